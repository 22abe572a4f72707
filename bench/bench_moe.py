"""MoE grouped GEMM (stem grouped_gemm) on DeepGEMM's grouped shapes, next to torch._grouped_mm in the same run.

Run: `pytest bench/bench_moe.py --benchmark-enable` on a CUDA GPU. Per shape (REFERENCE.md section 3):
- "dskc_fp8": dskc.ops.moe.grouped_gemm_contiguous / grouped_gemm_masked, FP8 1D2D, the arch's default config;
- "dskc_bf16": the same kernel on bf16 operands;
- "grouped_mm": torch._grouped_mm on bf16 operands (offsets for the contiguous layout, batched for masked; it
  multiplies all M_max rows of each masked group, so it does the work of a full group).
extra_info holds tflops (useful rows only) and DeepGEMM's published H800 figure. Without a GPU only the "smoke"
case runs: a tiny grouped GEMM and a tiny fused_moe through the Triton interpreter, so the bench cannot rot.
"""
from __future__ import annotations

import pytest
import torch

from dskc import knobs

HAS_GPU = torch.cuda.is_available()
E4M3 = torch.float8_e4m3fn

# (layout, groups, M per group, N, K) -> DeepGEMM's published TFLOPS (H800 SXM5). Masked: M per group = M_max,
# every group full (masked_m = M_max), as in DeepGEMM's table.
DEEPGEMM = {("contiguous", 4, 8192, 4096, 7168): 1346, ("contiguous", 8, 4096, 7168, 2048): 1214,
            ("masked", 1, 1024, 4096, 7168): 1233, ("masked", 4, 256, 7168, 2048): 815}


def _operands(layout, g, m, n, k, fp8, device):
    rows = (g * m,) if layout == "contiguous" else (g, m)
    a = torch.randn(*rows, k, device=device) * 0.5
    b = torch.randn(g, n, k, device=device) * 0.5
    if not fp8:
        return a.to(torch.bfloat16), None, b.to(torch.bfloat16), None
    sa = torch.rand(*rows, k // 128, device=device) + 0.5
    sb = torch.rand(g, -(-n // 128), k // 128, device=device) + 0.5
    return a.to(E4M3), sa, b.to(E4M3), sb


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
    x = torch.randn(5, 128).half()
    w13, w2 = torch.randn(4, 256, 128).half() * 0.1, torch.randn(4, 128, 128).half() * 0.1
    y = moe.fused_moe(x, torch.randn(4, 128), None, w13, None, w2, None, top_k=2, n_groups=1, n_limited_groups=1,
                      score_func="softmax", route_scale=1.0)
    assert y.shape == x.shape and torch.isfinite(y).all()
    benchmark.extra_info["label"] = "smoke"
