"""Stem fp8_gemm_1d2d: D[M, N] = (A * sa) @ (B * sb)^T with DeepSeek's block scaling ("1D2D").

A [M, K] e4m3 with sa [M, K/128] fp32 (1x128 per-token scales), B [N, K] e4m3 with sb [ceil(N/128), K/128] fp32
(128x128 block scales), D [M, N] bf16 (or fp16/fp32). Each BLOCK_K = 128 slice of K is multiplied on the tensor
cores into a fresh fp32 partial that is scaled and added to the fp32 accumulator: the "promotion every 128 of K"
of REFERENCE.md section 2 (Hopper's fp8 MMA keeps ~14 bits when it accumulates over long K by itself).

Rows of A and B past M / N are wrapped (`% M`) instead of masked: they are read but never stored, which keeps
masks off the inner loop. SPLIT_K > 1 writes fp32 partial sums to a [SPLIT_K, M, N] workspace that the launcher
reduces; it pays for small M with large K (M = 64, N = 2112, K = 7168 is 17 tiles of 128 on 132 SMs).
UPCAST = 1 (for sm_80, which has neither fp8 tensor cores nor an e4m3 type in Triton) takes A and B as raw uint8
bytes and decodes them to fp16 before the dot (exact: every e4m3 value is an fp16 value).
HAS_RES = 1 adds a residual R [M, N] (D's dtype) in the epilogue: D = round(round(A B^T) + R), the two roundings of
a GEMM followed by a separate add (a block's residual stream after its MLP's down projection). With SPLIT_K > 1 the
launcher adds it after the reduction.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._gemm_common import (GEMM_TILES, SMEM_LIMIT, e4m3_bits_to_fp16, gemm_rule, num_tiles,
                                                tile_coords)
from dskc.templates.triton._problem import ProblemBase, element, launch as _launch
from dskc.templates.triton.act_quant import _round_to

STEM = "fp8_gemm_1d2d"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """D[M, N] (out_dtype) = A[M, K] e4m3 x B[N, K] e4m3, 1x128 / 128x128 scales, + a residual [M, N] (residual = 1).
    M = tokens."""
    M: int
    N: int
    K: int
    out_dtype: str = "bf16"
    residual: int = 0
    BUCKETS = {"M": "pow2"}

SPACE = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_N": (64, 128, 256),
    "BLOCK_K": (128,),
    "GROUP_M": (1, 8, 32),
    "SPLIT_K": (1, 2, 4, 8),
    "UPCAST": (0, 1),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 5),
}

CONSTRAINTS = (
    "BLOCK_K == 128",                                   # one scale per 128 of K: promotion every K tile
    "K % BLOCK_K == 0",
    f"num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * (1 + UPCAST) <= {SMEM_LIMIT}",
    "SPLIT_K <= K // BLOCK_K",
    "BLOCK_M * BLOCK_N // (32 * num_warps) <= 64",      # fp32 accumulator per thread: 128 spilled (sm_90a)
)

# Measured with kernel_report at M=N=K=4096 (tests/kernels/test_reports_gemm.py): sm_90a 128x128, 8 warps,
# 4 stages: 184 registers, 128 KiB shared, no spills, QGMMA (128x256 spilled 600 B); sm_100a: 168 registers, UTCQMMA;
# sm_80 (fp16 upcast) 64x128, 8 warps: 168 registers (triton 3.6: 183), HMMA, no spills; with 4 warps it used 252
# registers on 3.9 and spilled 80 B on 3.6 (128x128 with 8 warps spilled 28 B on 3.9, 132 B on 3.6).
DEFAULTS = {
    "sm80": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": 1, "UPCAST": 1,
             "num_warps": 8, "num_stages": 3},
    "sm90": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": 1, "UPCAST": 0,
             "num_warps": 8, "num_stages": 4},
    "sm100": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": 1, "UPCAST": 0,
              "num_warps": 8, "num_stages": 4},
}

_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "UPCAST")


def problem_names() -> tuple[str, ...]:
    return Problem.names()


# sm_80 runs the fp16-upcast kernel: 128x128 with 8 warps spilled 28 bytes there (DEFAULTS' note), so its rule
# keeps to tiles of at most 64 x 128. So does a residual epilogue, on 8 warps from 64 x 128 up: the residual tile
# beside the accumulator left sm_90a stack frames under Triton 3.6 (the GPU host's; 3.9 fits them): 128x128 on 8
# warps 24 bytes, 64x128 on 4 warps 160; 64x128 / 128x64 on 8 warps: 160 / 164 registers, no stack.
SMALL_TILES = tuple(t for t in GEMM_TILES if t[0] * t[1] <= 64 * 128)


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """The tuning-free config for `problem` (waves / SM fill, split-K at small M; _gemm_common.gemm_rule)."""
    tiles = SMALL_TILES if family == "sm80" or problem.residual else GEMM_TILES
    cfg = gemm_rule(problem.as_dict(), base, sms, fits, tiles, family)
    if problem.residual and cfg["BLOCK_M"] * cfg["BLOCK_N"] >= 64 * 128 and fits({**cfg, "num_warps": 8}):
        cfg = {**cfg, "num_warps": 8}
    return cfg


@functools.lru_cache(maxsize=256)
def _bound(config_items: tuple, residual: int) -> dict:
    config = dict(config_items)
    has_res = int(bool(residual) and config["SPLIT_K"] == 1)     # split-K: added after the launcher's reduction
    return _launch({**{name: config[name] for name in _CONSTEXPRS}, "HAS_RES": has_res}, config)


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments} for (problem, config): what compile_specs builds and launch passes."""
    return {"fp8_gemm_1d2d_kernel": _bound(tuple(sorted(config.items())), int(getattr(problem, "residual", 0)))}


def cost(problem: dict) -> tuple[float, float]:
    """(flops, bytes): 2MNK; A and B once in fp8, their fp32 scales, D once in bf16."""
    m, n, k = problem["M"], problem["N"], problem["K"]
    scales = 4 * (m * k // 128 + triton.cdiv(n, 128) * k // 128)
    return 2.0 * m * n * k, float(m * k + n * k + scales + 2 * m * n)


@triton.jit
def fp8_gemm_1d2d_kernel(a_ptr, b_ptr, d_ptr, sa_ptr, sb_ptr, r_ptr, M, N, K,
                         stride_am, stride_bn, stride_dm, stride_dsplit,
                         stride_sam, stride_sak, stride_sbn, stride_sbk, stride_rm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
                         HAS_RES: tl.constexpr):
    tl.assume(stride_am % 16 == 0)
    tl.assume(stride_bn % 16 == 0)
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * per_split
    k_hi = tl.minimum(k_lo + per_split, k_tiles)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = (offs_m % M).to(tl.int64)  # 64-bit row offsets: M * K or M * N may pass 2^31
    rows_b = (offs_n % N).to(tl.int64)
    offs_k = k_lo * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None]
    # Rows start 16-byte aligned (checked by the launcher): the hint the runtime specialisation would give, so
    # the loads become 16-byte cp.async into a pipelined shared-memory ring, in cross-compiled reports too.
    a_ptrs = tl.multiple_of(a_ptrs, [16, 16])
    b_ptrs = tl.multiple_of(b_ptrs, [16, 16])
    sa_ptrs = sa_ptr + rows_a * stride_sam + k_lo * stride_sak
    if BLOCK_N <= 128:  # the whole N tile lies in one 128-row block of B: one scalar scale per K tile
        sb_ptrs = sb_ptr + (pid_n * BLOCK_N // 128) * stride_sbn + k_lo * stride_sbk
    else:
        sb_ptrs = sb_ptr + (rows_b // 128) * stride_sbn + k_lo * stride_sbk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(k_lo, k_hi):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        s_a = tl.load(sa_ptrs)
        s_b = tl.load(sb_ptrs)
        if UPCAST:
            a = e4m3_bits_to_fp16(a)
            b = e4m3_bits_to_fp16(b)
        part = tl.dot(a, b)
        if BLOCK_N <= 128:
            acc += part * (s_a * s_b)[:, None]
        else:
            acc += part * s_a[:, None] * s_b[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        sa_ptrs += stride_sak
        sb_ptrs += stride_sbk

    d_rows = pid_k.to(tl.int64) * stride_dsplit + offs_m.to(tl.int64) * stride_dm
    d_ptrs = d_ptr + d_rows[:, None] + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RES:   # round(round(acc) + r): the GEMM's output, then the add's (round to nearest even, as torch's add)
        r = tl.load(r_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        acc = _round_to(acc.to(d_ptr.dtype.element_ty).to(tl.float32) + r.to(tl.float32), d_ptr.dtype.element_ty)
    tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=mask)


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    """The one kernel of this stem; with SPLIT_K > 1 it writes an fp32 workspace."""
    problem = Problem.of(problem)
    d_type = "*fp32" if config["SPLIT_K"] > 1 else element(problem.out_dtype)
    ab = "*u8" if config["UPCAST"] else "*fp8e4nv"
    sig = {"a_ptr": ab, "b_ptr": ab, "d_ptr": d_type, "sa_ptr": "*fp32", "sb_ptr": "*fp32",
           "r_ptr": element(problem.out_dtype)}
    sig.update({name: "i32" for name in ("M", "N", "K", "stride_am", "stride_bn", "stride_dm", "stride_dsplit",
                                         "stride_sam", "stride_sak", "stride_sbn", "stride_sbk", "stride_rm")})
    kw = bind(problem, config)["fp8_gemm_1d2d_kernel"]
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    sig.update({name: "constexpr" for name in consts})
    return [CompileSpec.make(__name__, "fp8_gemm_1d2d_kernel", sig, consts,
                             num_warps=kw["num_warps"], num_stages=kw["num_stages"])]


def launch(a, sa, b, sb, out, config: dict, problem: Problem | None = None, residual=None) -> None:
    """Run the kernel on checked inputs (dskc.ops.fp8.fp8_gemm does the checking): out[M, N] is written
    (+ residual [M, N] of out's dtype when the problem has one)."""
    M, K = a.shape
    N = b.shape[0]
    split = config["SPLIT_K"]
    target = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=out.device)
    grid = (num_tiles(M, N, config["BLOCK_M"], config["BLOCK_N"]), split)
    if config["UPCAST"]:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    r = residual if residual is not None else out
    fp8_gemm_1d2d_kernel[grid](
        a, b, target, sa, sb, r, M, N, K,
        a.stride(0), b.stride(0), target.stride(-2), target.stride(0) if split > 1 else 0,
        sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), r.stride(0),
        **bind(problem, config)["fp8_gemm_1d2d_kernel"])
    if split > 1:
        torch.sum(target, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(target.sum(dim=0))
        if residual is not None:
            out.add_(residual)


def runner(problem: dict, config: dict, device: str, routing=None) -> dict:
    """The autotuner's GPU runner (autotune/gpu.py contract): random e4m3 operands and scales for `problem`.

    Returns launch / output / reference (fp32 dequantised matmul on `device`) / min_cos. `routing` is unused.
    """
    M, N, K = problem["M"], problem["N"], problem["K"]
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(M, K, generator=gen) * 0.5).to(torch.float8_e4m3fn).to(device)
    b = (torch.randn(N, K, generator=gen) * 0.5).to(torch.float8_e4m3fn).to(device)
    sa = (torch.rand(M, K // 128, generator=gen) + 0.5).to(device)
    sb = (torch.rand(triton.cdiv(N, 128), K // 128, generator=gen) + 0.5).to(device)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=device)  # unwritten shows

    def reference():
        a32 = a.float() * sa.repeat_interleave(128, dim=1)
        b32 = b.float() * sb.repeat_interleave(128, dim=0)[:N].repeat_interleave(128, dim=1)
        return a32 @ b32.T

    return {"launch": lambda: launch(a, sa, b, sb, out, config), "output": lambda: out, "reference": reference,
            "min_cos": 0.999}
