"""dskc.ops.grouped: the grouped GEMM of the MoE experts (stem grouped_gemm), FP8 1D2D or bf16 / fp16, contiguous
(DeepGEMM's m_indices / per-block expert ids) or masked layout, with SwiGLU (+ FP8 quant) and routed-weight
epilogues. Inputs are checked before any launch (ValueError / TypeError naming the problem); `dskc.ops.moe`
re-exports these names.
"""
from __future__ import annotations

import torch
import triton

from dskc import knobs
from dskc.ops._moe_checks import FP8, _HALF, _config, _devices, _fail, _need_e4m3, _tensor
from dskc.ops._validate import should_validate
from dskc.templates.triton import grouped_gemm as _gg

__all__ = ["grouped_gemm", "grouped_gemm_contiguous", "grouped_gemm_masked"]


def grouped_gemm(a, sa, b, sb, out, *, m_indices=None, block_expert=None, align=None, masked_m=None,
                 dense: bool = False, epilogue: str = "none", out_scale=None, row_weight=None, b_up=None, sb_up=None,
                 a_rows=None, weight_rows=None, top_k: int = 1, config=None, validate=None):
    """out[rows of expert e] = epilogue(A[rows] @ B[e]^T). FP8 1D2D when sa / sb are given, else bf16 / fp16.

    a: [R, K] (contiguous) or [E, M_max, K] (masked); sa: [R, K/128] / [E, M_max, K/128] fp32 (fp8 only; any
    strides, e.g. DeepGEMM's MN-major scales).
    b: [E, N, K]; sb: [E, ceil(N/128), K/128] fp32. Exactly one expert map: m_indices [R] int32 (per row, -1 =
    padding row, not written), block_expert [R/align] int32 (per align-row block, -1 = empty; BLOCK_M must divide
    align) or masked_m [E] int32 (rows per expert of the masked layout, each in [0, M_max]), or dense=True (b holds
    one expert, every row of the 2-D a multiplies it: a dense layer through the grouped kernel's epilogues). With
    m_indices, each expert's segment starts on a multiple of 128 (DeepGEMM's layout; the kernel needs one expert
    per BLOCK_M rows).
    validate: read the expert map on the host (one sync) and refuse ids outside [-1, E), masked_m outside
    [0, M_max] and several experts in one BLOCK_M-row block (ValueError); None = unless a CUDA graph is being
    captured, False = never (maps built by dskc). Unchecked, the kernel skips rows whose id is outside [0, E)
    (like -1: never a read outside b) and clamps masked_m to [0, M_max].
    epilogue: "none"; "weight" (times row_weight [R] fp32); "swiglu" (b = [gate; up] stacked, N = 2 * N_out, or
    gate in b and up in b_up / sb_up: out = silu(gate) * up); "swiglu_quant" (the same, out e4m3 with
    out_scale [R, N_out/128] fp32; N_out % 128 == 0).
    Rows as (token, k) assignments (a MoE layout's sorted ids, int32 [R], -1 on padding; see dskc.ops.moe):
    a_rows: a is the [T, K] token rows (sa [T, K/128]) and layout row r multiplies a[a_rows[r] // top_k]; the
    layout's shape (R or E x M_max rows) is out's. weight_rows (epilogue "weight"): row r is scaled by
    row_weight[weight_rows[r]], row_weight being the router's [T * top_k] weights. These ids are not read on the
    host (dskc's layouts make them); the kernel confines any outside [0, T * top_k) to token 0's row and weight 0.
    """
    fp8, masked = _check_operands(a, sa, b, sb, a_rows is not None)
    if a_rows is not None:
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3):
            _fail("with a_rows, out ([R, N] or [E, M_max, N]) gives the layout's shape")
        masked = out.dim() == 3
    lead = tuple(out.shape[:-1]) if a_rows is not None else tuple(a.shape[:-1])
    e, n, k = b.shape
    rows = lead[0] * (lead[1] if masked else 1)
    if epilogue not in _gg.EPILOGUES:
        _fail(f"epilogue must be one of {sorted(_gg.EPILOGUES)}, got {epilogue!r}")
    swiglu = epilogue.startswith("swiglu")
    stacked = swiglu and b_up is None
    b, sb, b_up, sb_up, n = _up_operands(b, sb, b_up, sb_up, swiglu, fp8)
    _check_out(out, lead, rows, n, epilogue, fp8, out_scale, row_weight, weight_rows is not None)
    gather = _check_rows(a_rows, weight_rows, rows, epilogue, top_k)
    maps = [m for m in (m_indices, block_expert, masked_m) if m is not None] + ([True] if dense else [])
    if len(maps) != 1 or (masked != (masked_m is not None)):
        _fail("give exactly one of m_indices / block_expert / dense=True (2-D a) or masked_m (3-D a)")
    if dense and e != 1:
        _fail(f"dense=True multiplies one expert; b holds {e}")
    per_id = 0 if dense else (align if block_expert is not None and isinstance(align, int) else 1)
    problem = _gg.Problem(e, rows, n, k, "fp8" if fp8 else _DT[a.dtype], "masked" if masked else "contiguous",
                          epilogue, per_id, "fp8" if epilogue == "swiglu_quant" else _DT[out.dtype], int(stacked),
                          gather)
    _devices(a=a, sa=sa, b=b, sb=sb, out=out, out_scale=out_scale, row_weight=row_weight)
    cfg = _config(_gg, config, problem, a.device)
    if dense:        # no ids: an int32 placeholder takes the id and unused pointers' places (never read)
        eid, m_max, n_mblocks = torch.empty(1, dtype=torch.int32, device=a.device), 0, triton.cdiv(rows, cfg["BLOCK_M"])
    else:
        eid, per_id, m_max, n_mblocks = _expert_map(lead, e, rows, m_indices, block_expert, align, masked_m, cfg)
    src = a_rows if a_rows is not None else (weight_rows if weight_rows is not None else eid)
    _devices(a=a, sa=sa, b=b, sb=sb, b_up=b_up, sb_up=sb_up, out=out, out_scale=out_scale, row_weight=row_weight,
             eid=eid, src=src)
    if not dense and should_validate(validate, a.device):
        _validate_map(eid, e, per_id, m_max, cfg["BLOCK_M"], masked)
    dummy = eid
    _gg.grouped_gemm_kernel[(n_mblocks, triton.cdiv(n, cfg["BLOCK_N"]))](
        a, sa if fp8 else dummy, b, b_up if swiglu else b, sb if fp8 else dummy,
        sb_up if (fp8 and swiglu) else dummy, out, out_scale if out_scale is not None else dummy, eid,
        masked_m if masked else eid, row_weight if row_weight is not None else dummy, src,
        rows, e, n, k, m_max, int(top_k), _n_src(a, a_rows, row_weight, weight_rows, top_k), b.stride(0),
        sb.stride(0) if fp8 else 0,
        *(_sa_strides(sa, masked and a_rows is None) if fp8 else (0, 0, 0)),
        **_gg.bind(problem, cfg, knobs.get().triton_interpret)["grouped_gemm_kernel"])
    return out


def _n_src(a, a_rows, row_weight, weight_rows, top_k: int) -> int:
    """How many assignment ids a layout's sorted ids may name: T * top_k (the kernel ignores any other)."""
    if a_rows is not None:
        return int(a.shape[0]) * int(top_k)
    return int(row_weight.numel()) if weight_rows is not None else 0


def _check_rows(a_rows, weight_rows, rows: int, epilogue: str, top_k: int) -> str:
    """The Problem's `gather` for the assignment ids given ("" for neither)."""
    if a_rows is not None and weight_rows is not None:
        _fail("give a_rows (the up GEMM) or weight_rows (the down GEMM's weights), not both")
    ids = a_rows if a_rows is not None else weight_rows
    if ids is None:
        return ""
    _tensor("a_rows" if a_rows is not None else "weight_rows", ids, (torch.int32,), shape=(rows,))
    if weight_rows is not None and epilogue != "weight":
        _fail("weight_rows is only read by the 'weight' epilogue")
    if not isinstance(top_k, int) or top_k < 1:
        _fail(f"top_k must be a positive int, got {top_k!r}")
    return "a" if a_rows is not None else "weight"


_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _sa_strides(sa, masked):
    """(expert, row, K-block) strides of the activation scales, which may be MN-major (DeepGEMM's TMA layout)."""
    return (sa.stride(0), sa.stride(1), sa.stride(2)) if masked else (0, sa.stride(0), sa.stride(1))


def _check_operands(a, sa, b, sb, token_rows: bool = False):
    """(fp8, masked) after checking a, sa, b, sb against each other (token_rows: a is the [T, K] token rows, read
    through a layout's ids)."""
    fp8 = sa is not None or sb is not None
    dts = (FP8,) if fp8 else _HALF
    _tensor("a", a, dts)
    _tensor("b", b, dts, ndim=3)
    if a.dim() not in (2, 3):
        _fail(f"a must be [R, K] (contiguous layout) or [E, M_max, K] (masked layout), got {tuple(a.shape)}")
    masked = a.dim() == 3
    if token_rows and masked:
        _fail(f"with a_rows, a is the [T, K] token rows, got {tuple(a.shape)}")
    e, n, k = b.shape
    if a.shape[-1] != k:
        _fail(f"a has K={a.shape[-1]}, b has K={k}")
    if not fp8 and a.dtype != b.dtype:
        _fail(f"a ({a.dtype}) and b ({b.dtype}) must have the same dtype", TypeError)
    if masked and a.shape[0] != e:
        _fail(f"masked a has {a.shape[0]} experts, b has {e}")
    if a.data_ptr() % 16 or b.data_ptr() % 16 or k % 16:
        _fail(f"a and b must start 16-byte aligned with K % 16 == 0 (the kernel's vector loads), got K={k}")
    if fp8:
        if sa is None or sb is None:
            _fail("fp8 operands need both sa and sb (give neither for bf16 / fp16)")
        if k % 128:
            _fail(f"fp8 grouped GEMM needs K % 128 == 0, got K={k}")
        _tensor("sa", sa, (torch.float32,), shape=tuple(a.shape[:-1]) + (k // 128,), strided=True)
        _tensor("sb", sb, (torch.float32,), shape=(e, triton.cdiv(n, 128), k // 128))
        _need_e4m3(a, "the fp8 grouped GEMM")
    return fp8, masked


def _up_operands(b, sb, b_up, sb_up, swiglu, fp8):
    """(b, sb, b_up, sb_up, N_out): a stacked [gate; up] b split in two, or the given up operand checked."""
    n = b.shape[1]
    if not swiglu:
        if b_up is not None or sb_up is not None:
            _fail("b_up / sb_up are only read by the swiglu epilogues")
        return b, sb, b_up, sb_up, n
    if b_up is not None:
        _check_up(b, sb, b_up, sb_up, fp8)
        return b, sb, b_up, sb_up, n
    if sb_up is not None:
        _fail("sb_up without b_up: give both, or neither for a stacked [gate; up] weight")
    if n % 2 or (fp8 and (n // 2) % 128):
        _fail(f"a stacked [gate; up] weight needs an even N (a multiple of 256 for fp8), got N={n}")
    n //= 2
    if fp8:
        return b[:, :n], sb[:, :n // 128], b[:, n:], sb[:, n // 128:], n
    return b[:, :n], sb, b[:, n:], sb_up, n


def _check_up(b, sb, b_up, sb_up, fp8):
    _tensor("b_up", b_up, (b.dtype,))
    if b_up.shape != b.shape or b_up.stride() != b.stride():
        _fail(f"b_up must match b: shape {tuple(b.shape)}, dtype {b.dtype}, strides {b.stride()}")
    if not fp8:
        if sb_up is not None:
            _fail("sb_up is only for fp8 weights (these are 16-bit)")
        return
    if sb_up is None:
        _fail(f"fp8 b_up needs sb_up shaped and strided like sb {tuple(sb.shape)}")
    _tensor("sb_up", sb_up, (torch.float32,), strided=True)
    if sb_up.shape != sb.shape or sb_up.stride() != sb.stride():
        _fail(f"fp8 b_up needs sb_up shaped and strided like sb {tuple(sb.shape)}")


def _check_out(out, lead, rows, n, epilogue, fp8, out_scale, row_weight, by_assignment=False):
    """out (and out_scale / row_weight) for the layout's rows `lead`; by_assignment: row_weight is the router's
    [T * top_k] weights, read through weight_rows."""
    quant = epilogue == "swiglu_quant"
    _tensor("out", out, (FP8,) if quant else (torch.bfloat16, torch.float16, torch.float32), shape=lead + (n,))
    if quant:
        if n % 128:
            _fail(f"swiglu_quant needs N_out % 128 == 0, got {n}")
        _tensor("out_scale", out_scale, (torch.float32,), shape=lead + (n // 128,))
    elif out_scale is not None:
        _fail("out_scale is only written by the swiglu_quant epilogue")
    if epilogue == "weight":
        _tensor("row_weight", row_weight, (torch.float32,))
        if row_weight.numel() != rows and not by_assignment:
            _fail(f"row_weight must have one weight per row ({rows}), got {row_weight.numel()}")
    elif row_weight is not None:
        _fail("row_weight is only read by the 'weight' epilogue")


def _expert_map(lead, e, rows, m_indices, block_expert, align, masked_m, cfg):
    """(expert-id tensor, ROWS_PER_ID, M_MAX, number of M-blocks) for the kernel; lead: the layout's shape."""
    bm = cfg["BLOCK_M"]
    if masked_m is not None:
        _tensor("masked_m", masked_m, (torch.int32,), shape=(e,))
        return masked_m, 1, lead[1], e * triton.cdiv(lead[1], bm)
    if m_indices is not None:
        _tensor("m_indices", m_indices, (torch.int32,), shape=(rows,))
        return m_indices, 1, 0, triton.cdiv(rows, bm)
    if align is None or align % bm or rows % align:
        _fail(f"block_expert needs align (got {align}) a multiple of BLOCK_M={bm} dividing the rows ({rows})")
    _tensor("block_expert", block_expert, (torch.int32,), shape=(rows // align,))
    return block_expert, align, 0, rows // bm


def _validate_map(eid, e, per_id, m_max, block_m, masked):
    """Refuse expert-map values the kernel would skip or clamp (one host sync); see grouped_gemm's `validate`."""
    if masked:
        if bool(((eid < 0) | (eid > m_max)).any()):
            _fail(f"masked_m must hold row counts in [0, M_max={m_max}], got {eid[:8].tolist()}...")
        return
    name = "m_indices" if per_id == 1 else "block_expert"
    outside = (eid < -1) | (eid >= e)
    mixed = torch.zeros((), dtype=torch.bool, device=eid.device)
    if per_id == 1 and eid.numel():
        big = torch.iinfo(torch.int32).max
        ids = torch.nn.functional.pad(eid, (0, -eid.numel() % block_m), value=-1).view(-1, block_m)
        lo = torch.where(ids >= 0, ids, big).amin(1)
        mixed = ((lo != big) & (lo != ids.amax(1))).any()
    bad_ids, bad_segments = torch.stack([outside.any(), mixed]).tolist()
    if bad_ids:
        _fail(f"{name} holds expert ids outside [-1, E={e}) (-1 = padding), e.g. {eid[outside][:4].tolist()}")
    if bad_segments:
        _fail(f"m_indices puts rows of several experts in one {block_m}-row block: each expert's segment must "
              f"start on a multiple of 128 (DeepGEMM's contiguous layout), padded with -1")


def grouped_gemm_contiguous(a, sa, b, sb, m_indices, out, *, config=None, validate=None):
    """DeepGEMM's m_grouped_*_gemm_nt_contiguous: out[r] = a[r] @ b[m_indices[r]]^T; rows with -1 untouched.

    Each expert's rows must start on a multiple of 128 (DeepGEMM's alignment); sa / sb None means bf16 / fp16.
    m_indices values are checked as in `grouped_gemm` (`validate`).
    """
    return grouped_gemm(a, sa, b, sb, out, m_indices=m_indices, config=config, validate=validate)


def grouped_gemm_masked(a, sa, b, sb, masked_m, expected_m, out, *, config=None, validate=None):
    """DeepGEMM's m_grouped_*_gemm_nt_masked: out[e, :masked_m[e]] = a[e, :masked_m[e]] @ b[e]^T.

    a [E, M_max, K], out [E, M_max, N]; rows past masked_m[e] are untouched. expected_m (DeepGEMM's hint of the
    typical masked_m) is checked and accepted for compatibility; the config comes from `config` or the defaults.
    masked_m values are checked as in `grouped_gemm` (`validate`).
    """
    if not isinstance(expected_m, int) or expected_m < 1:
        _fail(f"expected_m must be a positive int, got {expected_m!r}")
    return grouped_gemm(a, sa, b, sb, out, masked_m=masked_m, config=config, validate=validate)
