"""MLA non-absorbed prefill (dskc.ops.mla.mla_prefill) against a float64 PyTorch reference."""
import math

import pytest
import torch

from dskc.ops import mla

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(q, k, v, cu_q, cu_k, scale, causal):
    t_q, h, _ = q.shape
    out = torch.zeros(t_q, h, v.shape[2], dtype=torch.float64)
    lse = torch.full((t_q, h), -math.inf, dtype=torch.float64)
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if qe == qs:
            continue
        s = torch.einsum("qhd,khd->hqk", q[qs:qe].double(), k[ks:ke].double()) * scale
        if causal:
            i = torch.arange(qe - qs)[:, None]
            j = torch.arange(ke - ks)[None, :]
            s = s.masked_fill(j > i + (ke - ks) - (qe - qs), -math.inf)
        row = torch.logsumexp(s, -1)
        p = torch.exp(s - row[..., None]).nan_to_num(0.0)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, v[ks:ke].double())
        lse[qs:qe] = row.T
    return out, lse


SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("lens_q,lens_k,heads,dtype,causal", [
    ([1, 37, 5], None, 2, torch.float16, True),
    ([20, 3], [29, 3], 3, torch.float16, True),     # continuing a cached prefix
    ([9, 0, 14], None, 1, torch.float32, False),
])
def test_prefill_matches_reference(lens_q, lens_k, heads, dtype, causal):
    g = torch.Generator().manual_seed(len(lens_q) * 10 + heads)
    lens_k = lens_k or lens_q
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, 192, generator=g).to(dtype)
    k = torch.randn(int(cu_k[-1]), heads, 192, generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), heads, 128, generator=g).to(dtype)
    out, lse = mla.mla_prefill(q, k, v, cu_q, 192 ** -0.5, causal, cu_seqlens_k=cu_k, config=SMALL)
    ref_out, ref_lse = reference(q, k, v, cu_q, cu_k, 192 ** -0.5, causal)
    atol = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=1e-3)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_prefill_writes_cache_in_same_launch(kv_format):
    g = torch.Generator().manual_seed(5)
    lens = [7, 12]
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    q = torch.randn(19, 2, 192, generator=g).half()
    k = torch.randn(19, 2, 192, generator=g).half()
    v = torch.randn(19, 2, 128, generator=g).half()
    lat = torch.randn(19, 512, generator=g).half()
    kr = torch.randn(19, 64, generator=g).half()
    bt = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    seq_ids = torch.repeat_interleave(torch.arange(2), torch.tensor(lens))
    pos = torch.cat([torch.arange(n) for n in lens])
    slots = mla.paged_slots(bt, seq_ids, pos, 8)
    width = 656 if kv_format == "fp8" else 576
    cache = torch.zeros(4, 8, 1, width, dtype=torch.uint8 if kv_format == "fp8" else torch.float16)
    if kv_format == "bf16":
        cache.fill_(float("nan"))
    out, _ = mla.mla_prefill(q, k, v, cu, 192 ** -0.5, True, kv_latent=lat, k_rope=kr, kv_cache=cache, slots=slots,
                             kv_format=kv_format, config=SMALL)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, cu, 192 ** -0.5, True)[0], atol=3e-3, rtol=1e-2)
    flat = cache.view(32, width)
    rows = flat[slots.long()]
    want = torch.cat([lat, kr], -1).double()
    if kv_format == "fp8":
        got = mla.dequantize_mla_cache_fp8(rows).double()
        cos = torch.nn.functional.cosine_similarity(got[:, :512], want[:, :512], dim=1)
        assert (cos > 0.995).all()
        torch.testing.assert_close(got[:, 512:], kr.double(), atol=2e-2, rtol=1e-2)  # stored as bf16
    else:
        torch.testing.assert_close(rows.double(), want)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots.long()] = False
    assert (flat[untouched] == 0).all() if kv_format == "fp8" else flat[untouched].isnan().all()


def test_prefill_bad_inputs():
    q = torch.randn(5, 2, 192).half()
    k = torch.randn(5, 2, 192).half()
    v = torch.randn(5, 2, 128).half()
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError):
        mla.mla_prefill(q, k, v[..., :96], cu, 0.1)                       # v width not a power of two
    with pytest.raises(ValueError):
        mla.mla_prefill(q[..., :176], k[..., :176], v, cu, 0.1)           # 176 = 128 + 48
    with pytest.raises(ValueError):
        mla.mla_prefill(q, k, v, torch.tensor([0, 4], dtype=torch.int32), 0.1)
    with pytest.raises(TypeError):
        mla.mla_prefill(q, k.float(), v, cu, 0.1)
    with pytest.raises(TypeError):
        mla.mla_prefill(q, k, v, cu.long(), 0.1)


@gpu
@pytest.mark.gpu
def test_prefill_bf16_gpu():
    g = torch.Generator().manual_seed(0)
    lens = [1, 300, 1000, 64]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    t = int(cu[-1])
    q, k = (torch.randn(t, 16, 192, generator=g).bfloat16() for _ in range(2))
    v = torch.randn(t, 16, 128, generator=g).bfloat16()
    out, lse = mla.mla_prefill(q.cuda(), k.cuda(), v.cuda(), cu.cuda(), 192 ** -0.5, True)
    ref_out, ref_lse = reference(q, k, v, cu, cu, 192 ** -0.5, True)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-2, rtol=1e-3)
