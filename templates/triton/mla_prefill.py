"""MLA prefill, non-absorbed form: causal variable-length attention with per-head K (192) and V (128) widths.

`mla_prefill_kernel` grid (ceil(max_seqlen_q / BLOCK_M), batch, heads). Sequence b owns query tokens
cu_q[b]..cu_q[b+1] and key tokens cu_k[b]..cu_k[b+1]; with `CAUSAL`, query i (of len_q) sees keys
[0, len_k - len_q + i] (bottom-right aligned, so a prefill that continues a cached prefix works).
The q.k width D_QK = D_A + D_B is split into a power-of-two head (D_A) and tail (D_B, a power of two or 0):
192 = 128 (nope) + 64 (rope). The value width D_V is a power of two.
With WRITE_CACHE, the programs of head 0 also write their query tokens' latent kv (512) and rope key (64) into
the paged cache at flat `slots` (negative: skip; >= capacity, which dskc.ops refuses unless a CUDA graph is being
captured: skipped too), in the dense or FP8 layout (templates/triton/_mla_common.py).
Outputs: out [T_q, H, D_V] (q's dtype) and lse [T_q, H] fp32 (natural log; -inf for a row with no key).
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._mla_common import DL, DR, store_cache_rows
from dskc.templates.triton._problem import ProblemBase, element, launch as _launch

STEM = "mla_prefill"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """batch sequences of `seqlen` tokens, `heads` heads, q/k width d_qk, v width d_v, of `dtype`; causal;
    write_cache: the new tokens' latent into a paged cache (FP8 when kv_fp8)."""
    batch: int
    seqlen: int
    heads: int
    d_qk: int
    d_v: int
    kv_fp8: int = 0
    dtype: str = "bf16"
    causal: int = 1
    write_cache: int = 1
    BUCKETS = {"batch": "pow2", "seqlen": "pow2"}
SPACE = {"BLOCK_M": (32, 64, 128), "BLOCK_N": (32, 64, 128), "num_warps": (4, 8), "num_stages": (1, 2, 3)}
CONSTRAINTS = ("BLOCK_M * BLOCK_N <= 8192",)
# 8 warps: with 4 the 64 x 64 tile plus the 512-wide cache-write row spilled ~880 bytes on sm_90a; with 8, 237
# registers and none (pointers 16-byte aligned, as the JIT specializes them); 210 since the slot-capacity mask.
DEFAULTS = {
    "sm80": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "sm90": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "sm100": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
}


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments} for (problem, config)."""
    d_a, d_b = split_qk(problem.d_qk)
    write = bool(problem.write_cache)
    consts = {"D_A": d_a, "D_B": d_b, "D_V": problem.d_v, "CAUSAL": bool(problem.causal), "WRITE_CACHE": write,
              "FP8": write and bool(problem.kv_fp8), "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
    return {"mla_prefill_kernel": _launch(consts, config)}


def split_qk(d_qk: int) -> tuple[int, int]:
    """(D_A, D_B): the largest power of two <= d_qk and the rest, which must be 0 or a power of two."""
    d_a = 1 << (d_qk.bit_length() - 1)
    d_b = d_qk - d_a
    if d_b & (d_b - 1):
        raise ValueError(f"q/k head dim {d_qk} is not a power of two plus 0 or a power of two (e.g. 128 + 64)")
    return d_a, d_b


@triton.jit
def mla_prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
                       lat_ptr, krope_ptr, slots_ptr, cache_ptr, sc_ptr, crope_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                       stride_lt, stride_lat, stride_kr, capacity, qk_scale,
                       D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr, CAUSAL: tl.constexpr,
                       WRITE_CACHE: tl.constexpr, FP8: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """See the module docstring."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(cu_q_ptr + b)
    len_q = tl.load(cu_q_ptr + b + 1) - q0
    k0 = tl.load(cu_k_ptr + b)
    len_k = tl.load(cu_k_ptr + b + 1) - k0
    if pid_m * BLOCK_M < len_q:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < len_q
        tq = (q0 + rows).to(tl.int64)
        da = tl.arange(0, D_A)
        qa = tl.load(q_ptr + tq[:, None] * stride_qt + h * stride_qh + da[None, :], mask=rmask[:, None], other=0.0)
        if D_B > 0:
            db = D_A + tl.arange(0, D_B)
            qb = tl.load(q_ptr + tq[:, None] * stride_qt + h * stride_qh + db[None, :], mask=rmask[:, None],
                         other=0.0)
        shift = len_k - len_q
        hi = len_k
        if CAUSAL:
            hi = tl.minimum(len_k, (pid_m + 1) * BLOCK_M + shift)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_V], tl.float32)
        dv = tl.arange(0, D_V)
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < len_k
            tk = (k0 + cols).to(tl.int64)
            ka = tl.load(k_ptr + tk[:, None] * stride_kt + h * stride_kh + da[None, :], mask=cmask[:, None], other=0.0)
            s = tl.dot(qa, tl.trans(ka))
            if D_B > 0:
                kb = tl.load(k_ptr + tk[:, None] * stride_kt + h * stride_kh + db[None, :], mask=cmask[:, None],
                             other=0.0)
                s = tl.dot(qb, tl.trans(kb), s)
            s = s * qk_scale
            ok = cmask[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + shift)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + tk[:, None] * stride_vt + h * stride_vh + dv[None, :], mask=cmask[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(out_ptr + tq[:, None] * stride_ot + h * stride_oh + dv[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None])
        tl.store(lse_ptr + tq * stride_lt + h, lse, mask=rmask)
        if WRITE_CACHE:
            if h == 0:
                lat = tl.load(lat_ptr + tq[:, None] * stride_lat + tl.arange(0, DL)[None, :], mask=rmask[:, None],
                              other=0.0).to(tl.float32)
                kr = tl.load(krope_ptr + tq[:, None] * stride_kr + tl.arange(0, DR)[None, :], mask=rmask[:, None],
                             other=0.0).to(tl.float32)
                slots = tl.load(slots_ptr + tq, mask=rmask, other=-1)
                ok = rmask & (slots >= 0) & (slots < capacity)
                store_cache_rows(cache_ptr, sc_ptr, crope_ptr, tl.where(ok, slots, 0), lat, kr, ok, FP8)


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    problem = Problem.of(problem)
    dt = element(problem.dtype)
    fp8 = bool(problem.kv_fp8) and bool(problem.write_cache)
    sig = {"q_ptr": dt, "k_ptr": dt, "v_ptr": dt, "out_ptr": dt, "lse_ptr": "*fp32", "cu_q_ptr": "*i32",
           "cu_k_ptr": "*i32", "lat_ptr": dt, "krope_ptr": dt, "slots_ptr": "*i32",
           "cache_ptr": "*u8" if fp8 else dt, "sc_ptr": "*fp32" if fp8 else dt, "crope_ptr": "*bf16" if fp8 else dt}
    for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot",
                 "stride_oh", "stride_lt", "stride_lat", "stride_kr", "capacity"):
        sig[name] = "i32"
    sig["qk_scale"] = "fp32"
    kw = bind(problem, config)["mla_prefill_kernel"]
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    sig.update({k: "constexpr" for k in consts})
    return [CompileSpec.make(__name__, "mla_prefill_kernel", sig, consts, kw["num_warps"], kw["num_stages"])]


def cost(problem: dict) -> tuple[float, float]:
    """Causal: half the score matrix. Bytes: q, k, v, out once."""
    b, n, h, d_qk, d_v = (problem[k] for k in ("batch", "seqlen", "heads", "d_qk", "d_v"))
    flops = 2.0 * b * h * n * n * (d_qk + d_v) / 2
    return flops, float(2 * b * n * h * (2 * d_qk + 2 * d_v))
