"""Property-based tests of dskc.ops' MLA attention: get_mla_metadata, mla_decode, mla_prefill (its cache write
checked as in test_fuzz_mla_cache.py). References: attention over the gathered tokens in float64, the split
schedule walked in Python."""
import math

import pytest
import torch
from hypothesis import strategies as st

from _fuzz import (DEV, FLOATS, HALF, INTERP, SEEDS, TIERS, fault_or_none, generator, needs_kernels, run,
                   sometimes)
from dskc.ops import mla
from dskc.templates.triton import mla_decode as dec
from dskc.templates.triton import mla_prefill as pre
from test_fuzz_mla_cache import check_cache_rows

pytestmark = [needs_kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
ATT_DTYPES = (*HALF, torch.float32)          # tl.dot operands: bf16 is wrong under the interpreter
FP32_ATOL = 1e-4 if INTERP else 5e-3         # fp32 dots run as TF32 on a GPU


# ---------------------------------------------------------------- get_mla_metadata

@st.composite
def metadata_cases(draw):
    fault = draw(fault_or_none(["seqlens dtype", "heads_k", "rows 0", "parts 0"], tenths=2))
    b = draw(st.integers(0, 12))
    seqlens = torch.tensor([draw(st.one_of(st.just(0), st.integers(1, 70), st.integers(0, 20000)))
                            for _ in range(b)], dtype=torch.int32)
    kw = dict(block_n=draw(st.sampled_from([16, 32, 64])), num_parts=draw(st.one_of(st.none(), st.integers(1, 200))),
              overhead_tiles=draw(st.integers(0, 8)))
    rows, heads_k, expect = draw(st.integers(1, 256)), 1, ValueError
    if fault == "seqlens dtype":
        seqlens, expect = seqlens.long(), TypeError
    elif fault == "heads_k":
        heads_k = 2
    elif fault == "rows 0":
        rows = 0
    elif fault == "parts 0":
        kw["num_parts"] = 0
    else:
        expect = None
    return seqlens.to(DEV), rows, heads_k, kw, expect


def walk_schedule(md, seqlens):
    """Per batch, the (first tile, end tile, split index) pieces the split kernel will run for this metadata."""
    meta, cum = md.tile_scheduler_metadata.cpu().tolist(), md.num_splits.cpu().tolist()
    n = [max(0, -(-s // md.block_n)) for s in seqlens.cpu().tolist()]
    pieces = [[] for _ in n]
    for begin_b, begin_t, end_b, end_t, begin_split, block_n, *_ in meta:
        assert block_n == md.block_n
        for b in range(begin_b, end_b + 1):
            lo = begin_t if b == begin_b else 0
            hi = end_t if b == end_b else n[b]
            if lo < hi:
                pieces[b].append((lo, hi, begin_split if b == begin_b else 0))
    return n, pieces, cum


def check_get_mla_metadata(fz, case):
    seqlens, rows, heads_k, kw, expect = case
    if expect is not None:
        with fz.refused(expect):
            mla.get_mla_metadata(seqlens, rows, heads_k, **kw)
        return
    fz.in_contract()
    md = mla.get_mla_metadata(seqlens, rows, heads_k, **kw)
    n, pieces, cum = walk_schedule(md, seqlens)
    assert len(cum) == len(n) + 1 and cum[0] == 0
    for b, tiles in enumerate(n):
        got = sorted(pieces[b])
        assert cum[b + 1] - cum[b] == len(got), f"batch {b}: {cum[b + 1] - cum[b]} splits, {len(got)} pieces"
        assert [p[2] for p in got] == list(range(len(got))), f"batch {b}: split indices {got}"
        edges = [0] + [hi for _, hi, _ in got]
        assert [lo for lo, _, _ in got] == edges[:-1] and edges[-1] == tiles, f"batch {b}: tiles {got} of {tiles}"


@pytest.mark.parametrize("examples", TIERS)
def test_get_mla_metadata(examples, fuzz):
    run(check_get_mla_metadata, examples, fuzz, case=metadata_cases())


# ---------------------------------------------------------------- mla_decode (and the FP8 cache format)

def gathered(cache, kv_format, block_table, seqlens, dtype):
    """Per batch: float64 [seqlen, 576] tokens through the block table (FP8 tokens rounded to the query's dtype, as
    the kernel dequantises them)."""
    page = cache.shape[1]
    if kv_format == "fp8":
        tokens = mla.dequantize_mla_cache_fp8(cache[:, :, 0]).to(dtype).double()
    else:
        tokens = cache[:, :, 0].double()
    out = []
    for i, n in enumerate(seqlens.tolist()):
        idx = torch.arange(n)
        out.append(tokens[block_table[i, idx // page].long(), idx % page])
    return out


def attention64(q, keys, scale, causal):
    """q [s_q, h, 576], keys [n, 576] -> (out [s_q, h, 512], lse [h, s_q]) in float64; out 0 / lse -inf when empty."""
    s_q, h, _ = q.shape
    n = keys.shape[0]
    if n == 0:
        return torch.zeros(s_q, h, 512, dtype=torch.float64), torch.full((h, s_q), -math.inf, dtype=torch.float64)
    s = torch.einsum("shd,nd->shn", q.double(), keys) * scale
    if causal:
        limit = n - s_q + torch.arange(s_q)
        s = s.masked_fill(torch.arange(n)[None, None, :] > limit[:, None, None], -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ keys[:, :512], lse.T


@st.composite
def decode_cases(draw):
    fault = draw(fault_or_none(["seqlen > capacity", "negative seqlen", "page id", "unchecked page ids",
                                "unchecked page ids", "unchecked seqlens", "unchecked seqlens", "h_q", "q width",
                                "cache dtype", "fp8 with fp32 q", "softmax_scale", "block_table dtype",
                                "metadata rows"], tenths=3))
    b, s_q = draw(st.integers(1, 3)), draw(st.sampled_from([1, 1, 2, 3]))
    h_q = draw(st.one_of(st.sampled_from([1, 2, 3, 16, 64, 128]), st.integers(1, 40)))
    page = draw(st.sampled_from([16, 32, 64, 128, 256]))
    kv_format = draw(st.sampled_from(["bf16", "fp8"]))
    dtype = HALF[0] if kv_format == "fp8" else draw(st.sampled_from(ATT_DTYPES))
    if s_q * h_q > 64:                                 # keep the interpreted programs x tiles small
        s_q = 1
    cap = max(1, min(3 * page, (120 if h_q <= 16 else 40) // b))
    seqlens = [draw(st.one_of(st.just(0), st.just(1), st.just(page), st.integers(0, cap))) for _ in range(b)]
    g = generator(draw(SEEDS))
    max_blocks = max(1, max(-(-n // page) for n in seqlens)) + draw(st.integers(0, 1))
    cache, block_table = paged_cache(g, seqlens, page, max_blocks, kv_format, dtype,
                                     draw(st.sampled_from([0.3, 1.0, 4.0])))
    num_blocks = cache.shape[0]
    q = torch.randn(b, s_q, h_q, 576, generator=g).to(dtype)
    seq = torch.tensor(seqlens, dtype=torch.int32)
    kw = dict(softmax_scale=576 ** -0.5 * draw(st.sampled_from([0.5, 1.0, 2.0])), causal=draw(st.booleans()),
              kv_format=kv_format, config=decode_config(draw, s_q * h_q),
              num_splits=draw(st.one_of(st.none(), st.integers(1, 9))), validate=None)
    expect = ValueError
    if fault == "seqlen > capacity":
        seq[0] = max_blocks * page + 1
    elif fault == "negative seqlen":
        seq[-1] = -1
    elif fault in ("page id", "unchecked page ids") and seqlens[0] > 0:
        block_table[0, 0] = draw(st.sampled_from([-1, num_blocks, 2 ** 30]))
        if fault.startswith("unchecked"):
            expect, kw["validate"] = None, False
    elif fault == "unchecked seqlens":
        seq[0] = draw(st.sampled_from([max_blocks * page + 1, 2 ** 31 - 1, -5]))
        expect, kw["validate"] = None, False
    elif fault == "h_q":
        q = torch.randn(b, s_q, 129, 576).to(dtype)
    elif fault == "q width":
        q = torch.randn(b, s_q, h_q, 512).to(dtype)
    elif fault == "cache dtype" and kv_format == "bf16":
        cache, expect = cache.to(torch.float64), TypeError
    elif fault == "fp8 with fp32 q" and kv_format == "fp8":
        q, expect = q.float(), TypeError
    elif fault == "softmax_scale":
        kw["softmax_scale"] = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
    elif fault == "block_table dtype":
        block_table, expect = block_table.long(), TypeError
    elif fault == "metadata rows":
        kw["metadata"] = mla.get_mla_metadata(seq, s_q * h_q + 1, 1)
    else:
        expect = None
    return [t.to(DEV) for t in (q, cache, block_table, seq)], kw, fault, expect


def paged_cache(g, seqlens, page, max_blocks, kv_format, dtype, amp):
    """(cache, block_table): pages in random order; block-table entries past a sequence hold garbage (-1, huge,
    num_blocks) and pages nobody uses hold NaN: neither may be read."""
    b = len(seqlens)
    num_blocks = b * max_blocks + 2
    block_table = torch.randperm(num_blocks, generator=g)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    for i, n in enumerate(seqlens):
        block_table[i, -(-n // page):] = torch.tensor([-1, 2 ** 30, num_blocks], dtype=torch.int32)[i % 3]
    kv = torch.randn(num_blocks, page, 1, 576, generator=g) * amp
    cache = mla.quantize_mla_cache_fp8(kv) if kv_format == "fp8" else kv.to(dtype)
    used = torch.zeros(num_blocks, dtype=torch.bool)
    for i, n in enumerate(seqlens):
        used[block_table[i, : -(-n // page)].long()] = True
    cache[~used] = 0xFF if kv_format == "fp8" else float("nan")
    return cache, block_table


def decode_config(draw, rows):
    """None (the default) or a decode config from the stem's SPACE meeting its CONSTRAINTS."""
    if not draw(st.booleans()):
        return None
    bm = draw(st.sampled_from([m for m in dec.SPACE["BLOCK_M"] if m <= max(64, rows)]))
    bn = draw(st.sampled_from([n for n in dec.SPACE["BLOCK_N"] if bm * n <= 4096]))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=draw(st.sampled_from(dec.SPACE["BLOCK_K"])),
                BLOCK_DV=draw(st.sampled_from(dec.SPACE["BLOCK_DV"])), num_warps=4, num_stages=1)


def _decode_tolerance(dtype, fp8):
    return (FP32_ATOL, 1e-3) if dtype == torch.float32 and not fp8 else (4e-3, 1e-2)


def check_mla_decode(fz, case):
    (q, cache, block_table, seqlens), kw, fault, expect = case
    if expect is not None:
        with fz.refused(expect):
            mla.mla_decode(q, cache, block_table, seqlens, **kw)
        return
    (fz.confined if kw["validate"] is False else fz.in_contract)()
    out, lse = mla.mla_decode(q, cache, block_table, seqlens, **kw)
    b, s_q, h_q, _ = q.shape
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == q.dtype and lse.shape == (b, h_q, s_q)
    bt, seq = block_table.cpu(), seqlens.cpu()
    if kw["validate"] is False:     # confined: the offending batch is garbage (in bounds), the others exact
        assert fault in ("unchecked page ids", "unchecked seqlens")
        keep = torch.arange(b) != 0
        if not bool(keep.any()):
            return
        out, lse, q, bt, seq = out[keep], lse[keep], q[keep], bt[keep], seq[keep]
    keys = gathered(cache.cpu(), kw["kv_format"], bt, seq, q.dtype)
    atol, rtol = _decode_tolerance(q.dtype, kw["kv_format"] == "fp8")
    for i, k in enumerate(keys):
        ref_out, ref_lse = attention64(q[i].cpu(), k, kw["softmax_scale"], kw["causal"] and s_q > 1)
        scale = 1 + k[:, :512].abs().max().item() if k.numel() else 1
        torch.testing.assert_close(out[i].cpu().double(), ref_out, atol=atol * scale, rtol=rtol)
        torch.testing.assert_close(lse[i].cpu().double(), ref_lse, atol=atol * 10, rtol=rtol)


@pytest.mark.parametrize("examples", TIERS)
def test_mla_decode(examples, fuzz):
    run(check_mla_decode, examples, fuzz, case=decode_cases())


# ---------------------------------------------------------------- mla_prefill

@st.composite
def prefill_cases(draw):
    fault = draw(fault_or_none(["max_seqlen_q", "cu not rising", "cu dtype", "d_qk", "d_v", "dtypes differ",
                                "heads differ", "cu_k length", "latent missing", "slots past cache",
                                "unchecked slots", "unchecked slots"], tenths=3))
    b = draw(st.integers(1, 3))
    lens_q = [draw(st.one_of(st.sampled_from([0, 1, 16, 17, 63, 64, 65]), st.integers(0, 70))) for _ in range(b)]
    lens_k = [n + (draw(st.integers(0, 40)) if draw(sometimes(3)) else 0) for n in lens_q]
    heads = draw(st.integers(1, 3))
    d_qk, d_v = draw(st.sampled_from([192, 128, 96, 64, 48])), draw(st.sampled_from([128, 64, 32]))
    dtype = draw(st.sampled_from(ATT_DTYPES))
    g = generator(draw(SEEDS))
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    amp = draw(st.sampled_from([0.5, 1.0, 3.0]))
    q = (torch.randn(int(cu_q[-1]), heads, d_qk, generator=g) * amp).to(dtype)
    k = (torch.randn(int(cu_k[-1]), heads, d_qk, generator=g) * amp).to(dtype)
    v = torch.randn(int(cu_k[-1]), heads, d_v, generator=g).to(dtype)
    if draw(sometimes(3)):                 # views with a unit last stride (slices of wider heads): allowed
        q = torch.cat([q, torch.full_like(q[..., :16], float("nan"))], -1)[..., :d_qk]
        v = torch.cat([torch.full_like(v[..., :8], float("nan")), v], -1)[..., 8:]
    kw = dict(causal=draw(st.booleans()), cu_seqlens_k=cu_k, config=prefill_config(draw), validate=None,
              max_seqlen_q=draw(st.sampled_from([None, max(lens_q), max(lens_q) + 5])))
    cache = None
    if draw(sometimes(4)):
        cache = _cache_target(draw, g, int(cu_q[-1]), kw)
    expect = ValueError
    if fault == "max_seqlen_q" and max(lens_q) > 0:
        kw["max_seqlen_q"] = max(lens_q) - 1
    elif fault == "cu not rising" and b > 1:
        cu_q = cu_q.clone()
        cu_q[1] = int(cu_q[-1]) + 1
    elif fault == "cu dtype":
        cu_q, expect = cu_q.long(), TypeError
    elif fault == "d_qk":
        q, k = (torch.randn(x.shape[0], heads, 100).to(dtype) for x in (q, k))
    elif fault == "d_v":
        v = torch.randn(v.shape[0], heads, 96).to(dtype)
    elif fault == "dtypes differ":
        k, expect = k.to(torch.float64), TypeError
    elif fault == "heads differ":
        k = torch.randn(k.shape[0], heads + 1, d_qk).to(dtype)
    elif fault == "cu_k length":
        kw["cu_seqlens_k"] = torch.cat([cu_k, cu_k[-1:]])
    elif fault == "latent missing" and cache is not None:
        kw["kv_latent"] = None
    elif fault in ("slots past cache", "unchecked slots") and cache is not None and len(kw["slots"]):
        kw["slots"][0] = kw["kv_cache"].shape[0] * kw["kv_cache"].shape[1] + draw(st.integers(0, 2 ** 20))
        if fault == "unchecked slots":
            expect, kw["validate"] = None, False
    else:
        expect = None
    return q, k, v, cu_q, kw, expect


def prefill_config(draw):
    """None (the default) or a prefill config from the stem's SPACE meeting its CONSTRAINTS."""
    if not draw(st.booleans()):
        return None
    bm = draw(st.sampled_from(pre.SPACE["BLOCK_M"]))
    return dict(BLOCK_M=bm, BLOCK_N=draw(st.sampled_from([n for n in pre.SPACE["BLOCK_N"] if bm * n <= 8192])),
                num_warps=4, num_stages=1)


def _cache_target(draw, g, tokens, kw):
    """Adds kv_latent, k_rope, kv_cache (NaN / 0x7F-poisoned) and slots (some -1) to kw."""
    kv_format = draw(st.sampled_from(["bf16", "fp8"]))
    page, nb = draw(st.sampled_from([16, 32])), draw(st.integers(1, 4))
    capacity = page * nb
    n = min(tokens, capacity)
    slots = torch.full((tokens,), -1, dtype=torch.int32)
    slots[:n] = torch.randperm(capacity, generator=g)[:n].to(torch.int32)
    slots = slots[torch.randperm(tokens, generator=g)] if tokens else slots
    if kv_format == "fp8":
        cache = torch.full((nb, page, 1, 656), 0x7F, dtype=torch.uint8)
    else:
        cache = torch.full((nb, page, 1, 576), float("nan"), dtype=draw(st.sampled_from(FLOATS)))
    kw.update(kv_latent=torch.randn(tokens, 512, generator=g), k_rope=torch.randn(tokens, 64, generator=g),
              kv_cache=cache, slots=slots, kv_format=kv_format)
    return cache


def check_mla_prefill(fz, case):
    q, k, v, cu_q, kw, expect = case
    scale = q.shape[-1] ** -0.5
    dev = {key: val.to(DEV) if isinstance(val, torch.Tensor) else val for key, val in kw.items()}
    if expect is not None:
        with fz.refused(expect):
            mla.mla_prefill(q.to(DEV), k.to(DEV), v.to(DEV), cu_q.to(DEV), scale, **dev)
        return
    (fz.confined if kw["validate"] is False else fz.in_contract)()
    before = kw["kv_cache"].clone() if "kv_cache" in kw else None
    out, lse = mla.mla_prefill(q.to(DEV), k.to(DEV), v.to(DEV), cu_q.to(DEV), scale, **dev)
    cu_k = kw["cu_seqlens_k"]
    atol, rtol = (FP32_ATOL, 1e-3) if q.dtype == torch.float32 else (4e-3, 1e-2)
    for i in range(cu_q.numel() - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]))
        if qe == qs:
            continue
        s = torch.einsum("qhd,khd->hqk", q[qs:qe].double(), k[ks:ke].double()) * scale
        if kw["causal"]:
            s = s.masked_fill(torch.arange(ke - ks)[None, :] > torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs),
                              -math.inf)
        row = torch.logsumexp(s, -1)
        ref = torch.einsum("hqk,khd->qhd", torch.exp(s - row[..., None]).nan_to_num(0.0), v[ks:ke].double())
        torch.testing.assert_close(out[qs:qe].cpu().double(), ref, atol=atol * 4, rtol=rtol)
        torch.testing.assert_close(lse[qs:qe].cpu().double(), row.T, atol=atol * 10, rtol=rtol)
    if before is not None:
        check_cache_rows(dev["kv_cache"], kw["kv_format"], kw["slots"], kw["kv_latent"], kw["k_rope"], before)


@pytest.mark.parametrize("examples", TIERS)
def test_mla_prefill(examples, fuzz):
    run(check_mla_prefill, examples, fuzz, case=prefill_cases())
