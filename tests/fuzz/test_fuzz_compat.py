"""Property-based tests of the drop-in APIs: dskc.compat.deep_gemm (GEMMs, casts, layout and math helpers) and
dskc.compat.flash_mla (metadata + decode), against float64 references and DeepGEMM's / FlashMLA's documented
semantics; arguments they do not support must raise before any launch."""
import math

import pytest
import torch
from hypothesis import strategies as st

from _fuzz import (DEV, FLOATS, FP8, HALF, SEEDS, TIERS, assert_bits_equal, assert_gemm_close, dequant_1x128,
                   e4m3_step, fault_or_none, generator, needs_kernels, quant_1x128, run, sizes)
from test_fuzz_grouped import operands, segment_indices
from test_fuzz_mla import attention64, gathered
from dskc.compat import deep_gemm as dg
from dskc.compat import flash_mla
from dskc.ops import mla

pytestmark = [needs_kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _dev(*ts):
    return [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ts]


def block_reference(x, ue8m0=False):
    """DeepGEMM's per_block_cast_to_fp8 semantics: one scale per 128x128 block (x zero-padded), amax / 448 in fp32
    (IEEE division: the scale is exact to the bit)."""
    n, k = x.shape
    padded = torch.zeros(-(-n // 128) * 128, -(-k // 128) * 128)
    padded[:n, :k] = x.float()
    blocks = padded.view(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128)
    s = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    return dg.ceil_to_ue8m0(s) if ue8m0 else s


# ---------------------------------------------------------------- fp8_gemm_nt and the casts it is fed by

@st.composite
def gemm_nt_cases(draw):
    fault = draw(fault_or_none(["c", "recipe", "not a pair", "K % 128"], tenths=2))
    m, n, k = draw(sizes(lo=0, hi=70)), draw(sizes(lo=1, hi=200)), 128 * draw(st.integers(1, 2))
    g = generator(draw(SEEDS))
    x = torch.randn(m, k, generator=g) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    kw = dict(recipe=draw(st.sampled_from([None, (1, 128, 128)])), compiled_dims=draw(st.sampled_from(["nk", "mn"])),
              disable_ue8m0_cast=draw(st.booleans()))
    d = torch.full((m, n), float("nan"), dtype=draw(st.sampled_from([torch.bfloat16, torch.float32])))
    ue8m0, expect = draw(st.booleans()), NotImplementedError
    if fault == "c":
        kw["c"] = d.clone()
    elif fault == "recipe":
        kw["recipe"], expect = (1, 1, 128), ValueError
    elif fault == "not a pair":
        expect = TypeError
    elif fault == "K % 128":
        x, w, expect = x[:, :k - 64], w[:, :k - 64], ValueError
    else:
        expect = None
    return _dev(x, w, d), ue8m0, kw, fault, expect


def check_fp8_gemm_nt(fz, case):
    (x, w, d), ue8m0, kw, fault, expect = case
    a = dg.per_token_cast_to_fp8(x, use_ue8m0=ue8m0)
    b = dg.per_block_cast_to_fp8(w, use_ue8m0=ue8m0)
    if expect is not None:
        with fz.refused(expect):
            dg.fp8_gemm_nt(a[0] if fault == "not a pair" else a, b, d, **kw)
        assert bool(d.isnan().all())
        return
    fz.in_contract()
    dg.fp8_gemm_nt(a, b, d, **kw)
    a64, b64 = dequant_1x128(a[0].cpu(), a[1].cpu()), _deq_blocks(b[0].cpu(), b[1].cpu())
    assert_gemm_close(d, a64 @ b64.T, a64.abs() @ b64.abs().T, "fp8_gemm_nt")


def _deq_blocks(q, s):
    n, k = q.shape
    return q.double() * s.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


@pytest.mark.parametrize("examples", TIERS)
def test_fp8_gemm_nt(examples, fuzz):
    run(check_fp8_gemm_nt, examples, fuzz, case=gemm_nt_cases())


@st.composite
def cast_cases(draw):
    fault = draw(fault_or_none(["gran_k", "3-D block cast"], tenths=2))
    m, k = draw(sizes(lo=0, hi=200)), draw(sizes(lo=1, hi=300))
    g = generator(draw(SEEDS))
    x = (torch.randn(m, k, generator=g) * draw(st.sampled_from([1e-6, 1.0, 1e3]))).to(draw(st.sampled_from(FLOATS)))
    return x.to(DEV), draw(st.booleans()), fault


def check_casts(fz, case):
    x, ue8m0, fault = case
    if fault == "gran_k":
        with fz.refused(ValueError):
            dg.per_token_cast_to_fp8(x, ue8m0, gran_k=64)
        return
    if fault == "3-D block cast":
        with fz.refused(ValueError):
            dg.per_block_cast_to_fp8(x[None], ue8m0)
        return
    fz.in_contract()
    q, s = dg.per_token_cast_to_fp8(x, use_ue8m0=ue8m0)
    ref_q, ref_s = quant_1x128(x.cpu().float(), ue8m0)
    assert_bits_equal(s.cpu(), ref_s, "per_token_cast_to_fp8 scales")
    assert_bits_equal(q.cpu(), ref_q, "per_token_cast_to_fp8 values")
    bq, bs = dg.per_block_cast_to_fp8(x, use_ue8m0=ue8m0)
    assert bq.dtype == FP8 and bq.shape == x.shape and bs.shape == (-(-x.shape[0] // 128), -(-x.shape[1] // 128))
    assert_bits_equal(bs.cpu(), block_reference(x.cpu(), ue8m0), "per_block_cast_to_fp8 scales")
    deq = _deq_blocks(bq.cpu(), bs.cpu())
    full = bs.cpu().double().repeat_interleave(128, 0)[: x.shape[0]].repeat_interleave(128, 1)[:, : x.shape[1]]
    assert bool(((deq - x.cpu().double()).abs() <= e4m3_step(x.cpu().double() / full) * full * 0.51).all())


@pytest.mark.parametrize("examples", TIERS)
def test_deep_gemm_casts(examples, fuzz):
    run(check_casts, examples, fuzz, case=cast_cases())


@st.composite
def helper_cases(draw):
    return (draw(st.integers(1, 10 ** 6)), draw(st.integers(1, 4096)), draw(st.sampled_from([1, 2, 4, 8, 16, 3])),
            draw(st.floats(min_value=2.0 ** -120, max_value=2.0 ** 120, allow_subnormal=False)),
            draw(st.integers(1, 300)), draw(st.integers(1, 8)), draw(st.integers(0, 3)))


def check_helpers(fz, case):
    """ceil_div / align / get_tma_aligned_size / ceil_to_ue8m0 / get_mn_major_tma_aligned_tensor and the
    alignment getters, against their definitions (DeepGEMM's utils)."""
    x, y, elem, v, mn, k, groups = case
    assert dg.ceil_div(x, y) == -(-x // y) and dg.align(x, y) == -(-x // y) * y
    assert dg.get_mk_alignment_for_contiguous_layout() == dg.get_m_alignment_for_contiguous_layout() == 128
    if 16 % elem:
        with fz.refused(ValueError):
            dg.get_tma_aligned_size(mn, elem)
        return
    fz.in_contract()
    size = dg.get_tma_aligned_size(mn, elem)
    assert size >= mn and (size * elem) % 16 == 0 and size - mn < 16 // elem
    t = torch.tensor([v, -v], dtype=torch.float32)
    p = dg.ceil_to_ue8m0(t)
    assert bool((p >= t.abs()).all() and (p < 2 * t.abs()).all()), f"ceil_to_ue8m0({v}) = {p.tolist()}"
    assert bool((torch.frexp(p)[0] == 0.5).all()), "not a power of two"
    sf = torch.rand(*([groups] if groups else []), mn, k) + 0.1
    out = dg.get_mn_major_tma_aligned_tensor(sf)
    assert torch.equal(out, sf) and out.stride(-2) == 1 and out.stride(-1) == dg.get_tma_aligned_size(mn, 4)


@pytest.mark.parametrize("examples", TIERS)
def test_deep_gemm_helpers(examples, fuzz):
    run(check_helpers, examples, fuzz, case=helper_cases())


# ---------------------------------------------------------------- grouped GEMMs with DeepGEMM's names

@st.composite
def m_grouped_contiguous_cases(draw):
    fault = draw(fault_or_none(["psum layout", "id >= E", "recipe"], tenths=2))
    e = draw(st.integers(1, 3))
    counts = [draw(st.sampled_from([0, 1, 5, 70, 128, draw(st.integers(0, 130))])) for _ in range(e)]
    if sum(-(-c // 128) for c in counts) > 2:          # at most 256 rows: each 64-row block is a program
        counts = [min(c, 60) for c in counts]
    n, k = draw(sizes(lo=1, hi=260)), 128 * draw(st.integers(1, 2))
    g = generator(draw(SEEDS))
    m_idx = segment_indices(g, counts, dg.get_mk_alignment_for_contiguous_layout())
    (a, sa, b, sb), a64, b64 = operands(g, True, (len(m_idx),), e, n, k, None)
    d = torch.full((len(m_idx), n), float("nan"), dtype=torch.bfloat16)
    kw, expect = {}, ValueError
    if fault == "psum layout":
        kw["use_psum_layout"], expect = True, NotImplementedError
    elif fault == "id >= E" and len(m_idx):
        m_idx[-1] = e
    elif fault == "recipe":
        kw["recipe"] = (1, 128, 1)
    else:
        expect = None
    return _dev(a, sa, b, sb, m_idx, d), (a64, b64), kw, expect


def check_m_grouped_contiguous(fz, case):
    (a, sa, b, sb, m_idx, d), (a64, b64), kw, expect = case
    if expect is not None:
        with fz.refused(expect):
            dg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, m_idx, **kw)
        assert bool(d.isnan().all())
        return
    fz.in_contract()
    dg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, m_idx, **kw)
    ok = m_idx.cpu() >= 0
    ref = torch.full(d.shape, float("nan"), dtype=torch.float64)
    bound = torch.zeros_like(ref)
    ids = m_idx.cpu()[ok].long()
    ref[ok] = torch.einsum("mk,mnk->mn", a64[ok], b64[ids])
    bound[ok] = torch.einsum("mk,mnk->mn", a64[ok].abs(), b64[ids].abs())
    assert_gemm_close(d, ref, bound, "m_grouped_fp8_gemm_nt_contiguous (padding rows untouched)")


@pytest.mark.parametrize("examples", TIERS)
def test_m_grouped_fp8_gemm_nt_contiguous(examples, fuzz):
    run(check_m_grouped_contiguous, examples, fuzz, case=m_grouped_contiguous_cases())


@st.composite
def m_grouped_masked_cases(draw):
    fault = draw(fault_or_none(["masked_m > M_max", "expected_m", "recipe"], tenths=2))
    e, m_max = draw(st.integers(1, 4)), draw(sizes(lo=1, hi=70))
    n, k = draw(sizes(lo=1, hi=260)), 128 * draw(st.integers(1, 2))
    g = generator(draw(SEEDS))
    masked_m = torch.tensor([draw(st.integers(0, m_max)) for _ in range(e)], dtype=torch.int32)
    (a, sa, b, sb), a64, b64 = operands(g, True, (e, m_max), e, n, k, None)
    sa = dg.get_mn_major_tma_aligned_tensor(sa)           # what DeepGEMM's callers hand over
    d = torch.full((e, m_max, n), float("nan"), dtype=torch.bfloat16)
    kw, expected_m, expect = {}, draw(st.integers(1, 128)), ValueError
    if fault == "masked_m > M_max":
        masked_m[0] = m_max + 1
    elif fault == "expected_m":
        expected_m = 0
    elif fault == "recipe":
        kw["recipe"] = (128, 128, 128)
    else:
        expect = None
    return _dev(a, sa, b, sb, masked_m, d), (a64, b64), expected_m, kw, expect


def check_m_grouped_masked(fz, case):
    (a, sa, b, sb, masked_m, d), (a64, b64), expected_m, kw, expect = case
    if expect is not None:
        with fz.refused(expect):
            dg.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), d, masked_m, expected_m, **kw)
        assert bool(d.isnan().all())
        return
    fz.in_contract()
    dg.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), d, masked_m, expected_m, **kw)
    ref = torch.full(d.shape, float("nan"), dtype=torch.float64)
    bound = torch.zeros_like(ref)
    for i, m in enumerate(masked_m.tolist()):
        ref[i, :m] = a64[i, :m] @ b64[i].T
        bound[i, :m] = a64[i, :m].abs() @ b64[i].abs().T
    assert_gemm_close(d, ref, bound, "m_grouped_fp8_gemm_nt_masked (rows past masked_m untouched)")


@pytest.mark.parametrize("examples", TIERS)
def test_m_grouped_fp8_gemm_nt_masked(examples, fuzz):
    run(check_m_grouped_masked, examples, fuzz, case=m_grouped_masked_cases())


@st.composite
def bf16_nt_cases(draw):
    fault = draw(fault_or_none(["c", "d dtype"], tenths=2))
    m, n, k = draw(sizes(lo=0, hi=130)), draw(sizes(lo=1, hi=200)), 8 * draw(st.integers(1, 32))
    dtype = draw(st.sampled_from(HALF))
    g = generator(draw(SEEDS))
    a, b = torch.randn(m, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    d = torch.full((m, n), float("nan"), dtype=torch.float32 if fault == "d dtype" else dtype)
    return _dev(a, b, d), fault


def check_bf16_gemm_nt(fz, case):
    (a, b, d), fault = case
    if fault is not None:
        with fz.refused(NotImplementedError if fault == "c" else TypeError):
            dg.bf16_gemm_nt(a, b, d, c=d.clone() if fault == "c" else None)
        return
    fz.in_contract()
    dg.bf16_gemm_nt(a, b, d)
    a64, b64 = a.cpu().double(), b.cpu().double()
    assert_gemm_close(d, a64 @ b64.T, a64.abs() @ b64.abs().T, "bf16_gemm_nt")


@pytest.mark.parametrize("examples", TIERS)
def test_bf16_gemm_nt(examples, fuzz):
    run(check_bf16_gemm_nt, examples, fuzz, case=bf16_nt_cases())


# ---------------------------------------------------------------- flash_mla

@st.composite
def flash_cases(draw):
    fault = draw(fault_or_none(["head_dim_v", "indices", "descale", "topk", "heads_k", "metadata type",
                                "kv heads"], tenths=2))
    b, s_q = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    h_q = draw(st.sampled_from([1, 3, 9, 16]))
    page = draw(st.sampled_from([16, 64]))
    fp8 = draw(st.booleans())
    seqlens = [draw(st.one_of(st.just(0), st.integers(1, 70))) for _ in range(b)]
    g = generator(draw(SEEDS))
    max_blocks = max(1, max(-(-n // page) for n in seqlens))
    nb = b * max_blocks + 1
    block_table = torch.randperm(nb, generator=g)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    kv = torch.randn(nb, page, 1, 576, generator=g)
    q = torch.randn(b, s_q, h_q, 576, generator=g).to(HALF[0])
    if fp8:
        cache = mla.quantize_mla_cache_fp8(kv)
        cache = cache.view(FP8) if draw(st.booleans()) else cache       # FlashMLA hands e4m3 or byte tensors
    else:
        cache = kv.to(q.dtype)
    seq = torch.tensor(seqlens, dtype=torch.int32)
    kw = dict(softmax_scale=draw(st.sampled_from([None, 0.05])), causal=draw(st.booleans()), is_fp8_kvcache=fp8)
    return _dev(q, cache, block_table, seq), kw, fault


def check_flash_mla(fz, case):
    (q, cache, block_table, seq), kw, fault = case
    b, s_q, h_q, _ = q.shape
    if fault in ("topk", "heads_k"):
        with fz.refused(NotImplementedError if fault == "topk" else ValueError):
            flash_mla.get_mla_metadata(seq, s_q * h_q, 2 if fault == "heads_k" else 1,
                                       topk=64 if fault == "topk" else None)
        return
    md, splits = flash_mla.get_mla_metadata(seq, s_q * h_q, 1)
    args, dv = [q, cache, block_table, seq], 512
    if fault is not None:
        extra, expect = {}, NotImplementedError
        if fault == "head_dim_v":
            dv, expect = 256, ValueError
        elif fault == "indices":
            extra["indices"] = torch.zeros(b, s_q, 8, dtype=torch.int32, device=q.device)
        elif fault == "descale":
            extra["descale_q"] = torch.ones(1, device=q.device)
        elif fault == "metadata type":
            md, expect = md.tolist(), TypeError
        else:   # "kv heads"
            args[1], expect = torch.cat([cache.view(torch.uint8)] * 2, 2).view(cache.dtype), ValueError
        with fz.refused(expect):
            flash_mla.flash_mla_with_kvcache(*args, dv, md, splits, **kw, **extra)
        return
    fz.in_contract()
    out, lse = flash_mla.flash_mla_with_kvcache(*args, dv, md, splits, **kw)
    scale = kw["softmax_scale"] or 576 ** -0.5
    keys = gathered(cache.cpu().view(torch.uint8) if kw["is_fp8_kvcache"] else cache.cpu(),
                    "fp8" if kw["is_fp8_kvcache"] else "bf16", block_table.cpu(), seq.cpu(), q.dtype)
    for i, k in enumerate(keys):
        ref_out, ref_lse = attention64(q[i].cpu(), k, scale, kw["causal"] and s_q > 1)
        torch.testing.assert_close(out[i].cpu().double(), ref_out, atol=4e-3 * (1 + k.abs().max().item()
                                                                                if k.numel() else 1), rtol=1e-2)
        torch.testing.assert_close(lse[i].cpu().double(), ref_lse, atol=4e-2, rtol=1e-2)


@pytest.mark.parametrize("examples", TIERS)
def test_flash_mla_with_kvcache(examples, fuzz):
    run(check_flash_mla, examples, fuzz, case=flash_cases())
