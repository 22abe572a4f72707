"""dskc.ops.moe_block (fused_moe): the DeepSeek-V3 MoE block on dskc's kernels, in the fewest launches.

gate projection (moe_gate) -> routing and the expert layout (decode sizes: moe_route_align, one program; larger
batches: moe_route then moe_align) -> [w1; w3] grouped GEMM reading each row's token through the layout (no gather
pass) with the SwiGLU (+ FP8 quantisation) epilogue -> w2 grouped GEMM scaling each row by its routing weight, read
through the layout -> moe_combine (+ the block's residual stream).
Shared experts ride in the routed GEMMs as always-selected experts of weight 1 (n_shared: the shared MLP split into
experts of the routed width, stacked after the routed ones, dskc.runtime.modules.KernelMoE does it), or run as a
one-expert dense MLP added in the combine (shared=dict).
"""
from __future__ import annotations

import torch
import triton

from dskc.ops._moe_checks import FP8, _HALF, _config, _devices, _fail, _tensor
from dskc.ops.grouped import _DT, grouped_gemm
from dskc.ops.moe import _check_route, moe_align, moe_combine, moe_gate, moe_route, moe_route_align
from dskc.templates.triton import grouped_gemm as _gg
from dskc.templates.triton import moe_permute as _perm

__all__ = ["fused_moe", "moe_layout"]

_FUSED_KEYS = ("layout", "align", "gate", "route", "permute", "quant", "gemm1", "gemm2", "shared_gemm1",
               "shared_gemm2", "combine")


def moe_layout(t: int, n_experts: int, k: int, align: int = 128) -> str:
    """fused_moe's "auto" layout: masked (one program routes and lays out) while E * T rows are no more than the
    contiguous layout's static row space (decode-sized batches), else contiguous."""
    return "masked" if n_experts * t <= _perm.row_space(t * k, n_experts, align) else "contiguous"


def fused_moe(x, gate_weight, gate_bias, w13, w13_scale, w2, w2_scale, *, top_k, n_groups, n_limited_groups,
              score_func, route_scale, renorm=None, shared=None, n_shared: int = 0, x_quant=None, residual=None,
              config=None):
    """DeepSeek-V3 MoE block: sum_j w_j * w2_e(silu(w1_e x) * w3_e x) over the routed experts, + shared MLP.

    x [T, D] (bf16 / fp16; fp32 too for fp8 weights): what the gate reads. gate_weight [E, D] (the projection runs
    as moe_gate, in its dtype with fp32 accumulation), gate_bias None or [E] fp32. w13 [E', 2I, D] = stacked
    [w1; w3] per expert, w2 [E', D, I]: e4m3 with w13_scale [E', 2I/128, D/128] and w2_scale [E', D/128, I/128]
    fp32 (x quantised 1x128 once; D % 128 == 0, I % 128 == 0), or x's dtype with both scales None.
    E' = E + n_shared: the last n_shared experts are shared experts, taken by every token with weight 1.
    shared: None or {"w1": [Is, D], "w3": [Is, D], "w2": [D, Is]} (+ "w1_scale", "w3_scale", "w2_scale" for fp8),
    the dense MLP w2(silu(w1 x) * w3 x), added in the combine. renorm: see moe_route. x_quant: (q e4m3 [T, D],
    s fp32 [T, D/128]), x's 1x128 quantisation when the caller has it (a fused norm), read by the experts instead of
    quantising x again.
    residual: None or [T, D] of x's dtype, added to the output in the combine (round(round(moe) + residual)).
    config: optional {"layout": "auto" | "contiguous" | "masked", "align": 128, "gate", "route", "permute" (the
    contiguous layout's kernels), "quant", "gemm1", "gemm2", "shared_gemm1", "shared_gemm2", "combine": {...}}
    (per-stem configs; "auto": moe_layout). Returns [T, D] in x's dtype. Deterministic: no atomics.
    """
    cfg = dict(config or {})
    if set(cfg) - set(_FUSED_KEYS):
        _fail(f"fused_moe config keys {sorted(set(cfg) - set(_FUSED_KEYS))} unknown; known: {_FUSED_KEYS}")
    fp8 = _check_fused(x, gate_weight, gate_bias, w13, w13_scale, w2, w2_scale, n_shared)
    t, d = x.shape
    e_all = w13.shape[0]
    _check_route(e_all - n_shared, top_k, n_groups, n_limited_groups, score_func, gate_bias is not None)
    if shared is not None:
        _check_shared(shared, fp8, w13.dtype, d)
    _check_extras(x, x_quant, residual, fp8)
    if t == 0:
        return torch.empty_like(x)
    k = top_k + n_shared
    align = cfg.get("align", 128)
    kind = cfg.get("layout", "auto")
    if kind not in ("auto", "contiguous", "masked"):
        _fail(f"config['layout'] must be 'auto', 'contiguous' or 'masked', got {kind!r}")
    kind = moe_layout(t, e_all, k, align) if kind == "auto" else kind
    _check_gemms(x, w13.dtype, e_all, e_all * t if kind == "masked" else _perm.row_space(t * k, e_all, align),
                 w13.shape[1] // 2, kind, align, shared, cfg)
    logits = moe_gate(x, gate_weight, config=cfg.get("gate"))
    route = dict(top_k=top_k, n_groups=n_groups, n_limited_groups=n_limited_groups, score_func=score_func,
                 route_scale=route_scale, renorm=renorm, n_shared=n_shared, config=cfg.get("route"))
    weights, layout, maps, lead = _route_layout(logits, gate_bias, route, kind, e_all, t, align, cfg)
    if fp8:
        from dskc.ops.fp8 import act_quant
        a, sa = x_quant if x_quant is not None else act_quant(x, config=cfg.get("quant"))
    else:
        a, sa = x, None
    y = _experts(a, sa, w13, w13_scale, w2, w2_scale, layout, weights, maps, lead, x.dtype, cfg)
    shared_out = _shared_mlp(a, sa, shared, x.dtype, cfg) if shared is not None else None
    return moe_combine(y, layout, shared=shared_out, out_dtype=x.dtype, residual=residual,
                       config=cfg.get("combine", cfg.get("permute")))


def _route_layout(logits, gate_bias, route: dict, kind: str, e_all: int, t: int, align: int, cfg: dict):
    """(weights, layout, the grouped GEMMs' expert map, the layout's row shape): one program at decode sizes
    (masked), else moe_route and moe_align's kernels (contiguous)."""
    if kind == "masked":
        weights, _, layout = moe_route_align(logits, gate_bias, **route)
        return weights, layout, {"masked_m": layout.counts}, (e_all, t)
    weights, ids = moe_route(logits, gate_bias, **route)
    layout = moe_align(ids, e_all, layout="contiguous", align=align, config=cfg.get("permute"), validate=False)
    return weights, layout, {"block_expert": layout.block_expert, "align": align}, (layout.rows,)


def _experts(a, sa, w13, s13, w2, s2, layout, weights, maps, lead, out_dtype, cfg):
    """The experts' two grouped GEMMs over the layout's rows: a holds the T token rows (read through the layout);
    the second GEMM scales each row by its assignment's routing weight."""
    fp8 = sa is not None
    inter = w13.shape[1] // 2
    rows = dict(top_k=layout.top_k)
    h = torch.empty(lead + (inter,), dtype=FP8 if fp8 else a.dtype, device=a.device)
    sh = torch.empty(lead + (inter // 128,), dtype=torch.float32, device=a.device) if fp8 else None
    grouped_gemm(a, sa, w13, s13, h, epilogue="swiglu_quant" if fp8 else "swiglu", out_scale=sh,
                 a_rows=layout.sorted_ids, config=cfg.get("gemm1"), validate=False, **rows, **maps)
    y = torch.empty(lead + (w2.shape[1],), dtype=out_dtype, device=a.device)
    grouped_gemm(h, sh, w2, s2, y, epilogue="weight", row_weight=weights.view(-1), weight_rows=layout.sorted_ids,
                 config=cfg.get("gemm2"), validate=False, **rows, **maps)
    return y


def _check_gemms(x, wdtype, e_all, rows, inter, kind, align, shared, cfg):
    """The grouped GEMMs' configs must fit these widths (e.g. BLOCK_K | D): refused before any kernel runs."""
    t, d = x.shape
    fp8 = wdtype == FP8
    dt, out = ("fp8" if fp8 else _DT[wdtype]), _DT[x.dtype]
    up, h = ("swiglu_quant", "fp8") if fp8 else ("swiglu", dt)
    per_id = align if kind == "contiguous" else 1
    gemms = [(cfg.get("gemm1"), _gg.Problem(e_all, rows, inter, d, dt, kind, up, per_id, h, 1, "a")),
             (cfg.get("gemm2"), _gg.Problem(e_all, rows, d, inter, dt, kind, "weight", per_id, out, 0, "weight"))]
    if shared is not None:
        i_s = shared["w1"].shape[0]
        gemms += [(cfg.get("shared_gemm1", cfg.get("gemm1")), _gg.Problem(1, t, i_s, d, dt, "contiguous", up, 0, h)),
                  (cfg.get("shared_gemm2", cfg.get("gemm2")), _gg.Problem(1, t, d, i_s, dt, "contiguous", "none", 0,
                                                                          out))]
    for j, (config, problem) in enumerate(gemms):
        try:
            block_m = _config(_gg, config, problem, x.device)["BLOCK_M"]
        except ValueError as exc:
            raise ValueError(f"fused_moe cannot run D={d}, I={inter} with {wdtype} experts: {exc}") from None
        if j < 2 and kind == "contiguous" and align % block_m:
            _fail(f"fused_moe's align={align} must be a multiple of gemm{j + 1}'s BLOCK_M={block_m}")


def _shared_mlp(a, sa, shared, out_dtype, cfg):
    """The shared experts' MLP over the T token rows as the grouped kernel's dense mode (one expert)."""
    fp8 = sa is not None
    t, d = a.shape
    inter = shared["w1"].shape[0]
    sc = (lambda name: shared[name][None]) if fp8 else (lambda name: None)
    h = torch.empty(t, inter, dtype=FP8 if fp8 else a.dtype, device=a.device)
    sh = torch.empty(t, inter // 128, dtype=torch.float32, device=a.device) if fp8 else None
    grouped_gemm(a, sa, shared["w1"][None], sc("w1_scale"), h, dense=True, epilogue="swiglu_quant" if fp8 else
                 "swiglu", out_scale=sh, b_up=shared["w3"][None], sb_up=sc("w3_scale"),
                 config=cfg.get("shared_gemm1", cfg.get("gemm1")))
    y = torch.empty(t, d, dtype=out_dtype, device=a.device)
    grouped_gemm(h, sh, shared["w2"][None], sc("w2_scale"), y, dense=True,
                 config=cfg.get("shared_gemm2", cfg.get("gemm2")))
    return y


def _check_extras(x, x_quant, residual, fp8: bool) -> None:
    t, d = x.shape
    if x_quant is not None:
        if not fp8:
            _fail("x_quant is only read by fp8 experts")
        if not isinstance(x_quant, (tuple, list)) or len(x_quant) != 2:
            _fail("x_quant must be (q [T, D] e4m3, s [T, D/128] fp32)", TypeError)
        _tensor("x_quant[0]", x_quant[0], (FP8,), shape=(t, d))
        _tensor("x_quant[1]", x_quant[1], (torch.float32,), shape=(t, d // 128))
        _devices(x=x, q=x_quant[0], s=x_quant[1])
    if residual is not None:
        _tensor("residual", residual, (x.dtype,), shape=(t, d))
        _devices(x=x, residual=residual)


def _check_fused(x, gate_weight, gate_bias, w13, w13_scale, w2, w2_scale, n_shared: int = 0) -> bool:
    """Shapes and dtypes of fused_moe's tensors; returns whether the weights are fp8."""
    fp8 = w13.dtype == FP8 if isinstance(w13, torch.Tensor) else False
    _tensor("x", x, (torch.bfloat16, torch.float16, torch.float32) if fp8 else _HALF, ndim=2)
    t, d = x.shape
    _tensor("w13", w13, (FP8,) if fp8 else (x.dtype,), ndim=3)
    e_all, i2, dd = w13.shape
    if dd != d or i2 % 2:
        _fail(f"w13 must be [E, 2I, D={d}], got {tuple(w13.shape)}")
    if not isinstance(n_shared, int) or not 0 <= n_shared < e_all:
        _fail(f"n_shared must be an int in [0, {e_all}) (the shared experts stacked after the routed ones), got "
              f"{n_shared!r}")
    e, inter = e_all - n_shared, i2 // 2
    _tensor("gate_weight", gate_weight, (torch.bfloat16, torch.float16, torch.float32), shape=(e, d))
    if gate_bias is not None:
        _tensor("gate_bias", gate_bias, (torch.float32,), shape=(e,))
    _tensor("w2", w2, (w13.dtype,), shape=(e_all, d, inter))
    if fp8:
        if d % 128 or inter % 128:
            _fail(f"fp8 experts need D % 128 == 0 and I % 128 == 0, got D={d}, I={inter}")
        _tensor("w13_scale", w13_scale, (torch.float32,), shape=(e_all, i2 // 128, d // 128))
        _tensor("w2_scale", w2_scale, (torch.float32,), shape=(e_all, d // 128, inter // 128))
    elif w13_scale is not None or w2_scale is not None:
        _fail("w13_scale / w2_scale are only for e4m3 weights; these weights are " + str(w13.dtype))
    _devices(x=x, gate_weight=gate_weight, gate_bias=gate_bias, w13=w13, w13_scale=w13_scale, w2=w2,
             w2_scale=w2_scale)
    return fp8


def _check_shared(shared, fp8, wdtype, d):
    if not isinstance(shared, dict) or not {"w1", "w2", "w3"} <= set(shared):
        _fail("shared must be a dict with 'w1', 'w3' ([Is, D]) and 'w2' ([D, Is]) (+ '*_scale' for fp8)", TypeError)
    inter = shared["w1"].shape[0] if isinstance(shared["w1"], torch.Tensor) else -1
    for name, shape in (("w1", (inter, d)), ("w3", (inter, d)), ("w2", (d, inter))):
        _tensor(f"shared[{name!r}]", shared[name], (wdtype,), shape=shape)
        if fp8:
            _tensor(f"shared[{name + '_scale'!r}]", shared.get(name + "_scale"), (torch.float32,),
                    shape=(triton.cdiv(shape[0], 128), shape[1] // 128))
    if fp8 and inter % 128:
        _fail(f"fp8 shared experts need Is % 128 == 0, got {inter}")
