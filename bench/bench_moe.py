"""MoE grouped GEMM (stem grouped_gemm) on DeepGEMM's grouped shapes, next to torch._grouped_mm in the same run.

Run: `pytest bench/bench_moe.py --benchmark-enable` on a CUDA GPU. Per shape (REFERENCE.md section 3):
- "dskc_fp8": dskc.ops.moe.grouped_gemm_contiguous / grouped_gemm_masked, FP8 1D2D, the arch's default config;
- "dskc_bf16": the same kernel on bf16 operands;
- "grouped_mm": torch._grouped_mm on bf16 operands (offsets for the contiguous layout, batched for masked; it
  multiplies all M_max rows of each masked group, so it does the work of a full group).
extra_info holds tflops (useful rows only) and DeepGEMM's published H800 figure.
test_fused_moe times the whole DeepSeek-V3 MoE layer (E=256, D=7168, I=2048, top-8 of 8 groups keep 4, one shared
expert) at 1, 128 and 4096 tokens: dskc.ops.fused_moe in fp8 and bf16 next to `torch_moe`, the same block in plain
PyTorch on torch._grouped_mm (bf16). Without a GPU only the "smoke" case runs: a tiny grouped GEMM and a tiny
fused_moe (checked against torch_moe) through the Triton interpreter, so the bench cannot rot. Shapes, operand
builders and torch_moe are shared with `dskc bench --suite moe` (dskc.benchmark.moe).
"""
from __future__ import annotations

import pytest
import torch

from dskc import knobs
from dskc.benchmark.common import DEEPGEMM_GROUPED as DEEPGEMM  # (layout, G, M, N, K) -> published TFLOPS
from dskc.benchmark.moe import V3_ROUTE, torch_moe
from dskc.benchmark.moe import grouped_operands as _operands
from dskc.benchmark.moe import moe_layer as _moe_layer

HAS_GPU = torch.cuda.is_available()


def _impl(name, layout, g, m, n, k):
    """A zero-argument callable running `name` on fresh operands of one DeepGEMM shape on the GPU."""
    from dskc.ops import moe

    a, sa, b, sb = _operands(layout, g, m, n, k, name == "dskc_fp8", "cuda")
    out = torch.empty(*a.shape[:-1], n, dtype=torch.bfloat16, device="cuda")
    if name == "grouped_mm":
        bt = b.transpose(-2, -1)
        if layout == "contiguous":
            offs = torch.arange(1, g + 1, dtype=torch.int32, device="cuda") * m
            return lambda: torch._grouped_mm(a, bt, offs=offs, out_dtype=torch.bfloat16)
        return lambda: torch._grouped_mm(a, bt, out_dtype=torch.bfloat16)
    if layout == "contiguous":
        m_indices = torch.arange(g, dtype=torch.int32, device="cuda").repeat_interleave(m)
        return lambda: moe.grouped_gemm_contiguous(a, sa, b, sb, m_indices, out)
    masked_m = torch.full((g,), m, dtype=torch.int32, device="cuda")
    return lambda: moe.grouped_gemm_masked(a, sa, b, sb, masked_m, m, out)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="the grouped GEMM bench needs a CUDA GPU (sm_90a for fp8 tensor cores); "
                                        "the CPU runs only test_smoke")
@pytest.mark.parametrize("impl", ["dskc_fp8", "dskc_bf16", "grouped_mm"])
@pytest.mark.parametrize("shape", sorted(DEEPGEMM), ids=lambda s: "-".join(map(str, s)))
def test_grouped_gemm(benchmark, shape, impl):
    layout, g, m, n, k = shape
    fn = _impl(impl, layout, g, m, n, k)

    def run():
        fn()
        torch.cuda.synchronize()

    run()  # compile / warm up outside the timing
    benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)
    mean = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    benchmark.extra_info.update(impl=impl, layout=layout, tflops=2.0 * g * m * n * k / mean / 1e12,
                                deepgemm_h800_tflops=DEEPGEMM[shape])


@pytest.fixture(scope="module")
def v3_layer():
    """get(fp8) -> the V3 MoE layer's weights on the GPU; one set alive at a time (bf16 is 23 GB)."""
    held = {}

    def get(fp8):
        if fp8 not in held:
            held.clear()
            torch.cuda.empty_cache()
            held[fp8] = _moe_layer(256, 7168, 2048, fp8, "cuda")
        return held[fp8]
    yield get
    held.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="the MoE layer bench needs a CUDA GPU; the CPU runs only test_smoke")
@pytest.mark.parametrize("impl", ["dskc_fp8", "dskc_bf16", "torch_grouped_mm"])
@pytest.mark.parametrize("tokens", [1, 128, 4096])
def test_fused_moe(benchmark, v3_layer, tokens, impl):
    from dskc.ops import moe

    D, I = 7168, 2048
    gate, bias, w13, s13, w2, s2, shared = v3_layer(impl == "dskc_fp8")
    x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16)
    if impl == "torch_grouped_mm":
        fn = lambda: torch_moe(x, gate, bias, w13, w2, shared, **V3_ROUTE)  # noqa: E731
    else:
        fn = lambda: moe.fused_moe(x, gate, bias, w13, s13, w2, s2, shared=shared,  # noqa: E731
                                   score_func="sigmoid", **V3_ROUTE)

    def run():
        fn()
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=10, iterations=3, warmup_rounds=2)
    mean = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    flops = 2.0 * tokens * (V3_ROUTE["top_k"] + 1) * 3 * D * I
    benchmark.extra_info.update(impl=impl, tokens=tokens, tflops=flops / mean / 1e12)


@pytest.mark.skipif(not knobs.get().triton_interpret, reason="the smoke case runs through TRITON_INTERPRET=1")
def test_smoke(benchmark):
    """Tiny grouped GEMM and fused_moe through the interpreter: the bench's call paths stay correct."""
    from dskc.ops import moe

    a, sa, b, sb = _operands("contiguous", 2, 64, 72, 128, True, "cpu")
    m_indices = torch.arange(2, dtype=torch.int32).repeat_interleave(64)
    out = torch.full((128, 72), float("nan"), dtype=torch.float16)
    benchmark.pedantic(lambda: moe.grouped_gemm_contiguous(a, sa, b, sb, m_indices, out), rounds=1, iterations=1)
    deq_a = a.double() * sa.double().repeat_interleave(128, 1)
    deq_b = b.double() * sb.double()[:, :1]
    ref = torch.einsum("mk,mnk->mn", deq_a, deq_b[m_indices.long()])
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3
    gate, bias, w13, s13, w2, s2, shared = _moe_layer(16, 128, 128, False, "cpu")
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    route = dict(top_k=4, n_groups=4, n_limited_groups=2, route_scale=2.5)
    ref = torch_moe(x, gate, bias, w13, w2, shared, **route).double()
    half = {k: v.half() for k, v in shared.items()}   # the interpreter's bf16 tl.dot is wrong (triton #11584)
    y = moe.fused_moe(x.half(), gate, bias, w13.half(), None, w2.half(), None, shared=half, score_func="sigmoid",
                      config={"align": 16}, **route)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2
    benchmark.extra_info["label"] = "smoke"
