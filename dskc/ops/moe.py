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
from dskc.ops._moe_checks import FP8, _config, _devices, _fail, _need_e4m3, _tensor
from dskc.ops._validate import should_validate
from dskc.ops.grouped import grouped_gemm, grouped_gemm_contiguous, grouped_gemm_masked
from dskc.templates.triton import moe_gate as _gate
from dskc.templates.triton import moe_permute as _perm
from dskc.templates.triton import moe_route as _route
from dskc.templates.triton._problem import dtype_name as _dt

__all__ = ["moe_gate", "moe_route", "moe_route_align", "moe_align", "moe_gather", "moe_combine", "grouped_gemm", "grouped_gemm_contiguous",
           "grouped_gemm_masked", "fused_moe", "MoeLayout"]


# ---------------------------------------------------------------- routing

def moe_gate(x, weight, config=None):
    """The gate's projection: logits [T, E] fp32 = x [T, D] @ weight [E, D]^T (one launch, stem moe_gate).

    x bf16 / fp16 / fp32 with a unit last stride; weight contiguous bf16 / fp16 / fp32: x is converted to weight's
    dtype, products are exact in fp32 for 16-bit values of either dtype, accumulation in fp32 (an fp32 weight: IEEE
    fp32, no TF32). D a multiple of 32.
    """
    _tensor("x", x, (torch.bfloat16, torch.float16, torch.float32), ndim=2, strided=True)
    _tensor("weight", weight, (torch.bfloat16, torch.float16, torch.float32), ndim=2)
    t, d = x.shape
    e = weight.shape[0]
    if weight.shape[1] != d or d % 32 or (x.stride(1) != 1 and d > 1):     # D <= 1: the stride means nothing
        _fail(f"x [T, D] (unit last stride) and weight [E, D] with D % 32 == 0, got {tuple(x.shape)} and "
              f"{tuple(weight.shape)}")
    _devices(x=x, weight=weight)
    problem = _gate.Problem(t, e, d, _dt(x.dtype), _dt(weight.dtype))
    cfg = _config(_gate, config, problem, x.device)
    logits = torch.empty((t, e), dtype=torch.float32, device=x.device)
    if t:
        _gate.moe_gate_kernel[(triton.cdiv(e, cfg["BLOCK_E"]), triton.cdiv(t, cfg["BLOCK_T"]))](
            x, weight, logits, t, e, d, x.stride(0), **_gate.bind(problem, cfg)["moe_gate_kernel"])
    return logits


def moe_route(logits, bias=None, *, top_k: int, n_groups: int = 1, n_limited_groups: int = 1,
              score_func: str = "softmax", route_scale: float = 1.0, renorm: bool | None = None, n_shared: int = 0,
              config=None):
    """DeepSeek-V3 Gate on precomputed logits [T, E] fp32 -> (weights [T, top_k] fp32, ids [T, top_k] int32).

    bias: None or [E] fp32, added for selection only. n_groups must divide E; group-limited selection keeps
    n_limited_groups groups (scored by their top-2 sum with a bias, their max without). Ids are in descending
    selection-score order; exact ties go to the lowest index (see templates/triton/moe_route.py).
    renorm: divide the top-k weights by their sum (None: under sigmoid only, as DeepSeek-V3's Gate; True for
    transformers' norm_topk_prob and Mixtral's softmax top-k, False for a sigmoid router without it).
    n_shared: each row gets n_shared more columns, the shared experts E .. E + n_shared - 1 with weight 1
    ([T, top_k + n_shared] results).
    """
    problem, t = _route_problem(logits, bias, top_k, n_groups, n_limited_groups, score_func, renorm, n_shared, 0)
    cfg = _config(_route, config, problem, logits.device)
    k = top_k + n_shared
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int32, device=logits.device)
    if t == 0:
        return weights, ids
    _route.moe_route_kernel[(triton.cdiv(t, cfg["BLOCK_T"]),)](
        logits, bias if bias is not None else logits, weights, ids, t, float(route_scale),
        **_route.bind(problem, cfg)["moe_route_kernel"])
    return weights, ids


def moe_route_align(logits, bias=None, *, top_k: int, n_groups: int = 1, n_limited_groups: int = 1,
                    score_func: str = "softmax", route_scale: float = 1.0, renorm: bool | None = None,
                    n_shared: int = 0, config=None):
    """moe_route then moe_align(layout="masked") over the E + n_shared experts, in one launch (one program: for
    decode-sized batches). Returns (weights, ids, MoeLayout) as those two calls give (the layout's m_indices and
    padding rows of sorted_ids are not written: the masked grouped GEMM and moe_combine do not read them)."""
    problem, t = _route_problem(logits, bias, top_k, n_groups, n_limited_groups, score_func, renorm, n_shared, 1)
    cfg = _config(_route, config, problem, logits.device)
    k, e2, dev = top_k + n_shared, logits.shape[1] + n_shared, logits.device
    i32 = dict(dtype=torch.int32, device=dev)
    weights, ids = torch.empty((t, k), dtype=torch.float32, device=dev), torch.empty((t, k), **i32)
    dest, sorted_ids, counts = torch.empty(t * k, **i32), torch.empty(e2 * t, **i32), torch.empty(e2, **i32)
    if t:
        _route.moe_route_align_kernel[(1,)](
            logits, bias if bias is not None else logits, weights, ids, dest, sorted_ids, counts, t,
            float(route_scale), **_route.bind(problem, cfg)["moe_route_align_kernel"])
    else:
        counts.zero_()
    starts = None
    layout = MoeLayout("masked", e2, k, 1, t, dest, sorted_ids, None, None, counts, starts)
    return weights, ids, layout


def _route_problem(logits, bias, top_k, n_groups, n_limited, score_func, renorm, n_shared, align):
    _tensor("logits", logits, (torch.float32,), ndim=2)
    t, e = logits.shape
    if bias is not None:
        _tensor("bias", bias, (torch.float32,), shape=(e,))
    _devices(logits=logits, bias=bias)
    _check_route(e, top_k, n_groups, n_limited, score_func, bias is not None)
    if not isinstance(n_shared, int) or n_shared < 0:
        _fail(f"n_shared must be an int >= 0, got {n_shared!r}")
    return _route.Problem(t, e, top_k, n_groups, n_limited, score_func == "sigmoid", bias is not None,
                          -1 if renorm is None else int(bool(renorm)), n_shared, align), t


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
    cfg = _config(_perm, config, _perm.Problem(t, n_experts, k, 0, align, int(masked), 0, "none", 0, op="align"),
                  ids.device)
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
                                               int(layout.kind == "masked"), int(quant), _dt(x.dtype), 0, op="gather"),
                  x.device)
    r = layout.rows
    a = torch.empty((r, d), dtype=FP8 if quant else x.dtype, device=x.device)
    sa = torch.empty((r, d // 128), dtype=torch.float32, device=x.device) if quant else None
    rw = torch.empty(r, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(r, cfg["GATHER_ROWS"]), triton.cdiv(d, cfg["BLOCK_N"]))
    _perm.moe_gather_kernel[grid](x, layout.sorted_ids, weights, a, sa if quant else rw, rw, r, d, layout.top_k,
                                  **_perm.gather_kwargs(quant, cfg, knobs.get().triton_interpret))
    return a, sa, rw


def moe_combine(y, layout: MoeLayout, *, shared=None, out_dtype=None, residual=None, config=None):
    """out[t] = sum_j y[layout.dest[t*top_k + j]] (+ shared[t]) -> [T, N], summed in fp32 in j order (no atomics).

    y: [R, N] (or [E, max_m, N] for the masked layout) with the routing weights already applied.
    residual [T, N] of out's dtype: out = round(round(sum) + residual[t]), the residual add of a block in the same
    pass (what the sum then a separate add give).
    """
    _tensor("y", y, (torch.bfloat16, torch.float16, torch.float32))
    y2 = y.reshape(-1, y.shape[-1])
    if y2.shape[0] != layout.rows:
        _fail(f"y has {y2.shape[0]} rows, the layout has {layout.rows}")
    t, n = layout.dest.shape[0] // layout.top_k, y2.shape[1]
    out_dtype = out_dtype or y.dtype
    if shared is not None:
        _tensor("shared", shared, (torch.bfloat16, torch.float16, torch.float32), shape=(t, n))
    if residual is not None:
        _tensor("residual", residual, (out_dtype,), shape=(t, n))
    _devices(y=y, shared=shared, residual=residual, layout=layout.dest)
    problem = _perm.Problem(t, layout.n_experts, layout.top_k, n, layout.align, int(layout.kind == "masked"), 0,
                            _dt(y.dtype), int(shared is not None), int(residual is not None), "combine")
    cfg = _config(_perm, config, problem, y.device)
    out = torch.empty((t, n), dtype=out_dtype, device=y.device)
    if t == 0:
        return out
    grid = (triton.cdiv(t, cfg["COMBINE_T"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _perm.moe_combine_kernel[grid](y2, layout.dest, shared if shared is not None else y2,
                                   residual if residual is not None else y2, out, t, n,
                                   **_perm.combine_kwargs(layout.top_k, int(shared is not None), cfg,
                                                          int(residual is not None)))
    return out


from dskc.ops.moe_block import fused_moe  # noqa: E402  (the MoE block, built on the kernels above)
