"""MLA absorbed decode (dskc.ops.mla.mla_decode) against a float64 PyTorch reference of the same math."""
import math

import pytest
import torch

from dskc.ops import mla

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, BLOCK_DV=256, num_warps=4, num_stages=1)  # many tiles -> many splits


def dequant_fp8_tokens(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 656] -> float64 [..., 576]: 512 e4m3 * per-128 fp32 scale | 64 bf16 rope."""
    lead = raw.shape[:-1]
    lat = raw[..., :512].contiguous().view(torch.float8_e4m3fn).double().reshape(*lead, 4, 128)
    scale = raw[..., 512:528].contiguous().view(torch.float32).double().reshape(*lead, 4, 1)
    rope = raw[..., 528:].contiguous().view(torch.bfloat16).double()
    return torch.cat([(lat * scale).reshape(*lead, 512), rope], -1)


def reference(q, cache, block_table, seqlens, scale, causal, kv_format):
    """Gather each sequence's tokens through the block table and do softmax attention in float64."""
    b, s_q, h, _ = q.shape
    page = cache.shape[1]
    tokens = dequant_fp8_tokens(cache[:, :, 0]) if kv_format == "fp8" else cache[:, :, 0].double()
    out = torch.zeros(b, s_q, h, 512, dtype=torch.float64)
    lse = torch.full((b, h, s_q), -math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(seqlens[i])
        if n == 0:
            continue
        idx = torch.arange(n)
        k = tokens[block_table[i, idx // page].long(), idx % page]
        s = torch.einsum("shd,nd->shn", q[i].double().cpu(), k) * scale
        if causal:
            limit = n - s_q + torch.arange(s_q)
            s = s.masked_fill(idx[None, None, :] > limit[:, None, None], -math.inf)
        row_lse = torch.logsumexp(s, -1)
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)
        out[i] = p @ k[:, :512]
        lse[i] = row_lse.T
    return out, lse


def make_case(b, s_q, h, page, seqlens, dtype, kv_format, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(math.ceil(n / page) for n in seqlens) + 1)
    num_blocks = b * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[: b * max_blocks]
    block_table = perm.reshape(b, max_blocks).to(torch.int32)           # pages out of order
    kv = torch.randn(num_blocks, page, 1, 576, generator=g)
    if kv_format == "fp8":
        cache = mla.quantize_mla_cache_fp8(kv * 0.5)
    else:
        cache = kv.to(dtype)
    q = torch.randn(b, s_q, h, 576, generator=g).to(dtype)
    seq = torch.tensor(seqlens, dtype=torch.int32)
    return q.to(device), cache.to(device), block_table.to(device), seq.to(device)


CASES = [
    # (h_q, s_q, page, seqlens, dtype, kv_format, causal, config)
    (1, 1, 16, [1, 37, 16], torch.float16, "bf16", False, SMALL),
    (3, 2, 16, [53, 2, 30], torch.float16, "bf16", True, SMALL),
    (3, 1, 256, [77], torch.float32, "bf16", False, None),
    (16, 1, 64, [5, 100], torch.float16, "fp8", False, None),
    (16, 2, 16, [1, 45, 19], torch.float16, "fp8", True, SMALL),
    (128, 1, 16, [9, 21], torch.float16, "bf16", False, None),
]


@pytest.mark.parametrize("h_q,s_q,page,seqlens,dtype,kv_format,causal,config", CASES)
def test_decode_matches_reference(h_q, s_q, page, seqlens, dtype, kv_format, causal, config):
    q, cache, bt, seq = make_case(len(seqlens), s_q, h_q, page, seqlens, dtype, kv_format, seed=h_q * 7 + s_q)
    scale = 576 ** -0.5
    out, lse = mla.mla_decode(q, cache, bt, seq, scale, causal=causal, kv_format=kv_format, config=config)
    ref_out, ref_lse = reference(q, cache, bt, seq, scale, causal, kv_format)
    assert out.shape == (len(seqlens), s_q, h_q, 512) and out.dtype == dtype
    assert lse.shape == (len(seqlens), h_q, s_q) and lse.dtype == torch.float32
    atol = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=1e-3)


def test_zero_length_and_causal_empty_rows():
    """seqlen 0 -> out 0, lse -inf; with s_q=2 causal and seqlen 1, query 0 sees no key."""
    q, cache, bt, seq = make_case(3, 2, 4, 16, [0, 1, 20], torch.float16, "bf16", seed=3)
    out, lse = mla.mla_decode(q, cache, bt, seq, 0.1, causal=True, config=SMALL)
    ref_out, ref_lse = reference(q, cache, bt, seq, 0.1, True, "bf16")
    assert not out.isnan().any()
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    assert (out[1, 0] == 0).all() and (lse[1, :, 0] == -math.inf).all()
    torch.testing.assert_close(out.double(), ref_out, atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


def test_metadata_reuse_and_forced_splits():
    """Metadata made once serves two calls; 7 parts over a ragged batch split sequences across programs."""
    q, cache, bt, seq = make_case(3, 1, 5, 16, [70, 3, 44], torch.float16, "bf16", seed=11)
    meta = mla.get_mla_metadata(seq, 5, 1, block_m=16, block_n=16, num_parts=7)
    assert int(meta.num_splits[-1]) > 3   # at least one sequence really is split
    ref_out, ref_lse = reference(q, cache, bt, seq, 0.07, False, "bf16")
    for _ in range(2):
        out, lse = mla.mla_decode(q, cache, bt, seq, 0.07, metadata=meta, config=SMALL)
        torch.testing.assert_close(out.double(), ref_out, atol=3e-3, rtol=1e-2)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("parts", [1, 3, 13])
def test_schedule_covers_every_tile_once(parts):
    """Pure schedule check: the parts' tile ranges tile each sequence exactly, split counts agree."""
    g = torch.Generator().manual_seed(parts)
    seq = torch.randint(0, 300, (9,), generator=g, dtype=torch.int32)
    seq[2] = 0
    meta = mla.get_mla_metadata(seq, 16, 1, block_m=64, block_n=32, num_parts=parts)
    n = [(int(x) + 31) // 32 for x in seq]
    seen = [[0] * k for k in n]
    pieces = [0] * len(n)
    for row in meta.tile_scheduler_metadata.tolist():
        b0, t0, b1, t1 = row[:4]
        for b in range(b0, b1 + 1):
            lo, hi = (t0 if b == b0 else 0), (t1 if b == b1 else n[b])
            if lo < hi:
                pieces[b] += 1
                for t in range(lo, hi):
                    seen[b][t] += 1
    assert all(all(c == 1 for c in s) for s in seen)
    cum = meta.num_splits.tolist()
    assert cum[0] == 0 and [cum[i + 1] - cum[i] for i in range(len(n))] == pieces


def _bad_inputs():
    q, cache, bt, seq = make_case(2, 1, 2, 16, [10, 20], torch.float16, "bf16", seed=5)
    return q, cache, bt, seq


@pytest.mark.parametrize("mutate,err", [
    (lambda a: a.update(q=a["q"][..., :512]), ValueError),
    (lambda a: a.update(cache=a["cache"][..., :512].contiguous()), ValueError),
    (lambda a: a.update(seq=torch.tensor([10, 10_000], dtype=torch.int32)), ValueError),
    (lambda a: a.update(seq=torch.tensor([10, -1], dtype=torch.int32)), ValueError),
    (lambda a: a["bt"].__setitem__((1, 0), -3), ValueError),
    (lambda a: a["bt"].__setitem__((0, 0), 10_000), ValueError),
    (lambda a: a.update(bt=a["bt"].long()), TypeError),
    (lambda a: a.update(seq=a["seq"].long()), TypeError),
    (lambda a: a.update(cache=a["cache"].float()), TypeError),
    (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError),
])
def test_bad_input_raises_before_launch(mutate, err):
    q, cache, bt, seq = _bad_inputs()
    args = dict(q=q, cache=cache, bt=bt, seq=seq)
    mutate(args)
    with pytest.raises(err):
        mla.mla_decode(args["q"], args["cache"], args["bt"], args["seq"], 0.1)


def test_unused_block_table_entries_may_hold_garbage():
    """Entries past a sequence's last page are never read, so -1 there is fine."""
    q, cache, bt, seq = make_case(2, 1, 2, 16, [10, 20], torch.float16, "bf16", seed=8)
    bt[0, 1:] = -1
    out, lse = mla.mla_decode(q, cache, bt, seq, 0.1, config=SMALL)
    ref_out, _ = reference(q, cache, bt.clamp_min(0), seq, 0.1, False, "bf16")
    torch.testing.assert_close(out.double(), ref_out, atol=3e-3, rtol=1e-2)


def test_fp8_pack_roundtrip():
    x = torch.randn(5, 3, 576) * 3
    packed = mla.quantize_mla_cache_fp8(x)
    assert packed.shape == (5, 3, 656) and packed.dtype == torch.uint8
    back = dequant_fp8_tokens(packed)
    rel = (back[..., :512] - x[..., :512].double()).norm() / x[..., :512].double().norm()
    assert rel < 0.05
    torch.testing.assert_close(back[..., 512:], x[..., 512:].bfloat16().double())
    torch.testing.assert_close(mla.dequantize_mla_cache_fp8(packed).double(), back)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("h_q,s_q,kv_format", [(16, 1, "bf16"), (128, 2, "bf16"), (64, 1, "fp8"), (128, 2, "fp8")])
def test_decode_bf16_gpu(h_q, s_q, kv_format):
    seqlens = [1, 300, 1025, 64, 0, 777]
    q, cache, bt, seq = make_case(len(seqlens), s_q, h_q, 64, seqlens, torch.bfloat16, kv_format, seed=h_q,
                                  device="cuda")
    out, lse = mla.mla_decode(q, cache, bt, seq, 576 ** -0.5, causal=s_q > 1, kv_format=kv_format)
    ref_out, ref_lse = reference(q.cpu(), cache.cpu(), bt.cpu(), seq.cpu(), 576 ** -0.5, s_q > 1, kv_format)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-2, rtol=1e-3)
