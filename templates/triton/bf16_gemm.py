"""Stem bf16_gemm: D[M, N] = A[M, K] @ B[N, K]^T for bf16 (or fp16) models, fp32 accumulation.

B is an nn.Linear weight ([out_features, in_features], K contiguous). Rows past M / N are wrapped instead of
masked (read, never stored); row offsets are 64-bit (M * N passes 2^31 for a 129280-wide
LM head at 16K tokens); the K tail is masked only when K % BLOCK_K != 0 (EVEN_K = 0). Rows must start
16-byte aligned (K % 8 == 0, checked by dskc.ops.fp8.bf16_gemm), the hint that makes the loads 16-byte cp.async.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._gemm_common import GEMM_TILES, SMEM_LIMIT, gemm_rule, num_tiles, tile_coords
from dskc.templates.triton._problem import ProblemBase, element, launch as _launch

STEM = "bf16_gemm"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """D[M, N] = A[M, K] @ B[N, K]^T, operands of `dtype` ("bf16" | "fp16"), output of out_dtype ("": dtype; "fp32":
    e.g. an LM head's logits). M = tokens."""
    M: int
    N: int
    K: int
    dtype: str = "bf16"
    out_dtype: str = ""
    BUCKETS = {"M": "pow2"}

SPACE = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_N": (64, 128, 256),
    "BLOCK_K": (32, 64, 128),
    "GROUP_M": (1, 8, 32),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 5),
}

CONSTRAINTS = (
    f"num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * 2 <= {SMEM_LIMIT}",
    "BLOCK_M * BLOCK_N // (32 * num_warps) <= 128",     # fp32 accumulator registers per thread
    "K % 8 == 0",                                        # 16-byte aligned rows
)

# Measured with kernel_report at M=N=K=4096 (tests/kernels/test_reports_gemm.py): sm_90a 101 registers, 128 KiB
# shared, HGMMA, no spills (128x256: 178 registers, no spills); sm_80 176 registers HMMA; sm_100a 82 UTCHMMA.
DEFAULTS = {
    "sm80": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    "sm90": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    "sm100": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
}

_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def problem_names() -> tuple[str, ...]:
    return Problem.names()


# The rule's candidate tiles: 16x128 with 4 warps spilled 8 bytes on sm_90a (kernel_report, fp16, BLOCK_K 64,
# 4 stages: 72 registers, 8 bytes of spill stores), so it is left out.
TILES = tuple(t for t in GEMM_TILES if t != (16, 128))


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """The tuning-free config for `problem` (waves / SM fill; _gemm_common.gemm_rule over TILES)."""
    return gemm_rule(problem.as_dict(), base, sms, fits, TILES, family)


@functools.lru_cache(maxsize=256)
def _bound(even_k: int, config_items: tuple) -> dict:
    config = dict(config_items)
    return _launch({**{name: config[name] for name in _CONSTEXPRS}, "EVEN_K": even_k}, config)


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments} for (problem, config): what compile_specs builds and launch passes."""
    even_k = int(problem.K % config["BLOCK_K"] == 0)
    return {"bf16_gemm_kernel": _bound(even_k, tuple(sorted(config.items())))}


def cost(problem: dict) -> tuple[float, float]:
    """(flops, bytes): 2MNK; A, B and D once in 16-bit."""
    m, n, k = problem["M"], problem["N"], problem["K"]
    return 2.0 * m * n * k, 2.0 * (m * k + n * k + m * n)


@triton.jit
def bf16_gemm_kernel(a_ptr, b_ptr, d_ptr, M, N, K, stride_am, stride_bn, stride_dm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    a_ptrs = tl.multiple_of(a_ptrs, [16, 16])  # bytes: 16-byte aligned rows (see module docstring)
    b_ptrs = tl.multiple_of(b_ptrs, [16, 16])

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    d_ptrs = d_ptr + offs_m.to(tl.int64)[:, None] * stride_dm + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=mask)


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    """The one kernel of this stem, for operands and output of the problem's dtype."""
    problem = Problem.of(problem)
    t = element(problem.dtype)
    sig = {"a_ptr": t, "b_ptr": t, "d_ptr": element(problem.out_dtype or problem.dtype)}
    sig.update({name: "i32" for name in ("M", "N", "K", "stride_am", "stride_bn", "stride_dm")})
    kw = bind(problem, config)["bf16_gemm_kernel"]
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    sig.update({name: "constexpr" for name in consts})
    return [CompileSpec.make(__name__, "bf16_gemm_kernel", sig, consts,
                             num_warps=kw["num_warps"], num_stages=kw["num_stages"])]


def launch(a, b, out, config: dict) -> None:
    """Run the kernel on checked inputs (dskc.ops.fp8.bf16_gemm does the checking): out[M, N] is written."""
    M, K = a.shape
    N = b.shape[0]
    grid = (num_tiles(M, N, config["BLOCK_M"], config["BLOCK_N"]),)
    kw = bind(Problem(M, N, K), config)["bf16_gemm_kernel"]
    bf16_gemm_kernel[grid](a, b, out, M, N, K, a.stride(0), b.stride(0), out.stride(0), **kw)


def runner(problem: dict, config: dict, device: str, routing=None) -> dict:
    """The autotuner's GPU runner (autotune/gpu.py contract): random operands for `problem`.

    bf16 on CUDA; fp16 elsewhere (the interpreter's tl.dot is wrong on bf16). `routing` is unused.
    """
    M, N, K = problem["M"], problem["N"], problem["K"]
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float16
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=gen).to(dtype).to(device)
    b = torch.randn(N, K, generator=gen).to(dtype).to(device)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)  # unwritten shows
    return {"launch": lambda: launch(a, b, out, config), "output": lambda: out,
            "reference": lambda: a.float() @ b.float().T, "min_cos": 0.9999}
