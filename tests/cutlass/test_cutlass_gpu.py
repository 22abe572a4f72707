"""GPU tier: the CUTLASS kernels against plain-PyTorch references (float32 dequantized math)."""
from __future__ import annotations

import pytest
import torch

from dskc.runtime import cutlass as rt
from dskc.templates import cutlass

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sm_90a)")]

E4M3 = torch.float8_e4m3fn


def _diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: 0 for identical tensors, ~1e-4 for a good FP8 GEMM."""
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def _quant_rows(x: torch.Tensor):
    """1x128 activation quantization: per row per 128 columns, scale = amax / 448."""
    m, k = x.shape
    blocks = x.view(m, k // 128, 128)
    scale = blocks.abs().amax(-1).clamp(min=1e-4) / 448
    return (blocks / scale.unsqueeze(-1)).view(m, k).to(E4M3), scale.float().contiguous()


def _quant_blocks(w: torch.Tensor):
    """128x128 weight quantization (N padded up to a multiple of 128 for the scales)."""
    n, k = w.shape
    nb = -(-n // 128)
    padded = torch.nn.functional.pad(w, (0, 0, 0, nb * 128 - n))
    blocks = padded.view(nb, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448
    q = (blocks / scale[:, None, :, None]).view(nb * 128, k)[:n].to(E4M3)
    return q.contiguous(), scale.float().contiguous()


def _dequant_rows(q, s):
    return (q.float().view(q.shape[0], -1, 128) * s.unsqueeze(-1)).view(q.shape)


def _dequant_blocks(q, s):
    n, k = q.shape
    full = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    return q.float() * full


def _build(stem):
    res = cutlass.build(stem, cutlass.default_config(stem, "sm90a"), "sm90a")
    assert res.ok, res.message
    return rt.load(res)


@pytest.mark.parametrize("sizes,n,k", [((0, 1, 127, 300, 0, 45), 520, 768), ((256, 128, 512, 64), 2048, 7168)])
def test_fp8_grouped(sizes, n, k):
    gemm = _build("sm90_fp8_grouped_gemm_1d2d")
    dev = torch.device("cuda")
    t, g = sum(sizes), len(sizes)
    a, sa = _quant_rows(torch.randn(t, k, device=dev))
    qb = [_quant_blocks(torch.randn(n, k, device=dev)) for _ in range(g)]
    b, sb = torch.stack([q for q, _ in qb]), torch.stack([s for _, s in qb])
    offs = torch.tensor(sizes, device=dev).cumsum(0).to(torch.int32)
    out = torch.full((t, n), float("nan"), dtype=torch.bfloat16, device=dev)
    gemm(a, sa, b, sb, offs, out=out)
    torch.cuda.synchronize()
    ref = torch.empty(t, n, device=dev)
    start = 0
    for i, size in enumerate(sizes):
        rows = slice(start, start + size)
        ref[rows] = _dequant_rows(a[rows], sa[rows]) @ _dequant_blocks(b[i], sb[i]).T
        start += size
    assert not out.isnan().any()
    assert _diff(out.float(), ref) < 1e-3


@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (65, 520, 256), (257, 7168, 2048)])
def test_fp8_dense(m, n, k):
    gemm = _build("sm90_fp8_gemm_1d2d")
    dev = torch.device("cuda")
    a, sa = _quant_rows(torch.randn(m, k, device=dev))
    b, sb = _quant_blocks(torch.randn(n, k, device=dev))
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=dev)
    gemm(a, sa, b, sb, out=out)
    torch.cuda.synchronize()
    ref = _dequant_rows(a, sa) @ _dequant_blocks(b, sb).T
    assert not out.isnan().any()
    assert _diff(out.float(), ref) < 1e-3


@pytest.mark.parametrize("m,n,k,atol,rtol", [(1, 1032, 776, 2e-2, 2e-2), (77, 4096, 4096, 5e-2, 2e-2),
                                             (1024, 520, 136, 2e-2, 2e-2)])
def test_bf16_dense(m, n, k, atol, rtol):
    gemm = _build("sm90_bf16_gemm")
    dev = torch.device("cuda")
    a, b = torch.randn(m, k, device=dev).bfloat16(), torch.randn(n, k, device=dev).bfloat16()
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=dev)
    gemm(a, b, out=out)
    torch.cuda.synchronize()
    ref = a.double() @ b.double().T
    scale = k ** 0.5
    torch.testing.assert_close(out.double() / scale, ref / scale, atol=atol, rtol=rtol)
