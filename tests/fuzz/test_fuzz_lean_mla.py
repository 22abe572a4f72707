"""Property-based tests of the lean decode step's MLA ops: mla_absorb_q, mla_absorb_o, mla_step.
References: the absorbed products in float64 (operands rounded as the op's contract says), RoPE on interleaved pairs
in float64, act_quant (fuzzed in test_fuzz_fp8.py) of the unquantised output for the FP8 path, the paged positions
walked in plain Python and get_mla_metadata (fuzzed in test_fuzz_mla.py) for the step's schedule. A NaN token's
outputs are NaN and no other token's change (NaN exactly where the per-token reference has it)."""
import pytest
import torch
from hypothesis import strategies as st

from _fuzz import (DEV, FLOATS, HALF, INTERP, ROUNDING, SEEDS, TIERS, assert_bits_equal, fault_or_none, generator,
                   needs_kernels, run, sizes, sometimes)
from dskc import ops
from dskc.ops import mla
from test_fuzz_lean import nan_tokens

pytestmark = [needs_kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
ATT_DTYPES = (*HALF, torch.float32)          # tl.dot operands: bf16 is wrong under the interpreter
DOT_COEF = 1e-5 if INTERP else 2.0 ** -10    # error per unit of sum |a| |b|: fp32 dots run as TF32 on a GPU


def assert_dot_close(out, ref, bound, dot_fp32: bool, what: str, also=None):
    """out within its dtype's rounding (and a whole ulp of dtype `also`, rounded through first) of the float64 ref
    plus the accumulation's error (per unit of bound = sum |a| |b|); NaN exactly where ref is NaN."""
    rtol, atol = ROUNDING[out.dtype]
    if also is not None:
        rtol, atol = rtol + 2 * ROUNDING[also][0], atol + 2 * ROUNDING[also][1]
    out, ref, bound = out.double().cpu(), ref.double().cpu(), bound.double().cpu()
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN where the reference has none (or vice versa)"
    err = torch.where(ref.isnan(), 0.0, (out - ref).abs())
    coef = DOT_COEF if dot_fp32 else 1e-5
    ok = (err <= rtol * ref.abs() * 1.01 + coef * bound + atol) | ref.isnan()
    assert bool(ok.all()), f"{what}: max err {err[~ok].max().item():.3g} at |ref| {ref[~ok].abs().max().item():.3g}"


# ---------------------------------------------------------------- mla_absorb_q

@st.composite
def absorb_q_cases(draw):
    fault = draw(fault_or_none(["q 2-D", "q last stride", "q dtype", "nope", "w shape", "w dtype", "w strided",
                                "table dtype", "table shape", "rows dtype", "rows shape", "out dtype"], tenths=2))
    t, h = draw(sizes(lo=0, hi=40)), draw(st.sampled_from([1, 2, 3, 5]))
    nope = draw(st.sampled_from([16, 64, 128, 256] if fault != "nope" else [0, 8, 48, 100, 192, 512]))
    qd, od = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(ATT_DTYPES))
    layout = draw(st.sampled_from(["contiguous", "head-padded", "every other head"]))
    g = generator(draw(SEEDS))
    q = nan_tokens(g, torch.randn(t, h, nope + 64, generator=g) * draw(st.sampled_from([1e-2, 1.0, 20.0])),
                   draw(st.sampled_from([0, 0, 2]))).to(qd)
    if layout == "head-padded":                   # [tokens, heads, width] of a wider projection: unit last stride
        q = torch.cat([q, torch.full((t, h, 24), float("nan"), dtype=qd)], -1)[..., :nope + 64]
    elif layout == "every other head":
        q = torch.stack([q, torch.full_like(q, float("nan"))], 2).flatten(1, 2)[:, ::2]
    w = (torch.randn(h, 512, nope, generator=g) / max(nope, 1) ** 0.5).to(od)
    max_pos = draw(st.sampled_from([1, 7, 64]))
    table = torch.randn(max_pos, 32, 2, generator=g)
    rows = torch.randint(0, max_pos, (t,), generator=g, dtype=torch.int32)
    outside = t and draw(sometimes(3))            # rows outside the table: unchecked, confined to their tokens
    if outside:
        rows[torch.randint(0, t, (1,), generator=g)] = draw(st.sampled_from([-1, max_pos, max_pos + 1000]))
    expect = {None: None, "q 2-D": ValueError, "q last stride": ValueError, "q dtype": ValueError,
              "nope": ValueError, "w shape": ValueError, "w dtype": ValueError, "w strided": ValueError}.get(fault,
                                                                                                       TypeError)
    if fault == "q 2-D":
        q = q.flatten(1)
    elif fault == "q last stride":
        q = torch.stack([q, q], -1)[..., 0]
    elif fault == "q dtype":
        q = q.double()
    elif fault == "w shape":
        w = w[:, :256]
    elif fault == "w dtype":
        w = w.to(torch.float32 if od != torch.float32 else torch.float16)
    elif fault == "w strided":
        w = torch.stack([w, w], -1)[..., 0]
    elif fault == "table dtype":
        table = table.double()
    elif fault == "table shape":
        table = table[:, :16]
    elif fault == "rows dtype":
        rows = rows.long()
    elif fault == "rows shape":
        rows = torch.zeros(t + 1, dtype=torch.int32)
    elif fault == "out dtype":
        od = draw(st.sampled_from([torch.float64, torch.int32, torch.float8_e4m3fn]))
        w = w.to(od)
    return q.to(DEV), w.to(DEV), table.to(DEV), rows.to(DEV), od, outside, expect


def rope64(x: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE of x [T, H, 64] at the table's rows in float64 (NaN for a row outside the table)."""
    inside = (rows >= 0) & (rows < table.shape[0])
    cs = torch.where(inside[:, None, None], table.double()[rows.long().clamp(0, table.shape[0] - 1)], float("nan"))
    pairs = x.double().unflatten(-1, (-1, 2))
    c, s = cs[:, None, :, 0], cs[:, None, :, 1]
    return torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1).flatten(-2)


def check_mla_absorb_q(fz, case):
    q, w, table, rows, od, outside, expect = case
    if expect is not None:
        with fz.refused(expect):
            mla.mla_absorb_q(q, w, table, rows, od)
        return
    qq = mla.mla_absorb_q(q, w, table, rows, od)
    fz.confined() if outside else fz.in_contract()
    t, h, width = q.shape
    nope = width - 64
    assert qq.dtype == od and qq.shape == (t, h, 576)
    if bool(q.isnan().any()):
        fz.note("with NaN tokens")
    qr = q.cpu().to(od).double()                              # q's elements rounded to out_dtype first
    w64 = w.cpu().double()
    lat = torch.einsum("thd,hcd->thc", qr[..., :nope], w64)
    bound = torch.einsum("thd,hcd->thc", qr[..., :nope].abs(), w64.abs())
    assert_dot_close(qq[..., :512], lat, bound, od == torch.float32, "latent part")
    pe = rope64(qr[..., nope:], table.cpu(), rows.cpu())
    pairs, cs = qr[..., nope:].abs().unflatten(-1, (-1, 2)).sum(-1), table.cpu().double().abs().sum(-1)
    inside = (rows.cpu() >= 0) & (rows.cpu() < table.shape[0])
    pe_bound = (pairs * cs[rows.cpu().long().clamp(0, table.shape[0] - 1)][:, None] * inside[:, None, None])
    pe_bound = pe_bound.repeat_interleave(2, -1)                  # |x0 c| + |x1 s| >= both outputs of a pair
    assert_dot_close(qq[..., 512:], pe, pe_bound, False, "rope part")


@pytest.mark.parametrize("examples", TIERS)
def test_mla_absorb_q(examples, fuzz):
    run(check_mla_absorb_q, examples, fuzz, case=absorb_q_cases())


# ---------------------------------------------------------------- mla_absorb_o

@st.composite
def absorb_o_cases(draw):
    fault = draw(fault_or_none(["out 2-D", "out width", "out strided", "out dtype", "w heads", "w dtype",
                                "w strided", "V", "V 64 odd heads", "act dtype"], tenths=2))
    t, h = draw(sizes(lo=0, hi=24)), draw(st.sampled_from([1, 2, 3, 4]))
    v = draw(st.sampled_from([64, 128, 256]))
    if v == 64 and h % 2:
        h += 1
    od, act = draw(st.sampled_from(ATT_DTYPES)), draw(st.sampled_from(FLOATS))
    g = generator(draw(SEEDS))
    out = nan_tokens(g, torch.randn(t, h, 512, generator=g) * draw(st.sampled_from([1e-2, 1.0, 20.0])),
                     draw(st.sampled_from([0, 0, 2]))).to(od)
    w = (torch.randn(h, v, 512, generator=g) / 16).to(od)
    expect = TypeError if fault == "act dtype" else None if fault is None else ValueError
    if fault == "out 2-D":
        out = out.flatten(1)
    elif fault == "out width":
        out = out[..., :448].contiguous()
    elif fault == "out strided":
        out = torch.cat([out, out], -1)[..., :512]
        expect = ValueError if t * h > 1 else None            # one row of 512 is contiguous whatever its stride
    elif fault == "out dtype":
        out, w = out.double(), w.double()
    elif fault == "w heads":
        w = torch.randn(h + 2, v, 512).to(od)
    elif fault == "w dtype":
        w = w.to(torch.float32 if od != torch.float32 else torch.float16)
    elif fault == "w strided":
        w = torch.stack([w, w], -1)[..., 0]
    elif fault == "V":
        w = torch.randn(h, draw(st.sampled_from([1, 32, 96, 192])), 512).to(od)
    elif fault == "V 64 odd heads":
        out, w = out[:, :1].contiguous(), torch.randn(1, 64, 512).to(od)
    elif fault == "act dtype":
        act = draw(st.sampled_from([torch.float64, torch.int32, torch.float8_e4m3fn]))
    return out.to(DEV), w.to(DEV), act, draw(st.booleans()), expect


def check_mla_absorb_o(fz, case):
    out, w, act, quant, expect = case
    if expect is not None:
        with fz.refused(expect):
            mla.mla_absorb_o(out, w, act, quant)
        return
    fz.in_contract()
    t, h, _ = out.shape
    v = w.shape[1]
    y = mla.mla_absorb_o(out, w, act, False)
    assert y.dtype == out.dtype and y.shape == (t, h * v)
    if bool(out.isnan().any()):
        fz.note("with NaN tokens")
    o64, w64 = out.cpu().double(), w.cpu().double()
    ref = torch.einsum("thc,hvc->thv", o64, w64).flatten(1)
    bound = torch.einsum("thc,hvc->thv", o64.abs(), w64.abs()).flatten(1)
    assert_bits_equal(y.to(act).to(y.dtype), y, "o holds act_dtype's values")
    assert_dot_close(y, ref, bound, out.dtype == torch.float32, "o", also=act)     # rounded to out's dtype, act's
    if quant:
        fz.note("quantised")
        q, s = mla.mla_absorb_o(out, w, act, True)
        q_ref, s_ref = ops.act_quant(y.to(act))
        assert_bits_equal(s.cpu(), s_ref.cpu(), "scales (against act_quant of the unquantised o)")
        assert_bits_equal(q.cpu(), q_ref.cpu(), "e4m3 values (against act_quant of the unquantised o)")


@pytest.mark.parametrize("examples", TIERS)
def test_mla_absorb_o(examples, fuzz):
    run(check_mla_absorb_o, examples, fuzz, case=absorb_o_cases())


# ---------------------------------------------------------------- mla_step

@st.composite
def step_cases(draw):
    fault = draw(fault_or_none(["bt dtype", "bt 1-D", "bt rows", "bt last stride", "batch 0", "s_q 0", "rows 0",
                                "starts dtype", "starts shape", "start outside", "starts outside"], tenths=2))
    batch, s_q, page = draw(st.integers(1, 9)), draw(st.sampled_from([1, 1, 2, 3, 5])), draw(
        st.sampled_from([1, 3, 16, 64]))
    n_blocks = draw(st.integers(-(-s_q // page), 6))
    cap = n_blocks * page
    extra = draw(st.integers(0, 2))
    g = generator(draw(SEEDS))
    bt = torch.randperm((batch + extra) * n_blocks + 5, generator=g)[:(batch + extra) * n_blocks]
    bt = bt.to(torch.int32).view(batch + extra, n_blocks)
    if draw(sometimes(3)):                                  # columns of a wider table: row stride > max_blocks
        bt = torch.cat([bt, torch.full((batch + extra, 3), -7, dtype=torch.int32)], 1)[:, :n_blocks]
    device = draw(st.booleans())
    starts = torch.randint(0, cap - s_q + 1, (batch,), generator=g, dtype=torch.int32)
    kw = dict(start=int(starts[0]), rope_base=draw(st.sampled_from([0, 0, 3])), split=draw(st.booleans()),
              num_parts=draw(st.one_of(st.none(), st.integers(1, 12))),
              decode_config={"BLOCK_N": draw(st.sampled_from([16, 32, 64]))})
    if not device:
        starts[:] = kw["start"]
    args = [bt, page, batch, s_q, draw(st.integers(1, 64))]
    unchecked = device and draw(sometimes(4))              # positions past the table, unchecked: confined
    if unchecked:
        starts[int(torch.randint(0, batch, (1,), generator=g))] = draw(st.sampled_from([-s_q, cap - s_q + 1, cap]))
        kw["validate"] = False
    expect = TypeError if fault in ("bt dtype", "bt 1-D", "bt rows", "bt last stride", "starts dtype",
                                    "starts shape") else ValueError
    if fault is not None:
        kw.pop("validate", None)
        unchecked = False
    if fault == "bt dtype":
        args[0] = bt.long()
    elif fault == "bt 1-D":
        args[0] = bt.flatten()
    elif fault == "bt rows":
        args[2] = bt.shape[0] + 1
    elif fault == "bt last stride":
        args[0] = torch.stack([bt, bt], -1)[..., 0]
    elif fault in ("batch 0", "s_q 0", "rows 0"):
        args[{"batch 0": 2, "s_q 0": 3, "rows 0": 4}[fault]] = 0
    elif fault == "starts dtype":
        starts, device = starts.long(), True
    elif fault == "starts shape":
        starts, device = torch.zeros(batch + 1, dtype=torch.int32), True
    elif fault == "start outside":
        kw["start"], device = draw(st.sampled_from([-1, cap - s_q + 1])), False
    elif fault == "starts outside":
        starts[0], device = draw(st.sampled_from([-1, cap - s_q + 1])), True
    elif fault is None:
        expect = None
    args[0] = args[0].to(DEV)
    if device:
        kw["starts"] = starts.to(DEV)
    return args, kw, starts, unchecked, expect


def check_mla_step(fz, case):
    args, kw, starts, unchecked, expect = case
    if expect is not None:
        with fz.refused(expect):
            mla.mla_step(*args, **kw)
        return
    step = mla.mla_step(*args, **kw)
    fz.confined() if unchecked else fz.in_contract()
    bt, page, batch, s_q, num_q_rows = args
    cap = bt.shape[1] * page
    pos = (starts.long()[:, None] + torch.arange(s_q)).flatten()          # token b * s_q + s: sequence b's s-th
    seq = torch.arange(batch).repeat_interleave(s_q)
    inside = (pos >= 0) & (pos < cap)
    pages = bt.cpu().long()[seq, (pos // page).clamp(0, max(bt.shape[1] - 1, 0))]
    want_slots = torch.where(inside, pages * page + pos % page, -1)
    assert step.batch == batch and step.s_q == s_q
    assert step.slots.cpu().tolist() == want_slots.tolist(), "slots"
    assert step.rope_rows.cpu().tolist() == (pos - kw["rope_base"]).tolist(), "rope rows"
    assert step.seqlens.cpu().tolist() == (starts.long() + s_q).tolist(), "seqlens"
    if unchecked:
        return
    md = step.metadata
    ref = mla.get_mla_metadata(step.seqlens, num_q_rows, block_n=kw["decode_config"]["BLOCK_N"],
                               num_parts=kw["num_parts"], split=kw["split"])
    assert (md.block_m, md.block_n, md.num_q_rows, md.combine) == (ref.block_m, ref.block_n, num_q_rows, kw["split"])
    assert torch.equal(md.tile_scheduler_metadata, ref.tile_scheduler_metadata), "schedule"
    assert torch.equal(md.num_splits, ref.num_splits), "num_splits"


@pytest.mark.parametrize("examples", TIERS)
def test_mla_step(examples, fuzz):
    run(check_mla_step, examples, fuzz, case=step_cases())
