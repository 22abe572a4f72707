"""dskc.compat.flash_mla: FlashMLA's call sequence gives the attention FlashMLA documents."""
import math

import pytest
import torch

from dskc.compat import flash_mla
from dskc.ops import mla


def reference(q, cache_f64, block_table, seqlens, scale, causal):
    b, s_q, h, _ = q.shape
    page = cache_f64.shape[1]
    out = torch.zeros(b, s_q, h, 512, dtype=torch.float64)
    lse = torch.full((b, h, s_q), -math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(seqlens[i])
        idx = torch.arange(n)
        k = cache_f64[block_table[i, idx // page].long(), idx % page, 0]
        s = torch.einsum("shd,nd->shn", q[i].double(), k) * scale
        if causal:
            s = s.masked_fill(idx[None, None, :] > (n - s_q + torch.arange(s_q))[:, None, None], -math.inf)
        row_lse = torch.logsumexp(s, -1)
        out[i] = torch.exp(s - row_lse[..., None]).nan_to_num(0.0) @ k[:, :512]
        lse[i] = row_lse.T
    return out, lse


@pytest.mark.parametrize("fp8", [False, True])
def test_flashmla_call_sequence(fp8):
    g = torch.Generator().manual_seed(17 + fp8)
    b, s_q, h_q, page = 2, 2, 4, 64
    seqlens = torch.tensor([70, 9], dtype=torch.int32)
    block_table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)
    kv = torch.randn(4, page, 1, 576, generator=g)
    q = torch.randn(b, s_q, h_q, 576, generator=g).half()
    if fp8:
        cache = mla.quantize_mla_cache_fp8(kv).view(torch.float8_e4m3fn)   # FlashMLA hands fp8 bytes
        cache_f64 = mla.dequantize_mla_cache_fp8(cache.view(torch.uint8)).double()
    else:
        cache = kv.half()
        cache_f64 = cache.double()
    tile_md, num_splits = flash_mla.get_mla_metadata(seqlens, s_q * h_q, 1)
    assert tile_md.dtype == torch.int32 and tile_md.shape[1] == 8 and tuple(num_splits.shape) == (b + 1,)
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache, block_table, seqlens, 512, tile_md, num_splits,
                                                causal=True, is_fp8_kvcache=fp8)
    ref_out, ref_lse = reference(q, cache_f64, block_table, seqlens, 576 ** -0.5, True)
    torch.testing.assert_close(out.double(), ref_out, atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=1e-3)


def test_flashmla_rejects_what_it_cannot_do():
    seqlens = torch.tensor([5], dtype=torch.int32)
    tile_md, num_splits = flash_mla.get_mla_metadata(seqlens, 16, 1)
    q = torch.randn(1, 1, 16, 576).half()
    cache = torch.randn(1, 64, 1, 576).half()
    bt = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError):
        flash_mla.flash_mla_with_kvcache(q, cache, bt, seqlens, 128, tile_md, num_splits)
    with pytest.raises(NotImplementedError):
        flash_mla.flash_mla_with_kvcache(q, cache, bt, seqlens, 512, tile_md, num_splits,
                                         indices=torch.zeros(1, 1, 8, dtype=torch.int32))
    with pytest.raises(NotImplementedError):
        flash_mla.get_mla_metadata(seqlens, 16, 1, topk=2048)
    with pytest.raises(ValueError):
        flash_mla.get_mla_metadata(seqlens, 16, 2)
