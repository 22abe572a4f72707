"""dskc.ops.moe: DeepSeek-V3 MoE kernels (routing, permutation, grouped GEMM, combine) and `fused_moe`.

Every public function checks dtypes, shapes, scale shapes and devices before it launches anything and raises
ValueError / TypeError naming the problem. Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
Configs: each launcher takes `config=None` (the stem's tuning-free default for the current GPU, sm90's without one)
or a dict over the stem's SPACE (see dskc.templates.triton.{moe_route,moe_permute,grouped_gemm}).
"""
from __future__ import annotations

import dataclasses

import torch
import triton

from dskc import knobs
from dskc.ops._moe_checks import FP8, _HALF, _config, _devices, _fail, _need_e4m3, _tensor
from dskc.ops._validate import should_validate
from dskc.ops.grouped import _DT, grouped_gemm, grouped_gemm_contiguous, grouped_gemm_masked
from dskc.templates.triton import grouped_gemm as _gg
from dskc.templates.triton import moe_permute as _perm
from dskc.templates.triton import moe_route as _route
from dskc.templates.triton._problem import dtype_name as _dt

__all__ = ["moe_route", "moe_align", "moe_gather", "moe_combine", "grouped_gemm", "grouped_gemm_contiguous",
           "grouped_gemm_masked", "fused_moe", "MoeLayout"]


# ---------------------------------------------------------------- routing

def moe_route(logits, bias=None, *, top_k: int, n_groups: int = 1, n_limited_groups: int = 1,
              score_func: str = "softmax", route_scale: float = 1.0, renorm: bool | None = None, config=None):
    """DeepSeek-V3 Gate on precomputed logits [T, E] fp32 -> (weights [T, top_k] fp32, ids [T, top_k] int32).

    bias: None or [E] fp32, added for selection only. n_groups must divide E; group-limited selection keeps
    n_limited_groups groups (scored by their top-2 sum with a bias, their max without). Ids are in descending
    selection-score order; exact ties go to the lowest index (see templates/triton/moe_route.py).
    renorm: divide the top-k weights by their sum (None: under sigmoid only, as DeepSeek-V3's Gate; True for
    transformers' norm_topk_prob and Mixtral's softmax top-k, False for a sigmoid router without it).
    """
    _tensor("logits", logits, (torch.float32,), ndim=2)
    t, e = logits.shape
    if bias is not None:
        _tensor("bias", bias, (torch.float32,), shape=(e,))
    _devices(logits=logits, bias=bias)
    _check_route(e, top_k, n_groups, n_limited_groups, score_func, bias is not None)
    problem = _route.Problem(t, e, top_k, n_groups, n_limited_groups, score_func == "sigmoid", bias is not None,
                             -1 if renorm is None else int(bool(renorm)))
    cfg = _config(_route, config, problem, logits.device)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    if t == 0:
        return weights, ids
    _route.moe_route_kernel[(triton.cdiv(t, cfg["BLOCK_T"]),)](
        logits, bias if bias is not None else logits, weights, ids, t, float(route_scale),
        **_route.bind(problem, cfg)["moe_route_kernel"])
    return weights, ids


def _check_route(e, top_k, n_groups, n_limited, score_func, has_bias):
    if score_func not in ("softmax", "sigmoid"):
        _fail(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    if not 1 <= top_k <= e:
        _fail(f"top_k must be in [1, n_experts={e}], got {top_k}")
    if n_groups < 1 or e % n_groups:
        _fail(f"n_groups={n_groups} must divide n_experts={e}")
    if not 1 <= n_limited <= n_groups:
        _fail(f"n_limited_groups must be in [1, n_groups={n_groups}], got {n_limited}")
    if n_limited * (e // n_groups) < top_k:
        _fail(f"n_limited_groups * experts per group = {n_limited * (e // n_groups)} < top_k={top_k}")
    if has_bias and n_groups > 1 and e // n_groups < 2:
        _fail("group scores with a bias sum each group's top 2 experts: need >= 2 experts per group")


# ---------------------------------------------------------------- permutation

@dataclasses.dataclass(frozen=True)
class MoeLayout:
    """Where each (token, k) assignment lives in the grouped GEMM's row space.

    kind: "contiguous" (rows [R], experts in order, each padded to `align`) or "masked" ([E, max_m] rows).
    dest [T*top_k] int32: row of each assignment. sorted_ids [R] int32: assignment of each row, -1 on padding.
    m_indices [R] int32: expert of each row, -1 on padding (DeepGEMM's contiguous layout).
    block_expert [R/align] int32: expert of each align-row block, -1 when empty (contiguous only, else None).
    counts [E] int32: assignments per expert (= masked_m). starts [E] int32: first row of each expert.
    """
    kind: str
    n_experts: int
    top_k: int
    align: int
    max_m: int
    dest: torch.Tensor
    sorted_ids: torch.Tensor
    m_indices: torch.Tensor
    block_expert: torch.Tensor | None
    counts: torch.Tensor
    starts: torch.Tensor

    @property
    def rows(self) -> int:
        return self.sorted_ids.shape[0]


def moe_align(ids, n_experts: int, *, layout: str = "contiguous", align: int = 128, max_m: int | None = None,
              config=None, validate=None) -> MoeLayout:
    """Sort the assignments ids [T, top_k] int32 by expert (stable in token order) into `layout`.

    contiguous: a static row space of round_up(T*top_k + E*(align-1), align) rows (no host sync: graph-safe).
    masked: E blocks of max_m rows (default max(T, 1); needs max_m >= T since a token picks an expert at most
    once; a smaller max_m drops the overflowing assignments: their dest is -1).
    ids must lie in [0, E): validate (None = unless a CUDA graph is being captured; one host sync) refuses others
    with ValueError; unchecked (validate=False), an assignment with an id outside [0, E) is dropped (dest -1, no
    row, contributes nothing to moe_combine).
    """
    _tensor("ids", ids, (torch.int32,), ndim=2)
    _devices(ids=ids)
    if layout not in ("contiguous", "masked"):
        _fail(f"layout must be 'contiguous' or 'masked', got {layout!r}")
    if n_experts < 1:
        _fail(f"n_experts must be >= 1, got {n_experts}")
    if align < 1 or align & (align - 1):
        _fail(f"align must be a power of two, got {align}")
    t, k = ids.shape
    masked = layout == "masked"
    max_m = max(t, 1) if max_m is None else max_m
    if masked and max_m < 1:
        _fail(f"max_m must be >= 1, got {max_m}")
    if ids.numel() and should_validate(validate, ids.device):
        _validate_ids(ids, n_experts)
    cfg = _config(_perm, config, _perm.Problem(t, n_experts, k, 0, align, int(masked), 0, "none", 0), ids.device)
    n = t * k
    rows = n_experts * max_m if masked else _perm.row_space(n, n_experts, align)
    dev = ids.device
    i32 = dict(dtype=torch.int32, device=dev)
    counts, starts = torch.empty(n_experts, **i32), torch.empty(n_experts, **i32)
    dest, sorted_ids, m_idx = torch.empty(n, **i32), torch.empty(rows, **i32), torch.empty(rows, **i32)
    block_expert = None if masked else torch.empty(rows // align, **i32)
    be = triton.next_power_of_2(max(n_experts, 2))
    chunks = max(1, triton.cdiv(n, cfg["BLOCK_A"]))
    chunk_counts, chunk_base = torch.empty((chunks, be), **i32), torch.empty((chunks, be), **i32)
    kw = _perm.align_kwargs(n_experts, align, int(masked), cfg)
    _perm.moe_count_kernel[(chunks,)](ids, chunk_counts, n, **kw["moe_count_kernel"])
    _perm.moe_scan_kernel[(1,)](chunk_counts, chunk_base, counts, starts, chunks, max_m, **kw["moe_scan_kernel"])
    _perm.moe_scatter_kernel[(chunks,)](ids, chunk_base, starts, dest, sorted_ids, n, max_m,
                                        **kw["moe_scatter_kernel"])
    if rows == 0:  # no tokens and align 1: no rows to label (a zero-size grid cannot launch)
        return MoeLayout(layout, n_experts, k, align, max_m, dest, sorted_ids, m_idx, block_expert, counts, starts)
    _perm.moe_fill_rows_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
        counts, starts, sorted_ids, m_idx, block_expert if block_expert is not None else m_idx, rows, max_m,
        **kw["moe_fill_rows_kernel"])
    return MoeLayout(layout, n_experts, k, align, max_m, dest, sorted_ids, m_idx, block_expert, counts, starts)


def _validate_ids(ids, n_experts):
    """Refuse expert ids outside [0, E) (one host sync)."""
    outside = (ids < 0) | (ids >= n_experts)
    if bool(outside.any()):
        _fail(f"ids holds expert ids outside [0, n_experts={n_experts}), e.g. {ids[outside][:4].tolist()}")


def moe_gather(x, layout: MoeLayout, weights, *, quant: bool, config=None):
    """Rows of x [T, D] in layout order -> (a [R, D], sa [R, D/128] fp32 or None, row_weight [R] fp32).

    quant=True: a is e4m3 with 1x128 scales (amax clamped to 1e-4, scale = amax / 448; D % 128 == 0);
    else a has x's dtype. weights [T, top_k] fp32: row_weight[row] = weight of that row's assignment.
    Padding rows of a / sa / row_weight are left unwritten (every consumer masks or ignores them).
    """
    _tensor("x", x, (torch.bfloat16, torch.float16, torch.float32), ndim=2)
    t, d = x.shape
    _tensor("weights", weights, (torch.float32,), shape=(t, layout.top_k))
    if layout.dest.shape[0] != t * layout.top_k:
        _fail(f"layout was built for {layout.dest.shape[0]} assignments, x has {t} tokens x top_k={layout.top_k}")
    if quant and d % 128:
        _fail(f"FP8 quantisation needs D % 128 == 0, got D={d}")
    if quant:
        _need_e4m3(x, "moe_gather(quant=True)")
    _devices(x=x, weights=weights, layout=layout.sorted_ids)
    cfg = _config(_perm, config, _perm.Problem(t, layout.n_experts, layout.top_k, d, layout.align,
                                               int(layout.kind == "masked"), int(quant), _dt(x.dtype), 0), x.device)
    r = layout.rows
    a = torch.empty((r, d), dtype=FP8 if quant else x.dtype, device=x.device)
    sa = torch.empty((r, d // 128), dtype=torch.float32, device=x.device) if quant else None
    rw = torch.empty(r, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(r, cfg["GATHER_ROWS"]), triton.cdiv(d, cfg["BLOCK_N"]))
    _perm.moe_gather_kernel[grid](x, layout.sorted_ids, weights, a, sa if quant else rw, rw, r, d, layout.top_k,
                                  **_perm.gather_kwargs(quant, cfg, knobs.get().triton_interpret))
    return a, sa, rw


def moe_combine(y, layout: MoeLayout, *, shared=None, out_dtype=None, config=None):
    """out[t] = sum_j y[layout.dest[t*top_k + j]] (+ shared[t]) -> [T, N], summed in fp32 in j order (no atomics).

    y: [R, N] (or [E, max_m, N] for the masked layout) with the routing weights already applied.
    """
    _tensor("y", y, (torch.bfloat16, torch.float16, torch.float32))
    y2 = y.reshape(-1, y.shape[-1])
    if y2.shape[0] != layout.rows:
        _fail(f"y has {y2.shape[0]} rows, the layout has {layout.rows}")
    t, n = layout.dest.shape[0] // layout.top_k, y2.shape[1]
    if shared is not None:
        _tensor("shared", shared, (torch.bfloat16, torch.float16, torch.float32), shape=(t, n))
    _devices(y=y, shared=shared, layout=layout.dest)
    cfg = _config(_perm, config, _perm.Problem(t, layout.n_experts, layout.top_k, n, layout.align,
                                               int(layout.kind == "masked"), 0, _dt(y.dtype), int(shared is not None)),
                  y.device)
    out = torch.empty((t, n), dtype=out_dtype or y.dtype, device=y.device)
    if t == 0:
        return out
    grid = (triton.cdiv(t, cfg["COMBINE_T"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _perm.moe_combine_kernel[grid](y2, layout.dest, shared if shared is not None else y2, out, t, n,
                                   **_perm.combine_kwargs(layout.top_k, int(shared is not None), cfg))
    return out


# ---------------------------------------------------------------- the MoE block

_FUSED_KEYS = ("layout", "align", "route", "permute", "gemm1", "gemm2", "shared_gemm1", "shared_gemm2")


def fused_moe(x, gate_weight, gate_bias, w13, w13_scale, w2, w2_scale, *, top_k, n_groups, n_limited_groups,
              score_func, route_scale, renorm=None, shared=None, config=None):
    """DeepSeek-V3 MoE block: sum_j w_j * w2_e(silu(w1_e x) * w3_e x) over the routed experts, + shared MLP.

    x [T, D] (bf16 / fp16; fp32 too for fp8 weights). gate_weight [E, D], gate_bias None or [E] fp32; the gate
    projection runs as one fp32 torch matmul, then `moe_route`. w13 [E, 2I, D] = stacked [w1; w3] per expert,
    w2 [E, D, I]: e4m3 with w13_scale [E, 2I/128, D/128] and w2_scale [E, D/128, I/128] fp32 (1x128 activation
    quantisation on the fly; D % 128 == 0 and I % 128 == 0), or x's dtype with both scales None.
    shared: None or {"w1": [Is, D], "w3": [Is, D], "w2": [D, Is]} (+ "w1_scale", "w3_scale", "w2_scale" for fp8),
    the dense MLP w2(silu(w1 x) * w3 x), added in the combine. renorm: see moe_route.
    config: optional {"layout": "auto" | "contiguous" | "masked", "align": 128, "route": {...},
    "permute": {...}, "gemm1": {...}, "gemm2": {...}, "shared_gemm1": {...}, "shared_gemm2": {...}} (per-stem
    configs; the shared experts' GEMMs take gemm1 / gemm2's when their own are absent). "auto" takes the masked layout when
    E * T rows are no more than the contiguous layout's static row space (small T, decode), else contiguous.
    Returns [T, D] in x's dtype. Deterministic: no atomics.
    """
    cfg = dict(config or {})
    if set(cfg) - set(_FUSED_KEYS):
        _fail(f"fused_moe config keys {sorted(set(cfg) - set(_FUSED_KEYS))} unknown; known: {_FUSED_KEYS}")
    fp8 = _check_fused(x, gate_weight, gate_bias, w13, w13_scale, w2, w2_scale)
    t, d = x.shape
    e, i2, _ = w13.shape
    _check_route(e, top_k, n_groups, n_limited_groups, score_func, gate_bias is not None)
    if shared is not None:
        _check_shared(shared, fp8, w13.dtype, d)
    if t == 0:
        return torch.empty_like(x)
    align = cfg.get("align", 128)
    kind = cfg.get("layout", "auto")
    if kind not in ("auto", "contiguous", "masked"):
        _fail(f"config['layout'] must be 'auto', 'contiguous' or 'masked', got {kind!r}")
    if kind == "auto":
        kind = "masked" if e * t <= _perm.row_space(t * top_k, e, align) else "contiguous"
    _check_gemms(x, w13.dtype, e, e * t if kind == "masked" else _perm.row_space(t * top_k, e, align), i2 // 2,
                 kind, align, shared, cfg)
    logits = x.float() @ gate_weight.float().t()
    weights, ids = moe_route(logits, gate_bias, top_k=top_k, n_groups=n_groups, n_limited_groups=n_limited_groups,
                             score_func=score_func, route_scale=route_scale, renorm=renorm, config=cfg.get("route"))
    layout = moe_align(ids, e, layout=kind, align=align, max_m=t, config=cfg.get("permute"), validate=False)
    a, sa, rw = moe_gather(x, layout, weights, quant=fp8, config=cfg.get("permute"))
    if kind == "masked":
        a, sa, rw = a.view(e, t, d), (sa.view(e, t, -1) if fp8 else None), rw
        maps = {"masked_m": layout.counts}
    else:
        maps = {"block_expert": layout.block_expert, "align": align}
    y = _mlp(a, sa, w13, w13_scale, None, None, w2, w2_scale, rw, maps, x.dtype, cfg.get("gemm1"), cfg.get("gemm2"))
    shared_out = _shared_mlp(x, shared, fp8, cfg) if shared is not None else None
    return moe_combine(y, layout, shared=shared_out, out_dtype=x.dtype, config=cfg.get("permute"))


def _check_gemms(x, wdtype, e, rows, inter, kind, align, shared, cfg):
    """The grouped GEMMs' configs must fit these widths (e.g. BLOCK_K | D): refused before any kernel runs."""
    t, d = x.shape
    fp8 = wdtype == FP8
    dt, out = ("fp8" if fp8 else _DT[wdtype]), _DT[x.dtype]
    up, h = ("swiglu_quant", "fp8") if fp8 else ("swiglu", dt)
    per_id = align if kind == "contiguous" else 1
    gemms = [(cfg.get("gemm1"), _gg.Problem(e, rows, inter, d, dt, kind, up, per_id, h, 1)),
             (cfg.get("gemm2"), _gg.Problem(e, rows, d, inter, dt, kind, "weight", per_id, out, 0))]
    if shared is not None:
        i_s = shared["w1"].shape[0]
        gemms += [(cfg.get("shared_gemm1", cfg.get("gemm1")), _gg.Problem(1, t, i_s, d, dt, "contiguous", up, 1, h)),
                  (cfg.get("shared_gemm2", cfg.get("gemm2")), _gg.Problem(1, t, d, i_s, dt, "contiguous", "none", 1,
                                                                          out))]
    for j, (config, problem) in enumerate(gemms):
        try:
            block_m = _config(_gg, config, problem, x.device)["BLOCK_M"]
        except ValueError as exc:
            raise ValueError(f"fused_moe cannot run D={d}, I={inter} with {wdtype} experts: {exc}") from None
        if j < 2 and kind == "contiguous" and align % block_m:
            _fail(f"fused_moe's align={align} must be a multiple of gemm{j + 1}'s BLOCK_M={block_m}")


def _mlp(a, sa, w1, s1, w3, s3, w2, s2, rw, maps, out_dtype, cfg1, cfg2):
    """w2(silu(w1 a) * w3 a) (* rw) through two grouped GEMMs; w3 None means w1 is the stacked [w1; w3]."""
    fp8 = sa is not None
    inter = w1.shape[1] // (2 if w3 is None else 1)
    lead = tuple(a.shape[:-1])
    h = torch.empty(lead + (inter,), dtype=FP8 if fp8 else a.dtype, device=a.device)
    sh = torch.empty(lead + (inter // 128,), dtype=torch.float32, device=a.device) if fp8 else None
    grouped_gemm(a, sa, w1, s1, h, epilogue="swiglu_quant" if fp8 else "swiglu", out_scale=sh, b_up=w3,
                 sb_up=s3, config=cfg1, validate=False, **maps)
    y = torch.empty(lead + (w2.shape[1],), dtype=out_dtype, device=a.device)
    grouped_gemm(h, sh, w2, s2, y, epilogue="weight" if rw is not None else "none", row_weight=rw,
                 config=cfg2, validate=False, **maps)
    return y


def _shared_mlp(x, shared, fp8, cfg):
    """The shared experts as a one-expert grouped GEMM over the T tokens in order (every row maps to expert 0)."""
    t, d = x.shape
    i32 = dict(dtype=torch.int32, device=x.device)
    ident = MoeLayout("contiguous", 1, 1, 1, t, torch.arange(t, **i32), torch.arange(t, **i32),
                      torch.zeros(t, **i32), None, torch.full((1,), t, **i32), torch.zeros(1, **i32))
    ones = torch.ones((t, 1), dtype=torch.float32, device=x.device)
    a, sa, _ = moe_gather(x, ident, ones, quant=fp8, config=cfg.get("permute"))
    sc = (lambda name: shared[name][None]) if fp8 else (lambda name: None)
    return _mlp(a, sa, shared["w1"][None], sc("w1_scale"), shared["w3"][None], sc("w3_scale"), shared["w2"][None],
                sc("w2_scale"), None, {"m_indices": ident.m_indices}, x.dtype,
                cfg.get("shared_gemm1", cfg.get("gemm1")), cfg.get("shared_gemm2", cfg.get("gemm2")))


def _check_fused(x, gate_weight, gate_bias, w13, w13_scale, w2, w2_scale) -> bool:
    """Shapes and dtypes of fused_moe's tensors; returns whether the weights are fp8."""
    fp8 = w13.dtype == FP8 if isinstance(w13, torch.Tensor) else False
    _tensor("x", x, (torch.bfloat16, torch.float16, torch.float32) if fp8 else _HALF, ndim=2)
    t, d = x.shape
    _tensor("w13", w13, (FP8,) if fp8 else (x.dtype,), ndim=3)
    e, i2, dd = w13.shape
    if dd != d or i2 % 2:
        _fail(f"w13 must be [E, 2I, D={d}], got {tuple(w13.shape)}")
    inter = i2 // 2
    _tensor("gate_weight", gate_weight, (torch.bfloat16, torch.float16, torch.float32), shape=(e, d))
    if gate_bias is not None:
        _tensor("gate_bias", gate_bias, (torch.float32,), shape=(e,))
    _tensor("w2", w2, (w13.dtype,), shape=(e, d, inter))
    if fp8:
        if d % 128 or inter % 128:
            _fail(f"fp8 experts need D % 128 == 0 and I % 128 == 0, got D={d}, I={inter}")
        _tensor("w13_scale", w13_scale, (torch.float32,), shape=(e, i2 // 128, d // 128))
        _tensor("w2_scale", w2_scale, (torch.float32,), shape=(e, d // 128, inter // 128))
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
