"""The lean decode step's MoE fusions, each against the unfused path it replaces, on odd shapes (one token, 3
tokens, experts with no tokens, every token on one expert):

- moe_gate (the gate GEMM as a kernel) against the reference's fp32 torch product;
- moe_route with shared experts appended, and moe_route_align (routing + the masked layout in one program) against
  moe_route then moe_align: identical ids, weights and layout;
- the grouped GEMMs reading token rows / routing weights through the layout against moe_gather + the plain GEMMs:
  bit-identical rows (the same kernel arithmetic on the same operands);
- moe_combine with the residual add against moe_combine then the add: bit-identical;
- fused_moe with the shared experts as always-selected experts of the routed GEMMs against the shared MLP run apart,
  and with a pre-quantised x and a residual against fused_moe + act_quant + add;
- layout ids outside the assignments (unchecked under CUDA-graph capture) confined to their own rows.
"""
import pytest
import torch

from dskc import knobs
from dskc.ops import moe
from dskc.ops.fp8 import act_quant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
INTERP = knobs.get().triton_interpret
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
FP8 = torch.float8_e4m3fn
ROUTE = dict(top_k=3, n_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5)


def _logits(t, e, seed, only=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=g)
    if only is not None:            # every token's best expert is `only`, in the best group (4 experts a group)
        x[:, only // 4 * 4:only // 4 * 4 + 4] += 5.0
        x[:, only] += 5.0
    return x.to(DEV)


@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
def test_gate_kernel_equals_the_fp32_product(t, wdtype):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, 256, generator=g).to(torch.bfloat16).to(DEV)
    w = (torch.randn(16, 256, generator=g) / 16).to(wdtype).to(DEV)
    logits = moe.moe_gate(x, w)
    want = x.float() @ w.float().t()
    assert logits.dtype == torch.float32 and logits.shape == (t, 16)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="D % 32"):
        moe.moe_gate(x[:, :100], w[:, :100].contiguous())


@pytest.mark.parametrize("t,only,renorm", [(1, None, None), (3, None, None), (5, 6, None), (19, None, None),
                                           (3, None, False)])
@pytest.mark.parametrize("n_shared", [0, 2])
def test_route_align_equals_route_then_align(t, only, renorm, n_shared):
    logits = _logits(t, 16, seed=t, only=only)
    bias = (torch.randn(16, generator=torch.Generator().manual_seed(9)) * 0.01).to(DEV)
    route = dict(ROUTE, renorm=renorm)      # renorm False: a sigmoid router without renormalisation
    w0, i0 = moe.moe_route(logits, bias, **route)
    w1, i1 = moe.moe_route(logits, bias, n_shared=n_shared, **route)
    k = ROUTE["top_k"]
    assert torch.equal(w1[:, :k], w0) and torch.equal(i1[:, :k], i0)
    if n_shared:     # the shared experts: E .. E + n - 1, weight 1
        assert (i1[:, k:] == torch.arange(16, 16 + n_shared, dtype=torch.int32, device=DEV)).all()
        assert (w1[:, k:] == 1).all()
    w2, i2, lay = moe.moe_route_align(logits, bias, n_shared=n_shared, **route)
    assert torch.equal(w2, w1) and torch.equal(i2, i1)
    ref = moe.moe_align(i1, 16 + n_shared, layout="masked", max_m=t)
    assert torch.equal(lay.counts, ref.counts) and torch.equal(lay.dest, ref.dest)
    for e in range(16 + n_shared):                 # the used rows of every expert (the others are never read)
        c = int(ref.counts[e])
        assert torch.equal(lay.sorted_ids[e * t:e * t + c], ref.sorted_ids[e * t:e * t + c])
    if only is not None:
        assert int(lay.counts[only]) == t and (lay.counts[:16] == 0).any()     # experts with no tokens too


def _experts(e, d, inter, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, d, generator=g) * 0.3).to(FP8).to(DEV)
    w2 = (torch.randn(e, d, inter, generator=g) * 0.3).to(FP8).to(DEV)
    s13 = (torch.rand(e, 2 * inter // 128, d // 128, generator=g) * 0.01 + 0.005).to(DEV)
    s2 = (torch.rand(e, d // 128, inter // 128, generator=g) * 0.01 + 0.005).to(DEV)
    return w13, s13, w2, s2


@pytest.mark.parametrize("layout,t,only", [("masked", 1, None), ("masked", 3, None), ("contiguous", 3, None),
                                           ("masked", 4, 5)])
def test_gemms_through_the_layout_equal_gather_then_gemms(layout, t, only):
    e, d, inter = 6, 256, 128
    w13, s13, w2, s2 = _experts(e, d, inter, seed=t)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(DEV)
    w, ids = moe.moe_route(_logits(t, e, seed=4, only=only), None, top_k=2, n_groups=1, n_limited_groups=1,
                           score_func="softmax", route_scale=1.0)
    lay = moe.moe_align(ids, e, layout=layout, max_m=t, align=128)
    if only is not None:        # every token on expert `only`, and experts with no tokens
        assert (ids[:, 0] == only).all() and int((lay.counts == 0).sum()) >= e - 3
    a, sa, rw = moe.moe_gather(x, lay, w, quant=True)
    q, s = act_quant(x)
    if layout == "masked":
        maps, lead = {"masked_m": lay.counts}, (e, t)
        a, sa = a.view(e, t, d), sa.view(e, t, -1)
    else:
        maps, lead = {"block_expert": lay.block_expert, "align": 128}, (lay.rows,)
    outs = []
    for gathered in (False, True):
        h = torch.full(lead + (inter,), float("nan"), device=DEV).to(FP8)
        sh = torch.full(lead + (inter // 128,), float("nan"), device=DEV)
        rows = dict(a_rows=lay.sorted_ids, top_k=2) if gathered else {}
        moe.grouped_gemm(q if gathered else a, s if gathered else sa, w13, s13, h, epilogue="swiglu_quant",
                         out_scale=sh, **rows, **maps)
        y = torch.full(lead + (d,), float("nan"), dtype=torch.bfloat16, device=DEV)
        wts = dict(row_weight=w.view(-1), weight_rows=lay.sorted_ids, top_k=2) if gathered else dict(row_weight=rw)
        moe.grouped_gemm(h, sh, w2, s2, y, epilogue="weight", **wts, **maps)
        outs.append(moe.moe_combine(y, lay))
    assert torch.isfinite(outs[1]).all()
    # act_quant and the gather kernel quantise the same rows the same way up to the last bit of a scale (IEEE vs
    # approximate division on a GPU); on the CPU the two paths are equal
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)
    if DEV == "cpu":
        assert torch.equal(outs[1], outs[0])


@pytest.mark.parametrize("t,only", [(1, None), (3, None), (4, 2)])
def test_combine_with_the_residual_equals_combine_then_add(t, only):
    e, n = 5, 384
    ids = moe.moe_route(_logits(t, e, seed=t, only=only), None, top_k=2, n_groups=1, n_limited_groups=1,
                        score_func="softmax", route_scale=1.0)[1]
    lay = moe.moe_align(ids, e, layout="masked", max_m=t)
    g = torch.Generator().manual_seed(t)
    y = torch.randn(e, t, n, generator=g).to(torch.bfloat16).to(DEV)
    res = torch.randn(t, n, generator=g).to(torch.bfloat16).to(DEV)
    assert torch.equal(moe.moe_combine(y, lay, residual=res), moe.moe_combine(y, lay) + res)


def _moe_case(t, seed, only=None):
    e, d, inter = 8, 256, 128
    w13, s13, w2, s2 = _experts(e + 2, d, inter, seed)        # 8 routed + the shared MLP as 2 experts
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, d, generator=g).to(torch.bfloat16).to(DEV)
    gw = (torch.randn(e, d, generator=g) / 16).to(DEV)
    if only is not None:
        gw[only] = x.float().mean(0) * 4                          # every token scores expert `only` highest
    return x, gw, (w13, s13, w2, s2), dict(top_k=2, n_groups=2, n_limited_groups=1, score_func="softmax",
                                            route_scale=1.0)


@pytest.mark.parametrize("t,only", [(1, None), (3, None), (4, 5)])
def test_shared_experts_as_routed_experts_equal_the_shared_mlp_apart(t, only):
    x, gw, (w13, s13, w2, s2), route = _moe_case(t, seed=t, only=only)
    inter = w13.shape[1] // 2
    shared = {"w1": torch.cat([w13[8, :inter], w13[9, :inter]]), "w3": torch.cat([w13[8, inter:], w13[9, inter:]]),
              "w2": torch.cat([w2[8], w2[9]], 1), "w1_scale": torch.cat([s13[8, :1], s13[9, :1]]),
              "w3_scale": torch.cat([s13[8, 1:], s13[9, 1:]]), "w2_scale": torch.cat([s2[8], s2[9]], 1)}
    apart = moe.fused_moe(x, gw, None, w13[:8], s13[:8], w2[:8], s2[:8], shared=shared, **route)
    inside = moe.fused_moe(x, gw, None, w13, s13, w2, s2, n_shared=2, **route)
    assert torch.isfinite(inside).all()
    # the only difference: the shared MLP's output is rounded per 128-wide half before the combine sums it
    cos = torch.nn.functional.cosine_similarity(inside.double().flatten(), apart.double().flatten(), dim=0)
    assert cos > 0.9999, cos
    torch.testing.assert_close(inside.float(), apart.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("t,layout", [(1, "masked"), (3, "masked"), (3, "contiguous")])
def test_prequantised_input_and_residual_equal_the_separate_passes(t, layout):
    x, gw, (w13, s13, w2, s2), route = _moe_case(t, seed=10 + t)
    res = torch.randn(t, x.shape[1], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEV)
    cfg = {"layout": layout}
    plain = moe.fused_moe(x, gw, None, w13, s13, w2, s2, n_shared=2, config=cfg, **route)
    fused = moe.fused_moe(x, gw, None, w13, s13, w2, s2, n_shared=2, x_quant=act_quant(x), residual=res,
                          config=cfg, **route)
    assert torch.equal(fused, plain + res)
    with pytest.raises(TypeError, match="x_quant"):
        moe.fused_moe(x, gw, None, w13, s13, w2, s2, n_shared=2, x_quant=(x, x), **route)
    with pytest.raises(ValueError, match="n_shared"):
        moe.fused_moe(x, gw, None, w13, s13, w2, s2, n_shared=10, **route)


def test_assignment_ids_outside_the_tokens_are_confined():
    """A layout row naming an assignment outside [0, T * top_k) (unchecked ids, as under CUDA-graph capture) reads
    token 0's row and routing weight 0, never memory outside the operands; the other rows are unaffected."""
    e, d, inter, t = 2, 256, 128, 2
    w13, s13, w2, s2 = _experts(e, d, inter, seed=3)
    g = torch.Generator().manual_seed(1)
    q, s = act_quant(torch.randn(t, d, generator=g).to(torch.bfloat16).to(DEV))
    rw = torch.rand(t * 2, generator=g).to(DEV) + 0.5
    counts = torch.tensor([2, 1], dtype=torch.int32, device=DEV)
    outs = []
    for bad in (1, 10 ** 6, -7):        # 1: token 0's second assignment (valid); the others name no assignment
        rows = torch.tensor([0, 2, bad, -1], dtype=torch.int32, device=DEV)     # [E=2, M_max=2] layout rows
        h = torch.full((e, t, inter), float("nan"), device=DEV).to(FP8)
        sh = torch.full((e, t, 1), float("nan"), device=DEV)
        moe.grouped_gemm(q, s, w13, s13, h, epilogue="swiglu_quant", out_scale=sh, a_rows=rows, top_k=2,
                         masked_m=counts)
        y = torch.full((e, t, d), float("nan"), dtype=torch.bfloat16, device=DEV)
        moe.grouped_gemm(h, sh, w2, s2, y, epilogue="weight", row_weight=rw, weight_rows=rows, top_k=2,
                         masked_m=counts)
        used = torch.stack([h[0, 0], h[0, 1], h[1, 0]]).float(), torch.stack([sh[0, 0], sh[0, 1], sh[1, 0]])
        outs.append((used, y))
    (h_ok, s_ok), y_ok = outs[0]
    assert torch.isfinite(h_ok).all() and torch.isfinite(y_ok[0]).all() and (y_ok[1, 0] != 0).any()
    for (h_bad, s_bad), y_bad in outs[1:]:
        assert torch.equal(h_bad, h_ok) and torch.equal(s_bad, s_ok)       # token 0's row, as id 1 reads
        assert torch.equal(y_bad[0], y_ok[0])                                # expert 0's rows unaffected
        assert (y_bad[1, 0] == 0).all()                                      # routing weight 0
