"""Property-based tests of dskc.ops' FP8 / dense ops: act_quant, rmsnorm_act_quant, silu_mul_act_quant, fp8_gemm,
bf16_gemm. References: the 1x128 recipe in fp32 with IEEE division (bit-exact for act_quant), float64 otherwise."""
import math

import pytest
import torch
from hypothesis import strategies as st

from _fuzz import (AMAX, DEV, FLOATS, FP8, HALF, ROUNDING, SEEDS, TIERS, VALUE_MODES, assert_bits_equal,
                   dequant_1x128, e4m3_step, fault_or_none, generator, needs_kernels, poison_non_finite, quant_1x128,
                   run, sizes, sometimes, values)
from dskc.ops import fp8 as ops

pytestmark = [needs_kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


# ---------------------------------------------------------------- activations: layouts and values

@st.composite
def activations(draw, min_k=0, even=False):
    """(x, layout, expected error or None): x [*lead, K] in a drawn dtype, layout, value mode and magnitude."""
    layout = draw(st.sampled_from(["contiguous", "row-padded", "unit-stride slice"]) if draw(sometimes(8))
                  else st.sampled_from(["transposed", "unflattenable", "interleaved"]))
    lead = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), max_size=2))
    k = draw(sizes(384, lo=min_k, hi=400))
    if even:
        k += k % 2
    dtype = draw(st.sampled_from(FLOATS))
    mode, amax, bad = draw(VALUE_MODES), draw(AMAX), draw(st.sampled_from([0, 0, 0, 1, 3]))
    if dtype == torch.float16:
        amax = min(amax, 1e4)
    g = generator(draw(SEEDS))
    if layout == "unflattenable":
        lead = [max(lead[0], 2) if lead else 2, 3]
    x = values(g, (*lead, k), mode, amax)
    if mode in ("e4m3 grid", "e4m3 midpoints") and k:
        x[..., ::128] = amax                              # block amax = amax: x / s lands on the grid
    x = poison_non_finite(g, x, bad).to(dtype)
    expect = None
    if layout == "row-padded" and x.dim() >= 1:           # rows of a wider buffer: unit last stride, allowed
        wide = torch.full((*lead, k + 24), float("nan"), dtype=dtype)
        wide[..., 8:8 + k] = x
        x = wide[..., 8:8 + k]
    elif layout == "unit-stride slice" and len(lead) == 1:
        tall = torch.full((2 * lead[0], k), float("nan"), dtype=dtype)
        tall[::2] = x
        x = tall[::2]                                         # every other row of a taller buffer
    elif layout == "transposed" and lead:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        expect = ValueError if x.numel() and x.shape[-1] > 1 and x.stride(-1) != 1 else None
    elif layout == "interleaved":                          # every other element: last stride 2
        if not even and draw(st.booleans()):
            x = x[..., :1].contiguous()                    # ... of a size-1 last dim: stride irrelevant, allowed
        x = torch.stack([x, x], -1)[..., 0]
        expect = ValueError if x.numel() and x.shape[-1] > 1 else None   # a size-1 last dim has any stride
    elif layout == "unflattenable":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, leading dims not flattenable
        expect = ValueError if k > 0 else None
    return x.to(DEV), expect


def _check_quant(q, s, ref_q, ref_s, shape):
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert tuple(q.shape) == tuple(shape) and tuple(s.shape) == (*shape[:-1], -(-shape[-1] // 128))
    assert_bits_equal(s.cpu(), ref_s, "scales")
    assert_bits_equal(q.cpu(), ref_q, "e4m3 values")


def check_act_quant(fz, case, ue8m0):
    x, expect = case
    if expect is not None:
        with fz.refused(expect):
            ops.act_quant(x, ue8m0=ue8m0)
        return
    fz.in_contract()
    q, s = ops.act_quant(x, ue8m0=ue8m0)
    ref_q, ref_s = quant_1x128(x.cpu().float(), ue8m0)
    _check_quant(q, s, ref_q, ref_s, x.shape)


@pytest.mark.parametrize("examples", TIERS)
def test_act_quant(examples, fuzz):
    run(check_act_quant, examples, fuzz, case=activations(), ue8m0=st.booleans())


def _assert_quant_close(q, s, y64, ue8m0, rounded_to=None):
    """q * s within half an e4m3 step of y64 plus one step of the activation dtype `rounded_to` (the kernel rounds y
    to it; its subnormal step included); NaN exactly where y64 is not finite; scales within 1 % (2x under ue8m0)."""
    y64 = y64.cpu()
    finite = torch.isfinite(y64)
    ref_q, ref_s = quant_1x128(torch.where(finite, y64, 0.0).float(), ue8m0)
    ratio = s.cpu().double() / ref_s.double()
    assert bool(((ratio - 1).abs() <= (1.0 if ue8m0 else 1e-2)).all()), f"scales off by {ratio.max().item()}"
    deq = dequant_1x128(q.cpu(), s.cpu())
    assert torch.equal(deq.isnan(), ~finite), "NaN must appear exactly where the input is not finite"
    step = s.cpu().double().repeat_interleave(128, -1)[..., : y64.shape[-1]]
    yf = torch.where(finite, y64, 0.0)
    tiny = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}.get(rounded_to, 0.0)
    bound = (2.0 ** -4 + 2.0 ** -7) * yf.abs() * 1.01 + step * (e4m3_step(yf / step) * 0.51 + 2.0 ** -9) + tiny + 1e-30
    err = torch.where(finite, (deq - yf).abs(), 0.0)
    assert bool((err <= bound).all()), f"max err {(err - bound).max().item():.3g} over the bound"


def check_rmsnorm_act_quant(fz, case, ue8m0, residual, eps, w_seed):
    x, expect = case
    g = generator(w_seed)
    weight = (torch.rand(x.shape[-1], generator=g) + 0.5).to(x.dtype).to(DEV)
    r = (torch.randn(x.shape, generator=g) * 2).to(x.dtype).to(DEV) if residual else None
    if expect is not None:
        with fz.refused(expect):
            ops.rmsnorm_act_quant(x, weight, eps, residual=r, ue8m0=ue8m0)
        return
    fz.in_contract()
    outs = ops.rmsnorm_act_quant(x, weight, eps, residual=r, ue8m0=ue8m0)
    h = x.cpu()
    if residual:
        h = (x.cpu().float() + r.cpu().float()).to(x.dtype)
        assert_bits_equal(outs[2].cpu(), h, "residual out (x + residual, rounded)")
    h64 = h.double()
    y64 = h64 * torch.rsqrt((h64 * h64).mean(-1, keepdim=True) + eps) * weight.cpu().double()
    _assert_quant_close(outs[0], outs[1], y64, ue8m0, rounded_to=x.dtype)


@pytest.mark.parametrize("examples", TIERS)
def test_rmsnorm_act_quant(examples, fuzz):
    run(check_rmsnorm_act_quant, examples, fuzz, case=activations(min_k=1), ue8m0=st.booleans(),
        residual=st.booleans(), eps=st.sampled_from([1e-6, 1e-5, 0.5]), w_seed=SEEDS)


def check_silu_mul_act_quant(fz, case, ue8m0, odd):
    x, expect = case
    if odd and x.shape[-1] > 0:              # an odd last dim cannot split into gate | up
        x, expect = x[..., 1:], ValueError
    if expect is not None:
        with fz.refused(expect):
            ops.silu_mul_act_quant(x, ue8m0=ue8m0)
        return
    fz.in_contract()
    q, s = ops.silu_mul_act_quant(x, ue8m0=ue8m0)
    inter = x.shape[-1] // 2
    assert tuple(q.shape) == (*x.shape[:-1], inter)
    g64, u64 = x.cpu().double()[..., :inter], x.cpu().double()[..., inter:]
    y64 = g64 / (1 + torch.exp(-g64)) * u64
    if inter:
        _assert_quant_close(q, s, y64, ue8m0)


@pytest.mark.parametrize("examples", TIERS)
def test_silu_mul_act_quant(examples, fuzz):
    run(check_silu_mul_act_quant, examples, fuzz, case=activations(min_k=0, even=True), ue8m0=st.booleans(),
        odd=sometimes(2))


# ---------------------------------------------------------------- GEMMs

FAULTS = fault_or_none(["K % 128", "K differs", "sa shape", "sb shape", "a dtype", "misaligned a", "out shape",
                        "out dtype", "scales dtype"])


def _fp8_tensor(g, shape):
    """Random finite e4m3 values (every code but NaN) spread over the whole range."""
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes)
    return codes.view(FP8)


@st.composite
def fp8_gemm_cases(draw):
    fault = draw(FAULTS)
    m = draw(sizes(lo=0, hi=130))
    n = draw(sizes(lo=1, hi=300))
    k = 128 * draw(st.integers(1, 3))
    out_dtype = draw(st.sampled_from(FLOATS))
    give_out, col_major_scales, pad_rows = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    g = generator(draw(SEEDS))
    a, b = _fp8_tensor(g, (m, k)), _fp8_tensor(g, (n, k))
    if pad_rows:                                    # a with 16-byte aligned rows of a wider buffer: allowed
        a = torch.cat([a, _fp8_tensor(g, (m, 32))], 1)[:, :k]
    sa = torch.rand(m, k // 128, generator=g) * 2.0 ** draw(st.integers(-20, 0)) + 2.0 ** -30
    sb = (torch.rand(-(-n // 128), k // 128, generator=g) + 2.0 ** -20) / (448 * k)  # |out| <= 448
    if col_major_scales:
        sa, sb = sa.t().contiguous().t(), sb.t().contiguous().t()
    out = torch.full((m, n), float("nan"), dtype=out_dtype) if give_out else None
    expect = ValueError
    if fault == "K % 128":
        a, b, sa, sb = a[:, :k - 16], b[:, :k - 16], sa, sb
    elif fault == "K differs":
        b = _fp8_tensor(g, (n, k + 128))
    elif fault == "sa shape":
        sa = sa[:, :-1] if k > 128 else torch.rand(m + 1, 1, generator=g)
    elif fault == "sb shape":
        sb = torch.rand(-(-n // 128) + 1, k // 128, generator=g)
    elif fault == "a dtype":
        a, expect = a.float().to(torch.bfloat16), TypeError
    elif fault == "misaligned a" and m > 0:
        a = torch.cat([_fp8_tensor(g, (m, 1)), a], 1)[:, 1:]   # rows start 1 byte off 16
    elif fault == "out shape":
        out = torch.empty(m + 1, n, dtype=out_dtype)
    elif fault == "out dtype":
        out, expect = torch.empty(m, n, dtype=torch.float64), TypeError
    elif fault == "scales dtype":
        sa, expect = sa.double(), TypeError
    else:
        expect = None
    return [t.to(DEV) if t is not None else None for t in (a, sa, b, sb, out)], out_dtype, expect


def check_fp8_gemm(fz, case):
    (a, sa, b, sb, out), out_dtype, expect = case
    if expect is not None:
        with fz.refused(expect):
            ops.fp8_gemm(a, sa, b, sb, out=out, out_dtype=out_dtype)
        return
    fz.in_contract()
    res = ops.fp8_gemm(a, sa, b, sb, out=out, out_dtype=out_dtype)
    if out is not None:
        assert res is out
    k = a.shape[1]
    a64 = a.cpu().double() * sa.cpu().double().repeat_interleave(128, 1)[:, :k]
    b64 = b.cpu().double() * sb.cpu().double().repeat_interleave(128, 0)[: b.shape[0]].repeat_interleave(128, 1)
    ref = a64 @ b64.T
    scale = (a64.abs() @ b64.abs().T)                       # |a| |b|: the bound on fp32 accumulation error
    rtol, atol = ROUNDING[out_dtype]
    err = (res.cpu().double() - ref).abs()
    assert res.dtype == out_dtype and bool((err <= rtol * ref.abs() * 1.01 + 1e-5 * scale + atol).all()), \
        f"max err {err.max().item():.3g}"


@pytest.mark.parametrize("examples", TIERS)
def test_fp8_gemm(examples, fuzz):
    run(check_fp8_gemm, examples, fuzz, case=fp8_gemm_cases())


@st.composite
def bf16_gemm_cases(draw):
    fault = draw(fault_or_none(["K % 8", "dtypes differ", "K differs", "misaligned", "out dtype"]))
    m, n = draw(sizes(lo=0, hi=130)), draw(sizes(lo=1, hi=200))
    k = 8 * draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(HALF))
    g = generator(draw(SEEDS))
    amax = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    a = (torch.randn(m, k, generator=g) * amax).to(dtype)
    b = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype) if draw(st.booleans()) else None
    expect = ValueError
    if fault == "K % 8":
        a, b = a[:, : k - 3].contiguous(), b[:, : k - 3].contiguous()
    elif fault == "dtypes differ":
        b, expect = b.float(), TypeError
    elif fault == "K differs":
        b = torch.randn(n, k + 8, generator=g).to(dtype)
    elif fault == "misaligned" and m > 0:
        a = torch.randn(m * k + 1, generator=g).to(dtype)[1:].view(m, k)
    elif fault == "out dtype":
        out, expect = torch.empty(m, n, dtype=torch.float32), TypeError
    else:
        expect = None
    return [t.to(DEV) if t is not None else None for t in (a, b, out)], expect


def check_bf16_gemm(fz, case):
    (a, b, out), expect = case
    if expect is not None:
        with fz.refused(expect):
            ops.bf16_gemm(a, b, out=out)
        return
    fz.in_contract()
    res = ops.bf16_gemm(a, b, out=out)
    ref = a.cpu().double() @ b.cpu().double().T
    bound = a.cpu().double().abs() @ b.cpu().double().abs().T
    rtol, atol = ROUNDING[a.dtype]
    err = (res.cpu().double() - ref).abs()
    assert res.dtype == a.dtype and bool((err <= rtol * ref.abs() * 1.01 + 1e-5 * bound + atol).all()), \
        f"max err {err.max().item():.3g}"


@pytest.mark.parametrize("examples", TIERS)
def test_bf16_gemm(examples, fuzz):
    run(check_bf16_gemm, examples, fuzz, case=bf16_gemm_cases())
