"""Bad tuning data never reaches a launch: a broken export file is refused with an error naming it; a bad entry or
decision is ignored with one log line and the tuning-free config is selected instead (docs/reliability.md)."""
import json
import logging

import pytest
import torch

from dskc import compiler, knobs
from dskc.model import Transformer, get_config
from dskc.select import backends, tuned
from dskc.templates import registry

WO = {"M": 64, "N": 256, "K": 256, "out_dtype": "bf16"}      # tiny's attn.wo at 64 tokens
GOOD = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "SPLIT_K": 1, "UPCAST": 0, "num_warps": 4,
        "num_stages": 2}


@pytest.fixture(scope="module")
def model():
    return Transformer(get_config("tiny"), device="meta")


def _toolchain():
    import triton
    return {"triton": triton.__version__, "cuda": torch.version.cuda}


def _doc(config=GOOD, meta=None, **top):
    entry = {"bucket": {"M": 64, "N": 256, "K": 256, "out_dtype": "bf16"}, "config": config,
             "meta": {"toolchain": _toolchain(), "timing_mode": "model", "gpu": "none (model)", **(meta or {})}}
    return {"format": 1, "stem": "fp8_gemm_1d2d", "arch": "sm90a",
            "buckets": {"M": "pow2", "N": "exact", "K": "exact", "out_dtype": "exact"},
            "entries": {"M=64,N=256,K=256,out_dtype=bf16": entry}, **top}


def _write(root, doc=None, raw=None):
    path = root / "sm90a" / "fp8_gemm_1d2d.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw if raw is not None else json.dumps(doc))
    return path


def _wo(p):
    return next(c for c in p.choices if c.region == "layers.0.attn.wo" and c.slot == "gemm")


def _plan(root, model):
    with knobs.scope(tuned_dir=root):
        return compiler.plan(model, "sm90a", tokens=(64,))


def test_a_good_export_is_used(model, tmp_path):
    path = _write(tmp_path, _doc())
    c = _wo(_plan(tmp_path, model))
    assert dict(c.config) == GOOD and c.source == f"tuned:{path}"


@pytest.mark.parametrize("raw, message", [
    ('{"format": 1, "stem": "fp8_gemm_1d2d", "entr', "cannot be read"),                       # truncated
    ("\x00\x17garbage", "cannot be read"),                                                   # garbage
    (json.dumps(_doc(format=2)), "got format 2"),                                            # another version
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({**_doc(), "entries": {"x": {"bucket": {}, "config": GOOD}}}), "lacks bucket/config/meta"),
    (json.dumps(_doc(arch="sm100a")), "a file copied to the wrong place"),                  # another GPU's file
])
def test_a_broken_file_is_refused_naming_it(model, tmp_path, raw, message):
    path = _write(tmp_path, raw=raw)
    with pytest.raises(tuned.TunedFileError, match=message) as info:
        _plan(tmp_path, model)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("config, meta, why", [
    (GOOD, {"toolchain": {"triton": "0.0.1"}}, "tuned with triton 0.0.1"),                   # another toolchain
    ({**GOOD, "BLOCK_Q": 4}, None, "its config has parameters"),                              # unknown parameter
    ({k: v for k, v in GOOD.items() if k != "GROUP_M"}, None, "its config has parameters"),   # missing one
    ({**GOOD, "BLOCK_M": 48}, None, "values outside the stem's space: BLOCK_M=48"),
    ({**GOOD, "SPLIT_K": 8}, None, "breaks the stem's constraints ['SPLIT_K <= K // BLOCK_K']"),
])
def test_a_bad_entry_is_ignored_with_one_log_line(model, tmp_path, caplog, config, meta, why):
    _write(tmp_path, _doc(config, meta))
    with caplog.at_level(logging.WARNING, logger="dskc.select"):
        c = _wo(_plan(tmp_path, model))
        _plan(tmp_path, model)                                                               # asked again: no new line
    assert c.source == "default:sm90"
    assert dict(c.config) == registry.default_config("fp8_gemm_1d2d", "sm90a", registry.problem("fp8_gemm_1d2d", WO))
    lines = [r.message for r in caplog.records if why in r.message]
    assert len(lines) == 1, [r.message for r in caplog.records]


def test_a_measurement_from_another_gpu_is_ignored(model, tmp_path, caplog, monkeypatch):
    _write(tmp_path, _doc(meta={"timing_mode": "cuda-graph", "gpu": "NVIDIA A100-SXM4-80GB"}))
    monkeypatch.setattr(tuned, "current_gpu", lambda: "NVIDIA H200")
    with caplog.at_level(logging.WARNING, logger="dskc.select"):
        c = _wo(_plan(tmp_path, model))
    assert c.source == "default:sm90"
    assert any("measured on NVIDIA A100-SXM4-80GB, this GPU is NVIDIA H200" in r.message for r in caplog.records)
    monkeypatch.setattr(tuned, "current_gpu", lambda: "NVIDIA A100-SXM4-80GB")   # the same GPU: used
    assert _wo(_plan(tmp_path, model)).source.startswith("tuned:")


def test_a_backend_decision_naming_an_unknown_kernel_is_ignored(model, tmp_path, caplog):
    from dskc.templates.cutlass.spaces import VERIFIED

    entry = {"op": "fp8_gemm_1d2d", "bucket": backends.bucket(WO, "fp8_gemm_1d2d"), "backend": "cutlass",
             "stem": "sm90_fp8_gemm_9d9d", "config": dict(VERIFIED["sm90_fp8_gemm_1d2d"][0]), "triton_us": 40.0,
             "cutlass_us": 30.0, "timing_mode": "cuda-graph", "meta": {"gpu": "NVIDIA H200", "toolchain": _toolchain()}}
    path = tmp_path / "sm90a" / "_backends.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "arch": "sm90a",
                                "entries": {backends.entry_name("fp8_gemm_1d2d", entry["bucket"]): entry}}))
    with caplog.at_level(logging.WARNING, logger="dskc.select"):
        p = _plan(tmp_path, model)
    assert all(c.backend == "triton" for c in p.choices)
    assert "decided CUTLASS kernel 'sm90_fp8_gemm_9d9d' unknown" in _wo(p).why
    assert sum("does not exist" in r.message for r in caplog.records) == 1
