"""Inputs outside the contracts (issue 18's randomized pass): each finding refused before any launch, or confined.

The rule: an id, a length or a value outside a contract is refused before launch where checking is cheap (one
device sync, skipped while a CUDA graph is captured), and otherwise masked in the kernel (never an out-of-bounds
access); a NaN in one token may make that token's output NaN, never another token's. docs/reliability.md lists
every class with its test.
"""
import pytest
import torch

from dskc import knobs
from dskc.compat import deep_gemm
from dskc.ops import fp8 as fp8_ops
from dskc.ops import mla, moe

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                 reason="needs a CUDA GPU or TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]   # numpy's NaN / inf arithmetic warnings
INTERP = knobs.get().triton_interpret
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
HALF = torch.float16 if INTERP else torch.bfloat16   # the interpreter's bf16 tl.dot is wrong (triton #11584)
FP8 = torch.float8_e4m3fn


def _gemm16(rows, E=2, N=128, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, K, generator=g).to(HALF).to(DEV)
    b = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(HALF).to(DEV)
    out = torch.full((rows, N), float("nan"), dtype=HALF, device=DEV)
    return a, b, out


def _fp8_operands(rows, E=2, N=128, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, K, generator=g).to(FP8).to(DEV)
    sa = torch.rand(rows, K // 128, generator=g).add(0.5).to(DEV)
    b = torch.randn(E, N, K, generator=g).to(FP8).to(DEV)
    sb = torch.rand(E, -(-N // 128), K // 128, generator=g).add(0.5).div(K).to(DEV)
    return a, sa, b, sb


# ---------------------------------------------------------------- grouped GEMM expert ids

@pytest.mark.parametrize("bad", [2, 3, 2 ** 30, -2])
def test_grouped_gemm_refuses_expert_ids_outside_range(bad, no_launch):
    """m_indices must hold -1 or an expert in [0, E): E, E + 1, a huge id (SIGSEGV before) and -2 are refused."""
    a, b, out = _gemm16(128)
    m_idx = torch.zeros(128, dtype=torch.int32, device=DEV)
    m_idx[64:] = bad
    with no_launch(), pytest.raises(ValueError, match="expert ids"):
        moe.grouped_gemm_contiguous(a, None, b, None, m_idx, out)
    assert out.isnan().all()


def test_grouped_gemm_refuses_block_expert_outside_range(no_launch):
    a, b, out = _gemm16(256)
    block_expert = torch.tensor([0, 2], dtype=torch.int32, device=DEV)
    with no_launch(), pytest.raises(ValueError, match="expert ids"):
        moe.grouped_gemm(a, None, b, None, out, block_expert=block_expert, align=128)


def test_deep_gemm_compat_refuses_expert_ids_outside_range(no_launch):
    a, sa, b, sb = _fp8_operands(128)
    m_idx = torch.full((128,), 2, dtype=torch.int32, device=DEV)
    d = torch.full((128, 128), float("nan"), dtype=HALF, device=DEV)
    with no_launch(), pytest.raises(ValueError, match="expert ids"):
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, m_idx)


@pytest.mark.parametrize("bad", [2, 2 ** 30])
def test_grouped_gemm_kernel_masks_ids_outside_range(bad):
    """Unchecked (validate=False, as under CUDA-graph capture): rows with an id outside [0, E) are skipped like -1,
    never read from outside B; the other rows are still right."""
    a, b, out = _gemm16(256, seed=1)
    m_idx = torch.full((256,), bad, dtype=torch.int32, device=DEV)
    m_idx[:70] = 1
    moe.grouped_gemm(a, None, b, None, out, m_indices=m_idx, validate=False)
    ref = a[:70].double() @ b[1].double().T
    assert torch.allclose(out[:70].double(), ref, atol=2e-2, rtol=2e-2)
    assert out[70:].isnan().all()
    block_expert = torch.tensor([1, bad], dtype=torch.int32, device=DEV)
    out.fill_(float("nan"))
    moe.grouped_gemm(a, None, b, None, out, block_expert=block_expert, align=128, validate=False)
    assert torch.allclose(out[:128].double(), a[:128].double() @ b[1].double().T, atol=2e-2, rtol=2e-2)
    assert out[128:].isnan().all()


def test_grouped_gemm_refuses_unaligned_segments(no_launch):
    """Two experts inside one BLOCK_M-row block: the kernel would store only one of them (rows left unwritten)."""
    a, b, out = _gemm16(128)
    m_idx = torch.zeros(128, dtype=torch.int32, device=DEV)
    m_idx[5:] = 1
    with no_launch(), pytest.raises(ValueError, match="segment"):
        moe.grouped_gemm_contiguous(a, None, b, None, m_idx, out)


def test_grouped_gemm_refuses_masked_m_outside_range(no_launch):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 16, 128, generator=g).to(HALF).to(DEV)
    b = torch.randn(2, 128, 128, generator=g).to(HALF).to(DEV)
    out = torch.empty(2, 16, 128, dtype=HALF, device=DEV)
    for bad in ([17, 0], [-1, 3]):
        with no_launch(), pytest.raises(ValueError, match="masked_m"):
            moe.grouped_gemm_masked(a, None, b, None, torch.tensor(bad, dtype=torch.int32, device=DEV), 8, out)


def test_grouped_gemm_checks_up_operand(no_launch):
    """b_up / sb_up: sb_up's dtype and both devices are checked (they were not)."""
    a, sa, b, sb = _fp8_operands(128)
    m_idx = torch.zeros(128, dtype=torch.int32, device=DEV)
    h = torch.empty(128, 128, dtype=FP8, device=DEV)
    sh = torch.empty(128, 1, dtype=torch.float32, device=DEV)
    kw = dict(m_indices=m_idx, epilogue="swiglu_quant", out_scale=sh)
    with no_launch(), pytest.raises(TypeError, match="sb_up"):
        moe.grouped_gemm(a, sa, b, sb, h, b_up=b.clone(), sb_up=sb.double(), **kw)
    with no_launch(), pytest.raises(ValueError, match="device"):
        moe.grouped_gemm(a, sa, b, sb, h, b_up=b.to("meta"), sb_up=sb.clone(), **kw)
    with no_launch(), pytest.raises(ValueError, match="device"):
        moe.grouped_gemm(a, sa, b, sb, h, b_up=b.clone(), sb_up=sb.to("meta"), **kw)
    a16, b16, out16 = _gemm16(128)
    with no_launch(), pytest.raises(ValueError, match="sb_up"):
        moe.grouped_gemm(a16, None, b16, None, out16, m_indices=m_idx, epilogue="swiglu", b_up=b16.clone(),
                         sb_up=sb.clone())


# ---------------------------------------------------------------- routing and permutation

def _route_cases():
    nan_row = torch.full((8,), float("nan"))
    plus_inf = torch.randn(8)
    plus_inf[3] = float("inf")
    minus_inf = torch.full((8,), float("-inf"))
    half_nan = torch.randn(8)
    half_nan[::2] = float("nan")
    return {"nan": nan_row, "+inf": plus_inf, "-inf row": minus_inf, "half nan": half_nan}


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
@pytest.mark.parametrize("case", list(_route_cases()))
def test_route_non_finite_token_keeps_valid_distinct_ids(case, groups, score_func):
    """ids stay in [0, E) and distinct per token whatever the logits; only the bad token's weights may be NaN."""
    torch.manual_seed(5)
    clean = torch.randn(6, 8)
    bad = clean.clone()
    bad[2] = _route_cases()[case]
    bias = torch.randn(8) * 0.1
    kw = dict(top_k=4, n_groups=groups[0], n_limited_groups=groups[1], score_func=score_func)
    w0, i0 = moe.moe_route(clean.to(DEV), bias.to(DEV), **kw)
    w1, i1 = moe.moe_route(bad.to(DEV), bias.to(DEV), **kw)
    ids = i1.cpu()
    assert ((ids >= 0) & (ids < 8)).all(), ids[2]
    assert all(len(set(r.tolist())) == 4 for r in ids), ids[2]
    others = torch.arange(6) != 2
    assert torch.equal(i1.cpu()[others], i0.cpu()[others])
    assert torch.equal(w1.cpu()[others], w0.cpu()[others])
    if groups[0] > 1:   # the kept groups still hold every pick
        assert (ids[2] // 2).unique().numel() <= 2


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_align_drops_ids_outside_range(layout):
    """An assignment with an id outside [0, E) (-1, E, huge) gets dest -1; no two assignments share a row."""
    ids = torch.tensor([[0, 1], [-1, 1], [4, 0], [2 ** 30, 3], [5, 2]], dtype=torch.int32, device=DEV)
    lay = moe.moe_align(ids, 5 if layout == "masked" else 4, layout=layout, align=4, validate=False)
    n_experts = lay.n_experts
    dest = lay.dest.cpu()
    flat = ids.cpu().flatten()
    bad = (flat < 0) | (flat >= n_experts)
    assert (dest[bad] == -1).all()
    assert (dest[~bad] >= 0).all()
    assert dest[~bad].unique().numel() == int((~bad).sum())
    sorted_ids = lay.sorted_ids.cpu()
    assert torch.equal(sorted_ids[dest[~bad].long()], torch.arange(flat.numel())[~bad].int())
    assert (lay.counts.cpu() == torch.bincount(flat[~bad].long(), minlength=n_experts)).all()


def test_align_refuses_ids_outside_range(no_launch):
    ids = torch.tensor([[0, 1], [-1, 1]], dtype=torch.int32, device=DEV)
    with no_launch(), pytest.raises(ValueError, match="expert ids"):
        moe.moe_align(ids, 4)


def _moe_weights(fp8, E, D, I, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    if not fp8:
        return w13.to(HALF).to(DEV), None, w2.to(HALF).to(DEV), None
    s13 = torch.rand(E, 2 * I // 128, D // 128, generator=g).add(0.5) / 448
    s2 = torch.rand(E, D // 128, I // 128, generator=g).add(0.5) / 448
    return (w13 * 100).to(FP8).to(DEV), s13.to(DEV), (w2 * 100).to(FP8).to(DEV), s2.to(DEV)


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_fused_moe_non_finite_token_leaves_other_tokens_bit_identical(fp8, layout, poison):
    """A NaN / inf in one token may make that token's output NaN, never change another token's (it did: the NaN
    token's ids == E landed on expert 0's first row and overwrote another token's)."""
    T, E, D, I, top_k = 9, 4, 128, 128, 2
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, D, generator=g).to(HALF).to(DEV)
    gw = (torch.randn(E, D, generator=g) / D ** 0.5).to(DEV)
    w13, s13, w2, s2 = _moe_weights(fp8, E, D, I, seed=12)
    config = {"layout": layout}
    if layout == "contiguous":   # 16-row segments: the default 128 makes E * 128 rows to run through the interpreter
        config.update(align=16, gemm1={"BLOCK_M": 16}, gemm2={"BLOCK_M": 16})
    kw = dict(top_k=top_k, n_groups=1, n_limited_groups=1, score_func="softmax", route_scale=1.0, config=config)
    clean = moe.fused_moe(x, gw, None, w13, s13, w2, s2, **kw)
    bad_x = x.clone()
    bad_x[4, 7] = poison
    out = moe.fused_moe(bad_x, gw, None, w13, s13, w2, s2, **kw)
    others = torch.arange(T) != 4
    assert torch.equal(out.cpu()[others], clean.cpu()[others])
    assert not torch.isfinite(out[4].float()).all()


def test_fused_moe_refuses_unsupported_width_before_any_launch(no_launch):
    """16-bit weights with D = 32: the grouped GEMM's BLOCK_K cannot tile K = 32; refused up front (was: after 6-7
    kernels had run)."""
    E, D, I = 4, 32, 64
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, D, generator=g).to(HALF).to(DEV)
    gw = torch.randn(E, D, generator=g).to(DEV)
    w13 = torch.randn(E, 2 * I, D, generator=g).to(HALF).to(DEV)
    w2 = torch.randn(E, D, I, generator=g).to(HALF).to(DEV)
    with no_launch(), pytest.raises(ValueError, match="grouped_gemm"):
        moe.fused_moe(x, gw, None, w13, None, w2, None, top_k=2, n_groups=1, n_limited_groups=1,
                      score_func="softmax", route_scale=1.0)


# ---------------------------------------------------------------- activation quantisation

def test_act_quant_non_finite_becomes_nan_never_finite():
    """Contract: a NaN or +-inf element quantises to e4m3 NaN; the block's scale comes from its finite elements, so
    every other element of the block quantises exactly as without it (was: NaN -> -448 * s, inf -> s = inf)."""
    torch.manual_seed(7)
    x = torch.randn(3, 256)
    bad = x.clone()
    bad[0, 3], bad[1, 200], bad[2, 0] = float("nan"), float("inf"), float("-inf")
    q0, s0 = fp8_ops.act_quant(x.to(DEV))
    q1, s1 = fp8_ops.act_quant(bad.to(DEV))
    deq = q1.float().cpu() * s1.cpu().repeat_interleave(128, 1)
    hit = ~torch.isfinite(bad)
    assert deq[hit].isnan().all()
    # the finite elements: exactly the quantisation of the same block without the bad element's magnitude
    x_masked = bad.masked_fill(hit, 0.0)
    q2, s2 = fp8_ops.act_quant(x_masked.to(DEV))
    assert torch.equal(s1.cpu(), s2.cpu()) and torch.isfinite(s1).all()
    assert torch.equal(q1.view(torch.uint8).cpu()[~hit], q2.view(torch.uint8).cpu()[~hit])
    assert torch.equal(q1.view(torch.uint8).cpu()[0, 128:], q0.view(torch.uint8).cpu()[0, 128:])   # clean block


@pytest.mark.parametrize("op", ["rmsnorm", "silu_mul"])
def test_fused_quant_nan_stays_in_its_row(op):
    torch.manual_seed(8)
    x = torch.randn(4, 256).to(DEV)
    bad = x.clone()
    bad[1, 17] = float("nan")
    if op == "rmsnorm":
        w = torch.rand(256).add(0.5).to(DEV)
        (q0, s0), (q1, s1) = fp8_ops.rmsnorm_act_quant(x, w), fp8_ops.rmsnorm_act_quant(bad, w)
    else:
        (q0, s0), (q1, s1) = fp8_ops.silu_mul_act_quant(x), fp8_ops.silu_mul_act_quant(bad)
    others = torch.arange(4) != 1
    assert torch.equal(q1.view(torch.uint8)[others], q0.view(torch.uint8)[others])
    assert torch.equal(s1[others], s0[others])
    assert (q1.float()[1] * s1[1].repeat_interleave(128)[: q1.shape[1]]).isnan().any()


def test_act_quant_empty_last_dim():
    """K = 0 returns empty results (it said 'make it contiguous' for a contiguous tensor)."""
    q, s = fp8_ops.act_quant(torch.randn(3, 0, device=DEV))
    assert q.shape == (3, 0) and s.shape == (3, 0) and q.dtype == FP8


# ---------------------------------------------------------------- MLA prefill

def test_mla_prefill_refuses_too_small_max_seqlen_q(no_launch):
    """max_seqlen_q sizes the grid: smaller than the longest sequence left rows unwritten; now refused."""
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 70, 75], dtype=torch.int32, device=DEV)
    q = torch.randn(75, 2, 192, generator=g).to(HALF).to(DEV)
    k = torch.randn(75, 2, 192, generator=g).to(HALF).to(DEV)
    v = torch.randn(75, 2, 128, generator=g).to(HALF).to(DEV)
    with no_launch(), pytest.raises(ValueError, match="max_seqlen_q"):
        mla.mla_prefill(q, k, v, cu, 0.1, max_seqlen_q=64)
    out, _ = mla.mla_prefill(q, k, v, cu, 0.1, max_seqlen_q=128)   # larger than needed is fine
    assert torch.isfinite(out.float()).all()


# ---------------------------------------------------------------- found by the property-based tests (tests/fuzz)

def test_size_one_last_dim_with_any_stride_is_accepted():
    """x [M, 1] whose last stride is not 1 (its size is 1, so the stride means nothing; torch calls [1, 1] with
    strides (2, 2) contiguous): act_quant refused it as 'not contiguous in its last dimension'."""
    base = torch.randn(8, device=DEV)
    for t in (base.as_strided((1, 1), (2, 2)), base.as_strided((3, 1), (2, 2))):
        q, s = fp8_ops.act_quant(t)
        ref_s = t.float().abs().clamp(min=1e-4) / 448
        assert q.shape == t.shape and torch.equal(s, ref_s)
        assert torch.equal(q.float() * s, (t.float() / ref_s).to(FP8).float() * ref_s)


def test_align_masked_without_tokens():
    """moe_align(layout='masked') of zero tokens raised 'max_m must be >= 1, got 0' for a max_m nobody passed."""
    lay = moe.moe_align(torch.zeros(0, 2, dtype=torch.int32, device=DEV), 3, layout="masked")
    assert lay.max_m == 1 and lay.rows == 3 and (lay.m_indices == -1).all() and (lay.counts == 0).all()


def test_gather_quant_keeps_nan():
    """moe_gather(quant=True) stored a NaN element as e4m3 384 under the interpreter (its e4m3 cast); NaN stays NaN
    and inf becomes NaN (act_quant's contract)."""
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(9)).to(HALF).to(DEV)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    lay = moe.moe_align(torch.tensor([[0], [1], [0]], dtype=torch.int32, device=DEV), 2, align=4)
    a, sa, _ = moe.moe_gather(x, lay, torch.ones(3, 1, device=DEV), quant=True)
    rows = lay.dest.long().cpu()
    deq = a.float().cpu()
    assert deq[rows[1], 5].isnan() and deq[rows[2], 7].isnan()
    assert torch.isfinite(sa.cpu()[rows]).all() and torch.isfinite(deq[rows[0]]).all()   # padding rows: unwritten


def test_rmsnorm_refuses_a_zero_dim_x(no_launch):
    """rmsnorm / rmsnorm_act_quant of a 0-D x raised IndexError from the shape check; now ValueError."""
    x, w = torch.ones((), dtype=HALF, device=DEV), torch.ones(1, dtype=HALF, device=DEV)
    with no_launch(), pytest.raises(ValueError, match="at least one dimension"):
        fp8_ops.rmsnorm(x, w)
    with no_launch(), pytest.raises(ValueError, match="at least one dimension"):
        fp8_ops.rmsnorm_act_quant(x, w)


@pytest.mark.parametrize("nope", [0, 48, 192, 512])
def test_mla_absorb_q_refuses_a_no_rope_width_it_cannot_tile(nope, no_launch):
    """The whole no-rope width is one tl.arange / dot K: nope 48 or 192 failed inside the launched kernel ('arange's
    range must be a power of 2'), 512 with a config-constraint error; now ValueError naming the width."""
    q = torch.randn(2, 2, nope + 64, device=DEV)
    w = torch.randn(2, 512, nope, device=DEV).to(HALF)
    rows = torch.zeros(2, dtype=torch.int32, device=DEV)
    with no_launch(), pytest.raises(ValueError, match="no-rope width"):
        mla.mla_absorb_q(q, w, torch.randn(4, 32, 2, device=DEV), rows, HALF)


def test_mla_absorb_refuse_non_float_dtypes(no_launch):
    """out_dtype / act_dtype outside bf16 / fp16 / fp32 raised KeyError from the config lookup; now TypeError."""
    q = torch.randn(1, 1, 192, device=DEV)
    with no_launch(), pytest.raises(TypeError, match="out_dtype"):
        mla.mla_absorb_q(q, torch.zeros(1, 512, 128, dtype=torch.int32, device=DEV), torch.randn(4, 32, 2, device=DEV),
                         torch.zeros(1, dtype=torch.int32, device=DEV), torch.int32)
    out, w = torch.randn(1, 2, 512, device=DEV).to(HALF), torch.randn(2, 64, 512, device=DEV).to(HALF)
    for act in (torch.int32, torch.float64):
        with no_launch(), pytest.raises(TypeError, match="act_dtype"):
            mla.mla_absorb_o(out, w, act, True)


def test_moe_gate_accepts_an_empty_last_dim_with_any_stride():
    """moe_gate refused x [T, 0] whose last stride is not 1 ('unit last stride'), which the project's rule accepts
    (a last dim of size <= 1 has any stride); the logits of D = 0 are zeros."""
    x = torch.randn(3, 0, device=DEV).as_strided((3, 0), (2, 2))
    logits = moe.moe_gate(x, torch.randn(4, 0, device=DEV))
    assert logits.shape == (3, 4) and bool((logits == 0).all())


def test_value_checks_are_skipped_while_a_cuda_graph_is_captured(monkeypatch):
    """The ops read device values (one sync) only outside CUDA-graph capture; there the kernels' masks are all that
    stands between a bad id and memory, which the confined cases above exercise with validate=False."""
    from dskc.ops._validate import should_validate
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not should_validate(None, cuda) and should_validate(True, cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert should_validate(None, cuda) and should_validate(None, torch.device("cpu"))
    assert not should_validate(False, torch.device("cpu"))
