"""Stem mla_step: the per-step state of paged MLA attention, computed once per step for every layer, in one launch.

`mla_step_kernel` is one program. From where each sequence's new tokens start (MODE 2: a device int32 [B] of
positions, what a CUDA-graph decode step reads; MODE 1: one host int for all sequences) and the block table it
writes, for the T = B * S_Q new tokens (token b * S_Q + s is sequence b's s-th new token, at position start_b + s):
  rope_rows [T]  = position - rope_base (the row of the rope table the layers are given);
  slots [T]      = block_table[b, position // PAGE] * PAGE + position % PAGE (-1 past the block table: not written);
  seqlens [B]    = start_b + S_Q;
and the split-KV schedule of mla_decode over those seqlens (MODE 0 reads the seqlens instead: get_mla_metadata):
  SPLIT = 1: FlashMLA's balanced schedule: each sequence costs ceil(seqlen / block_n) key tiles plus `overhead`;
    part p takes the units [p * P, (p + 1) * P) of the sequences laid end to end, P = ceil(total / n_parts);
  SPLIT = 0: part b is sequence b, whole (n_parts = B): nothing is split, so mla_decode launches no combine.
  meta [n_parts, 8] int32 rows (begin_b, begin_tile, end_b, end_tile, begin_split, block_n, 0, 0) and
  num_splits [B + 1] int32 (cumulative pieces per sequence), as dskc.ops.mla.MLAMetadata documents.
Everything is computed in chunks of BLOCK_B sequences / tokens and BLOCK_P parts, so any batch fits; the per-sequence
values the part rows need are kept in a scratch buffer between the passes (one program: a barrier orders them).
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._problem import ProblemBase, launch as _launch, pow2

STEM = "mla_step"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """batch sequences of s_q new tokens each over a cache in pages of page_size; split: the balanced split-KV
    schedule (1) or one part per sequence (0, no combine); positions: 1 when the step computes slots, rope rows and
    seqlens from start positions, 0 when it is given the seqlens (a schedule only: get_mla_metadata)."""
    batch: int
    s_q: int = 1
    page_size: int = 64
    split: int = 1
    positions: int = 1
    BUCKETS = {"batch": "pow2", "s_q": "pow2"}

    def __post_init__(self):
        object.__setattr__(self, "split", int(bool(self.split)))
        object.__setattr__(self, "positions", int(bool(self.positions)))


SPACE = {"BLOCK_B": (16, 32, 64, 128, 256), "BLOCK_P": (16, 32, 64), "num_warps": (1, 2, 4)}
CONSTRAINTS = ("BLOCK_B * BLOCK_P <= 1024 * num_warps",)     # the [BLOCK_P, BLOCK_B] comparison tile in registers
# kernel_report sm_90a, batch 64 (tests/kernels/test_reports_lean.py): 44 registers (split), 25 (unsplit), no spills.
DEFAULTS = {f: {"BLOCK_B": 64, "BLOCK_P": 16, "num_warps": 4} for f in ("sm80", "sm90", "sm100")}
META_COLS = 8


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """Sequences (tokens) per chunk: the step's token count rounded up to a power of two, 16..256; parts per chunk
    as many as the register budget of 4 warps leaves (16..64)."""
    bb = max(16, min(256, pow2(problem.batch * problem.s_q)))
    cfg = {**base, "BLOCK_B": bb, "BLOCK_P": max(16, min(64, 4096 // bb))}
    return cfg if fits(cfg) else dict(base)


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments} for (problem, config)."""
    consts = {"PAGE": problem.page_size, "SPLIT": problem.split, "BLOCK_B": config["BLOCK_B"],
              "BLOCK_P": config["BLOCK_P"]}
    return {"mla_step_kernel": _launch(consts, config, num_stages=1)}


def cost(problem: dict) -> tuple[float, float]:
    """(flops, bytes): a few integer passes over the tokens and sequences; negligible beside the layers."""
    t = problem["batch"] * problem["s_q"]
    return float(20 * t), float(16 * t + 64 * problem["batch"])


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    problem = Problem.of(problem)
    sig = {"starts_ptr": "*i32", "seqlens_in_ptr": "*i32", "block_table_ptr": "*i32", "rope_rows_ptr": "*i32",
           "slots_ptr": "*i32", "seqlens_ptr": "*i32", "meta_ptr": "*i32", "cum_ptr": "*i32", "work_ptr": "*i32",
           "MODE": "i32", "start0": "i32", "B": "i32", "S_Q": "i32", "stride_bt": "i32", "n_pages": "i32",
           "rope_base": "i32", "n_parts": "i32", "block_n": "i32", "overhead": "i32"}
    kw = bind(problem, config)["mla_step_kernel"]
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    sig.update({k: "constexpr" for k in consts})
    return [CompileSpec.make(__name__, "mla_step_kernel", sig, consts, kw["num_warps"], kw["num_stages"])]


@triton.jit
def _zero(BLOCK: tl.constexpr):
    """An int32 scalar 0 (a loop-carried running sum starts from it)."""
    return tl.sum(tl.zeros([BLOCK], tl.int32), 0)


@triton.jit
def _seqlens(starts_ptr, seqlens_in_ptr, b, bmask, MODE, start0, S_Q):
    """Cache length of sequences b after this step's tokens (MODE 0: as given)."""
    if MODE == 0:
        s = tl.load(seqlens_in_ptr + b, mask=bmask, other=0)
    elif MODE == 1:
        s = tl.zeros(b.shape, tl.int32) + start0 + S_Q
    else:
        s = tl.load(starts_ptr + b, mask=bmask, other=0) + S_Q
    return tl.where(bmask, s, 0)


@triton.jit
def _tokens(starts_ptr, block_table_ptr, rope_rows_ptr, slots_ptr, MODE, start0, B, S_Q, stride_bt, n_pages,
            rope_base, PAGE: tl.constexpr, BLOCK_B: tl.constexpr):
    """rope_rows and slots of every new token (chunks of BLOCK_B tokens)."""
    for t0 in range(0, B * S_Q, BLOCK_B):
        tok = t0 + tl.arange(0, BLOCK_B)
        tmask = tok < B * S_Q
        b = tok // S_Q
        if MODE == 1:
            pos = start0 + tok % S_Q
        else:
            pos = tl.load(starts_ptr + b, mask=tmask, other=0) + tok % S_Q
        pidx = pos // PAGE
        inside = tmask & (pos >= 0) & (pidx < n_pages)
        page = tl.load(block_table_ptr + b * stride_bt + pidx, mask=inside, other=0)
        tl.store(slots_ptr + tok, tl.where(inside, page * PAGE + pos % PAGE, -1), mask=tmask)
        tl.store(rope_rows_ptr + tok, pos - rope_base, mask=tmask)


@triton.jit
def _schedule_whole(starts_ptr, seqlens_in_ptr, meta_ptr, cum_ptr, MODE, start0, B, S_Q, block_n,
                    BLOCK_B: tl.constexpr):
    """SPLIT = 0: part b is sequence b, whole."""
    running = _zero(BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bmask = b < B
        n = (tl.maximum(_seqlens(starts_ptr, seqlens_in_ptr, b, bmask, MODE, start0, S_Q), 0) + block_n - 1) // block_n
        one = tl.where(bmask & (n > 0), 1, 0)
        tl.store(cum_ptr + 1 + b, running + tl.cumsum(one, 0), mask=bmask)
        running += tl.sum(one, 0)
        row = meta_ptr + b * 8
        tl.store(row + 0, b, mask=bmask)
        tl.store(row + 1, tl.zeros_like(b), mask=bmask)
        tl.store(row + 2, b, mask=bmask)
        tl.store(row + 3, n, mask=bmask)
        tl.store(row + 4, tl.zeros_like(b), mask=bmask)
        tl.store(row + 5, tl.zeros_like(b) + block_n, mask=bmask)
        tl.store(row + 6, tl.zeros_like(b), mask=bmask)
        tl.store(row + 7, tl.zeros_like(b), mask=bmask)


@triton.jit
def _costs(starts_ptr, seqlens_in_ptr, work_ptr, cum_ptr, MODE, start0, B, S_Q, n_parts, block_n, overhead,
           BLOCK_B: tl.constexpr):
    """Per sequence: first unit (start), tiles n and first part into work [3, B]; num_splits; returns the payload."""
    total = _zero(BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bmask = b < B
        n = (tl.maximum(_seqlens(starts_ptr, seqlens_in_ptr, b, bmask, MODE, start0, S_Q), 0) + block_n - 1) // block_n
        total += tl.sum(tl.where(bmask, n + overhead, 0), 0)
    payload = tl.maximum((total + n_parts - 1) // n_parts, 1)
    running = _zero(BLOCK_B)
    pieces = _zero(BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bmask = b < B
        n = (tl.maximum(_seqlens(starts_ptr, seqlens_in_ptr, b, bmask, MODE, start0, S_Q), 0) + block_n - 1) // block_n
        cost = tl.where(bmask, n + overhead, 0)
        start = running + tl.cumsum(cost, 0) - cost
        running += tl.sum(cost, 0)
        first = (start + overhead) // payload
        last = (start + overhead + n - 1) // payload
        splits = tl.where(bmask & (n > 0), last - first + 1, 0)
        tl.store(cum_ptr + 1 + b, pieces + tl.cumsum(splits, 0), mask=bmask)
        pieces += tl.sum(splits, 0)
        tl.store(work_ptr + b, start, mask=bmask)
        tl.store(work_ptr + B + b, n, mask=bmask)
        tl.store(work_ptr + 2 * B + b, first, mask=bmask)
    return payload


@triton.jit
def _schedule_split(work_ptr, meta_ptr, B, n_parts, block_n, overhead, payload, BLOCK_B: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """SPLIT = 1: the part rows, from the per-sequence values in work (see the module docstring)."""
    last = tl.maximum(B - 1, 0)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < n_parts
        lo = p * payload
        hi = lo + payload
        begin_b = tl.zeros([BLOCK_P], tl.int32)
        end_b = tl.zeros([BLOCK_P], tl.int32)
        for b0 in range(0, B, BLOCK_B):       # searchsorted(ends, lo / hi - 1, right=True): ends at or before
            b = b0 + tl.arange(0, BLOCK_B)
            bmask = b < B
            end = tl.load(work_ptr + b, mask=bmask, other=0) + tl.load(work_ptr + B + b, mask=bmask, other=0) \
                + overhead
            begin_b += tl.sum((bmask[None, :] & (end[None, :] <= lo[:, None])).to(tl.int32), 1)
            end_b += tl.sum((bmask[None, :] & (end[None, :] <= hi[:, None] - 1)).to(tl.int32), 1)
        empty = begin_b >= B
        bb = tl.minimum(begin_b, last)
        eb = tl.minimum(end_b, last)
        has = (tl.zeros_like(p) + B) > 0
        hmask = pmask & has
        start_bb = tl.load(work_ptr + bb, mask=hmask, other=0)
        n_bb = tl.load(work_ptr + B + bb, mask=hmask, other=0)
        first_bb = tl.load(work_ptr + 2 * B + bb, mask=hmask, other=0)
        start_eb = tl.load(work_ptr + eb, mask=hmask, other=0)
        n_eb = tl.load(work_ptr + B + eb, mask=hmask, other=0)
        row = meta_ptr + p * 8
        tl.store(row + 0, tl.where(empty, 1, bb), mask=pmask)
        tl.store(row + 1, tl.minimum(tl.maximum(lo - start_bb - overhead, 0), n_bb), mask=pmask)
        tl.store(row + 2, tl.where(empty, 0, eb), mask=pmask)
        tl.store(row + 3, tl.minimum(tl.maximum(hi - start_eb - overhead, 0), n_eb), mask=pmask)
        tl.store(row + 4, tl.where(has, tl.maximum(p - first_bb, 0), 0), mask=pmask)
        tl.store(row + 5, tl.zeros_like(p) + block_n, mask=pmask)
        tl.store(row + 6, tl.zeros_like(p), mask=pmask)
        tl.store(row + 7, tl.zeros_like(p), mask=pmask)


@triton.jit
def mla_step_kernel(starts_ptr, seqlens_in_ptr, block_table_ptr, rope_rows_ptr, slots_ptr, seqlens_ptr, meta_ptr,
                    cum_ptr, work_ptr, MODE, start0, B, S_Q, stride_bt, n_pages, rope_base, n_parts, block_n,
                    overhead, PAGE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """See the module docstring."""
    if MODE != 0:
        _tokens(starts_ptr, block_table_ptr, rope_rows_ptr, slots_ptr, MODE, start0, B, S_Q, stride_bt, n_pages,
                rope_base, PAGE, BLOCK_B)
        for b0 in range(0, B, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            tl.store(seqlens_ptr + b, _seqlens(starts_ptr, seqlens_in_ptr, b, b < B, MODE, start0, S_Q),
                     mask=b < B)
    tl.store(cum_ptr, 0)
    if SPLIT:
        payload = _costs(starts_ptr, seqlens_in_ptr, work_ptr, cum_ptr, MODE, start0, B, S_Q, n_parts, block_n,
                         overhead, BLOCK_B)
        tl.debug_barrier()        # the part rows read what every thread wrote to work
        _schedule_split(work_ptr, meta_ptr, B, n_parts, block_n, overhead, payload, BLOCK_B, BLOCK_P)
    else:
        _schedule_whole(starts_ptr, seqlens_in_ptr, meta_ptr, cum_ptr, MODE, start0, B, S_Q, block_n, BLOCK_B)
