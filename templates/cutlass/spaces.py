"""Search spaces, constraints and tuning-free defaults of the CUTLASS stems, as data.

Each stem is one `CutlassStem` record, mirroring the Triton contract of `dskc.templates` (STEM, SPACE,
CONSTRAINTS, DEFAULTS, problem_names, cost). CONSTRAINTS are Python expressions over SPACE names and the
problem's names (evaluated by `dskc.templates.registry.satisfies`); they reject before nvcc what CUTLASS's
static_asserts would reject after a minute of compiling, plus configs that cannot fit shared memory.

Values: TILE_* is the CTA tile (M, N, K), CLUSTER_* the thread-block cluster (TMA multicast), SCHEDULE the kernel
schedule: "cooperative" (two consumer warp groups share one tile, tile M >= 128) or "pingpong" (two consumer warp
groups alternate whole tiles, so each holds a full tile's accumulators).

Defaults follow the shapes of CUTLASS's own Hopper examples (67/68: 128x128x128, cluster 1x2, cooperative for
block-scaled FP8; 128x256x64 cooperative for bf16). They are only the CUTLASS side's untuned choice: without
timings the per-arch default kernel stays the Triton stem (see `dskc.templates.cutlass.candidates`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

SMEM_LIMIT = 232448          # usable bytes per block on sm_90 (REFERENCE.md section 4)
EPILOGUE_SMEM = 32768        # upper bound of the TMA epilogue's staging buffers for the tiles below
SCHEDULES = ("cooperative", "pingpong")


@dataclasses.dataclass(frozen=True)
class CutlassStem:
    """One CUTLASS template (templates/cutlass/<stem>.cu.jinja) and its tuning contract."""
    stem: str                          # also the template's file stem
    op: str                            # the operation it implements (see dskc.templates.cutlass.OPS)
    space: dict                        # parameter -> candidate values
    constraints: tuple                 # expressions over space and problem names
    defaults: dict                     # arch family ("sm90") -> config
    problem: tuple                     # the problem's names
    cost: Callable[[dict], tuple]      # problem -> (flops, bytes moved)
    archs: tuple = ("sm90a",)          # the targets its code is valid for


def _acc_limit(per_copy: int) -> str:
    """fp32 accumulator registers per consumer thread: cooperative splits a tile over 256 threads, pingpong not."""
    return (f"TILE_M * TILE_N // (256 if SCHEDULE == 'cooperative' else 128) <= {per_copy}")


def _smem(elem_bytes: int) -> str:
    """At least two pipeline stages of A and B tiles next to the epilogue's buffers."""
    return f"2 * (TILE_M + TILE_N) * TILE_K * {elem_bytes} + {EPILOGUE_SMEM} <= {SMEM_LIMIT}"


_SCHEDULE_RULES = (
    "SCHEDULE != 'cooperative' or TILE_M % 128 == 0",   # two warp groups of 64 rows each
    "SCHEDULE != 'pingpong' or TILE_M in (64, 128)",
    "CLUSTER_M * CLUSTER_N <= 2",                       # multicast beyond 2 CTAs starves small problems
)


def _fp8_dense_cost(p: dict) -> tuple:
    m, n, k = p["M"], p["N"], p["K"]
    return 2.0 * m * n * k, float(m * k + n * k + 2 * m * n + 4 * (m * k // 128 + (n // 128 + 1) * (k // 128)))


def _fp8_grouped_cost(p: dict) -> tuple:
    g, m, n, k = p["G"], p["M"], p["N"], p["K"]
    scales = 4 * (m * k // 128 + g * (n // 128 + 1) * (k // 128))
    return 2.0 * m * n * k, float(m * k + g * n * k + 2 * m * n + scales)


def _bf16_cost(p: dict) -> tuple:
    m, n, k = p["M"], p["N"], p["K"]
    return 2.0 * m * n * k, float(2 * (m * k + n * k + m * n))


_FP8_SPACE = {
    "TILE_M": (64, 128, 256),
    "TILE_N": (128, 256),             # 256 stays in the space so the constraint below documents the limit
    "TILE_K": (128,),                 # one scale per 128 of K: FP32 promotion every K tile
    "CLUSTER_M": (1, 2),
    "CLUSTER_N": (1, 2),
    "SCHEDULE": SCHEDULES,
}

_FP8_RULES = (
    "TILE_K == 128",
    # CUTLASS 4.2's sm90 blockwise accumulation wants one weight scale per tile along N: nvcc rejected 128x256
    # with 'static assertion failed with "Accumulator and scaleB must have same shape."' (fp8_accumulation.hpp).
    "TILE_N == 128",
    _acc_limit(128),                  # blockwise scaling keeps a second accumulator copy: 2 x 128 registers max
    _smem(1),
) + _SCHEDULE_RULES

FP8_GROUPED = CutlassStem(
    stem="sm90_fp8_grouped_gemm_1d2d",
    op="fp8_grouped_gemm_1d2d",
    space=_FP8_SPACE,
    constraints=_FP8_RULES + ("K % 128 == 0", "N % 8 == 0"),
    defaults={"sm90": {"TILE_M": 128, "TILE_N": 128, "TILE_K": 128, "CLUSTER_M": 1, "CLUSTER_N": 2,
                       "SCHEDULE": "cooperative"}},
    problem=("G", "M", "N", "K"),     # groups (experts), total rows over all groups, N, K
    cost=_fp8_grouped_cost,
)

FP8_DENSE = CutlassStem(
    stem="sm90_fp8_gemm_1d2d",
    op="fp8_gemm_1d2d",
    space=_FP8_SPACE,
    constraints=_FP8_RULES + ("K % 128 == 0", "N % 8 == 0"),
    defaults={"sm90": {"TILE_M": 128, "TILE_N": 128, "TILE_K": 128, "CLUSTER_M": 1, "CLUSTER_N": 2,
                       "SCHEDULE": "cooperative"}},
    problem=("M", "N", "K"),
    cost=_fp8_dense_cost,
)

BF16_DENSE = CutlassStem(
    stem="sm90_bf16_gemm",
    op="bf16_gemm",
    space={
        "TILE_M": (64, 128, 256),
        "TILE_N": (64, 128, 256),
        "TILE_K": (64, 128),
        "CLUSTER_M": (1, 2),
        "CLUSTER_N": (1, 2),
        "SCHEDULE": SCHEDULES,
    },
    constraints=(_acc_limit(128), _smem(2)) + _SCHEDULE_RULES + ("K % 8 == 0", "N % 8 == 0"),
    defaults={"sm90": {"TILE_M": 128, "TILE_N": 256, "TILE_K": 64, "CLUSTER_M": 2, "CLUSTER_N": 1,
                       "SCHEDULE": "cooperative"}},
    problem=("M", "N", "K"),
    cost=_bf16_cost,
)

STEMS = {s.stem: s for s in (FP8_GROUPED, FP8_DENSE, BF16_DENSE)}

# Besides each default, two configs per stem that were compiled by hand for sm_90a with nvcc 13.0 (and in the
# slow test tier): known-good seeds for the autotuner, and the renders the tests keep checking.
VERIFIED = {
    FP8_GROUPED.stem: (
        {"TILE_M": 128, "TILE_N": 128, "TILE_K": 128, "CLUSTER_M": 1, "CLUSTER_N": 1, "SCHEDULE": "cooperative"},
        {"TILE_M": 64, "TILE_N": 128, "TILE_K": 128, "CLUSTER_M": 1, "CLUSTER_N": 1, "SCHEDULE": "pingpong"},
    ),
    FP8_DENSE.stem: (
        {"TILE_M": 128, "TILE_N": 128, "TILE_K": 128, "CLUSTER_M": 2, "CLUSTER_N": 1, "SCHEDULE": "cooperative"},
        {"TILE_M": 64, "TILE_N": 128, "TILE_K": 128, "CLUSTER_M": 1, "CLUSTER_N": 2, "SCHEDULE": "pingpong"},
    ),
    BF16_DENSE.stem: (
        {"TILE_M": 128, "TILE_N": 128, "TILE_K": 64, "CLUSTER_M": 1, "CLUSTER_N": 2, "SCHEDULE": "pingpong"},
        {"TILE_M": 256, "TILE_N": 128, "TILE_K": 64, "CLUSTER_M": 1, "CLUSTER_N": 1, "SCHEDULE": "cooperative"},
    ),
}
