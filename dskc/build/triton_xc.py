"""Compile Triton kernels for a GPU that need not be present, and read what the compiler made of them.

`compile_kernels(specs, arch)` renders nothing itself: a spec names an importable @triton.jit kernel, its signature,
constexprs and launch options. Builds run in a subprocess without TRITON_INTERPRET (so the interpreter's kernels and
native builds never mix, and a crashing build cannot take the caller down), are cached by content, and yield a
`KernelReport`: registers, shared memory, spills, and the tensor-core instructions found in the SASS.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from dskc import knobs
from dskc.arch import Arch, parse
from dskc.build import cache

# Tensor-core instruction families in SASS: Hopper wgmma (GMMA), Blackwell tcgen05 (UTC*MMA), Ampere mma.sync (HMMA).
TENSOR_CORE_OPS = ("QGMMA", "HGMMA", "IGMMA", "BGMMA", "UTCQMMA", "UTCHMMA", "UTCIMMA", "UTCOMMA", "HMMA", "IMMA")
_ATTRS_VERSION = "ptr-div16+meta2"  # how the worker specialises arguments (and what it keeps); part of the key
_COUNTS = collections.Counter()  # builds actually run in this process (misses), for "warm path must not recompile"


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    module: str                       # importable module holding the kernel, e.g. "dskc.templates.triton.act_quant"
    kernel: str                       # attribute name of the @triton.jit function
    signature: tuple                  # ((arg, type), ...) with Triton type strings: "*fp8e4nv", "i32", "constexpr"
    constexprs: tuple                 # ((name, value), ...)
    num_warps: int = 4
    num_stages: int = 3
    unaligned: tuple = ()             # pointer arguments a launch may pass not 16-byte aligned (e.g. a view into a
                                      # stacked tensor): built without the 16-divisibility assumption

    @staticmethod
    def make(module, kernel, signature: dict, constexprs: dict, num_warps=4, num_stages=3,
             unaligned=()) -> "CompileSpec":
        return CompileSpec(module, kernel, tuple(signature.items()), tuple(sorted(constexprs.items())),
                           num_warps, num_stages, tuple(unaligned))

    @property
    def name(self) -> str:
        return f"{self.kernel}[{','.join(f'{k}={v}' for k, v in self.constexprs)};w{self.num_warps}s{self.num_stages}]"


@dataclasses.dataclass(frozen=True)
class KernelReport:
    name: str
    arch: str
    registers: int
    shared_bytes: int        # static + dynamic shared memory the launch needs
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    tensor_core_ops: tuple   # sorted distinct tensor-core SASS opcodes
    cubin: str               # path of the cached cubin
    metadata: str = ""       # path of Triton's metadata JSON beside it (what a launcher for the cubin needs)
    divisible_by_16: tuple = ()  # names of the arguments the cubin assumes 16-divisible (the pointers)

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class CompileError(RuntimeError):
    pass


def _source_hash(spec: CompileSpec) -> str:
    return _module_hash(spec.module)


@functools.lru_cache(maxsize=None)
def _module_hash(module: str) -> str:
    """The kernel module's source plus its private siblings (`_*.py` helpers it may import), so editing a shared
    helper invalidates every build that could use it. Read once per process (every cache lookup needs it)."""
    mod = importlib.import_module(module)
    path = Path(inspect.getsourcefile(mod))
    h = hashlib.sha256(path.read_bytes())
    for helper in sorted(path.parent.glob("_*.py")):
        h.update(helper.name.encode() + helper.read_bytes())
    h.update(_ATTRS_VERSION.encode())
    return h.hexdigest()


def toolchain() -> tuple:
    import triton
    return (("triton", triton.__version__),)


def _key(spec: CompileSpec, arch: Arch) -> cache.CacheKey:
    config = spec.constexprs + (("num_warps", spec.num_warps), ("num_stages", spec.num_stages),
                                ("signature", spec.signature))
    if spec.unaligned:
        config += (("unaligned", spec.unaligned),)
    return cache.CacheKey("triton", f"{spec.module}.{spec.kernel}", _source_hash(spec), config, arch.name, toolchain())


def compile_kernels(specs: list[CompileSpec], arch: str | Arch) -> list[KernelReport | CompileError]:
    """Compile each spec for `arch` (cached). A failing spec yields a CompileError in its slot, never a raise.

    Raises cache.CacheError when the build cache or the scratch folder cannot be written (no permission, the disk
    full): that is the machine's fault, not the kernel's. Processes compiling the same kernels at once build each
    one once: the misses are built under their cache keys' locks, after a second lookup."""
    arch = parse(arch)
    out: list = [None] * len(specs)
    todo = _fill_hits(specs, range(len(specs)), arch, out)
    if todo:
        with cache.lock([_key(specs[i], arch) for i in todo]):
            todo = _fill_hits(specs, todo, arch, out)     # built by another process while we waited
            if todo:
                cache.check_writable("triton")            # before a build is spent
                with _scratch() as workdir:               # the worker's files, gone once published
                    _publish_results(specs, todo, _run_worker([specs[i] for i in todo], arch, workdir), arch, out)
    return out


def _fill_hits(specs, indices, arch: Arch, out: list) -> list[int]:
    """Put the report of every cached spec among `indices` in `out`; return the indices still to build."""
    todo = []
    for i in indices:
        entry = cache.lookup(_key(specs[i], arch))
        if entry is not None:
            out[i] = _report_from(entry, specs[i], arch)
        else:
            todo.append(i)
    return todo


@contextlib.contextmanager
def _scratch():
    try:
        tmp = tempfile.TemporaryDirectory(prefix="dskc-xc-")
    except OSError as exc:
        raise cache.environment_error(exc, tempfile.gettempdir()) or exc
    with tmp as workdir:
        yield workdir


def _publish_results(specs, todo, results, arch: Arch, out: list) -> None:
    """Move each successful build into the cache and put its report (or the CompileError) in `out`."""
    for i, res in zip(todo, results):
        if "environment" in res:   # the worker could not write its files: no verdict on the kernel
            raise cache.CacheError(res["environment"])
        if "error" in res:
            out[i] = CompileError(f"{specs[i].name} for {arch}: {res['error']}")
            continue
        _COUNTS[arch.name] += 1

        def _publish(tmp: Path, res=res):
            for fname, src in res["files"].items():
                Path(tmp / fname).write_bytes(Path(src).read_bytes())
            return res["meta"]
        entry = cache.publish(_key(specs[i], arch), _publish)     # under the key's lock (compile_kernels)
        out[i] = _report_from(entry, specs[i], arch)


def build_count(arch: str | None = None) -> int:
    """Native builds this process ran (cache misses); 0 growth means a warm cache."""
    return _COUNTS[arch] if arch else sum(_COUNTS.values())


def report(spec: CompileSpec, arch: str | Arch = "sm90a") -> KernelReport:
    """Compile one kernel for `arch` and report its resources; raises CompileError if it does not build."""
    res = compile_kernels([spec], arch)[0]
    if isinstance(res, CompileError):
        raise res
    return res


def _report_from(entry: Path, spec: CompileSpec, arch: Arch) -> KernelReport:
    meta = cache.read_meta(entry)
    return KernelReport(name=spec.name, arch=arch.name, registers=meta["registers"], shared_bytes=meta["shared"],
                        stack_bytes=meta["stack"], spill_store_bytes=meta["spill_stores"],
                        spill_load_bytes=meta["spill_loads"], tensor_core_ops=tuple(meta["tensor_core_ops"]),
                        cubin=str(entry / "kernel.cubin"), metadata=str(entry / "kernel.json"),
                        divisible_by_16=tuple(meta.get("divisible_by_16", ())))


def _run_worker(specs: list[CompileSpec], arch: Arch, workdir: str) -> list[dict]:
    payload = json.dumps({"arch": [arch.cc, arch.suffix], "workdir": workdir,
                          "specs": [dataclasses.asdict(s) for s in specs]})
    try:
        proc = subprocess.run([sys.executable, "-m", "dskc.build._xc_worker"], input=payload, text=True,
                              capture_output=True, env=knobs.subprocess_env(interpret=False),
                              timeout=knobs.get().compile_timeout_s * max(1, len(specs)))
    except subprocess.TimeoutExpired:
        return [{"error": "build timed out"}] * len(specs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return [{"error": f"compiler process failed (rc {proc.returncode}): {tail}"}] * len(specs)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- parsing what ptxas / cuobjdump print (used by the worker) ----

def parse_resource_usage(text: str) -> dict:
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", text)
    if not m:
        raise CompileError(f"no resource usage in cuobjdump output: {text[:200]}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "static_shared": int(m.group(3))}


def parse_spills(ptxas_verbose: str) -> tuple[int, int]:
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_verbose)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def tensor_core_ops(sass: str) -> list[str]:
    found = set(re.findall(r"\b(" + "|".join(TENSOR_CORE_OPS) + r")\b", sass))
    return sorted(found)
