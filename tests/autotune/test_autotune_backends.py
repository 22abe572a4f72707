"""Triton vs CUTLASS per shape (autotune/backends.py): model-mode comparison and export on the CPU, the merge rules
of _backends.json, the CLI, and (GPU tier) a measured comparison."""
import json
import math

import pytest
import torch

from dskc import compiler, knobs
from dskc.autotune import backends
from dskc.autotune.cli import main
from dskc.model import Transformer, get_config
from dskc.select import backends as reader

PROBLEM = {"M": 64, "N": 256, "K": 256}      # tiny's attn.wo at m_hint 64 (its Triton kernel sits in the test cache)
BUCKET = {**PROBLEM, "out_dtype": "bf16", "residual": 0}    # its bucket: the stem's Problem, defaults filled in


@pytest.fixture(scope="module")
def model_entry():
    with knobs.scope(cache_dir=knobs.get().cache_dir):
        return backends.compare("fp8_gemm_1d2d", PROBLEM, "sm90a", timing="model", limit=3)


def test_model_comparison_ranks_but_is_labelled_an_estimate(model_entry):
    e = model_entry
    assert e["timing_mode"] == "model" and e["meta"]["gpu"] == "none (model)"
    assert e["op"] == "fp8_gemm_1d2d" and e["bucket"] == BUCKET and e["stem"] == "sm90_fp8_gemm_1d2d"
    assert len(e["meta"]["candidates"]) == 3
    times = [c["us"] for c in e["meta"]["candidates"]]
    assert all(t is not None and 0 < t < 1e4 for t in times)
    assert e["cutlass_us"] == pytest.approx(min(times)) and e["triton_us"] > 0
    assert e["backend"] == ("cutlass" if e["cutlass_us"] < e["triton_us"] else "triton")
    assert e["meta"]["triton_source"].startswith(("default:", "tuned:"))


def test_model_export_never_switches_the_compiler(model_entry, tmp_path):
    path = backends.export_decision(model_entry, "sm90a", tmp_path)
    assert path == tmp_path / "sm90a" / "_backends.json"
    assert reader.read_file(path)["entries"][reader.entry_name("fp8_gemm_1d2d", BUCKET)]["timing_mode"] == "model"
    with knobs.scope(tuned_dir=tmp_path):
        p = compiler.plan(Transformer(get_config("tiny"), device="meta"), "sm90a", m_hint=64)
    assert all(c.backend == "triton" for c in p.choices)
    assert any("estimate only, not applied" in c.why for c in p.choices)


def test_measured_entry_is_kept_over_a_model_one_and_replaces_it(model_entry, tmp_path):
    measured = {**model_entry, "timing_mode": "cuda-graph", "backend": "cutlass", "triton_us": 50.0,
                "cutlass_us": 20.0}
    path = backends.export_decision(model_entry, "sm90a", tmp_path)
    backends.export_decision(measured, "sm90a", tmp_path)
    backends.export_decision(model_entry, "sm90a", tmp_path)          # a later estimate does not overwrite
    entries = reader.read_file(path)["entries"]
    assert len(entries) == 1 and next(iter(entries.values()))["timing_mode"] == "cuda-graph"
    other = {**model_entry, "bucket": {**BUCKET, "M": 256}}
    backends.export_decision(other, "sm90a", tmp_path)                 # other buckets are merged in
    assert len(reader.read_file(path)["entries"]) == 2
    with knobs.scope(tuned_dir=tmp_path):
        p = compiler.plan(Transformer(get_config("tiny"), device="meta"), "sm90a", m_hint=64)
    assert {c.region for c in p.choices if c.backend == "cutlass"} == {f"layers.{i}.attn.wo" for i in range(3)}


def test_corrupt_existing_file_stops_the_export(model_entry, tmp_path):
    path = tmp_path / "sm90a" / "_backends.json"
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2")
    with pytest.raises(reader.BackendFileError, match="cannot be read"):
        backends.export_decision(model_entry, "sm90a", tmp_path)
    assert path.read_text() == "[1, 2"


def test_cutlass_model_estimate_follows_the_problem():
    cfg = {"TILE_M": 128, "TILE_N": 128, "TILE_K": 128, "CLUSTER_M": 1, "CLUSTER_N": 2, "SCHEDULE": "cooperative"}
    small = backends.cutlass_model_s("sm90_fp8_gemm_1d2d", {"M": 64, "N": 512, "K": 512}, cfg, "sm90a")
    big_p = {"M": 4096, "N": 7168, "K": 2048}
    big = backends.cutlass_model_s("sm90_fp8_gemm_1d2d", big_p, cfg, "sm90a")
    assert 0 < small < big and math.isfinite(big)
    assert big >= 2.0 * 4096 * 7168 * 2048 / 1979e12           # never faster than the FP8 tensor-core peak


def test_compare_rejects_what_it_cannot_compare():
    with pytest.raises(ValueError, match="no CUTLASS candidate"):
        backends.compare("fp8_gemm_1d2d", PROBLEM, "sm100a", timing="model")
    with pytest.raises(ValueError, match="timing"):
        backends.compare("fp8_gemm_1d2d", PROBLEM, "sm90a", timing="roofline")
    with pytest.raises(ValueError, match="no CUTLASS counterpart"):
        backends.compare("act_quant", {"M": 64, "K": 256}, "sm90a", timing="model")


def test_cli_compares_and_exports(tmp_path, capsys):
    args = ["--backends", "triton,cutlass", "--target", "sm90a", "--kernels", "fp8_gemm_1d2d", "--timing", "model",
            "--problem", json.dumps(PROBLEM), "--out", str(tmp_path), "--cutlass-candidates", "2"]
    with knobs.scope(cache_dir=knobs.get().cache_dir):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "fp8_gemm_1d2d" in out and "model" in out and "ESTIMATES" in out
    doc = json.loads((tmp_path / "sm90a" / "_backends.json").read_text())
    assert list(doc["entries"]) == [reader.entry_name("fp8_gemm_1d2d", BUCKET)]
    assert main(["--backends", "triton,cuda", "--target", "sm90a", "--problem", json.dumps(PROBLEM)]) == 2
    assert "--backends takes 'triton,cutlass'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and nvcc)")
def test_gpu_comparison_is_measured(tmp_path):
    problem = {"M": 256, "N": 1024, "K": 512}
    e = backends.compare("fp8_gemm_1d2d", problem, "sm90a", timing="gpu", limit=2)
    assert e["timing_mode"] in reader.MEASURED_MODES and e["meta"]["gpu"] != "none (model)"
    assert e["triton_us"] > 0 and e["cutlass_us"] is not None and e["cutlass_us"] > 0, e["meta"]["candidates"]
    path = backends.export_decision(e, "sm90a", tmp_path)
    d = reader.decide("fp8_gemm_1d2d", problem, "sm90a", root=tmp_path)
    assert d.backend == e["backend"] and str(path) in d.why
