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
