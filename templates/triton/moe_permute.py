"""Stem moe_permute: token permutation to and from the expert-grouped layouts of the grouped GEMM.

Kernels (all deterministic; no atomics anywhere):
  moe_count_kernel      one program per BLOCK_A assignments (A = T * top_k, the expert of each (token, k)):
                        per-chunk expert counts [chunks, BLOCK_E].
  moe_scan_kernel       one program: exclusive prefix of the chunk counts over chunks (tiles of BLOCK_C chunks,
                        tl.cumsum), total counts [E] and each expert's first row `starts` [E]:
                          contiguous (MASKED = 0): expert e owns rows [start_e, start_e + round_up(count_e, ALIGN));
                            start_e = sum of the earlier experts' padded counts; the row space has a static size
                            round_up(A + E * (ALIGN - 1), ALIGN) so that no host sync is needed (CUDA graphs);
                          masked (MASKED = 1): start_e = e * M_MAX, counts = masked_m ([E, M_MAX, K] layout).
  moe_scatter_kernel    one program per chunk: rank of each assignment inside its expert (chunk base + in-chunk
                        prefix: a stable sort, token order kept), dest = start + rank, sorted_ids[dest] = assignment.
                        An assignment whose id is outside [0, E) is counted nowhere and gets dest = -1 (dropped:
                        no row, nothing combined), so it can never share a row with another assignment.
                        (A single-program version took 2 x A / BLOCK_A dependent steps: ~1000 for T = 4096, top-8.)
  moe_fill_rows_kernel  one program per BLOCK_R rows: m_indices[row] = expert or -1 (padding; DeepGEMM's contiguous
                        layout), block_expert[row / ALIGN] = expert or -1 (empty block), sorted_ids[row] = -1 on
                        padding rows.
  moe_gather_kernel     a[row] = x[sorted_ids[row] // top_k] (QUANT = 1: quantised on the fly to e4m3 with one
                        fp32 scale per 128 channels, amax clamped to 1e-4, scale = amax / 448; a NaN / inf
                        element becomes e4m3 NaN and stays out of the amax, as in act_quant), and
                        row_weight[row] = routing weight of that assignment. Padding rows are not written.
  moe_combine_kernel    out[t] = sum_j y[dest[t * top_k + j]] (+ shared[t]), summed in fp32 in a fixed j order;
                        HAS_RES: out[t] = round(round(that) + residual[t]), a block's residual add in the same pass.
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._moe_common import to_e4m3
from dskc.templates.triton.act_quant import _round_to
from dskc.templates.triton._problem import ProblemBase, element, launch as _launch

STEM = "moe_permute"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """T tokens x top_k assignments over E experts, D channels; the contiguous layout pads each expert to `align`
    rows (masked = 1: [E, T] rows); quant: the gather quantises x (`dtype`) to e4m3; shared: the combine adds the
    shared experts' output; residual: the combine adds a residual stream; op: the kernels the launch runs:
    "align" (count, scan, scatter, fill), "gather", "combine", or "" for all of them."""
    T: int
    E: int
    top_k: int
    D: int
    align: int = 128
    masked: int = 0
    quant: int = 1
    dtype: str = "bf16"
    shared: int = 1
    residual: int = 0
    op: str = ""
    BUCKETS = {"T": "pow2"}

SPACE = {
    "BLOCK_A": (32, 64, 128, 256),   # assignments per program of the count / scatter kernels
    "BLOCK_C": (4, 8, 16, 32),       # chunks per step of the scan kernel
    "BLOCK_R": (32, 64, 128, 256),   # rows per program of the fill kernel
    "GATHER_ROWS": (1, 2, 4, 8),     # rows per program of the gather kernel
    "BLOCK_N": (128, 256, 512),      # channels per program of the gather / combine kernels
    "COMBINE_T": (1, 2, 4, 8),       # tokens per program of the combine kernel
    "num_warps": (1, 2, 4, 8),
}

CONSTRAINTS = (
    "BLOCK_A * max(E, 16) <= 2048 * num_warps",     # the one-hot [BLOCK_A, E] tile of count / scatter in registers
    "BLOCK_C * max(E, 16) <= 2048 * num_warps",     # the [BLOCK_C, E] tile of chunk counts of the scan
    "BLOCK_R * max(E, 16) <= 2048 * num_warps",     # the [BLOCK_R, E] row-to-expert comparison of the fill kernel
    "BLOCK_N % 128 == 0",                           # the quantising gather works on whole 128-channel groups
)


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """The base, with the [block, E] tiles of the count / scatter, scan and fill kernels halved (within SPACE) until
    they fit the registers for this many experts: DeepSeek-V3's 256 routed + 1 shared expert take BLOCK_A and
    BLOCK_R from 64 to 32 (the base's 64 x 512-wide one-hot tile broke the constraints: a launch refused)."""
    cap = 2048 * base["num_warps"] // max(problem.E, 16)
    cfg = dict(base)
    for name in ("BLOCK_A", "BLOCK_C", "BLOCK_R"):
        while cfg[name] > cap and cfg[name] // 2 >= min(SPACE[name]):
            cfg[name] //= 2
    return cfg if fits(cfg) else dict(base)

# kernel_report sm_90a, E = 256 (tests/kernels/test_reports_moe.py): the one-hot [BLOCK_A, E] kernels at BLOCK_A 128 /
# 4 warps: 255 registers and 296 bytes of spills; 64 / 4 warps: 216; 64 / 8 warps: 127 (scatter 128, count 48,
# scan 60), no spills. Fill kernel 64 rows / 8 warps: 128 registers.
_DEFAULT = {"BLOCK_A": 64, "BLOCK_C": 16, "BLOCK_R": 64, "GATHER_ROWS": 2, "BLOCK_N": 256, "COMBINE_T": 2,
            "num_warps": 8}
DEFAULTS = {"sm80": dict(_DEFAULT), "sm90": dict(_DEFAULT), "sm100": dict(_DEFAULT)}


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def align_kwargs(E: int, align: int, masked: int, config: dict) -> dict:
    """Launch keyword arguments of moe_align's kernels (count, scan, scatter, fill)."""
    be = triton.next_power_of_2(max(E, 2))
    base = {"E": E, "BLOCK_E": be}
    return {"moe_count_kernel": _launch({**base, "BLOCK_A": config["BLOCK_A"]}, config, 1),
            "moe_scan_kernel": _launch({**base, "ALIGN": align, "MASKED": int(masked), "BLOCK_C": config["BLOCK_C"]},
                                       config, 1),
            "moe_scatter_kernel": _launch({**base, "MASKED": int(masked), "BLOCK_A": config["BLOCK_A"]}, config, 1),
            "moe_fill_rows_kernel": _launch({**base, "ALIGN": align, "MASKED": int(masked),
                                             "BLOCK_R": config["BLOCK_R"]}, config, 1)}


def gather_kwargs(quant: int, config: dict, interpret: bool = False) -> dict:
    """Launch keyword arguments of moe_gather's kernel (INTERP_FIX = 1 only under TRITON_INTERPRET)."""
    return _launch({"QUANT": int(quant), "ROWS": config["GATHER_ROWS"], "BLOCK_N": config["BLOCK_N"],
                    "INTERP_FIX": int(interpret)}, config, 1)


def combine_kwargs(top_k: int, shared: int, config: dict, residual: int = 0) -> dict:
    """Launch keyword arguments of moe_combine's kernel."""
    return _launch({"TOP_K": top_k, "HAS_SHARED": int(shared), "HAS_RES": int(residual),
                    "BLOCK_T": config["COMBINE_T"], "BLOCK_N": config["BLOCK_N"]}, config, 1)


OPS = ("align", "gather", "combine")


def bind(problem: Problem, config: dict, interpret: bool = False) -> dict:
    """{kernel name: launch keyword arguments} of every kernel the problem launches (its op's, or all)."""
    if problem.op not in OPS + ("",):
        raise ValueError(f"moe_permute op must be one of {OPS} or '' (all), got {problem.op!r}")
    out = {}
    if problem.op in ("", "align"):
        out.update(align_kwargs(problem.E, problem.align, problem.masked, config))
    if problem.op in ("", "gather"):
        out["moe_gather_kernel"] = gather_kwargs(problem.quant, config, interpret)
    if problem.op in ("", "combine"):
        out["moe_combine_kernel"] = combine_kwargs(problem.top_k, problem.shared, config, problem.residual)
    return out


def cost(problem: dict) -> tuple[float, float]:
    """(flops, bytes): the gather reads x top_k times and writes e4m3 rows; the combine reads bf16 rows."""
    a, d = problem["T"] * problem["top_k"], problem["D"]
    return float(2 * a * d), float(a * (2 * d + d + 4 * d // 128) + a * 2 * d + problem["T"] * 2 * d)


def row_space(n_assign: int, E: int, align: int) -> int:
    """Rows of the contiguous layout: enough for any routing of n_assign assignments over E experts."""
    return triton.cdiv(n_assign + E * (align - 1), align) * align


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    problem = Problem.of(problem)
    act = "*i32" if problem.op == "align" else element(problem.dtype)   # align's kernels read no activations
    sigs = {
        "moe_count_kernel": {"ids_ptr": "*i32", "chunk_ptr": "*i32", "A": "i32"},
        "moe_scan_kernel": {"chunk_ptr": "*i32", "base_ptr": "*i32", "counts_ptr": "*i32", "starts_ptr": "*i32",
                            "n_chunks": "i32", "M_MAX": "i32"},
        "moe_scatter_kernel": {"ids_ptr": "*i32", "base_ptr": "*i32", "starts_ptr": "*i32", "dest_ptr": "*i32",
                               "sorted_ptr": "*i32", "A": "i32", "M_MAX": "i32"},
        "moe_fill_rows_kernel": {"counts_ptr": "*i32", "starts_ptr": "*i32", "sorted_ptr": "*i32",
                                 "m_idx_ptr": "*i32", "block_expert_ptr": "*i32", "R": "i32", "M_MAX": "i32"},
        "moe_gather_kernel": {"x_ptr": act, "sorted_ptr": "*i32", "w_ptr": "*fp32",
                              "a_ptr": "*fp8e4nv" if problem.quant else act, "sa_ptr": "*fp32", "rw_ptr": "*fp32",
                              "R": "i32", "D": "i32", "TOP_K": "i32"},
        "moe_combine_kernel": {"y_ptr": act, "dest_ptr": "*i32", "shared_ptr": act, "res_ptr": act, "out_ptr": act,
                               "T": "i32", "N": "i32"},
    }
    specs = []
    for kernel, kw in bind(problem, config).items():
        cx = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
        specs.append(CompileSpec.make(__name__, kernel, {**sigs[kernel], **{k: "constexpr" for k in cx}}, cx,
                                      num_warps=kw["num_warps"], num_stages=kw["num_stages"]))
    return specs


@triton.jit
def _one_hot(ids_ptr, a0, A, E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr):
    """([BLOCK_A, BLOCK_E] int32: 1 where assignment a0 + i goes to expert j, [BLOCK_A] whether its id is in
    [0, E)). Rows past A and ids outside [0, E) are all zero (dropped)."""
    offs = a0 + tl.arange(0, BLOCK_A)
    ids = tl.load(ids_ptr + offs, mask=offs < A, other=-1)
    valid = (ids >= 0) & (ids < E)
    ids = tl.where(valid, ids, -1)
    return (ids[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32), valid


@triton.jit
def moe_count_kernel(ids_ptr, chunk_ptr, A, E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr):
    c = tl.program_id(0)
    hot, _ = _one_hot(ids_ptr, c * BLOCK_A, A, E, BLOCK_E, BLOCK_A)
    tl.store(chunk_ptr + c * BLOCK_E + tl.arange(0, BLOCK_E), tl.sum(hot, 0))


@triton.jit
def moe_scan_kernel(chunk_ptr, base_ptr, counts_ptr, starts_ptr, n_chunks, M_MAX,
                    E: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr, MASKED: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    ecols = tl.arange(0, BLOCK_E)
    crows = tl.arange(0, BLOCK_C)
    running = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, n_chunks, BLOCK_C):
        offs = (c0 + crows)[:, None] * BLOCK_E + ecols[None, :]
        cmask = (c0 + crows < n_chunks)[:, None]
        tile = tl.load(chunk_ptr + offs, mask=cmask, other=0)
        tl.store(base_ptr + offs, tl.cumsum(tile, 0) - tile + running[None, :], mask=cmask)
        running += tl.sum(tile, 0)
    if MASKED:
        starts = ecols * M_MAX
    else:
        padded = (running + ALIGN - 1) // ALIGN * ALIGN
        starts = tl.cumsum(padded, 0) - padded
    tl.store(counts_ptr + ecols, running, mask=ecols < E)
    tl.store(starts_ptr + ecols, starts, mask=ecols < E)


@triton.jit
def moe_scatter_kernel(ids_ptr, base_ptr, starts_ptr, dest_ptr, sorted_ptr, A, M_MAX,
                       E: tl.constexpr, BLOCK_E: tl.constexpr, MASKED: tl.constexpr, BLOCK_A: tl.constexpr):
    c = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    offs = c * BLOCK_A + tl.arange(0, BLOCK_A)
    amask = offs < A
    hot, valid = _one_hot(ids_ptr, c * BLOCK_A, A, E, BLOCK_E, BLOCK_A)
    base = tl.load(base_ptr + c * BLOCK_E + ecols)              # same-expert assignments in earlier chunks
    starts = tl.load(starts_ptr + ecols, mask=ecols < E, other=0)
    before = tl.cumsum(hot, 0) - hot                            # ... and earlier in this chunk
    rank = tl.sum(hot * (before + base[None, :]), 1)
    dest = tl.sum(hot * starts[None, :], 1) + rank
    ok = amask & valid                    # an id outside [0, E) has no expert: dropped, dest -1
    if MASKED:
        ok = ok & (rank < M_MAX)
    tl.store(dest_ptr + offs, tl.where(ok, dest, -1), mask=amask)
    tl.store(sorted_ptr + dest, offs, mask=ok)


@triton.jit
def moe_fill_rows_kernel(counts_ptr, starts_ptr, sorted_ptr, m_idx_ptr, block_expert_ptr, R, M_MAX,
                         E: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr, MASKED: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    ecols = tl.arange(0, BLOCK_E)
    emask = ecols < E
    counts = tl.load(counts_ptr + ecols, mask=emask, other=0)
    starts = tl.load(starts_ptr + ecols, mask=emask, other=0)
    if MASKED:
        span = tl.zeros([BLOCK_E], tl.int32) + M_MAX
    else:
        span = (counts + ALIGN - 1) // ALIGN * ALIGN
    rel = rows[:, None] - starts[None, :]
    inside = (rel >= 0) & (rel < span[None, :]) & emask[None, :]
    expert = tl.max(tl.where(inside, ecols[None, :], -1), 1)
    valid = tl.max((inside & (rel < counts[None, :])).to(tl.int32), 1) > 0
    tl.store(m_idx_ptr + rows, tl.where(valid, expert, -1), mask=rmask)
    tl.store(sorted_ptr + rows, tl.full([BLOCK_R], -1, tl.int32), mask=rmask & ~valid)
    if not MASKED:
        first = (rows % ALIGN) == 0
        tl.store(block_expert_ptr + rows // ALIGN, tl.where(valid, expert, -1), mask=rmask & first)


@triton.jit
def moe_gather_kernel(x_ptr, sorted_ptr, w_ptr, a_ptr, sa_ptr, rw_ptr, R, D, TOP_K,
                      QUANT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, INTERP_FIX: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pid_n = tl.program_id(1)
    src = tl.load(sorted_ptr + rows, mask=rows < R, other=-1)
    if tl.max(src, 0) < 0:  # only padding rows: the static row space is mostly padding for small batches
        return
    ok = src >= 0
    tok = tl.where(ok, src // TOP_K, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    v = tl.load(x_ptr + tok[:, None].to(tl.int64) * D + cols[None, :], mask=ok[:, None] & cmask[None, :],
                other=0.0)
    dst = a_ptr + rows[:, None].to(tl.int64) * D + cols[None, :]
    if QUANT:
        G: tl.constexpr = BLOCK_N // 128
        vg = tl.reshape(v.to(tl.float32), [ROWS, G, 128])
        finite = tl.abs(vg) < float("inf")      # as act_quant: non-finite -> NaN, left out of the amax
        amax = tl.maximum(tl.max(tl.where(finite, tl.abs(vg), 0.0), 2), 1e-4)
        scale = amax / 448.0
        q = tl.reshape(tl.where(finite, vg / scale[:, :, None], float("nan")), [ROWS, BLOCK_N])
        tl.store(dst, to_e4m3(q, a_ptr.dtype.element_ty, INTERP_FIX), mask=ok[:, None] & cmask[None, :])
        groups = pid_n * G + tl.arange(0, G)
        n_groups = D // 128
        tl.store(sa_ptr + rows[:, None] * n_groups + groups[None, :], scale,
                 mask=ok[:, None] & (groups < n_groups)[None, :])
    else:
        tl.store(dst, v.to(a_ptr.dtype.element_ty), mask=ok[:, None] & cmask[None, :])
    if pid_n == 0:
        tl.store(rw_ptr + rows, tl.load(w_ptr + tl.where(ok, src, 0), mask=ok, other=0.0), mask=ok)


@triton.jit
def moe_combine_kernel(y_ptr, dest_ptr, shared_ptr, res_ptr, out_ptr, T, N,
                       TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask = toks < T
    mask = tmask[:, None] & (cols < N)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(dest_ptr + toks * TOP_K + j, mask=tmask, other=-1)
        acc += tl.load(y_ptr + row[:, None].to(tl.int64) * N + cols[None, :], mask=mask & (row >= 0)[:, None],
                       other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + toks[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:   # the MoE's output in its dtype, then the residual add (rounded to nearest even, as torch's add)
        r = tl.load(res_ptr + toks[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = _round_to(acc.to(out_ptr.dtype.element_ty).to(tl.float32) + r, out_ptr.dtype.element_ty)
    tl.store(out_ptr + toks[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
