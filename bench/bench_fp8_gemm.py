"""Dense FP8 1D2D GEMM (stem fp8_gemm_1d2d) on DeepGEMM's shape table, next to PyTorch in the same run.

Run: `pytest bench/bench_fp8_gemm.py --benchmark-enable` on a CUDA GPU. Per shape (REFERENCE.md section 3):
- "dskc": dskc.ops.fp8_gemm with the arch's default config (block-scaled, promotion every 128 of K);
- "scaled_mm": torch._scaled_mm with row-wise scales (cuBLASLt fp8; coarser scaling than 1D2D, so an upper
  reference rather than the same computation);
- "bf16": torch.matmul on bf16 operands of the same shape.
extra_info holds tflops and DeepGEMM's published H800 figure. Without a GPU only the "smoke" case runs: one tiny
shape through the Triton interpreter (TRITON_INTERPRET=1), so the bench code cannot rot.
"""
from __future__ import annotations

import pytest
import torch

from dskc import knobs

HAS_GPU = torch.cuda.is_available()
E4M3 = torch.float8_e4m3fn

# (M, N, K) -> DeepGEMM's published TFLOPS (dense 1D2D, H800 SXM5, NVCC 12.8).
DEEPGEMM = {(64, 2112, 7168): 206, (64, 24576, 1536): 289, (64, 7168, 16384): 336, (128, 7168, 16384): 645,
            (128, 4096, 7168): 533, (4096, 2112, 7168): 1127, (4096, 24576, 1536): 1212,
            (4096, 7168, 16384): 1520, (4096, 4096, 7168): 1410, (4096, 7168, 2048): 1168}


def _operands(m, n, k, device):
    a = (torch.randn(m, k, device=device) * 0.5).to(E4M3)
    sa = torch.rand(m, k // 128, device=device) + 0.5
    b = (torch.randn(n, k, device=device) * 0.5).to(E4M3)
    sb = torch.rand(-(-n // 128), k // 128, device=device) + 0.5
    return a, sa, b, sb


def _impl(name, m, n, k):
    """A zero-argument callable running `name` on fresh operands of shape (m, n, k) on the GPU."""
    from dskc.ops import fp8_gemm

    a, sa, b, sb = _operands(m, n, k, "cuda")
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    if name == "dskc":
        return lambda: fp8_gemm(a, sa, b, sb, out=out)
    if name == "scaled_mm":
        row, col = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        return lambda: torch._scaled_mm(a, b.t(), scale_a=row, scale_b=col, out_dtype=torch.bfloat16)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    return lambda: torch.matmul(a16, b16.t(), out=out)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="the FP8 GEMM bench needs a CUDA GPU (sm_90a for fp8 tensor cores); "
                                        "the CPU runs only test_smoke")
@pytest.mark.parametrize("impl", ["dskc", "scaled_mm", "bf16"])
@pytest.mark.parametrize("shape", sorted(DEEPGEMM))
def test_fp8_gemm(benchmark, shape, impl):
    m, n, k = shape
    fn = _impl(impl, m, n, k)

    def run():
        fn()
        torch.cuda.synchronize()

    run()  # compile / warm up outside the timing
    benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)
    mean = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    benchmark.extra_info.update(impl=impl, tflops=2.0 * m * n * k / mean / 1e12, deepgemm_h800_tflops=DEEPGEMM[shape])


@pytest.mark.skipif(not knobs.get().triton_interpret, reason="the smoke case runs through TRITON_INTERPRET=1")
def test_smoke(benchmark):
    """Tiny shape through the interpreter: the bench's call path and its result stay correct."""
    from dskc.ops import fp8_gemm

    a, sa, b, sb = _operands(3, 72, 128, "cpu")
    out = torch.full((3, 72), float("nan"), dtype=torch.bfloat16)
    benchmark.pedantic(lambda: fp8_gemm(a, sa, b, sb, out=out), rounds=1, iterations=1)
    ref = (a.double() * sa.double().repeat_interleave(128, 1)) @ (b.double() * sb.double()[:1]).T
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2
    benchmark.extra_info["label"] = "smoke"
