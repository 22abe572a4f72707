"""Stem mla_absorb: absorbed MLA's per-head products with wkv_b, written where the next kernel reads them.

- op "q", `mla_q_absorb_kernel` grid (H, ceil(T / BLOCK_T), 512 / BLOCK_C): the 576-wide decode query, assembled in
  place (no concatenation): qq[t, h, :512] = q_nope[t, h] @ W_UK[h] (W_UK[h] = wkv_b's K half of head h, [nope, 512],
  held transposed [512, nope]), and qq[t, h, 512:] = RoPE(q_pe[t, h]) at the token's rope row (programs of the first
  column block). q's elements are rounded to qq's dtype first, the way the query is converted for the cache dtype.
  A rope row outside the table (unchecked under CUDA-graph capture) is never read: that token's rope part is NaN.
- op "o", `mla_o_absorb_kernel` grid (ceil(T / BLOCK_T), H * V / 128): o[t, h, :] = out[t, h] @ W_UV[h]^T (W_UV[h]:
  wkv_b's V half, [V, 512]) for the 128 columns of o's flattened rows a program owns (two heads of V = 64, or 128
  columns of one head when V is a multiple of 128), rounded to `dtype` then to the activation dtype as the unfused
  path does, and (QUANT = 1) quantised 1x128 to e4m3 (act_quant's arithmetic) for wo's FP8 GEMM; else stored in the
  output's dtype.
Both multiply with the weights as the left operand (swap AB: 64..128 weight rows x BLOCK_T tokens), so a few decode
tokens still fill a wgmma; fp32 accumulation.
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._problem import ProblemBase, element, launch as _launch, pow2
from dskc.templates.triton.act_quant import _quantize, _round_to
from dskc.templates.triton.mla_rope import _rotate

STEM = "mla_absorb"
OPS = {"q": "mla_q_absorb_kernel", "o": "mla_o_absorb_kernel"}
D_LATENT = 512
_DL = tl.constexpr(D_LATENT)


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """`tokens` rows of `heads` heads; nope: the query's no-rope width (rope 64); v_dim: the value width; dtype: the
    attention's (query, cache, output) dtype; act: the model's activation dtype (q's, and o's before quantisation);
    op: "q" (query assembly) or "o" (output projection); quant: op "o" quantises for an FP8 wo."""
    tokens: int
    heads: int
    nope: int = 128
    v_dim: int = 128
    dtype: str = "bf16"
    act: str = "bf16"
    op: str = "q"
    quant: int = 1
    BUCKETS = {"tokens": "pow2"}

    def __post_init__(self):
        object.__setattr__(self, "quant", int(bool(self.quant)) if self.op == "o" else 0)


SPACE = {"BLOCK_T": (16, 32, 64), "BLOCK_C": (64, 128), "BLOCK_K": (64, 128), "num_warps": (4, 8),
         "num_stages": (1, 2, 3)}
CONSTRAINTS = (
    "op != 'o' or v_dim == 64 or v_dim % 128 == 0",     # a program's 128 columns: two heads of 64 or part of one
    "nope % 16 == 0 and nope <= 256",                   # the whole no-rope width is one dot's K
    "BLOCK_C * nope // (32 * num_warps) <= 128",        # the W_UK tile in registers
)
# kernel_report sm_90a, 64 tokens (tests/kernels/test_reports_lean.py): DeepSeek-V3 (128 heads, nope 128, V 128)
# q 40 registers, o 48, both HGMMA, no spills; tiny's V 64 (two heads per 128 columns) o 48, HGMMA.
DEFAULTS = {f: {"BLOCK_T": 16, "BLOCK_C": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
            for f in ("sm80", "sm90", "sm100")}


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """Tokens per program: the step's tokens rounded up to 16..64."""
    cfg = {**base, "BLOCK_T": max(16, min(64, pow2(problem.tokens)))}
    return cfg if fits(cfg) else dict(base)


ROUND_ACT = {"bf16": 1, "fp16": 2}     # op "o": o rounded to a 16-bit act dtype other than the attention's (fp32: none)


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments}: the problem's op's kernel."""
    if problem.op == "q":
        consts = {"NOPE": problem.nope, "BLOCK_T": config["BLOCK_T"], "BLOCK_C": config["BLOCK_C"]}
    elif problem.op == "o":
        v = problem.v_dim
        consts = {"V": v, "TWO_HEADS": int(v < 128), "QUANT": problem.quant,
                  "ROUND_ACT": ROUND_ACT.get(problem.act, 0) if problem.act != problem.dtype else 0,
                  "BLOCK_T": config["BLOCK_T"], "BLOCK_K": config["BLOCK_K"]}
    else:
        raise ValueError(f"mla_absorb op must be one of {sorted(OPS)}, got {problem.op!r}")
    return {OPS[problem.op]: _launch(consts, config)}


def cost(problem: dict) -> tuple[float, float]:
    """(flops, bytes): per token and head a [nope x 512] or [512 x V] product; the weights read once."""
    t, h = problem["tokens"], problem["heads"]
    k = problem["nope"] if problem["op"] == "q" else problem["v_dim"]
    return 2.0 * t * h * k * D_LATENT, float(2 * h * k * D_LATENT + 2 * t * h * (k + D_LATENT + 64))


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    problem = Problem.of(problem)
    dt, act = element(problem.dtype), element(problem.act)
    if problem.op == "q":
        sig = {"q_ptr": act, "wk_ptr": dt, "rope_tab_ptr": "*fp32", "rows_ptr": "*i32", "qq_ptr": dt, "T": "i32",
               "H": "i32", "stride_qt": "i32", "stride_qh": "i32", "max_pos": "i32"}
    else:
        sig = {"o_ptr": dt, "wv_ptr": dt, "y_ptr": "*u8" if problem.quant else dt, "s_ptr": "*fp32", "T": "i32",
               "H": "i32"}
    kw = bind(problem, config)[OPS[problem.op]]
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    sig.update({k: "constexpr" for k in consts})
    return [CompileSpec.make(__name__, OPS[problem.op], sig, consts, kw["num_warps"], kw["num_stages"])]


@triton.jit
def mla_q_absorb_kernel(q_ptr, wk_ptr, rope_tab_ptr, rows_ptr, qq_ptr, T, H, stride_qt, stride_qh, max_pos,
                        NOPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """See the module docstring (op "q")."""
    h = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c0 = tl.program_id(2) * BLOCK_C
    tmask = t < T
    DT = qq_ptr.dtype.element_ty
    q_row = q_ptr + t.to(tl.int64) * stride_qt + h * stride_qh
    q_nope = tl.load(q_row[:, None] + tl.arange(0, NOPE)[None, :], mask=tmask[:, None], other=0.0).to(DT)
    cols = c0 + tl.arange(0, BLOCK_C)
    w = tl.load(wk_ptr + (h * _DL + cols).to(tl.int64)[:, None] * NOPE + tl.arange(0, NOPE)[None, :])
    acc = tl.dot(w, tl.trans(q_nope))                           # [BLOCK_C, BLOCK_T]: latent columns x tokens
    qq_row = qq_ptr + (t.to(tl.int64) * H + h) * (_DL + 64)
    tl.store(qq_row[None, :] + cols[:, None], acc.to(DT), mask=tmask[None, :])
    if tl.program_id(2) == 0:
        i = tl.arange(0, 32)
        row = tl.load(rows_ptr + t, mask=tmask, other=0)
        inside = (tmask & (row >= 0) & (row < max_pos))[:, None]   # a row outside the table rotates to NaN
        row = tl.where(row >= 0, row, 0).to(tl.int64)
        cos = tl.load(rope_tab_ptr + row[:, None] * 64 + 2 * i[None, :], mask=inside, other=float("nan"))
        sin = tl.load(rope_tab_ptr + row[:, None] * 64 + 2 * i[None, :] + 1, mask=inside, other=float("nan"))
        pe = q_row[:, None] + NOPE + 2 * i[None, :]
        even = tl.load(pe, mask=tmask[:, None], other=0.0).to(DT).to(tl.float32)
        odd = tl.load(pe + 1, mask=tmask[:, None], other=0.0).to(DT).to(tl.float32)
        re, ro = _rotate(even, odd, cos, sin)
        dst = qq_row[:, None] + _DL + 2 * i[None, :]
        tl.store(dst, re.to(DT), mask=tmask[:, None])
        tl.store(dst + 1, ro.to(DT), mask=tmask[:, None])


@triton.jit
def _head_product(o_ptr, w_base, t, tmask, h, d0, H, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_T] fp32: W_UV[h, d0:d0+ROWS, :] @ out[t, h, :]^T (w_base: W_UV[h])."""
    acc = tl.zeros([ROWS, BLOCK_T], tl.float32)
    o_row = o_ptr + (t.to(tl.int64) * H + h) * _DL
    w_rows = w_base + (d0 + tl.arange(0, ROWS))[:, None] * _DL
    for k in range(0, _DL, BLOCK_K):
        kk = k + tl.arange(0, BLOCK_K)
        x = tl.load(o_row[None, :] + kk[:, None], mask=tmask[None, :], other=0.0)      # [BLOCK_K, BLOCK_T]
        acc = tl.dot(tl.load(w_rows + kk[None, :]), x, acc)
    return acc


@triton.jit
def mla_o_absorb_kernel(o_ptr, wv_ptr, y_ptr, s_ptr, T, H, V: tl.constexpr, TWO_HEADS: tl.constexpr,
                        QUANT: tl.constexpr, ROUND_ACT: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """See the module docstring (op "o")."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1)
    tmask = t < T
    DT = o_ptr.dtype.element_ty
    if TWO_HEADS:           # V = 64: heads 2g and 2g + 1
        a0 = _head_product(o_ptr, wv_ptr + (2 * g).to(tl.int64) * V * _DL, t, tmask, 2 * g, 0, H, V,
                           BLOCK_T, BLOCK_K)
        a1 = _head_product(o_ptr, wv_ptr + (2 * g + 1).to(tl.int64) * V * _DL, t, tmask, 2 * g + 1, 0, H, V,
                           BLOCK_T, BLOCK_K)
        y = tl.reshape(tl.permute(tl.join(a0, a1), (1, 2, 0)), [BLOCK_T, 128])   # [tokens, 2 heads x 64]
    else:                   # 128 columns of head g // (V / 128)
        h = g // (V // 128)
        y = tl.trans(_head_product(o_ptr, wv_ptr + h.to(tl.int64) * V * _DL, t, tmask, h,
                                   (g % (V // 128)) * 128, H, 128, BLOCK_T, BLOCK_K))
    y = _round_to(y, DT)                                       # o in the attention's dtype, as out @ W_UV gives it
    if ROUND_ACT == 1:                                         # ... then .to(the 16-bit activations)
        y = _round_to(y, tl.bfloat16)
    elif ROUND_ACT == 2:
        y = _round_to(y, tl.float16)
    cols = g * 128 + tl.arange(0, 128)
    dst = y_ptr + t.to(tl.int64)[:, None] * (H * V) + cols[None, :]
    if QUANT:
        q, s = _quantize(y, 0)
        tl.store(dst, q, mask=tmask[:, None])
        tl.store(s_ptr + t.to(tl.int64) * (H * V // 128) + g, s, mask=tmask)
    else:
        tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=tmask[:, None])
