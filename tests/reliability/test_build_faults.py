"""Faults in the build path: processes racing on one cache, damaged cache entries and shipped directories, a cache
that cannot be written, the disk full. Each is detected, rebuilt or refused with a clear message; a kernel whose
bytes do not match what was built is never handed on (nor launched: test_aot_tamper_after_verify).

Kernels: the autotuner tests' probe stem (an fp16 tiled dot), cross-compiled for sm_90a (no GPU needed).
"""
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import probe_stem
from dskc import cli, knobs
from dskc.arch import parse
from dskc.build import _xc_worker, aot, cache, triton_xc

AUTOTUNE_TESTS = Path(__file__).parents[1] / "autotune"     # probe_stem.py (conftest.py puts it on sys.path)
PROBLEM = {"M": 77, "N": 190, "K": 128}
CONFIGS = [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
           for m, n in ((16, 32), (16, 64), (32, 32), (32, 64), (64, 32))]


def _specs(configs=CONFIGS):
    return [probe_stem.compile_specs(PROBLEM, c)[0] for c in configs]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(entry: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir())}


def _leftovers(root: Path) -> list:
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".trash-"))]


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache holding the five probe kernels; tests copy it before damaging anything."""
    root = tmp_path_factory.mktemp("warm") / "cache"
    with knobs.scope(cache_dir=root):
        reports = triton_xc.compile_kernels(_specs(), "sm90a")
    assert all(isinstance(r, triton_xc.KernelReport) for r in reports), reports
    return root, {r.name: _files(Path(r.cubin).parent) for r in reports}


def _copy_of(warm, tmp_path) -> Path:
    shutil.copytree(warm[0], tmp_path / "cache")
    return tmp_path / "cache"


# ---- four processes, one cache ----

_RACER = """
import hashlib, json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import probe_stem
from dskc.arch import parse
from dskc.build import cache, triton_xc
configs = json.loads(sys.argv[2])
specs = [probe_stem.compile_specs({"M": 77, "N": 190, "K": 128}, c)[0] for c in configs]
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.002)
if os.environ.get("ROLE") == "reader":   # read every entry the moment it appears, until all are there
    keys, seen, deadline = [triton_xc._key(s, parse("sm90a")) for s in specs], {}, time.monotonic() + 240
    while len(seen) < len(keys) and time.monotonic() < deadline:
        for k in keys:
            entry = cache.lookup(k)
            if entry is not None and k not in seen:
                files = json.loads((entry / "manifest.json").read_text())["files"]
                seen[k] = {n: hashlib.sha256(cache.read_verified(entry, n)).hexdigest() for n in files}
    print(json.dumps({"seen": len(seen)}))
else:
    reports = triton_xc.compile_kernels(specs, "sm90a")
    cubins = [hashlib.sha256(cache.read_verified(Path(r.cubin).parent, "kernel.cubin")).hexdigest() for r in reports]
    print(json.dumps({"builds": triton_xc.build_count(), "reports": [r.as_dict() for r in reports], "cubins": cubins}))
"""


def test_four_processes_build_each_kernel_once_and_nobody_reads_half_a_file(tmp_path, worker_env):
    go, root = tmp_path / "go", tmp_path / "cache"
    configs = json.dumps(CONFIGS[:2])
    env = {**worker_env, "DSKC_CACHE_DIR": str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(go), configs, str(AUTOTUNE_TESTS)],
                              env={**env, "ROLE": role}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ("builder",) * 4 + ("reader",)]
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    builders, reader = outs[:4], outs[4]
    print(f"builds per process: {[o['builds'] for o in builders]}; reader saw {reader['seen']} whole entries")
    assert sum(o["builds"] for o in builders) == 2                 # each kernel built once, by one process
    assert all(o["reports"] == builders[0]["reports"] and o["cubins"] == builders[0]["cubins"] for o in builders)
    assert reader["seen"] == 2                                     # every entry it found was whole and verified
    assert _leftovers(root) == []


# ---- a damaged cache entry ----

def _truncate(entry):
    data = (entry / "kernel.cubin").read_bytes()
    (entry / "kernel.cubin").write_bytes(data[: len(data) // 2])


def _flip(entry, name="kernel.cubin"):
    data = bytearray((entry / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (entry / name).write_bytes(bytes(data))


def _manifest_hash(entry):
    doc = json.loads((entry / cache.MANIFEST).read_text())
    doc["files"]["kernel.cubin"] = "0" * 64
    (entry / cache.MANIFEST).write_text(json.dumps(doc))


def _manifest_garbage(entry):
    (entry / cache.MANIFEST).write_text('{"files": ')


DAMAGE = {"truncated cubin": _truncate, "flipped byte in the cubin": _flip,
          "flipped byte in the metadata": lambda e: _flip(e, "kernel.json"),
          "manifest hash does not match": _manifest_hash, "manifest not JSON": _manifest_garbage}


def test_damaged_cache_entries_are_detected_and_rebuilt(warm, tmp_path, caplog):
    root = _copy_of(warm, tmp_path)
    with knobs.scope(cache_dir=root):
        reports = triton_xc.compile_kernels(_specs(), "sm90a")
        for damage, r in zip(DAMAGE.values(), reports):
            damage(Path(r.cubin).parent)
        before = triton_xc.build_count()
        with caplog.at_level(logging.WARNING, logger="dskc.build"):
            again = triton_xc.compile_kernels(_specs(), "sm90a")
    assert triton_xc.build_count() - before == len(DAMAGE)            # each damaged entry rebuilt, once
    assert caplog.text.count("does not match its manifest") == len(DAMAGE)
    assert [r.as_dict() for r in again] == [r.as_dict() for r in reports]
    for r in again:                                                 # the rebuilt files are the original bytes
        assert _files(Path(r.cubin).parent) == warm[1][r.name]
    assert _leftovers(root) == []


# ---- a damaged `dskc compile --out` directory ----

@pytest.fixture
def shipped(warm, tmp_path, monkeypatch):
    """An AOT directory written by aot.write for a plan of two probe kernels (probe_stem stands in for a
    registered stem), and the reports it was written from."""
    from dskc.templates import registry

    get = registry.get
    monkeypatch.setattr(registry, "get", lambda stem: probe_stem if stem == probe_stem.STEM else get(stem))
    root = _copy_of(warm, tmp_path)
    with knobs.scope(cache_dir=root):
        reports = triton_xc.compile_kernels(_specs(CONFIGS[:2]), "sm90a")
    plan = SimpleNamespace(target=parse("sm90a"), choices=[], fallbacks=[], libraries={},
                           reports={(probe_stem.STEM, tuple(PROBLEM.items()), tuple(c.items())): [r]
                                    for c, r in zip(CONFIGS, reports)})
    out = tmp_path / "out"
    aot.write(plan, out)
    return out, plan, reports


def _edit_manifest(out, change):
    doc = json.loads((out / "manifest.json").read_text())
    change(doc["kernels"][0])
    (out / "manifest.json").write_text(json.dumps(doc))


SHIPPED_DAMAGE = {
    "truncated cubin": (lambda out, k: _truncate_file(out / k["file"]), "does not match its manifest hash"),
    "flipped byte in the cubin": (lambda out, k: _flip_file(out / k["file"]), "does not match its manifest hash"),
    "flipped byte in the metadata": (lambda out, k: _flip_file(out / k["metadata"]), "does not match"),
    "manifest hash does not match": (lambda out, k: _edit_manifest(out, lambda r: r.update(sha256="0" * 64)),
                                     "does not match its manifest hash"),
    "file outside the directory": (lambda out, k: _edit_manifest(out, lambda r: r.update(file="../manifest.json")),
                                   "outside"),
    "record without its launch": (lambda out, k: _edit_manifest(out, lambda r: r.pop("launch")), "malformed"),
    "file missing": (lambda out, k: (out / k["file"]).unlink(), "missing"),
}


def _truncate_file(path):
    path.write_bytes(path.read_bytes()[:100])


def _flip_file(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(SHIPPED_DAMAGE))
def test_a_damaged_shipped_directory_is_refused(shipped, damage, capsys):
    out = shipped[0]
    kernel = aot.verify(out)["kernels"][0]
    hurt, message = SHIPPED_DAMAGE[damage]
    hurt(out, kernel)
    with pytest.raises(ValueError, match=message):
        aot.verify(out)
    assert cli.main(["run", "--from", str(out)]) == 2                # `dskc run --from` refuses it, one line
    assert message.split()[0] in capsys.readouterr().err


def test_aot_write_refuses_a_cache_file_changed_since_its_build(shipped, tmp_path):
    _, plan, reports = shipped
    _flip_file(Path(reports[1].cubin))
    with pytest.raises(cache.CacheError, match="changed since it was built"):
        aot.write(plan, tmp_path / "out2")
    assert not (tmp_path / "out2" / "manifest.json").exists()


_TAMPER = """
import json, sys
sys.path.insert(0, sys.argv[2])
from triton.compiler.compiler import CompiledKernel
from _aot_probe import TARGET, _src
from dskc.runtime import aot
out = sys.argv[1]
installed = aot.install(out)                      # verifies every file, then hooks the JIT functions
compiled = []
rows = []
for h in installed.hooks:
    h.original = lambda src, target=None, options=None, h=h, **kw: compiled.append(h.fn.__name__)
    e = h.entries[0]
    path = f"{out}/{e['file']}"
    good = open(path, "rb").read()
    bad = bytearray(good); bad[len(bad) // 2] ^= 1
    open(path, "wb").write(bytes(bad))            # changed after verify, before the first launch loads it
    src, options = _src(h.fn, e["launch"])
    tampered = h(src, target=TARGET, options=options)
    open(path, "wb").write(good)
    restored = h(src, target=TARGET, options=options)
    rows.append({"tampered_served": isinstance(tampered, CompiledKernel),
                 "restored_served": isinstance(restored, CompiledKernel) and restored.kernel == good})
print(json.dumps({"rows": rows, "compiled": len(compiled), "misses": installed.stats.misses}))
"""


def test_aot_tamper_after_verify_is_never_launched(shipped):
    out = shipped[0]
    proc = subprocess.run([sys.executable, "-c", _TAMPER, str(out), str(Path(__file__).parents[1] / "compiler")],
                          capture_output=True, text=True, env=knobs.subprocess_env(interpret=False), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rows"] == [{"tampered_served": False, "restored_served": True}]
    assert res["compiled"] == 1 and "changed since" in res["misses"][0][1]


# ---- a cache that cannot be written ----

_READ_ONLY = """
import json, sys
sys.path.insert(0, sys.argv[1])
import probe_stem
from dskc.build import cache, triton_xc
p = {"M": 77, "N": 190, "K": 128}
warm = probe_stem.compile_specs(p, json.loads(sys.argv[2]))[0]
cold = probe_stem.compile_specs(p, json.loads(sys.argv[3]))[0]
(hit,) = triton_xc.compile_kernels([warm], "sm90a")
try:
    triton_xc.compile_kernels([cold], "sm90a")
    error = None
except cache.CacheError as exc:
    error = str(exc)
print(json.dumps({"hit": hit.name, "builds": triton_xc.build_count(), "error": error}))
"""


def test_a_read_only_cache_serves_hits_and_refuses_misses_clearly(warm, tmp_path, worker_env):
    """Real permissions: the cache folder made read-only. Root ignores permission bits, so as root the check runs
    with CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER dropped from its bounding set (setpriv): still uid 0,
    but bound by the owner's r-x bits like any user."""
    root = _copy_of(warm, tmp_path)
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    cmd = [sys.executable, "-c", _READ_ONLY, str(AUTOTUNE_TESTS), json.dumps(CONFIGS[0]),
           json.dumps({**CONFIGS[0], "num_stages": 3})]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: the mocked test below covers an unwritable cache")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"] + cmd
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**worker_env, "DSKC_CACHE_DIR": str(root)})
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    if proc.returncode != 0 and "setpriv" in proc.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["builds"] == 0                                       # the hit was served; the miss built nothing
    assert "not writable" in res["error"] and "DSKC_CACHE_DIR" in res["error"]


def test_an_unwritable_cache_is_a_clear_error_mocked(warm, tmp_path, monkeypatch):
    """The same refusal where permissions cannot be dropped: every attempt to create a folder in the cache fails
    with EACCES (as it would for a user without write permission)."""
    root = _copy_of(warm, tmp_path)

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
    monkeypatch.setattr(cache.tempfile, "mkdtemp", denied)
    with knobs.scope(cache_dir=root):
        before = triton_xc.build_count()
        (hit,) = triton_xc.compile_kernels(_specs(CONFIGS[:1]), "sm90a")
        with pytest.raises(cache.CacheError, match="not writable.*DSKC_CACHE_DIR"):
            triton_xc.compile_kernels(_specs([{**CONFIGS[0], "num_stages": 3}]), "sm90a")
        with pytest.raises(cache.CacheError, match="not writable"):
            cache.get_or_build(cache.CacheKey("cutlass", "k", "s", (), "sm90a", ()), lambda d: {})
    assert isinstance(hit, triton_xc.KernelReport) and triton_xc.build_count() == before


# ---- the disk full ----

def test_disk_full_while_publishing_is_a_clear_error_and_leaves_nothing(warm, tmp_path, monkeypatch):
    root = _copy_of(warm, tmp_path)
    real_write = Path.write_bytes

    def full(self, data):
        if root in self.parents:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)
    cold = _specs([{**CONFIGS[1], "num_stages": 3}])
    with knobs.scope(cache_dir=root):
        monkeypatch.setattr(Path, "write_bytes", full)
        with pytest.raises(cache.CacheError, match="the disk is full"):
            triton_xc.compile_kernels(cold, "sm90a")
        assert cache.lookup(triton_xc._key(cold[0], parse("sm90a"))) is None and _leftovers(root) == []
        monkeypatch.setattr(Path, "write_bytes", real_write)       # space again: the same call builds it
        (report,) = triton_xc.compile_kernels(cold, "sm90a")
    assert isinstance(report, triton_xc.KernelReport) and report.registers > 0


def test_disk_full_writing_a_manifest(tmp_path, monkeypatch):
    real_write = Path.write_text

    def full(self, *a, **kw):
        if self.name == cache.MANIFEST:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, *a, **kw)
    monkeypatch.setattr(Path, "write_text", full)
    key = cache.CacheKey("cutlass", "k", "s", (), "sm90a", ())
    with knobs.scope(cache_dir=tmp_path), pytest.raises(cache.CacheError, match="the disk is full"):
        cache.get_or_build(key, lambda d: (d / "kernel.so").write_bytes(b"x") and {})
    assert not (tmp_path / "cutlass" / key.digest()).exists() and _leftovers(tmp_path) == []


def test_disk_full_in_the_build_scratch_folder_is_no_verdict_on_the_kernel(monkeypatch, tmp_path):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "k.ptx")
    monkeypatch.setattr(_xc_worker, "_compile_one", full)
    (res,) = _xc_worker.compile_all({"arch": [90, "a"], "workdir": str(tmp_path), "specs": [{}]})
    assert "environment" in res and "error" not in res
    with pytest.raises(cache.CacheError, match="No space left"):
        triton_xc._publish_results(_specs(CONFIGS[:1]), [0], [res], parse("sm90a"), [None])


def test_nvcc_out_of_space_is_a_cache_error_not_a_failed_kernel(tmp_path):
    from dskc.build import nvcc

    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'Cuda compilation tools, V13.0.88'; exit 0; }\n"
                    "echo \"$FAKE_NVCC_SAYS\" >&2; exit 1\n")
    fake.chmod(0o755)
    job = nvcc.NvccJob("k", (("X", 1),), "int main() {}", arch="sm90a")
    with knobs.scope(cache_dir=tmp_path / "cache", nvcc=str(fake)):
        os.environ["FAKE_NVCC_SAYS"] = "kernel.cu(1): error: expected a ';'"
        try:
            (res,) = nvcc.build_many([job], progress=False)
            assert not res.ok and res.stage == "nvcc" and "expected a ';'" in res.message   # the kernel's fault
            os.environ["FAKE_NVCC_SAYS"] = f"ptxas fatal: kernel.so: {os.strerror(errno.ENOSPC)}"
            with pytest.raises(cache.CacheError, match="the disk is full"):                 # the machine's
                nvcc.build_many([job], progress=False)
        finally:
            del os.environ["FAKE_NVCC_SAYS"]
