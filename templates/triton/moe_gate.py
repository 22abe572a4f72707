"""Stem moe_gate: the MoE gate's projection, logits[T, E] = x[T, D] @ W[E, D]^T in fp32, for moe_route.

`moe_gate_kernel` grid (ceil(E / BLOCK_E), ceil(T / BLOCK_T)): the weights are the left operand (swap AB: BLOCK_E
experts x BLOCK_T tokens), so the few tokens of a decode step still fill a wgmma and the E x D weights are spread
over E / BLOCK_E programs instead of read whole by each token block. x is converted to W's dtype: a 16-bit W
(the model's bf16 gate) multiplies on the tensor cores with fp32 accumulation, which for bf16 x and W gives what the
reference's fp32 product of the same values gives up to the summation order (every product is exact in fp32);
an fp32 W multiplies in IEEE fp32 (no TF32).
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._problem import ProblemBase, element, launch as _launch, pow2

STEM = "moe_gate"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """T tokens x D channels of `dtype` against E experts' gate rows of w_dtype ("bf16" | "fp16" | "fp32")."""
    T: int
    E: int
    D: int
    dtype: str = "bf16"
    w_dtype: str = "bf16"
    BUCKETS = {"T": "pow2"}


SPACE = {"BLOCK_E": (64, 128), "BLOCK_T": (16, 32, 64), "BLOCK_K": (32, 64, 128), "num_warps": (4, 8),
         "num_stages": (2, 3, 4)}
CONSTRAINTS = (
    "D % BLOCK_K == 0",                                                  # no K masks
    "(BLOCK_E + BLOCK_T) * BLOCK_K * (4 if w_dtype == 'fp32' else 2) * num_stages <= 232448",
    "BLOCK_E * BLOCK_T // (32 * num_warps) <= 64",                       # fp32 accumulator per thread
)
# kernel_report sm_90a (DeepSeek-V3: E 256, D 7168, bf16, 64 tokens; tests/kernels/test_reports_lean.py): 237
# registers, HGMMA, no spills.
DEFAULTS = {f: {"BLOCK_E": 64, "BLOCK_T": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
            for f in ("sm80", "sm90", "sm100")}


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """Tokens per program: the tokens rounded up to 16..64; the K step the largest of 128 / 64 / 32 dividing D;
    8 warps past 16 tokens (sm_90a, BLOCK_E 64 x BLOCK_K 128: 4 warps take 237 registers at 16 tokens, 255 at 32
    and spill 392 bytes at 64; 8 warps take 128 at 32 and 64, no spills)."""
    bk = next((k for k in (128, 64, 32) if problem.D % k == 0), base["BLOCK_K"])
    bt = max(16, min(64, pow2(problem.T)))
    cfg = {**base, "BLOCK_T": bt, "BLOCK_K": bk, "num_warps": 8 if bt > 16 else base["num_warps"]}
    return cfg if fits(cfg) else dict(base)


def bind(problem: Problem, config: dict) -> dict:
    consts = {"BLOCK_E": config["BLOCK_E"], "BLOCK_T": config["BLOCK_T"], "BLOCK_K": config["BLOCK_K"],
              "IEEE": int(problem.w_dtype == "fp32")}
    return {"moe_gate_kernel": _launch(consts, config)}


def cost(problem: dict) -> tuple[float, float]:
    t, e, d = problem["T"], problem["E"], problem["D"]
    w = 4 if problem["w_dtype"] == "fp32" else 2
    return 2.0 * t * e * d, float(w * e * d + 2 * t * d + 4 * t * e)


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    problem = Problem.of(problem)
    sig = {"x_ptr": element(problem.dtype), "w_ptr": element(problem.w_dtype), "logits_ptr": "*fp32", "T": "i32",
           "E": "i32", "D": "i32", "stride_xt": "i32"}
    kw = bind(problem, config)["moe_gate_kernel"]
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    sig.update({k: "constexpr" for k in consts})
    return [CompileSpec.make(__name__, "moe_gate_kernel", sig, consts, kw["num_warps"], kw["num_stages"])]


@triton.jit
def moe_gate_kernel(x_ptr, w_ptr, logits_ptr, T, E, D, stride_xt, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """See the module docstring."""
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    toks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    emask = experts < E
    tmask = toks < T
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + tl.where(emask, experts, 0).to(tl.int64)[:, None] * D + ks[None, :]
    x_ptrs = x_ptr + tl.where(tmask, toks, 0).to(tl.int64)[None, :] * stride_xt + ks[:, None]
    acc = tl.zeros([BLOCK_E, BLOCK_T], tl.float32)
    for _ in range(0, D, BLOCK_K):
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs).to(w_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(w, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    dst = logits_ptr + toks.to(tl.int64)[None, :] * E + experts[:, None]
    tl.store(dst, acc, mask=emask[:, None] & tmask[None, :])
