"""MLA decode, absorbed form: split-KV attention of (s_q x h_q) query rows against a paged latent cache.

Per token the cache holds 576 elements: 512 latent (also the value) + 64 shared rope key. Two layouts:
  * dense:  [num_blocks, page, 1, 576] in the query's 16/32-bit float dtype;
  * FP8:    uint8 [num_blocks, page, 1, 656] = 512 e4m3 | 4 fp32 scales (one per 128 latent) | 64 bf16 rope.

Kernels:
  `mla_decode_split_kernel`  grid (num_parts, ceil(s_q*h_q / BLOCK_M)). Part p walks its slice of the work given
      by the scheduling metadata (batches begin_b..end_b, BLOCK_N-token tiles begin_tile..end_tile). A batch whose
      work is all in one part is written straight to (out, lse); otherwise each piece writes an fp32 partial
      (o, lse) into slot cum_splits[b] + split index of an accumulator.
  `mla_decode_combine_kernel` grid (batch, ceil(rows / BLOCK_R)): merges the partials of split batches; writes
      out = 0, lse = -inf for empty sequences (seqlen 0). Launched only for a split schedule (Problem.split = 1):
      with one part per sequence (split = 0) every sequence is written by the split kernel, empty ones included.
Query rows are (s, h) flattened with h fastest; query row s sees keys [0, seqlen - s_q + s] when causal.
Values outside the contract are confined, never read out of bounds (dskc.ops checks them with a sync, except while
a CUDA graph is captured): a seqlen is clamped to [0, max_blocks * PAGE] and a token whose page id is outside
[0, num_blocks) is skipped like one past the sequence.
The 512 latent columns are handled as 4 chunks of 128 (matching the FP8 scale groups) so no tile needs 512 live
columns of one operand at once.
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._problem import ProblemBase, element, launch as _launch, pow2

STEM = "mla_decode"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """batch sequences of s_q new query tokens x h_q heads against `seqlen` cached tokens in pages of page_size;
    kv_fp8: the 656-byte FP8 cache (else a dense cache of `dtype`); dtype of q / out ("bf16" | "fp16" | "fp32");
    causal: the new tokens see each other causally (applies when s_q > 1); split: the balanced split-KV schedule
    with its combine kernel (1), or one part per sequence and no combine (0; see split_pays)."""
    batch: int
    s_q: int
    h_q: int
    seqlen: int
    page_size: int = 64
    kv_fp8: int = 0
    dtype: str = "bf16"
    causal: int = 1
    split: int = 1
    BUCKETS = {"batch": "pow2", "s_q": "pow2", "seqlen": "pow2"}

    def __post_init__(self):
        object.__setattr__(self, "kv_fp8", int(bool(self.kv_fp8)))
        object.__setattr__(self, "causal", int(bool(self.causal)))
        object.__setattr__(self, "split", int(bool(self.split)))
D_LATENT = 512
D_ROPE = 64
D_QK = D_LATENT + D_ROPE
_DL = tl.constexpr(D_LATENT)
_DQK = tl.constexpr(D_QK)
FP8_TOKEN_BYTES = 656
META_COLS = 8          # tile_scheduler_metadata row: begin_b, begin_tile, end_b, end_tile, begin_split, 0, 0, 0

SPACE = {
    "BLOCK_M": (16, 32, 64),
    "BLOCK_N": (16, 32, 64),
    "BLOCK_K": (32, 64, 128),
    "BLOCK_DV": (64, 128, 256, 512),
    "num_warps": (4, 8),
    "num_stages": (1, 2, 3),
}
CONSTRAINTS = (
    "BLOCK_M <= max(64, s_q * h_q)",   # 64 rows is one wgmma; more than the rows is waste
    "BLOCK_M * BLOCK_N <= 4096",
)
# 64 query rows (what one sm_90 wgmma needs; rows past h_q*s_q are masked, cheap while the step is memory-bound)
# x 32 keys, q.k in 64-wide chunks, value columns split in two across the grid (a 64 x 512 fp32 accumulator
# alone would be 128 registers per thread). sm_90a, pointers 16-byte aligned as the JIT specializes them:
# 222 registers (bf16 cache) / 246 (FP8 cache), no spills (207 / 243 before the page-id mask). 64 keys: 242 / 255
# registers, FP8 spilled 44 bytes;
# BLOCK_DV 512 spilled 336 bytes.
DEFAULTS = {
    "sm80": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_DV": 256, "num_warps": 8, "num_stages": 1},
    "sm90": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_DV": 256, "num_warps": 8, "num_stages": 1},
    "sm100": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_DV": 256, "num_warps": 8, "num_stages": 1},
}


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """Head blocking: BLOCK_M query rows (s_q x h_q) per program. sm_90+ keeps 64 (one wgmma is 64 rows; rows past
    s_q * h_q are masked, cheap while decode is memory-bound); sm_80 (mma.sync, 16 rows) takes the rows rounded up
    to 16..64. When the (batch x row-block x value-split) programs leave SMs idle, the 512 value columns are split
    four ways instead of two (BLOCK_DV 128), twice the programs, each with a smaller accumulator."""
    rows = problem.s_q * problem.h_q
    cfg = dict(base)
    if family == "sm80":
        cfg["BLOCK_M"] = max(16, min(64, pow2(rows)))
    programs = problem.batch * -(-rows // cfg["BLOCK_M"]) * (D_LATENT // cfg["BLOCK_DV"])
    if programs < sms and cfg["BLOCK_DV"] > 128:
        cfg["BLOCK_DV"] = 128
    return cfg if fits(cfg) else dict(base)


COMBINE = {"BLOCK_R": 8, "num_warps": 4, "num_stages": 1}
# A split costs about 5 tiles of 64 keys of setup and combine (FlashMLA's estimate), so splitting a sequence in two
# pays only past twice that; a cache that cannot hold a longer sequence never splits.
SPLIT_MIN_TOKENS = 2 * 5 * 64


def split_pays(batch: int, rows: int, cache_tokens: int, sms: int) -> bool:
    """Whether a decode of `batch` sequences x `rows` query rows over a cache of `cache_tokens` per sequence takes
    the balanced split-KV schedule (with its combine launch) rather than one part per sequence: only when the
    sequences can be long enough for a split to pay and the unsplit grid (64-row blocks x two value halves, the
    default tile) leaves SMs idle. Decided from static facts, so a captured CUDA graph knows its launches."""
    programs = batch * -(-rows // 64) * 2
    return cache_tokens > SPLIT_MIN_TOKENS and programs < sms


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments}: the split kernel, and the combine kernel when the schedule
    splits (problem.split)."""
    fp8 = bool(problem.kv_fp8)
    split = {"PAGE": problem.page_size, **token_strides(fp8), "CAUSAL": bool(problem.causal) and problem.s_q > 1,
             "FP8": fp8, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "BLOCK_K": config["BLOCK_K"],
             "BLOCK_DV": config["BLOCK_DV"]}
    out = {"mla_decode_split_kernel": _launch(split, config)}
    if problem.split:
        out["mla_decode_combine_kernel"] = _launch({"BLOCK_R": COMBINE["BLOCK_R"]}, COMBINE)
    return out


@triton.jit
def _load_latent(kv_ptr, sc_ptr, row_off, sc_off, cols, n_mask, FP8: tl.constexpr, DTYPE: tl.constexpr):
    """Latent columns `cols` of the gathered tokens (rows at row_off), dequantized to DTYPE."""
    if FP8:
        # e4m3 bytes -> fp16 by moving the bits (sign to bit 15, exponent+mantissa up by 7) and scaling by 2^8 to
        # re-bias the exponent (7 -> 15); exact for normals and subnormals, and needs no fp8 type (sm_80 has none).
        # e4m3fn's NaN (S.1111.111) is kept NaN, as torch's float8_e4m3fn reads the byte.
        raw = tl.load(kv_ptr + row_off[:, None] + cols[None, :], mask=n_mask[:, None], other=0).to(tl.uint16)
        bits = ((raw & 0x80) << 8) | ((raw & 0x7F) << 7)
        x = bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        x = tl.where((raw & 0x7F) == 0x7F, float("nan"), x)
        scale = tl.load(sc_ptr + sc_off[:, None] + (cols // 128)[None, :], mask=n_mask[:, None], other=0.0)
        x = (x * scale).to(DTYPE)
    else:
        x = tl.load(kv_ptr + row_off[:, None] + cols[None, :], mask=n_mask[:, None], other=0.0).to(DTYPE)
    return x


@triton.jit
def _tile_update(q_ptr, q_off, row_mask, kv_ptr, sc_ptr, rope_ptr, block_table_ptr, b, t0, seqlen, limit, dv0,
                 m_i, l_i, acc, stride_bt, num_blocks, qk_scale, PAGE: tl.constexpr, TOK: tl.constexpr,
                 SC_TOK: tl.constexpr, ROPE_TOK: tl.constexpr, FP8: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, DTYPE: tl.constexpr):
    """One BLOCK_N-token tile of online softmax (base-2 logits) for all rows of the program.

    q.k is summed over BLOCK_K-wide chunks (q chunks re-read, they stay in L1/L2) so that no 512-wide operand is
    live in registers; the value columns dv0..dv0+BLOCK_DV are loaded again for P @ V.
    """
    t = t0 + tl.arange(0, BLOCK_N)
    n_mask = t < seqlen
    page = tl.load(block_table_ptr + b * stride_bt + t // PAGE, mask=n_mask, other=0)
    n_mask = n_mask & (page >= 0) & (page < num_blocks)     # a page id outside the cache: token skipped
    page = tl.where(n_mask, page, 0).to(tl.int64)
    tok = page * PAGE + (t % PAGE)
    row_off = tok * TOK
    sc_off = tok * SC_TOK
    rope_off = tok * ROPE_TOK
    q_rope = tl.load(q_ptr + q_off[:, None] + _DL + tl.arange(0, 64)[None, :], mask=row_mask[:, None], other=0.0)
    k_rope = tl.load(rope_ptr + rope_off[:, None] + tl.arange(0, 64)[None, :], mask=n_mask[:, None], other=0.0)
    s = tl.dot(q_rope, tl.trans(k_rope.to(DTYPE)))
    # q chunks are re-read per tile on purpose (L1/L2 hits): a tile-dependent offset that is always 0 (and keeps
    # 16-element alignment) stops the compiler hoisting all of q into registers; hoisted, the 64 x 64 x 256 tile
    # spilled 132 bytes on sm_90a, with this none.
    q_off = q_off + tl.where(t0 < 0, 16, 0)
    for c in tl.static_range(_DL // BLOCK_K):
        cols = c * BLOCK_K + tl.arange(0, BLOCK_K)
        q_c = tl.load(q_ptr + q_off[:, None] + cols[None, :], mask=row_mask[:, None], other=0.0)
        k_c = _load_latent(kv_ptr, sc_ptr, row_off, sc_off, cols, n_mask, FP8, DTYPE)
        s = tl.dot(q_c, tl.trans(k_c), s)
    s = s * qk_scale
    s = tl.where(n_mask[None, :] & (t[None, :] <= limit[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_latent(kv_ptr, sc_ptr, row_off, sc_off, dv0 + tl.arange(0, BLOCK_DV), n_mask, FP8, DTYPE)
    acc = tl.dot(p.to(DTYPE), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _write_empty(out_ptr, lse_ptr, b, rows, n_rows, row_mask, dv, dv0, h_idx, s_idx, stride_lb, stride_lh,
                 BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out = 0 and lse = -inf for the rows of an empty sequence b (what the combine writes for a split schedule)."""
    o_off = (b.to(tl.int64) * n_rows + rows) * _DL
    tl.store(out_ptr + o_off[:, None] + dv[None, :], tl.zeros([BLOCK_M, BLOCK_DV], tl.float32).to(
        out_ptr.dtype.element_ty), mask=row_mask[:, None])
    if dv0 == 0:
        tl.store(lse_ptr + b * stride_lb + h_idx * stride_lh + s_idx, tl.full([BLOCK_M], float("-inf"), tl.float32),
                 mask=row_mask)


@triton.jit
def mla_decode_split_kernel(
        q_ptr, kv_ptr, sc_ptr, rope_ptr, block_table_ptr, seqlens_ptr, meta_ptr, cum_splits_ptr,
        out_ptr, lse_ptr, oacc_ptr, lacc_ptr,
        S_Q, H_Q, stride_bt, stride_lb, stride_lh, num_blocks, max_tok, qk_scale,
        PAGE: tl.constexpr, TOK: tl.constexpr, SC_TOK: tl.constexpr, ROPE_TOK: tl.constexpr,
        CAUSAL: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Attention of BLOCK_M query rows (output columns dv0..dv0+BLOCK_DV) over one part's tiles."""
    DTYPE = q_ptr.dtype.element_ty
    # q and out are contiguous (rows of 576 / 512 elements) and every base is 16-byte aligned (checked by the
    # wrapper); token strides are constexpr, so gathered rows load as 16-byte vectors.
    q_ptr = tl.multiple_of(q_ptr, 16)
    kv_ptr = tl.multiple_of(kv_ptr, 16)
    rope_ptr = tl.multiple_of(rope_ptr, 16)
    out_ptr = tl.multiple_of(out_ptr, 16)
    part = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dv0 = tl.program_id(2) * BLOCK_DV
    dv = dv0 + tl.arange(0, BLOCK_DV)
    n_rows = S_Q * H_Q
    row_mask = rows < n_rows
    s_idx = rows // H_Q
    h_idx = rows % H_Q
    begin_b = tl.load(meta_ptr + part * 8 + 0)
    begin_tile = tl.load(meta_ptr + part * 8 + 1)
    end_b = tl.load(meta_ptr + part * 8 + 2)
    end_tile = tl.load(meta_ptr + part * 8 + 3)
    begin_split = tl.load(meta_ptr + part * 8 + 4)
    for i in range(0, end_b - begin_b + 1):
        b = begin_b + i
        seqlen = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), max_tok)   # within the block table
        t_lo = tl.where(b == begin_b, begin_tile, 0)
        t_hi = tl.minimum(tl.where(b == end_b, end_tile, tl.cdiv(seqlen, BLOCK_N)), tl.cdiv(seqlen, BLOCK_N))
        if tl.load(cum_splits_ptr + b + 1) == tl.load(cum_splits_ptr + b):   # an empty sequence: 0 and -inf
            _write_empty(out_ptr, lse_ptr, b, rows, n_rows, row_mask, dv, dv0, h_idx, s_idx, stride_lb, stride_lh,
                         BLOCK_M, BLOCK_DV)
        elif t_lo < t_hi:
            q_off = (b.to(tl.int64) * n_rows + rows) * _DQK
            if CAUSAL:
                limit = seqlen - S_Q + s_idx
            else:
                limit = tl.zeros([BLOCK_M], tl.int32) + seqlen - 1
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            for tile in range(t_lo, t_hi):
                m_i, l_i, acc = _tile_update(
                    q_ptr, q_off, row_mask, kv_ptr, sc_ptr, rope_ptr, block_table_ptr, b, tile * BLOCK_N, seqlen, limit, dv0,
                    m_i, l_i, acc, stride_bt, num_blocks, qk_scale, PAGE, TOK, SC_TOK, ROPE_TOK, FP8, BLOCK_N, BLOCK_K,
                    BLOCK_DV, DTYPE)
            empty = l_i == 0.0
            acc = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))[:, None]
            lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
            cum0 = tl.load(cum_splits_ptr + b)
            n_split = tl.load(cum_splits_ptr + b + 1) - cum0
            if n_split == 1:
                o_off = (b.to(tl.int64) * n_rows + rows) * _DL
                tl.store(out_ptr + o_off[:, None] + dv[None, :], acc.to(out_ptr.dtype.element_ty),
                         mask=row_mask[:, None])
                if dv0 == 0:
                    tl.store(lse_ptr + b * stride_lb + h_idx * stride_lh + s_idx, lse, mask=row_mask)
            else:
                slot = (cum0 + tl.where(b == begin_b, begin_split, 0)).to(tl.int64)
                a_off = (slot * n_rows + rows) * _DL
                tl.store(oacc_ptr + a_off[:, None] + dv[None, :], acc, mask=row_mask[:, None])
                if dv0 == 0:
                    tl.store(lacc_ptr + slot * n_rows + rows, lse, mask=row_mask)


@triton.jit
def mla_decode_combine_kernel(out_ptr, lse_ptr, oacc_ptr, lacc_ptr, cum_splits_ptr, S_Q, H_Q,
                              stride_ob, stride_os, stride_oh, stride_lb, stride_lh, BLOCK_R: tl.constexpr):
    """Merge the fp32 partials of batch program_id(0) (only batches with 0 or >= 2 splits are touched)."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_rows = S_Q * H_Q
    row_mask = rows < n_rows
    s_idx = rows // H_Q
    h_idx = rows % H_Q
    cum0 = tl.load(cum_splits_ptr + b)
    n_split = tl.load(cum_splits_ptr + b + 1) - cum0
    if n_split != 1:
        cols = tl.arange(0, _DL)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for i in range(0, n_split):
            m = tl.maximum(m, tl.load(lacc_ptr + (cum0 + i).to(tl.int64) * n_rows + rows, mask=row_mask,
                                      other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w_sum = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, _DL], tl.float32)
        for i in range(0, n_split):
            slot = (cum0 + i).to(tl.int64)
            w = tl.exp(tl.load(lacc_ptr + slot * n_rows + rows, mask=row_mask, other=float("-inf")) - m_safe)
            o = tl.load(oacc_ptr + (slot * n_rows + rows)[:, None] * _DL + cols[None, :],
                        mask=row_mask[:, None], other=0.0)
            acc += w[:, None] * o
            w_sum += w
        empty = w_sum == 0.0
        acc = acc / tl.where(empty, 1.0, w_sum)[:, None]
        lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, w_sum)))
        o_off = b.to(tl.int64) * stride_ob + s_idx * stride_os + h_idx * stride_oh
        tl.store(out_ptr + o_off[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
        tl.store(lse_ptr + b * stride_lb + h_idx * stride_lh + s_idx, lse, mask=row_mask)


def token_strides(kv_fp8: bool) -> dict:
    """Per-token element strides of the (kv, scale, rope) views of a contiguous cache."""
    if kv_fp8:
        return {"TOK": FP8_TOKEN_BYTES, "SC_TOK": FP8_TOKEN_BYTES // 4, "ROPE_TOK": FP8_TOKEN_BYTES // 2}
    return {"TOK": D_QK, "SC_TOK": D_QK, "ROPE_TOK": D_QK}


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    """The split kernel (for the problem's cache format and page size) and the combine kernel."""
    problem = Problem.of(problem)
    dt = element(problem.dtype)
    fp8 = bool(problem.kv_fp8)
    kv_t, sc_t, rope_t = ("*u8", "*fp32", "*bf16") if fp8 else (dt, dt, dt)
    sigs = {"mla_decode_split_kernel": {
        "q_ptr": dt, "kv_ptr": kv_t, "sc_ptr": sc_t, "rope_ptr": rope_t, "block_table_ptr": "*i32",
        "seqlens_ptr": "*i32", "meta_ptr": "*i32", "cum_splits_ptr": "*i32", "out_ptr": dt, "lse_ptr": "*fp32",
        "oacc_ptr": "*fp32", "lacc_ptr": "*fp32", "S_Q": "i32", "H_Q": "i32", "stride_bt": "i32",
        "stride_lb": "i32", "stride_lh": "i32", "num_blocks": "i32", "max_tok": "i32", "qk_scale": "fp32"},
        "mla_decode_combine_kernel": {
        "out_ptr": dt, "lse_ptr": "*fp32", "oacc_ptr": "*fp32", "lacc_ptr": "*fp32", "cum_splits_ptr": "*i32",
        "S_Q": "i32", "H_Q": "i32", "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32", "stride_lb": "i32",
        "stride_lh": "i32"}}
    specs = []
    for kernel, kw in bind(problem, config).items():
        cx = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
        specs.append(CompileSpec.make(__name__, kernel, {**sigs[kernel], **{k: "constexpr" for k in cx}}, cx,
                                      kw["num_warps"], kw["num_stages"]))
    return specs


COMBINE_BLOCK_R = COMBINE["BLOCK_R"]


def cache_bytes_per_token(kv_fp8: bool, elem_bytes: int = 2) -> int:
    return FP8_TOKEN_BYTES if kv_fp8 else D_QK * elem_bytes


def cost(problem: dict) -> tuple[float, float]:
    """(flops, bytes): QK^T over 576 + PV over 512 per (row, key); bytes = cache read + q + out."""
    b, s_q, h_q, n = problem["batch"], problem["s_q"], problem["h_q"], problem["seqlen"]
    flops = 2.0 * b * s_q * h_q * n * (D_QK + D_LATENT)
    cache = b * n * cache_bytes_per_token(bool(problem["kv_fp8"]))
    return flops, float(cache + b * s_q * h_q * (D_QK + D_LATENT) * 2)
