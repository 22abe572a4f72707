"""Property-based tests of the lean decode step's MoE and norm ops: moe_gate, moe_route_align, rmsnorm.
References: the gate GEMM in float64 (x rounded to the weight's dtype first), moe_route then moe_align (both fuzzed
in test_fuzz_moe.py) for the one-program routing + layout, RMSNorm in float64. A NaN token's outputs are NaN and
no other token's change: each reference is per token, and NaN must appear exactly where the reference has it."""
import pytest
import torch
from hypothesis import strategies as st

from _fuzz import (DEV, FLOATS, HALF, ROUNDING, SEEDS, TIERS, assert_close, assert_gemm_close, fault_or_none,
                   generator, needs_kernels, run, sizes, sometimes)
from dskc import ops
from dskc.ops import moe
from test_fuzz_fp8 import activations
from test_fuzz_moe import route_cases

pytestmark = [needs_kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
FP8_E4M3 = torch.float8_e4m3fn
W_DTYPES = (*HALF, torch.float32)            # the gate's tl.dot operands: bf16 is wrong under the interpreter


def nan_tokens(g: torch.Generator, x: torch.Tensor, tenths_rows: int) -> torch.Tensor:
    """x with NaN in a random element of about tenths_rows / 10 of its tokens (dim 0)."""
    x = x.clone()
    if x.shape[0] and x[0].numel():
        rows = (torch.rand(x.shape[0], generator=g) < tenths_rows / 10).nonzero().flatten()
        flat = x.view(x.shape[0], -1)
        for r in rows.tolist():
            flat[r, int(torch.randint(0, flat.shape[1], (1,), generator=g))] = float("nan")
    return x


# ---------------------------------------------------------------- moe_gate

@st.composite
def gate_cases(draw):
    fault = draw(fault_or_none(["x dtype", "w dtype", "x 3-D", "w 1-D", "D % 32", "D mismatch", "x last stride",
                                "w non-contiguous"], tenths=3))
    t = draw(sizes(lo=0, hi=70))
    e = draw(st.sampled_from([1, 2, 3, 7, 8, 16, 33, 64, 65, 256]))
    d = draw(st.sampled_from([0, 32, 64, 96, 160, 256, 288]))
    xd, wd = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(W_DTYPES))
    layout = draw(st.sampled_from(["contiguous", "row-padded", "every other row"]))
    g = generator(draw(SEEDS))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    x = nan_tokens(g, torch.randn(t, d, generator=g) * scale, draw(st.sampled_from([0, 0, 2]))).to(xd)
    w = (torch.randn(e, d, generator=g) / max(d, 1) ** 0.5).to(wd)
    if layout == "row-padded":                            # rows of a wider buffer: unit last stride, allowed
        x = torch.cat([x, torch.full((t, 40), float("nan"), dtype=xd)], 1)[:, :d]
    elif layout == "every other row":
        x = torch.stack([x, torch.full_like(x, float("nan"))], 1).flatten(0, 1)[::2]
    expect = TypeError if fault in ("x dtype", "w dtype") else ValueError
    if fault == "x dtype":
        x = x.double()
    elif fault == "w dtype":
        w = w.double()
    elif fault == "x 3-D":
        x = x[None]
    elif fault == "w 1-D":
        w = w.flatten()
    elif fault == "D % 32":
        x, w = torch.randn(t, d + 16).to(xd), torch.randn(e, d + 16).to(wd)
    elif fault == "D mismatch":
        w = torch.randn(e, d + 32).to(wd)
    elif fault == "x last stride":
        x = torch.stack([x, x], -1)[..., 0]
        expect = ValueError if d > 1 else None
    elif fault == "w non-contiguous":
        w = torch.stack([w, w], -1)[..., 0]
        expect = ValueError if d > 1 else None
    elif fault is None:
        expect = None
    return x.to(DEV), w.to(DEV), expect


def check_moe_gate(fz, case):
    x, w, expect = case
    if expect is not None:
        with fz.refused(expect):
            moe.moe_gate(x, w)
        return
    fz.in_contract()
    logits = moe.moe_gate(x, w)
    assert logits.dtype == torch.float32 and logits.shape == (x.shape[0], w.shape[0])
    x64, w64 = x.cpu().to(w.dtype).double(), w.cpu().double()
    if x.shape[0] and bool(x.isnan().any()):
        fz.note("with NaN tokens")
    assert_gemm_close(logits, x64 @ w64.t(), x64.abs() @ w64.abs().t(), "gate logits")


@pytest.mark.parametrize("examples", TIERS)
def test_moe_gate(examples, fuzz):
    run(check_moe_gate, examples, fuzz, case=gate_cases())


# ---------------------------------------------------------------- moe_route_align

def check_moe_route_align(fz, case, n_shared, renorm):
    logits, bias, kw, expect = case
    if expect is None and n_shared < 0:
        expect = ValueError
    kw = dict(kw, n_shared=n_shared, renorm=renorm)
    if expect is not None:
        with fz.refused(expect):
            moe.moe_route_align(logits, bias, **kw)
        return
    fz.in_contract()
    w, ids, lay = moe.moe_route_align(logits, bias, **kw)
    w0, ids0 = moe.moe_route(logits, bias, **kw)
    t, e2 = logits.shape[0], logits.shape[1] + n_shared
    assert torch.equal(ids, ids0), "ids differ from moe_route's"
    assert torch.equal(w.isnan(), w0.isnan()) and torch.equal(w.nan_to_num(), w0.nan_to_num()), \
        "weights differ from moe_route's"
    assert lay.kind == "masked" and lay.n_experts == e2 and lay.max_m == t and lay.rows == e2 * t
    if not bool(torch.isfinite(logits).all()):
        fz.note("with non-finite tokens")
    if n_shared:
        fz.note("with shared experts")
    counts, dest, rows = masked_layout(ids0.cpu(), e2)
    assert torch.equal(lay.counts.cpu(), counts) and torch.equal(lay.dest.cpu(), dest), "layout differs"
    sorted_ids = lay.sorted_ids.cpu()
    assert all(sorted_ids[e * t:e * t + len(r)].tolist() == r for e, r in enumerate(rows)), "sorted_ids differ"


def masked_layout(ids: torch.Tensor, n_experts: int):
    """moe_align's masked layout in plain Python: (counts, dest, per expert the assignments of its used rows), the
    assignments t * top_k + j of each expert in token order in the block of max_m = T rows."""
    t = ids.shape[0]
    flat = ids.flatten().tolist()
    rows = [[a for a, e in enumerate(flat) if e == x] for x in range(n_experts)]
    dest = torch.empty(len(flat), dtype=torch.int32)
    for x, r in enumerate(rows):
        for i, a in enumerate(r):
            dest[a] = x * t + i
    return torch.tensor([len(r) for r in rows], dtype=torch.int32), dest, rows

@pytest.mark.parametrize("examples", TIERS)
def test_moe_route_align(examples, fuzz):
    run(check_moe_route_align, examples, fuzz, case=route_cases(max_t=20),     # one program: decode-sized T
        n_shared=st.one_of(st.just(0), st.integers(1, 3), st.just(-1)), renorm=st.sampled_from([None, True, False]))


# ---------------------------------------------------------------- rmsnorm

@st.composite
def rmsnorm_cases(draw):
    x, expect = draw(activations(min_k=1))
    fault = draw(fault_or_none(["w dtype", "w length", "w 2-D", "eps", "out dtype", "x 0-D", "x int"], tenths=2))
    g = generator(draw(SEEDS))
    w = (torch.rand(x.shape[-1], generator=g) + 0.5).to(x.dtype).to(DEV)
    kw = dict(eps=draw(st.sampled_from([1e-6, 1e-5, 0.5])), out_dtype=draw(st.sampled_from([None, *FLOATS])))
    if fault is not None and expect is None:
        expect = TypeError if fault in ("w dtype", "out dtype", "x int") else ValueError
        if fault == "w dtype":
            w = w.double()
        elif fault == "w length":
            w = torch.ones(x.shape[-1] + 1, dtype=x.dtype, device=DEV)
        elif fault == "w 2-D":
            w = w[None]
        elif fault == "eps":
            kw["eps"] = draw(st.sampled_from([0.0, -1e-6, float("nan")]))
        elif fault == "out dtype":
            kw["out_dtype"] = draw(st.sampled_from([torch.float64, torch.int8, FP8_E4M3]))
        elif fault == "x 0-D":
            x, w = torch.ones((), dtype=x.dtype, device=DEV), torch.ones(1, dtype=x.dtype, device=DEV)
        else:
            x, w = x.to(torch.int32), w.to(torch.int32)
    return x, w, kw, expect



def check_rmsnorm(fz, case):
    x, w, kw, expect = case
    if expect is not None:
        with fz.refused(expect):
            ops.rmsnorm(x, w, **kw)
        return
    fz.in_contract()
    y = ops.rmsnorm(x, w, **kw)
    out_dtype = kw["out_dtype"] or x.dtype
    assert y.dtype == out_dtype and y.shape == x.shape
    if not bool(torch.isfinite(x).all()):
        fz.note("with non-finite tokens")
    x64 = x.cpu().double()
    y64 = x64 * torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + kw["eps"]) * w.cpu().double()
    (rx, ax), (ro, ao) = ROUNDING[x.dtype], ROUNDING[out_dtype]
    # rounded to x's dtype then stored in out_dtype (half an ulp each, doubled for the two roundings), plus the fp32
    # arithmetic (rsqrt's few ulps)
    assert_close(y, y64, atol=2 * (ax + ao), rtol=2.02 * (rx + ro) + 2e-6, what="rmsnorm")


@pytest.mark.parametrize("examples", TIERS)
def test_rmsnorm(examples, fuzz):
    run(check_rmsnorm, examples, fuzz, case=rmsnorm_cases())
