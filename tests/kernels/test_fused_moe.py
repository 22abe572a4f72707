"""fused_moe (route -> permute -> grouped GEMM + SwiGLU -> grouped GEMM + weights -> combine, + shared experts)
against the DeepSeek-V3 MoE block written in float64 PyTorch on the same (dequantised) numbers."""
import pytest
import torch
import torch.nn.functional as F

from dskc import knobs
from dskc.ops import moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
INTERP = knobs.get().triton_interpret
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
HALF = torch.float16 if INTERP else torch.bfloat16   # the interpreter's bf16 tl.dot is wrong (triton #11584)
FP8 = torch.float8_e4m3fn


def quant_rows(x):
    g = x.double().reshape(*x.shape[:-1], -1, 128)
    s = (g.abs().amax(-1).clamp(min=1e-4) / 448.0).float()
    q = (g.float() / s[..., None]).to(FP8)
    return (q.double() * s.double()[..., None]).reshape(x.shape)       # the dequantised values


def quant_blocks(w):
    """128x128 block quantisation of w [..., N, K] -> (e4m3, scales, dequantised float64)."""
    *lead, n, k = w.shape
    g = w.reshape(*lead, n // 128, 128, k // 128, 128)
    s = g.abs().amax((-3, -1)).clamp(min=1e-4) / 448.0
    q = (g / s[..., None, :, None]).to(FP8)
    deq = (q.double() * s.double()[..., None, :, None]).reshape(w.shape)
    return q.reshape(w.shape).contiguous(), s.contiguous(), deq


def gate(logits, bias, top_k, n_groups, n_limited_groups, score_func, route_scale):
    logits = logits.double()
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    sel = scores if bias is None else scores + bias.double()
    if n_groups > 1:
        g = sel.view(sel.shape[0], n_groups, -1)
        gs = g.amax(-1) if bias is None else g.topk(2, -1)[0].sum(-1)
        drop = torch.ones_like(gs, dtype=torch.bool).scatter_(1, gs.topk(n_limited_groups, -1)[1], False)
        sel = g.masked_fill(drop[:, :, None], float("-inf")).flatten(1)
    ids = sel.topk(top_k, -1)[1]
    w = scores.gather(1, ids)
    if score_func == "sigmoid":
        w = w / w.sum(-1, keepdim=True)
    return w * route_scale, ids


def mlp(x, w1, w3, w2, fp8):
    """w2(silu(w1 x) * w3 x) in float64, with the kernel's activation quantisation points when fp8."""
    h = F.silu(x @ w1.T) * (x @ w3.T)
    return (quant_rows(h) if fp8 else h) @ w2.T


def make_case(fp8, T, E, D, I, top_k, has_bias, with_shared, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(HALF)
    gw = torch.randn(E, D, generator=g) / D ** 0.5
    bias = torch.randn(E, generator=g) * 0.3 if has_bias else None
    w13 = torch.randn(E, 2 * I, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    sh = {n: torch.randn(*s, generator=g) / s[1] ** 0.5 for n, s in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I)))}
    if fp8:
        (q13, s13, w13), (q2, s2, w2) = quant_blocks(w13), quant_blocks(w2)
        args, ref_w = [q13, s13, q2, s2], {"w13": w13, "w2": w2}
        shared, ref_sh = {}, {}
        for n, w in sh.items():
            shared[n], shared[n + "_scale"], ref_sh[n] = quant_blocks(w)
    else:
        args = [w13.to(HALF), None, w2.to(HALF), None]
        ref_w = {"w13": w13.to(HALF).double(), "w2": w2.to(HALF).double()}
        shared = {n: w.to(HALF) for n, w in sh.items()}
        ref_sh = {n: w.double() for n, w in shared.items()}
    move = lambda t: t.to(DEV) if t is not None else None  # noqa: E731
    return (move(x), move(gw), move(bias), [move(t) for t in args],
            {n: move(t) for n, t in shared.items()} if with_shared else None, ref_w, ref_sh if with_shared else None)


def reference(x, gw, bias, ref_w, ref_sh, fp8, route):
    logits = x.float() @ gw.float().t()                       # the same fp32 logits fused_moe routes on
    w, ids = gate(logits.cpu(), None if bias is None else bias.cpu(), **route)
    xr = quant_rows(x.cpu()) if fp8 else x.cpu().double()
    inter = ref_w["w13"].shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        w13 = ref_w["w13"][e]
        y = mlp(xr[tok], w13[:inter], w13[inter:], ref_w["w2"][e], fp8)
        out.index_add_(0, tok, y * w[tok, slot][:, None])
    if ref_sh is not None:
        out += mlp(xr, ref_sh["w1"], ref_sh["w3"], ref_sh["w2"], fp8)
    return out, ids


CASES = [  # fp8, T, E, top_k, n_groups, n_limited, score_func, bias, route_scale, shared, layout, align
    (True, 1, 4, 1, 1, 1, "softmax", False, 1.0, False, "contiguous", 128),     # one token, top-1
    (True, 37, 8, 3, 4, 2, "sigmoid", True, 2.5, True, "masked", 128),         # V3-style gate, shared
    (True, 23, 6, 6, 1, 1, "sigmoid", False, 1.0, False, "auto", 64),          # top_k = number of experts
    (True, 19, 8, 2, 4, 1, "sigmoid", True, 2.5, True, "contiguous", 64),      # one group: idle experts
    (False, 29, 8, 2, 2, 1, "softmax", False, 16.0, True, "contiguous", 64),
    (False, 3, 5, 3, 1, 1, "softmax", False, 1.0, False, "masked", 128),
]


@pytest.mark.parametrize("fp8,T,E,top_k,n_groups,n_limited,score_func,has_bias,route_scale,with_shared,layout,align",
                         CASES)
def test_fused_moe_matches_block(fp8, T, E, top_k, n_groups, n_limited, score_func, has_bias, route_scale,
                                 with_shared, layout, align):
    D, I = 256, 128
    x, gw, bias, (w13, s13, w2, s2), shared, ref_w, ref_sh = make_case(fp8, T, E, D, I, top_k, has_bias,
                                                                        with_shared, seed=T * E)
    route = dict(top_k=top_k, n_groups=n_groups, n_limited_groups=n_limited, score_func=score_func,
                 route_scale=route_scale)
    out = moe.fused_moe(x, gw, bias, w13, s13, w2, s2, shared=shared, config={"layout": layout, "align": align},
                        **route)
    ref, _ = reference(x, gw, bias, ref_w, ref_sh, fp8, route)
    assert out.dtype == x.dtype and out.shape == x.shape
    err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if fp8 else 5e-3 if INTERP else 1e-2), err   # bf16 intermediates on a GPU


def test_fused_moe_all_tokens_on_one_expert():
    """A large bias on one expert routes every token there (the bias selects; the weight ignores it)."""
    T, E, D, I = 21, 4, 128, 128
    x, gw, _, (w13, s13, w2, s2), _, ref_w, _ = make_case(False, T, E, D, I, 1, False, False, seed=9)
    bias = torch.tensor([0.0, 0.0, 50.0, 0.0], device=DEV)
    route = dict(top_k=1, n_groups=1, n_limited_groups=1, score_func="sigmoid", route_scale=1.0)
    out = moe.fused_moe(x, gw, bias, w13, s13, w2, s2, config={"align": 32}, **route)
    ref, ids = reference(x, gw, bias, ref_w, None, False, route)
    assert (ids == 2).all()
    assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < (5e-3 if INTERP else 1e-2)


def test_fused_moe_no_tokens():
    x, gw, bias, (w13, s13, w2, s2), _, _, _ = make_case(True, 1, 4, 256, 128, 2, True, False, seed=2)
    out = moe.fused_moe(x[:0], gw, bias, w13, s13, w2, s2, top_k=2, n_groups=1, n_limited_groups=1,
                        score_func="sigmoid", route_scale=1.0)
    assert out.shape == (0, 256) and out.dtype == x.dtype


def test_fused_moe_rejects_bad_input():
    x, gw, bias, (w13, s13, w2, s2), shared, _, _ = make_case(True, 4, 4, 256, 128, 2, True, True, seed=1)
    route = dict(top_k=2, n_groups=2, n_limited_groups=1, score_func="sigmoid", route_scale=1.0)
    cases = [
        (dict(w13_scale=None), "w13_scale"),
        (dict(w2_scale=s2[:, :1]), "w2_scale"),
        (dict(w13=w13[:, :, :128].contiguous()), "w13 must be"),
        (dict(x=x[:, :128].contiguous(), gate_weight=gw[:, :128].contiguous()), "w13 must be"),
        (dict(gate_bias=bias.double()), "gate_bias"),
        (dict(gate_weight=gw[:3]), "gate_weight"),
        (dict(top_k=5), "top_k"),
        (dict(n_groups=3), "divide"),
        (dict(shared={"w1": shared["w1"]}), "shared"),
        (dict(config={"tile": 1}), "config keys"),
        (dict(config={"layout": "dense"}), "layout"),
        (dict(score_func="tanh"), "score_func"),
    ]
    base = dict(x=x, gate_weight=gw, gate_bias=bias, w13=w13, w13_scale=s13, w2=w2, w2_scale=s2, shared=shared,
                **route)
    for change, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            moe.fused_moe(**{**base, **change})
    w13h = torch.randn(4, 256, 256, device=DEV, dtype=HALF)
    w2h = torch.randn(4, 256, 128, device=DEV, dtype=HALF)
    with pytest.raises(TypeError, match="x must have dtype"):
        moe.fused_moe(x.float(), gw, bias, w13h, None, w2h, None, **route)
    with pytest.raises(ValueError, match="only for e4m3"):
        moe.fused_moe(x, gw, bias, w13h, s13, w2h, None, **route)


GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available() or INTERP,
                              reason="GPU tier: needs a CUDA GPU and TRITON_INTERPRET unset")


@pytest.mark.gpu
@GPU_ONLY
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_fused_moe_gpu_v3_gate(fp8, layout):
    """Larger shapes with DeepSeek-V3's gate (sigmoid, bias, 8 groups keep 4, top-8, route_scale 2.5) in bf16."""
    T, E, D, I = 333 if layout == "contiguous" else 24, 32, 1024, 256
    x, gw, bias, (w13, s13, w2, s2), shared, ref_w, ref_sh = make_case(fp8, T, E, D, I, 8, True, True, seed=11)
    route = dict(top_k=8, n_groups=8, n_limited_groups=4, score_func="sigmoid", route_scale=2.5)
    out = moe.fused_moe(x, gw, bias, w13, s13, w2, s2, shared=shared, config={"layout": layout}, **route)
    ref, _ = reference(x, gw, bias, ref_w, ref_sh, fp8, route)
    err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err   # bf16 output and bf16 intermediates (h, per-expert y) on top of the fp8 recipe


@pytest.mark.gpu
@GPU_ONLY
def test_fused_moe_masked_replays_in_a_cuda_graph():
    """The masked layout needs no host sync: capture once, replay on new tokens, match the reference."""
    T, E, D, I = 8, 16, 256, 128
    x, gw, bias, (w13, s13, w2, s2), shared, ref_w, ref_sh = make_case(True, T, E, D, I, 4, True, True, seed=12)
    route = dict(top_k=4, n_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5)
    call = lambda: moe.fused_moe(static_x, gw, bias, w13, s13, w2, s2, shared=shared,  # noqa: E731
                                 config={"layout": "masked"}, **route)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()                                  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call()
    new_x = (torch.randn(T, D, device=DEV) * 1.5).to(HALF)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = reference(new_x, gw, bias, ref_w, ref_sh, True, route)
    assert ((static_out.cpu().double() - ref).norm() / ref.norm()).item() < 2e-2
