"""Dense FP8 1D2D GEMM (stem fp8_gemm_1d2d) on DeepGEMM's shape table, next to PyTorch in the same run.

Run: `pytest bench/bench_fp8_gemm.py --benchmark-enable` on a CUDA GPU. Per shape (REFERENCE.md section 3):
- "dskc": dskc.ops.fp8_gemm with the arch's default config (block-scaled, promotion every 128 of K);
- "scaled_mm": torch._scaled_mm with row-wise scales (cuBLASLt fp8; coarser scaling than 1D2D, so an upper
  reference rather than the same computation);
- "bf16": torch.matmul on bf16 operands of the same shape.
extra_info holds tflops and DeepGEMM's published H800 figure. Shapes and operand builders are shared with
`dskc bench --suite gemm` (dskc.benchmark), which also runs torch.compile and writes JSON + plots. Without a GPU only the "smoke" case runs: one tiny
shape through the Triton interpreter (TRITON_INTERPRET=1), so the bench code cannot rot.
"""
from __future__ import annotations

import pytest
import torch

from dskc import knobs
from dskc.benchmark.common import DEEPGEMM_DENSE as DEEPGEMM  # (M, N, K) -> published TFLOPS, H800 SXM5
from dskc.benchmark.gemm import fp8_operands as _operands

HAS_GPU = torch.cuda.is_available()


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
