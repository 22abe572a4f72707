"""CUTLASS kernels as selection candidates: listed on sm90a only, picked only on a measured (GPU-timed) win from
<tuned dir>/<arch>/_backends.json, never on a model estimate, a stale or invalid decision, or the CPU runtime."""
import dataclasses
import json
import logging

import pytest
import torch

from dskc import compiler, knobs
from dskc.explain import kernel_table
from dskc.lower.passes import Options
from dskc.model import Transformer, get_config
from dskc.select import backends
from dskc.select.choose import RUNTIME_CUTLASS
from dskc.templates.cutlass.spaces import VERIFIED

WO = {"M": 64, "N": 256, "K": 256}            # tiny's attn.wo at the selection's token hint (m_hint 64); wq_a and
                                              # wkv_a run as one GEMM of the block (fuse_block_norms)
CFG = dict(VERIFIED["sm90_fp8_gemm_1d2d"][0])


@pytest.fixture(scope="module")
def model():
    return Transformer(get_config("tiny"), device="meta")


def _toolchain():
    import triton
    return {"triton": triton.__version__, "cuda": torch.version.cuda}


def entry(op="fp8_gemm_1d2d", problem=WO, backend="cutlass", stem="sm90_fp8_gemm_1d2d", config=CFG,
          triton_us=40.0, cutlass_us=30.0, mode="cuda-graph", toolchain=None):
    return {"op": op, "bucket": backends.bucket(problem, op), "backend": backend, "stem": stem, "config": dict(config),
            "triton_us": triton_us, "cutlass_us": cutlass_us, "timing_mode": mode,
            "meta": {"gpu": "NVIDIA H200", "toolchain": toolchain or _toolchain()}}


def write(root, *entries, raw=None):
    path = root / "sm90a" / "_backends.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": 1, "arch": "sm90a",
           "entries": {backends.entry_name(e["op"], e["bucket"]): e for e in entries}}
    path.write_text(raw if raw is not None else json.dumps(doc))
    return path


def plan_with(root, model, **kw):
    if "tokens" not in kw:
        kw.setdefault("m_hint", 64)           # one token bucket: the decisions below are for M = 64
    with knobs.scope(tuned_dir=root):
        return compiler.plan(model, "sm90a", **kw)


def by_region(p, region, stem_prefix=""):
    return [c for c in p.choices if c.region == region and (c.stem.startswith(stem_prefix) or not stem_prefix)]


def test_alternatives_listed_on_sm90a_only(model, tmp_path):
    p = plan_with(tmp_path, model)
    alts = {c.stem: c.alternatives for c in p.choices}
    assert alts["fp8_gemm_1d2d"] == ("sm90_fp8_gemm_1d2d",)
    # the head writes fp32 logits and the MoE's grouped GEMMs read their rows through the layout (the dense MLP's
    # runs in the one-expert mode): no CUTLASS kernel does either
    assert alts["bf16_gemm"] == () and alts["grouped_gemm"] == ()
    assert alts["act_quant"] == () and alts["mla_decode"] == ()
    bf16 = plan_with(tmp_path, Transformer(dataclasses.replace(get_config("tiny"), dtype="bf16"), device="meta"))
    assert {c.alternatives for c in bf16.choices if c.stem == "bf16_gemm" and c.region != "head"} == \
        {("sm90_bf16_gemm",)}
    assert all(c.backend == "triton" for c in p.choices)
    assert {c.why for c in p.choices if c.alternatives} == {"default: Triton (no measurement)"}
    assert "triton: default: Triton (no measurement)" in kernel_table(p)
    for target in ("sm100a", "sm80"):
        other = compiler.plan(model, target)
        assert all(c.alternatives == () and c.backend == "triton" and c.why == "" for c in other.choices), target


def test_gpu_timed_decision_switches_the_bucket_to_cutlass(model, tmp_path):
    path = write(tmp_path, entry())
    p = plan_with(tmp_path, model)
    picked = [c for c in p.choices if c.backend == "cutlass"]
    assert {c.region for c in picked} == {f"layers.{i}.attn.wo" for i in range(3)}
    c = picked[0]
    assert c.stem == "sm90_fp8_gemm_1d2d" and dict(c.config) == CFG and c.source == f"measured:{path}"
    assert c.triton[0] == "fp8_gemm_1d2d" and c.triton[2] == "default:sm90"
    assert dict(c.problem) == {**WO, "out_dtype": "bf16", "residual": 0} and c.slot == "gemm" and c.tokens == 64
    assert "cutlass 1.33x faster" in c.why and "cuda-graph" in c.why
    # the act_quant of the region and every other GEMM bucket stay on Triton
    assert all(x.backend == "triton" for x in p.choices if x.region == c.region and x is not c)
    assert all(x.backend == "triton" for x in p.choices if not x.region.endswith(".wo"))
    assert "cutlass: measured: cutlass 1.33x faster" in kernel_table(p)
    # the bucket rounds M up to a power of two: 40 tokens share the 64 bucket, 65 do not
    assert any(x.backend == "cutlass" for x in plan_with(tmp_path, model, m_hint=40).choices)
    assert all(x.backend == "triton" for x in plan_with(tmp_path, model, m_hint=65).choices)


@pytest.mark.parametrize("changes, why", [
    ({"mode": "model"}, "estimate only, not applied"),
    ({"backend": "triton", "triton_us": 30.0, "cutlass_us": 40.0}, "measured: triton 1.33x faster"),
    ({"toolchain": {"triton": "0.0.1-other"}}, "is stale: tuned with triton 0.0.1-other"),
    ({"config": {**CFG, "TILE_N": 256}}, "decided CUTLASS config invalid: constraint failed"),
])
def test_decisions_that_keep_triton(model, tmp_path, caplog, changes, why):
    write(tmp_path, entry(**changes))
    with caplog.at_level(logging.WARNING, logger="dskc.select"):
        p = plan_with(tmp_path, model)
    assert all(c.backend == "triton" for c in p.choices)
    wo = [c for c in by_region(p, "layers.0.attn.wo") if c.stem == "fp8_gemm_1d2d"][0]
    assert why in wo.why, wo.why
    assert why in kernel_table(p)


@pytest.mark.parametrize("raw, message", [
    ("{not json", "cannot be read"),
    (json.dumps({"format": 2, "entries": {}}), "expected a JSON object"),
    (json.dumps({"format": 1, "entries": {"x": {**entry(), "backend": "cuda"}}}), "backend 'cuda'"),
    (json.dumps({"format": 1, "entries": {"x": {k: v for k, v in entry().items() if k != "stem"}}}), "stem"),
])
def test_corrupt_decision_file_raises_naming_it(model, tmp_path, raw, message):
    path = write(tmp_path, raw=raw)
    with pytest.raises(backends.BackendFileError, match=message) as info:
        plan_with(tmp_path, model)
    assert str(path) in str(info.value)


def test_decision_inside_an_mlp_is_recorded_but_its_runtime_has_no_cutlass_path(model, tmp_path):
    opts = Options(fuse_block_norms=False)     # the dense MLP's w2 GEMM without the block's residual epilogue
    down = dict(next(c.problem for c in plan_with(tmp_path, model, options=opts).choices
                     if c.region == "layers.0.ffn" and c.slot == "down"))
    write(tmp_path, entry("fp8_gemm_1d2d", down))
    p = plan_with(tmp_path, model, options=opts)
    assert all(c.backend == "triton" for c in p.choices)
    mlp = [c for c in p.choices if c.region == "layers.0.ffn" and c.slot == "down"]
    assert mlp and all("no CUTLASS path in the mlp runtime module" in c.why for c in mlp)
    assert all(c.alternatives == () for c in p.choices if c.stem == "grouped_gemm")     # the MoE: none at all
    assert RUNTIME_CUTLASS == {compiler.Op.LINEAR, compiler.Op.FP8_LINEAR}


def test_cpu_runtime_never_picks_cutlass(model, tmp_path):
    write(tmp_path, entry())
    p = plan_with(tmp_path, model, runs_on="cpu")
    assert all(c.backend == "triton" for c in p.choices)
    wo = [c for c in by_region(p, "layers.0.attn.wo") if c.stem == "fp8_gemm_1d2d"][0]
    assert "CPU runtime (interpreter) cannot run CUTLASS" in wo.why
    with pytest.raises(ValueError, match="runs_on"):
        plan_with(tmp_path, model, runs_on="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU runtime's choice")
def test_compile_on_cpu_keeps_triton_and_explain_says_so(tmp_path):
    write(tmp_path, entry())
    torch.manual_seed(0)
    model = Transformer(get_config("tiny"))
    with knobs.scope(tuned_dir=tmp_path, triton_interpret=True):
        compiled = compiler.compile(model, build_kernels=False, progress=False, tokens=(64,))
    linears = [m for m in compiled.module.modules() if type(m).__name__ == "KernelLinear"]
    assert linears and all(m.cutlass is None for m in linears)
    assert "CPU runtime (interpreter) cannot run CUTLASS" in compiled.explain()


def test_cutlass_build_failure_goes_back_to_triton(model, tmp_path, monkeypatch):
    from dskc.build.nvcc import NvccFailure
    from dskc.templates import cutlass
    write(tmp_path, entry())
    p = plan_with(tmp_path, model)
    calls = []

    def failing(stem, config, arch="sm90a", problem=None):
        calls.append((stem, problem))
        return NvccFailure(stem, tuple(sorted(config.items())), "sm90a", "nvcc", "error: made up for the test")

    monkeypatch.setattr(cutlass, "build", failing)
    monkeypatch.setattr(compiler, "compile_kernels", lambda specs, arch: [])   # Triton builds are not under test
    compiler.build(p, progress=False)
    assert calls == [("sm90_fp8_gemm_1d2d", WO)]                     # one build for the three wo regions
    wo = [c for c in by_region(p, "layers.0.attn.wo") if c.stem == "fp8_gemm_1d2d"]
    assert len(wo) == 1 and wo[0].backend == "triton" and "failed to build (nvcc)" in wo[0].why
    assert wo[0].source == "default:sm90" and wo[0].triton == () and not p.libraries
    assert all(c.backend == "triton" for c in p.choices)


def test_cutlass_build_is_kept_for_the_runtime_and_explained(model, tmp_path, monkeypatch):
    from dskc.build.nvcc import NvccBuild
    from dskc.templates import cutlass
    write(tmp_path, entry())
    p = plan_with(tmp_path, model)
    fake = NvccBuild("sm90_fp8_gemm_1d2d", tuple(sorted(CFG.items())), "sm90a", "/nonexistent/lib.so", 167, 0, 0, 0,
                     0, ("QGMMA",), 0.0, True)
    monkeypatch.setattr(cutlass, "build", lambda stem, config, arch="sm90a", problem=None: fake)
    monkeypatch.setattr(compiler, "compile_kernels", lambda specs, arch: [])
    compiler.build(p, progress=False)
    assert list(p.libraries.values()) == [fake]
    assert compiler._cutlass_build(p, "layers.1.attn.wo") is fake
    assert compiler._cutlass_build(p, "layers.1.attn.wq_b") is None
    row = [line for line in kernel_table(p).splitlines() if line.startswith("layers.0.attn.wo ")
           and "sm90_fp8_gemm_1d2d" in line]
    assert len(row) == 1 and "167reg/0spill/QGMMA" in row[0] and "cutlass: measured" in row[0]


def test_kernel_linear_rejects_a_wrong_or_failed_build():
    from types import SimpleNamespace

    from dskc.build.nvcc import NvccFailure
    from dskc.ir.graph import Node, Op
    from dskc.runtime.modules import KernelLinear
    node = Node("lin", Op.LINEAR, (64, 128), "bf16")
    src = torch.nn.Linear(128, 64, bias=False, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs a sm90_bf16_gemm build"):
        KernelLinear(src, node, cutlass=SimpleNamespace(name="sm90_fp8_gemm_1d2d", ok=True))
    failed = NvccFailure("sm90_bf16_gemm", (), "sm90a", "nvcc", "boom")
    with pytest.raises((TypeError, ValueError)):
        KernelLinear(src, node, cutlass=failed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and nvcc)")
def test_kernel_linear_runs_cutlass_on_gpu():
    from dskc.ir.graph import Node, Op
    from dskc.model import quantize_weight
    from dskc.runtime.modules import KernelLinear
    from dskc.templates import cutlass
    n, k, m = 384, 512, 37
    built = cutlass.build("sm90_fp8_gemm_1d2d", CFG, "sm90a", {"M": m, "N": n, "K": k})
    assert built.ok, built
    w = torch.randn(n, k) * 0.05
    q, s = quantize_weight(w)
    src = torch.nn.Module()
    src.weight, src.scale = torch.nn.Parameter(q.cuda(), requires_grad=False), s.cuda()
    mod = KernelLinear(src, Node("lin", Op.FP8_LINEAR, (n, k), "fp8"), cutlass=built)
    x = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ (q.cuda().float().double() * s.cuda().double().repeat_interleave(128, 0)[:n]
                        .repeat_interleave(128, 1)).T
    y = mod(x)
    cos = torch.nn.functional.cosine_similarity(y.double().flatten(), ref.flatten(), dim=0)
    assert y.shape == (2, m, n) and torch.isfinite(y).all() and cos > 0.995, cos


@pytest.mark.parametrize("stem,problem,op", [
    ("grouped_gemm", {"dtype": "fp8", "layout": "masked"}, "fp8_grouped_gemm_1d2d"),
    ("grouped_gemm", {"dtype": "bf16"}, None),
    ("grouped_gemm", {"dtype": "fp8", "gather": "a"}, None),               # token rows read through the layout
    ("grouped_gemm", {"dtype": "fp8", "gather": "weight"}, None),
    ("grouped_gemm", {"dtype": "fp8", "rows_per_id": 0}, None),            # the dense MLP's one-expert mode
    ("fp8_gemm_1d2d", {"M": 64, "N": 256, "K": 256}, "fp8_gemm_1d2d"),
    ("fp8_gemm_1d2d", {"M": 64, "N": 256, "K": 256, "residual": 1}, None),  # the block's residual add
    ("bf16_gemm", {"M": 1, "N": 256, "K": 256}, "bf16_gemm"),
    ("bf16_gemm", {"M": 1, "N": 256, "K": 256, "out_dtype": "fp32"}, None),  # the head's fp32 logits
])
def test_no_cutlass_alternative_for_epilogues_or_row_maps_it_lacks(stem, problem, op):
    assert backends.cutlass_op(stem, problem) == op
