"""Property-based tests of the MLA cache path: rope_norm_cache_write (+ paged_slots) and the FP8 cache format
(quantize_mla_cache_fp8 / dequantize_mla_cache_fp8). References: RMSNorm + RoPE in float64, the cache layout
rebuilt in PyTorch."""
import pytest
import torch
from hypothesis import strategies as st

from _fuzz import DEV, FLOATS, SEEDS, TIERS, e4m3_step, fault_or_none, generator, needs_kernels, run, sometimes
from dskc.ops import mla

pytestmark = [needs_kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def check_cache_rows(cache, kv_format, slots, lat, rope, before):
    """Rows at slots hold (lat, rope) in the cache format; every other row is untouched."""
    flat, prev = cache.cpu().view(-1, cache.shape[-1]), before.view(-1, cache.shape[-1])
    capacity = flat.shape[0]
    ok = (slots >= 0) & (slots < capacity)
    rows = slots[ok].long()
    want = torch.cat([lat, rope], -1)[ok].double()
    if kv_format == "fp8":
        got = mla.dequantize_mla_cache_fp8(flat[rows]).double()
        scale = flat[rows][:, 512:528].contiguous().view(torch.float32).double().repeat_interleave(128, 1)
        step = e4m3_step(want[:, :512] / scale) * scale          # e4m3 keeps 3 mantissa bits
        assert bool(((got[:, :512] - want[:, :512]).abs() <= step * 1.01).all()), "fp8 latent off by > one step"
        torch.testing.assert_close(got[:, 512:], want[:, 512:], atol=1e-6, rtol=2.0 ** -7, equal_nan=True)  # bf16
    else:
        tol = {torch.float32: 1e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[flat.dtype]
        torch.testing.assert_close(flat[rows].double(), want, atol=tol * 4, rtol=tol * 2, equal_nan=True)
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(flat[untouched].view(torch.uint8), prev[untouched].view(torch.uint8)), "other rows written"



# ---------------------------------------------------------------- rope_norm_cache_write (+ paged_slots)

@st.composite
def rope_cases(draw):
    fault = draw(fault_or_none(["position", "unchecked positions", "unchecked positions", "slots past cache",
                                "unchecked slots", "unchecked slots", "kv_a width", "table dtype",
                                "positions dtype", "q_pe width", "kv_format", "slots missing"], tenths=3))
    t, heads = draw(st.integers(0, 9)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(FLOATS))
    g = generator(draw(SEEDS))
    max_pos = draw(st.integers(1, 64))
    theta = torch.rand(max_pos, 32, generator=g) * 6.3
    table = torch.stack([theta.cos(), theta.sin()], -1)
    wide = torch.randn(t, 600, generator=g) * draw(st.sampled_from([0.01, 1.0, 30.0]))
    kv_a = (wide[:, 8:584] if draw(st.booleans()) else wide[:, :576].contiguous()).to(dtype)  # row-strided view
    weight = (torch.rand(512, generator=g) + 0.5).to(dtype)
    positions = torch.randint(0, max_pos, (t,), generator=g, dtype=torch.int32)
    q = torch.randn(t, heads, 192, generator=g).to(dtype)
    q_pe = q[..., 128:] if draw(st.booleans()) else None        # a strided view, rotated in place
    kw = dict(eps=draw(st.sampled_from([1e-6, 1e-2])), validate=None)
    if draw(sometimes(5)):
        kw.update(paged_target(draw, g, t))
    expect = ValueError
    if fault in ("position", "unchecked positions") and t:
        positions[0] = draw(st.sampled_from([-1, max_pos, 2 ** 30]))
        if fault.startswith("unchecked"):
            expect, kw["validate"] = None, False
    elif fault in ("slots past cache", "unchecked slots") and t and "kv_cache" in kw:
        kw["slots"][0] = kw["kv_cache"].shape[0] * kw["kv_cache"].shape[1] + draw(st.integers(0, 2 ** 20))
        if fault.startswith("unchecked"):
            expect, kw["validate"] = None, False
    elif fault == "kv_a width":
        kv_a = kv_a[:, :512]
    elif fault == "table dtype":
        table, expect = table.double(), TypeError
    elif fault == "positions dtype":
        positions, expect = positions.long(), TypeError
    elif fault == "q_pe width" and t:
        q_pe = q[..., 96:]
    elif fault == "kv_format" and "kv_cache" in kw:
        kw["kv_format"] = "fp16"
    elif fault == "slots missing" and "kv_cache" in kw:
        kw["slots"], expect = None, TypeError
    else:
        expect = None
    return kv_a, weight, table, positions, q, q_pe, kw, expect


def paged_target(draw, g, t):
    """{kv_cache, slots, kv_format}: slots from paged_slots (checked against its definition), some -1, one token
    per slot (two writers of one slot would race); the cache NaN / 0x7F-poisoned."""
    page, nb = draw(st.sampled_from([16, 64])), draw(st.integers(1, 3))
    seq = torch.randint(0, 2, (t,), generator=g)
    bt = torch.randperm(2 * nb, generator=g)[: 2 * nb].view(2, nb).remainder(nb).to(torch.int32)
    pos = torch.randint(0, page * nb, (t,), generator=g)
    slots = mla.paged_slots(bt, seq, pos, page)
    assert torch.equal(slots, (bt[seq, pos // page].long() * page + pos % page).to(torch.int32)), "paged_slots"
    slots = torch.where(torch.rand(t, generator=g) < 0.2, -1, slots).to(torch.int32)
    seen = set()
    for i, s in enumerate(slots.tolist()):
        if s in seen:
            slots[i] = -1
        seen.add(s)
    fmt = draw(st.sampled_from(["bf16", "fp8"]))
    cache = torch.full((nb, page, 1, 656), 0x7F, dtype=torch.uint8) if fmt == "fp8" else \
        torch.full((nb, page, 1, 576), float("nan"), dtype=draw(st.sampled_from(FLOATS)))
    return dict(kv_cache=cache, slots=slots, kv_format=fmt)


def rope64(x, table, pos):
    """Interleaved pairs (x[2i], x[2i+1]) rotated by the table's (cos, sin) at pos, float64 (NaN off the table)."""
    ok = (pos >= 0) & (pos < table.shape[0])
    cs = table[pos.long().clamp(0, table.shape[0] - 1)].double()
    cs[~ok] = float("nan")
    while cs.dim() < x.dim() + 1:
        cs = cs.unsqueeze(-3)
    even, odd = x.double()[..., 0::2], x.double()[..., 1::2]
    cos, sin = cs[..., 0], cs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


def check_rope_norm_cache_write(fz, case):
    kv_a, weight, table, positions, q, q_pe, kw, expect = case
    dev = {key: val.to(DEV) if isinstance(val, torch.Tensor) else val for key, val in kw.items()}
    qd = q.clone().to(DEV)                      # rotated in place: keep q for the reference
    q_pe_d = None if q_pe is None else qd[..., q.shape[-1] - q_pe.shape[-1]:]
    args = (kv_a.to(DEV), weight.to(DEV), table.to(DEV), positions.to(DEV), q_pe_d)
    if expect is not None:
        with fz.refused(expect):
            mla.rope_norm_cache_write(*args, **dev)
        return
    (fz.confined if kw["validate"] is False else fz.in_contract)()
    before = kw["kv_cache"].clone() if "kv_cache" in kw else None
    lat, pe = mla.rope_norm_cache_write(*args, **dev)
    x = kv_a.double()
    ref_lat = x[:, :512] * torch.rsqrt((x[:, :512] ** 2).mean(-1, keepdim=True) + kw["eps"]) * weight.double()
    ref_pe = rope64(kv_a[:, 512:], table, positions)
    tol = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[kv_a.dtype]
    torch.testing.assert_close(lat.cpu().double(), ref_lat, atol=tol, rtol=tol * 2)
    peak = ref_pe.abs().nan_to_num().max().item() if ref_pe.numel() else 0.0
    torch.testing.assert_close(pe.cpu().double(), ref_pe, atol=tol * peak + tol,
                               rtol=tol * 2, equal_nan=True)
    if q_pe is not None:
        ref_q = rope64(q[..., 128:], table, positions)
        torch.testing.assert_close(qd.cpu()[..., 128:].double(), ref_q, atol=tol * 8, rtol=tol * 2, equal_nan=True)
        assert torch.equal(qd.cpu()[..., :128], q[..., :128]), "q's nope part changed"
    if before is not None:
        check_cache_rows(dev["kv_cache"], kw["kv_format"], kw["slots"], ref_lat.float(), ref_pe.float(), before)


@pytest.mark.parametrize("examples", TIERS)
def test_rope_norm_cache_write(examples, fuzz):
    run(check_rope_norm_cache_write, examples, fuzz, case=rope_cases())


# ---------------------------------------------------------------- the FP8 cache format

@st.composite
def cache_rows(draw):
    fault = draw(fault_or_none(["width", "dtype"], tenths=2))
    lead = draw(st.lists(st.integers(0, 4), max_size=3))
    g = generator(draw(SEEDS))
    kv = torch.randn(*lead, 576, generator=g) * draw(st.sampled_from([1e-6, 1e-3, 1.0, 100.0, 3e4]))
    if draw(sometimes(2)) and kv.numel():
        kv.view(-1)[torch.randint(0, kv.numel(), (3,), generator=g)] = float("nan")
    kv = kv.to(draw(st.sampled_from(FLOATS)))
    return (kv[..., :575] if fault == "width" else kv.long() if fault == "dtype" else kv), \
        ValueError if fault else None


def check_mla_cache_fp8(fz, case):
    kv, expect = case
    if expect is not None:
        with fz.refused(expect):
            mla.quantize_mla_cache_fp8(kv)
        with fz.no_launch(), pytest.raises(expect):
            mla.dequantize_mla_cache_fp8(kv.to(torch.uint8))
        return
    fz.in_contract()
    packed = mla.quantize_mla_cache_fp8(kv)
    assert packed.dtype == torch.uint8 and packed.shape == (*kv.shape[:-1], 656)
    back = mla.dequantize_mla_cache_fp8(packed).double()
    x = kv.double()
    lat, got = x[..., :512].reshape(*x.shape[:-1], 4, 128), back[..., :512].reshape(*x.shape[:-1], 4, 128)
    scale = packed[..., 512:528].contiguous().view(torch.float32).double()
    fine = torch.isfinite(lat)         # act_quant's contract: NaN / inf -> NaN, the scale from the finite values
    assert bool(torch.isfinite(scale).all()) and torch.equal(got.isnan(), ~fine)
    step = e4m3_step(lat.nan_to_num() / scale[..., None]) * scale[..., None]
    assert bool(((got - lat).abs()[fine] <= (step * 0.51)[fine] + 1e-30).all()), "latent beyond half an e4m3 step"
    torch.testing.assert_close(back[..., 512:], x[..., 512:].to(torch.bfloat16).double(), equal_nan=True)


@pytest.mark.parametrize("examples", TIERS)
def test_mla_cache_fp8(examples, fuzz):
    run(check_mla_cache_fp8, examples, fuzz, case=cache_rows())
