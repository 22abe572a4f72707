"""MLA key/query path: RMSNorm of the latent kv + DeepSeek RoPE (interleaved pairs) + paged-cache write, one pass.

`mla_rope_norm_kernel` grid (ceil(T / BLOCK_T),): for BLOCK_T tokens
  * latent = rmsnorm(kv_a[:, :512]) * weight  (fp32 math)   -> kv_out [T, 512]
  * k_pe   = rope(kv_a[:, 512:576], pos)                      -> pe_out [T, 64]
  * q_pe   = rope(q_pe, pos) in place for every head (q_pe [T, H, 64], any strides, e.g. a slice of q)
  * when WRITE_CACHE: latent and k_pe into the paged cache at flat slot `slots[t]` (< 0: not written).
Out of range (checked by dskc.ops before the launch, except while a CUDA graph is captured): a slot >= CAPACITY is
not written; a position outside [0, MAX_POS) reads no table entry and rotates to NaN (k_pe, q_pe, cache rope).
RoPE rotates (x[2i], x[2i+1]) by angle pos * freq[i]: the table is [max_pos, 32, 2] = (cos, sin), YaRN already
folded into the frequencies (the model's precompute_rope).
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._mla_common import store_cache_rows
from dskc.templates.triton._problem import ProblemBase, element, launch as _launch, pow2

STEM = "mla_rope"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """`tokens` rows of kv_a and q_pe (h_q heads; 0: no query) of `dtype`; write_cache: into a paged cache (FP8 when
    kv_fp8); in_dtype: kv_a's (and the latent / k_pe outputs') dtype when it differs from `dtype` ("": the same),
    e.g. a bf16 projection feeding an fp16 cache under the interpreter; cache_dtype: a dense cache's dtype when it
    differs from `dtype` (values are converted on the write)."""
    tokens: int
    h_q: int
    kv_fp8: int = 0
    dtype: str = "bf16"
    write_cache: int = 1
    in_dtype: str = ""
    cache_dtype: str = ""
    BUCKETS = {"tokens": "pow2"}

    def __post_init__(self):
        object.__setattr__(self, "kv_fp8", int(bool(self.kv_fp8)))
        object.__setattr__(self, "write_cache", int(bool(self.write_cache)))
SPACE = {"BLOCK_T": (1, 2, 4, 8), "BLOCK_H": (1, 4, 16), "num_warps": (1, 2, 4)}
CONSTRAINTS = ("BLOCK_H <= max(4, h_q)",)  # more heads per step than exist is waste
DEFAULTS = {
    "sm80": {"BLOCK_T": 4, "BLOCK_H": 4, "num_warps": 4},
    "sm90": {"BLOCK_T": 4, "BLOCK_H": 4, "num_warps": 4},
    "sm100": {"BLOCK_T": 4, "BLOCK_H": 4, "num_warps": 4},
}


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """Tokens per program: the base's 4, or fewer when there are fewer tokens (one token: one warp)."""
    bt = min(base["BLOCK_T"], pow2(problem.tokens))
    cfg = {**base, "BLOCK_T": bt, "num_warps": min(base["num_warps"], max(1, bt))}
    return cfg if fits(cfg) else dict(base)


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments} for (problem, config)."""
    write = bool(problem.write_cache)
    consts = {"BLOCK_T": config["BLOCK_T"], "BLOCK_H": config["BLOCK_H"], "WRITE_CACHE": write,
              "FP8": write and bool(problem.kv_fp8)}
    return {"mla_rope_norm_kernel": _launch(consts, config, num_stages=1)}


@triton.jit
def _rotate(even, odd, cos, sin):
    return even * cos - odd * sin, even * sin + odd * cos


@triton.jit
def mla_rope_norm_kernel(kv_a_ptr, weight_ptr, rope_tab_ptr, pos_ptr, q_ptr, kv_out_ptr, pe_out_ptr, slots_ptr,
                         cache_ptr, sc_ptr, crope_ptr, T, H, stride_kv_t, stride_qt, stride_qh, max_pos, capacity, eps,
                         BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, WRITE_CACHE: tl.constexpr,
                         FP8: tl.constexpr):
    """See the module docstring."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    tok64 = tok.to(tl.int64)
    cols = tl.arange(0, 512)
    x = tl.load(kv_a_ptr + tok64[:, None] * stride_kv_t + cols[None, :], mask=tmask[:, None], other=0.0)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / 512 + eps)
    w = tl.load(weight_ptr + cols).to(tl.float32)
    lat = x * rstd[:, None] * w[None, :]
    tl.store(kv_out_ptr + tok64[:, None] * 512 + cols[None, :], lat.to(kv_out_ptr.dtype.element_ty),
             mask=tmask[:, None])
    pos = tl.load(pos_ptr + tok, mask=tmask, other=0)
    pos_ok = (pos >= 0) & (pos < max_pos)
    pos = tl.where(pos_ok, pos, 0).to(tl.int64)
    i = tl.arange(0, 32)
    tab = (tmask & pos_ok)[:, None]
    cos = tl.load(rope_tab_ptr + pos[:, None] * 64 + 2 * i[None, :], mask=tab, other=float("nan"))
    sin = tl.load(rope_tab_ptr + pos[:, None] * 64 + 2 * i[None, :] + 1, mask=tab, other=float("nan"))
    pe = kv_a_ptr + tok64[:, None] * stride_kv_t + 512 + 2 * i[None, :]
    ke, ko = _rotate(tl.load(pe, mask=tmask[:, None], other=0.0).to(tl.float32),
                     tl.load(pe + 1, mask=tmask[:, None], other=0.0).to(tl.float32), cos, sin)
    po = pe_out_ptr + tok64[:, None] * 64 + 2 * i[None, :]
    tl.store(po, ke.to(pe_out_ptr.dtype.element_ty), mask=tmask[:, None])
    tl.store(po + 1, ko.to(pe_out_ptr.dtype.element_ty), mask=tmask[:, None])
    if WRITE_CACHE:
        slots = tl.load(slots_ptr + tok, mask=tmask, other=-1)
        # interleave the rotated pairs back into 64 columns for the cache row
        k_pe = tl.reshape(tl.join(ke, ko), [BLOCK_T, 64])
        ok = tmask & (slots >= 0) & (slots < capacity)
        store_cache_rows(cache_ptr, sc_ptr, crope_ptr, tl.where(ok, slots, 0), lat, k_pe, ok, FP8)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = tmask[:, None, None] & (h < H)[None, :, None]
        qp = q_ptr + tok64[:, None, None] * stride_qt + h[None, :, None] * stride_qh + 2 * i[None, None, :]
        qe, qo = _rotate(tl.load(qp, mask=m, other=0.0).to(tl.float32),
                         tl.load(qp + 1, mask=m, other=0.0).to(tl.float32), cos[:, None, :], sin[:, None, :])
        tl.store(qp, qe.to(q_ptr.dtype.element_ty), mask=m)
        tl.store(qp + 1, qo.to(q_ptr.dtype.element_ty), mask=m)


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    problem = Problem.of(problem)
    dt = element(problem.dtype)
    ind = element(problem.in_dtype or problem.dtype)
    fp8 = bool(problem.kv_fp8) and bool(problem.write_cache)
    cdt = element(problem.cache_dtype or problem.dtype)
    cache = ("*u8", "*fp32", "*bf16") if fp8 else ((cdt, cdt, cdt) if problem.write_cache else (ind, ind, ind))
    sig = {"kv_a_ptr": ind, "weight_ptr": dt, "rope_tab_ptr": "*fp32", "pos_ptr": "*i32",
           "q_ptr": dt if problem.h_q else ind, "kv_out_ptr": ind, "pe_out_ptr": ind, "slots_ptr": "*i32",
           "cache_ptr": cache[0], "sc_ptr": cache[1],
           "crope_ptr": cache[2], "T": "i32", "H": "i32", "stride_kv_t": "i32", "stride_qt": "i32",
           "stride_qh": "i32", "max_pos": "i32", "capacity": "i32", "eps": "fp32"}
    kw = bind(problem, config)["mla_rope_norm_kernel"]
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    sig.update({k: "constexpr" for k in consts})
    return [CompileSpec.make(__name__, "mla_rope_norm_kernel", sig, consts, kw["num_warps"], kw["num_stages"])]


def cost(problem: dict) -> tuple[float, float]:
    t, h = problem["tokens"], problem["h_q"]
    return float(t * (4 * 512 + 6 * 32 * (h + 1))), float(t * (576 * 2 + 512 * 2 + 64 * 2 * 2 + h * 64 * 4 + 656))
