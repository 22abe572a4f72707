"""CUTLASS stems on a GPU: TFLOPS next to dskc's Triton stem and DeepGEMM's published H800 figures.

Run: `pytest bench/bench_cutlass.py --benchmark-enable` on an sm_90a GPU (skipped elsewhere, with the reason).
Each case records extra_info: tflops (CUTLASS default config), triton_tflops (the Triton stem's sm90 default, for
the dense FP8 GEMM), deepgemm_tflops (REFERENCE.md section 3, H800 SXM5, NVCC 12.8) and the ratio.
"""
from __future__ import annotations

import pytest
import torch

from dskc.benchmark.common import DEEPGEMM_DENSE, DEEPGEMM_GROUPED  # published H800 TFLOPS
from dskc.benchmark.measure import cuda_time_ms as _time_ms

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUTLASS benches need an sm_90a CUDA GPU")]

E4M3 = torch.float8_e4m3fn

# (M, N, K) -> DeepGEMM's published TFLOPS (dense, 1D2D): the subset the CUTLASS stem is compared on.
DENSE = {s: DEEPGEMM_DENSE[s] for s in ((64, 2112, 7168), (128, 7168, 16384), (4096, 2112, 7168),
                                         (4096, 24576, 1536), (4096, 7168, 16384), (4096, 4096, 7168))}
# (groups, rows per group, N, K) -> DeepGEMM's published TFLOPS (grouped, contiguous).
GROUPED = {key[1:]: v for key, v in DEEPGEMM_GROUPED.items() if key[0] == "contiguous"}


def _launcher(stem):
    from dskc.runtime import cutlass as rt
    from dskc.templates import cutlass

    res = cutlass.build(stem, cutlass.default_config(stem, "sm90a"), "sm90a")
    assert res.ok, res.message
    return rt.load(res)


def _fp8_operands(m, n, k, groups=None):
    dev = torch.device("cuda")
    a = torch.randn(m, k, device=dev).to(E4M3)
    sa = torch.rand(m, k // 128, device=dev) + 0.5
    b_shape = (n, k) if groups is None else (groups, n, k)
    b = torch.randn(*b_shape, device=dev).to(E4M3)
    sb = torch.rand(*b_shape[:-2], -(-n // 128), k // 128, device=dev) + 0.5
    return a, sa, b, sb


@pytest.mark.parametrize("shape", sorted(DENSE))
def test_fp8_dense(benchmark, shape):
    from dskc.templates import registry
    from dskc.templates.triton import fp8_gemm as triton_fp8

    m, n, k = shape
    gemm = _launcher("sm90_fp8_gemm_1d2d")
    a, sa, b, sb = _fp8_operands(m, n, k)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    flops = 2.0 * m * n * k
    cutlass_ms = _time_ms(lambda: gemm(a, sa, b, sb, out=out))
    cfg = registry.default_config("fp8_gemm_1d2d", "sm90a")
    triton_ms = _time_ms(lambda: triton_fp8.launch(a, sa, b, sb, out, cfg))
    benchmark.extra_info.update(tflops=flops / cutlass_ms / 1e9, triton_tflops=flops / triton_ms / 1e9,
                                deepgemm_tflops=DENSE[shape], vs_deepgemm=flops / cutlass_ms / 1e9 / DENSE[shape])
    benchmark(lambda: (gemm(a, sa, b, sb, out=out), torch.cuda.synchronize()))


@pytest.mark.parametrize("shape", sorted(GROUPED))
def test_fp8_grouped(benchmark, shape):
    groups, rows, n, k = shape
    gemm = _launcher("sm90_fp8_grouped_gemm_1d2d")
    a, sa, b, sb = _fp8_operands(groups * rows, n, k, groups)
    offs = torch.arange(1, groups + 1, device="cuda", dtype=torch.int32) * rows
    out = torch.empty(groups * rows, n, dtype=torch.bfloat16, device="cuda")
    flops = 2.0 * groups * rows * n * k
    ms = _time_ms(lambda: gemm(a, sa, b, sb, offs, out=out))
    benchmark.extra_info.update(tflops=flops / ms / 1e9, deepgemm_tflops=GROUPED[shape],
                                vs_deepgemm=flops / ms / 1e9 / GROUPED[shape])
    benchmark(lambda: (gemm(a, sa, b, sb, offs, out=out), torch.cuda.synchronize()))


@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (8192, 8192, 8192), (64, 7168, 2048)])
def test_bf16_dense(benchmark, shape):
    m, n, k = shape
    gemm = _launcher("sm90_bf16_gemm")
    a = torch.randn(m, k, device="cuda").bfloat16()
    b = torch.randn(n, k, device="cuda").bfloat16()
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    flops = 2.0 * m * n * k
    ms = _time_ms(lambda: gemm(a, b, out=out))
    torch_ms = _time_ms(lambda: torch.matmul(a, b.T, out=out))
    benchmark.extra_info.update(tflops=flops / ms / 1e9, torch_tflops=flops / torch_ms / 1e9)
    benchmark(lambda: (gemm(a, b, out=out), torch.cuda.synchronize()))
