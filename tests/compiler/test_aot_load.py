"""Loading a `dskc compile --out DIR` build: `dskc.compiler.load`, `dskc run --from DIR`, and the runtime hook
that makes Triton launch the shipped cubins instead of compiling (dskc.runtime.aot).

No GPU here: the hook is exercised through Triton's own argument binder and specialisation for an sm_90 target in
a subprocess without the interpreter (tests/compiler/_aot_probe.py); the model runs through the interpreter. The
GPU test at the end runs the whole thing natively and asserts that nothing compiled.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dskc import cli, compiler, knobs
from dskc.build import aot
from dskc.model import Transformer, get_config, init_random

PROBE = Path(__file__).with_name("_aot_probe.py")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "tiny-sm90a"
    assert cli.main(["compile", "--model", "tiny", "--target", "sm90a", "--out", str(out), "--tokens", "1,16,128"]) == 0
    return out


def _probe(out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(PROBE), str(out)], capture_output=True, text=True,
                          env=knobs.subprocess_env(interpret=False), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_manifest_ships_metadata_and_launch_specialisation(tiny_dir):
    manifest = aot.verify(tiny_dir)
    triton_kernels = [k for k in manifest["kernels"] if k.get("backend", "triton") == "triton"]
    assert triton_kernels
    for k in triton_kernels:
        meta = json.loads((tiny_dir / k["metadata"]).read_text())
        launch = k["launch"]
        assert meta["name"] == launch["function"] and meta["num_warps"] == launch["num_warps"]
        assert meta["target"]["arch"] == 90
        pointers = {n for n, t in launch["signature"].items() if t.startswith("*")}
        # every pointer but a stacked SwiGLU weight's up scales (a view: CompileSpec.unaligned) is 16-divisible
        assert set(launch["divisible_by_16"]) <= pointers and pointers - set(launch["divisible_by_16"]) <= {"sbu_ptr"}


def test_shipped_cubins_serve_the_launches_triton_would_compile(tiny_dir):
    res = _probe(tiny_dir)
    assert res["serving"], res["reason"]
    rows = res["rows"]
    assert len(rows) == len([k for k in aot.verify(tiny_dir)["kernels"] if k.get("backend", "triton") == "triton"])
    bad = [r for r in rows if not (r["served"] and r["name_ok"] and r["cubin_ok"])]
    assert bad == [], bad
    # a launch the cubin was not built for goes to Triton's compile: a misaligned pointer, another constexpr
    assert all(r["misaligned_compiles"] for r in rows)
    assert all(r.get("other_constexpr_compiles", True) for r in rows)
    assert res["served"] == len(rows)


def test_a_build_from_another_triton_serves_nothing(tiny_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["toolchain"] = {"triton": "0.0.0"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = _probe(other)
    assert not res["serving"] and "0.0.0" in res["reason"]
    assert res["served"] == 0 and all(not r["served"] for r in res["rows"])


def test_load_runs_the_same_kernels_as_compile(tiny_dir):
    cfg = get_config("tiny")
    model = Transformer(cfg)
    init_random(model, seed=1)
    loaded = compiler.load(model, tiny_dir)
    assert loaded.plan.fallbacks == [] and not loaded.aot.serving   # the interpreter runs them here
    fresh = compiler.compile(model, "sm90a", build_kernels=False, progress=False, tokens=(1, 16, 128))
    assert {(c.region, c.stem, c.config) for c in loaded.plan.choices} == \
        {(c.region, c.stem, c.config) for c in fresh.plan.choices}
    tok = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = loaded(tok, 0), fresh(tok, 0)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_load_refuses_another_model_and_bad_directories(tiny_dir, tmp_path):
    other = Transformer(get_config("tiny", n_layers=2), device="meta")
    with pytest.raises(ValueError, match="another model: n_layers"):
        compiler.load(other, tiny_dir)
    with pytest.raises(ValueError, match="no manifest.json"):
        compiler.load(other, tmp_path)
    old = tmp_path / "old"
    shutil.copytree(tiny_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(dict(manifest, version=1)))
    with pytest.raises(ValueError, match="manifest version 1"):
        aot.verify(old)
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / manifest["kernels"][0]["metadata"]).unlink()
    with pytest.raises(ValueError, match="missing"):
        aot.verify(old)
    (old / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        aot.verify(old)


def test_run_cli_from_dir_and_bad_input(tiny_dir, capsys):
    assert cli.main(["run", "--from", str(tiny_dir), "--prompt-lens", "3", "2", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert f"loaded from {tiny_dir}" in out and "fallbacks: 0" in out
    assert len(re.findall(r"prompt \d \(\d tokens\) -> \[\d+, \d+\]", out)) == 2
    assert cli.main(["run", "--from", str(tiny_dir), "--model", "tiny"]) == 2
    assert "give one" in capsys.readouterr().err
    assert cli.main(["run", "--from", str(tiny_dir / "nope")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_from_dir_compiles_nothing(tmp_path):
    from dskc.arch import detect

    out = tmp_path / "tiny"
    assert cli.main(["compile", "--model", "tiny", "--target", detect().name, "--out", str(out)]) == 0
    proc = subprocess.run([sys.executable, "-m", "dskc", "run", "--from", str(out), "--new-tokens", "4"],
                          capture_output=True, text=True, env=knobs.subprocess_env(interpret=False), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"(\d+) served, (\d+) compiled here", proc.stdout)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) == 0, proc.stdout[-3000:]
