"""Stem act_quant: per-token 1x128 e4m3 quantisation of activations, plain or fused after RMSNorm / SiLU-and-mul.

For each row and each 128 columns: amax = max(|x|) clamped to >= 1e-4, s = amax / 448 (UE8M0 = 1 rounds s up to a
power of two, DeepSeek-V3.1's "ue8m0" scale format), q = e4m3(x / s) (REFERENCE.md section 2). Scales are fp32
[M, ceil(K/128)]; a partial last block is quantised on its own columns.
Non-finite inputs: e4m3fn has no infinity, so a NaN or +-inf element becomes e4m3 NaN (0x7F) and never a finite
value; the block's amax is taken over its finite elements, so the other elements quantise exactly as they would
without it (DeepSeek's reference kernel keeps NaN elementwise the same way; a scale of inf, as an amax over an inf
would give, would turn the whole block into NaN).

Three kernels share the config (BLOCK_M rows per program, num_warps):
- act_quant_kernel: x [M, K] -> (q, s). Grid (ceil(M/BLOCK_M), ceil(K/128)).
- rmsnorm_quant_kernel: h = x (+ residual, stored rounded to its dtype as the new residual); y = h / rms(h) * w
  rounded to x's dtype (as the unfused model would hand it to its Linear) then quantised (QUANT) and/or stored
  (STORE_Y, in the y tensor's dtype: what the consumer multiplies with, e.g. a MoE gate beside the FP8 experts, or
  a 16-bit LM head). Two passes over the row (sum of squares, then normalise + quantise), so K is not bounded by
  registers. Grid (ceil(M/BLOCK_M),).
- silu_mul_quant_kernel: gate_up [M, 2I] -> y = silu(gate) * up in fp32, quantised. Grid (ceil(M/BLOCK_M), ceil(I/128)).
The e4m3 values are encoded by `e4m3_bits` (integer arithmetic, round-to-nearest-even) and stored through a uint8
view: the same code then runs on sm_80 (where Triton has no e4m3 type), on sm_90/sm_100, and in the interpreter
(whose fp32 -> e4m3 cast truncates, unlike the GPU's cvt.rn). The kernels are memory-bound, so the few extra
integer ops per element cost nothing measurable.
"""
from __future__ import annotations

import dataclasses
import functools

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._problem import ProblemBase, launch as _launch, pow2

STEM = "act_quant"

# op -> (kernel, fixed constexprs): which of the three kernels a problem launches
_NORM = ("rmsnorm_quant_kernel", "HAS_RES", "STORE_Y", "QUANT")
OPS = {"quant": ("act_quant_kernel", {}),
       "rmsnorm": (_NORM[0], dict(zip(_NORM[1:], (0, 0, 1)))),          # (q, s) of RMSNorm(x)
       "add_rmsnorm": (_NORM[0], dict(zip(_NORM[1:], (1, 0, 1)))),      # (q, s, h = x + residual)
       "add_rmsnorm_normed": (_NORM[0], dict(zip(_NORM[1:], (1, 1, 1)))),   # (q, s, h, y = the normed h)
       "norm": (_NORM[0], dict(zip(_NORM[1:], (0, 1, 0)))),             # y = RMSNorm(x) only
       "silu_mul": ("silu_mul_quant_kernel", {})}


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """M rows of K columns quantised 1x128 from `dtype` activations; op: "quant" (x), "rmsnorm" (RMSNorm(x)),
    "add_rmsnorm" (RMSNorm(x + residual)), "add_rmsnorm_normed" (the same, also storing the normed x), "norm" (the
    normed x alone, no quantisation) or "silu_mul" (silu(gate) * up, K = I). ue8m0: power-of-two scales; y_dtype:
    the stored normed x's dtype ("": dtype)."""
    M: int
    K: int
    dtype: str = "bf16"
    op: str = "quant"
    ue8m0: int = 0
    y_dtype: str = ""
    BUCKETS = {"M": "pow2"}

SPACE = {
    "BLOCK_M": (1, 2, 4, 8, 16, 32),
    "num_warps": (1, 2, 4, 8),
    "num_stages": (1, 2),
}

CONSTRAINTS = (
    "BLOCK_M * 128 // (32 * num_warps) <= 64",   # fp32 tile elements per thread
    "BLOCK_M * 128 >= 32 * num_warps",           # every thread holds something
)

DEFAULTS = {
    "sm80": {"BLOCK_M": 8, "num_warps": 4, "num_stages": 1},
    "sm90": {"BLOCK_M": 8, "num_warps": 4, "num_stages": 1},
    "sm100": {"BLOCK_M": 8, "num_warps": 4, "num_stages": 1},
}

FP8_MAX = 448.0
AMAX_MIN = 1e-4


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """Rows per program: 8 (4 warps) from 8 rows up; fewer rows get a block of their own size and fewer warps."""
    bm = min(base["BLOCK_M"], pow2(problem.M))
    return {**base, "BLOCK_M": bm, "num_warps": max(1, min(base["num_warps"], bm // 2))}


@functools.lru_cache(maxsize=256)
def _bound(op: str, ue8m0: int, config_items: tuple) -> dict:
    config = dict(config_items)
    kernel, fixed = OPS[op]
    return {kernel: _launch({"BLOCK_M": config["BLOCK_M"], "UE8M0": ue8m0, **fixed}, config)}


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments}: the one kernel of the problem's op."""
    if problem.op not in OPS:
        raise ValueError(f"act_quant op must be one of {sorted(OPS)}, got {problem.op!r}")
    return _bound(problem.op, int(problem.ue8m0), tuple(sorted(config.items())))


def cost(problem: dict) -> tuple[float, float]:
    """(flops, bytes) of the plain kernel: read bf16, write fp8 and fp32 scales."""
    m, k = problem["M"], problem["K"]
    return 3.0 * m * k, float(2 * m * k + m * k + 4 * m * triton.cdiv(k, 128))


@triton.jit
def e4m3_bits(y):
    """e4m3 bit patterns (uint8) of fp32 values already clamped to [-448, 448], round-to-nearest-even."""
    a = tl.abs(y)
    sign = (y.to(tl.int32, bitcast=True) >> 24) & 0x80
    sub = (a * 512.0 + 8388608.0) - 8388608.0          # subnormal grid 2^-9, RNE by the fp32 magic number
    abits = a.to(tl.int32, bitcast=True)
    rounded = (abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20  # fp32 exponent | top 3 mantissa bits, RNE
    code = tl.where(a < 0.015625, sub.to(tl.int32), rounded - (120 << 3))
    return (code | sign).to(tl.uint8)


@triton.jit
def _quantize(x, UE8M0: tl.constexpr):
    """Row-wise (q as e4m3 bits, s) of an fp32 [BLOCK_M, 128] tile; non-finite elements -> NaN, outside the amax."""
    finite = tl.abs(x) < float("inf")
    x = tl.where(finite, x, 0.0)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    s = tl.div_rn(amax, 448.0)  # IEEE division: `/` lowers to div.full.f32 (2 ulp) on the GPU
    if UE8M0:  # round the scale up to a power of two, exactly (bit arithmetic, no log2)
        bits = s.to(tl.int32, bitcast=True)
        expo = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (expo << 23).to(tl.float32, bitcast=True)
    y = tl.clamp(tl.div_rn(x, s[:, None]), -448.0, 448.0)
    return tl.where(finite, e4m3_bits(y), 0x7F).to(tl.uint8), s


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                     BLOCK_M: tl.constexpr, UE8M0: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = _quantize(x, UE8M0)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + tl.program_id(1), s, mask=rows < M)


@triton.jit
def _round_to(h, dtype: tl.constexpr):
    """fp32 h rounded (to nearest even) to `dtype` and widened back to fp32.

    bf16 is rounded with integer ops before the cast: the GPU's cast rounds to nearest, the interpreter's truncates,
    and this way both give the same bits (the final cast is then exact). NaN/inf are not expected here.
    """
    if dtype == tl.bfloat16:
        bits = h.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        h = bits.to(tl.float32, bitcast=True)
    return h.to(dtype).to(tl.float32)


@triton.jit
def _residual_sum(x_ptr, r_ptr, rows, cols, mask, stride_xm, stride_rm, HAS_RES: tl.constexpr):
    """x (+ residual, rounded to the residual's dtype) of one tile, in fp32."""
    h = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = _round_to(h + r, r_ptr.dtype.element_ty)
    return h


@triton.jit
def rmsnorm_quant_kernel(x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, rout_ptr, y_ptr, M, K, eps,
                         stride_xm, stride_rm, stride_routm, stride_qm, stride_sm, stride_ym,
                         BLOCK_M: tl.constexpr, HAS_RES: tl.constexpr, UE8M0: tl.constexpr,
                         STORE_Y: tl.constexpr, QUANT: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, 128)):
        cols = kb * 128 + tl.arange(0, 128)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        h = _residual_sum(x_ptr, r_ptr, rows, cols, mask, stride_xm, stride_rm, HAS_RES)
        if HAS_RES:
            tl.store(rout_ptr + rows[:, None] * stride_routm + cols[None, :],
                     h.to(rout_ptr.dtype.element_ty), mask=mask)
        sumsq += tl.sum(h * h, axis=1)
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)
    for kb in range(0, tl.cdiv(K, 128)):
        cols = kb * 128 + tl.arange(0, 128)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        h = _residual_sum(x_ptr, r_ptr, rows, cols, mask, stride_xm, stride_rm, HAS_RES)
        w = tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        y = _round_to(h * rstd[:, None] * w[None, :], x_ptr.dtype.element_ty)
        if STORE_Y:
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        if QUANT:
            q, s = _quantize(y, UE8M0)
            tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
            tl.store(s_ptr + rows * stride_sm + kb, s, mask=rows < M)


@triton.jit
def silu_mul_quant_kernel(gu_ptr, q_ptr, s_ptr, M, I, stride_gm, stride_qm, stride_sm,
                          BLOCK_M: tl.constexpr, UE8M0: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < M) & (cols[None, :] < I)
    g_ptrs = gu_ptr + rows[:, None] * stride_gm + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    q, s = _quantize(y, UE8M0)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + tl.program_id(1), s, mask=rows < M)


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    """The kernel of the problem's op (plain, RMSNorm with or without the residual add, SiLU-and-mul)."""
    problem = Problem.of(problem)
    q, act = "*u8", f"*{problem.dtype}"
    plain = {"x_ptr": act, "q_ptr": q, "s_ptr": "*fp32", "M": "i32", "K": "i32",
             "stride_xm": "i32", "stride_qm": "i32", "stride_sm": "i32"}
    flags = OPS[problem.op][1]
    # pointers an op leaves unused are passed another tensor of the call (see launch_rmsnorm_quant): their types
    y = f"*{problem.y_dtype or problem.dtype}" if flags.get("STORE_Y") else act
    qn, sn = ("*u8", "*fp32") if flags.get("QUANT", 1) else (y, y)
    norm = {"x_ptr": act, "r_ptr": act, "w_ptr": act, "q_ptr": qn, "s_ptr": sn, "rout_ptr": act, "y_ptr": y,
            "M": "i32", "K": "i32", "eps": "fp32", "stride_xm": "i32", "stride_rm": "i32", "stride_routm": "i32",
            "stride_qm": "i32", "stride_sm": "i32", "stride_ym": "i32"}
    silu = {"gu_ptr": act, "q_ptr": q, "s_ptr": "*fp32", "M": "i32", "I": "i32",
            "stride_gm": "i32", "stride_qm": "i32", "stride_sm": "i32"}
    sigs = {"act_quant_kernel": plain, "rmsnorm_quant_kernel": norm, "silu_mul_quant_kernel": silu}
    specs = []
    for kernel, kw in bind(problem, config).items():
        consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
        sig = {**sigs[kernel], **{k: "constexpr" for k in consts}}
        specs.append(CompileSpec.make(__name__, kernel, sig, consts, kw["num_warps"], kw["num_stages"]))
    return specs


def _bits(q):
    import torch
    return q.view(torch.uint8)


def _kw(op: str, ue8m0: bool, config: dict) -> dict:
    return _bound(op, int(ue8m0), tuple(sorted(config.items())))[OPS[op][0]]


def launch_act_quant(x, q, s, ue8m0: bool, config: dict) -> None:
    """x [M, K] -> q [M, K] e4m3, s [M, ceil(K/128)] fp32 (inputs checked by dskc.ops.fp8)."""
    M, K = x.shape
    grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(K, 128))
    act_quant_kernel[grid](x, _bits(q), s, M, K, x.stride(0), q.stride(0), s.stride(0),
                           **_kw("quant", ue8m0, config))


def launch_rmsnorm_quant(x, residual, weight, eps, q, s, residual_out, ue8m0: bool, config: dict, y=None) -> None:
    """RMSNorm(x (+ residual)) * weight -> (q, s) (q None: not quantised), y (when given) the normed x;
    residual_out gets x + residual when residual is given."""
    M, K = x.shape
    has_res = residual is not None
    r = residual if has_res else x
    rout = residual_out if has_res else x
    op = ("add_rmsnorm_normed" if y is not None else "add_rmsnorm") if has_res else ("rmsnorm" if y is None else "norm")
    if q is None and op != "norm":
        raise ValueError("an unquantised RMSNorm stores y and has no residual")
    qb, ss = (_bits(q), s) if q is not None else (y, y)
    yy = y if y is not None else x
    rmsnorm_quant_kernel[(triton.cdiv(M, config["BLOCK_M"]),)](
        x, r, weight, qb, ss, rout, yy, M, K, float(eps),
        x.stride(0), r.stride(0), rout.stride(0), qb.stride(0), ss.stride(0), yy.stride(0),
        **_kw(op, ue8m0, config))


def launch_silu_mul_quant(gate_up, q, s, ue8m0: bool, config: dict) -> None:
    """gate_up [M, 2I] -> q [M, I] e4m3 of silu(gate) * up, s [M, ceil(I/128)]."""
    M, two_i = gate_up.shape
    inter = two_i // 2
    grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(inter, 128))
    silu_mul_quant_kernel[grid](gate_up, _bits(q), s, M, inter, gate_up.stride(0), q.stride(0),
                                s.stride(0), **_kw("silu_mul", ue8m0, config))


def runner(problem: dict, config: dict, device: str, routing=None) -> dict:
    """The autotuner's GPU runner (autotune/gpu.py contract) for the plain kernel: x [M, K] bf16 -> (q, s).

    output is the dequantised q * s, reference the input itself. `routing` is unused.
    """
    import torch

    M, K = problem["M"], problem["K"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16).to(device)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=device)
    s = torch.full((M, triton.cdiv(K, 128)), float("nan"), dtype=torch.float32, device=device)

    def output():
        return q.float() * s.repeat_interleave(128, dim=1)[:, :K]

    return {"launch": lambda: launch_act_quant(x, q, s, False, config), "output": output,
            "reference": lambda: x.float(), "min_cos": 0.999}
