"""Jitted helpers shared by the dense GEMM stems (not a stem itself: it defines no STEM).

`tile_coords` maps a flat program id to an (M-tile, N-tile) pair in GROUP_M-row bands so that neighbouring
programs reuse the same B tiles from L2 (Triton's matmul tutorial "grouped ordering").
`smem_limit` is the per-block shared-memory budget the CONSTRAINTS of the GEMM stems use (H100/H200: 232448 B).
"""
from __future__ import annotations

import triton
import triton.language as tl

SMEM_LIMIT = 232448  # bytes per block on sm_90 (REFERENCE.md section 4); sm_80 allows 166912 and fails at build


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of flat program `pid`, walking GROUP_M M-tiles down before moving one N-tile right."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % width) % group_size)
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit
def e4m3_bits_to_fp16(u):
    """fp16 value of e4m3 bit patterns held as uint8 (exact; NaN patterns are not special-cased).

    Placing e4m3's 7 exponent+mantissa bits at fp16's bits 13..7 reads them with fp16's bias 15 instead of 7, so a
    factor 2^8 restores the value; e4m3 subnormals land on fp16 subnormals and scale just as well. For sm_80, whose
    compiler rejects e4m3 pointers altogether.
    """
    u16 = u.to(tl.uint16)
    bits = ((u16 & 0x80) << 8) | ((u16 & 0x7F) << 7)
    return bits.to(tl.float16, bitcast=True) * 256.0


def num_tiles(M: int, N: int, block_m: int, block_n: int) -> int:
    """Programs along the flat tile axis of a GEMM grid."""
    return triton.cdiv(M, block_m) * triton.cdiv(N, block_n)


# The tuning-free tile rule of the dense GEMMs (DeepGEMM picks its block sizes the same way, by a formula over the
# shape, never by timing): among the candidate (BLOCK_M, BLOCK_N) tiles that meet the stem's constraints, take the
# fewest waves of tiles over the SMs, then the fullest last wave, then the larger tile. A single partial wave at
# small M with a long K is split along K (SPLIT_K, where the stem has it) until about one wave is full.
GEMM_TILES = ((16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (64, 128), (128, 128), (128, 256))
SPLIT_CHOICES = (1, 2, 4, 8)
# The smallest tile height that keeps each family's tensor-core instruction: Hopper's wgmma and Blackwell's tcgen05
# issue 64-row MMAs (kernel_report, sm_90a, fp8 16x64x128 with 4 warps: HMMA instead of QGMMA); sm_80's mma.sync is
# 16 rows tall.
MIN_BLOCK_M = {"sm80": 16, "sm90": 64, "sm100": 64}


def waves(M: int, N: int, block_m: int, block_n: int, split: int, sms: int) -> tuple[int, float]:
    """(number of waves, utilisation of the SMs over those waves) of a GEMM grid; 1.0 = every SM busy always."""
    programs = num_tiles(max(M, 1), max(N, 1), block_m, block_n) * split
    n = -(-programs // sms)
    return n, programs / (n * sms)


def gemm_rule(problem: dict, base: dict, sms: int, fits, tiles=GEMM_TILES, family: str = "sm90") -> dict:
    """The config the rule picks for problem {M, N, K} (see above); `fits(config)` says whether a config meets the
    stem's constraints; `base` supplies every other parameter (GROUP_M, UPCAST, stages)."""
    M, N, K = problem["M"], problem["N"], problem["K"]
    low = MIN_BLOCK_M.get(family, 16)
    best = None
    for bm, bn in tiles:
        if bm < low or (bm > low and bm // 2 >= M):   # below the MMA's height / twice as tall as the rows: waste
            continue
        for warps in (4, 8):
            cfg = {**base, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}
            if "SPLIT_K" in base:
                cfg["SPLIT_K"] = 1
            if not fits(cfg):
                continue
            n, util = waves(M, N, bm, bn, 1, sms)
            key = (n, -util, -(bm * bn), warps)
            if best is None or key < best[0]:
                best = (key, cfg)
            break                               # the fewer warps that fit: more programs per SM
    if best is None:
        return dict(base)
    cfg = best[1]
    if "SPLIT_K" in cfg and best[0][0] == 1:
        k_tiles = K // cfg.get("BLOCK_K", 128)
        for split in SPLIT_CHOICES[1:]:
            trial = {**cfg, "SPLIT_K": split}
            n, util = waves(M, N, cfg["BLOCK_M"], cfg["BLOCK_N"], split, sms)
            if n > 1 or k_tiles // split < 4 or not fits(trial):
                break
            cfg = trial
    return cfg
