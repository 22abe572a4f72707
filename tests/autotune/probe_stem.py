"""A small template stem for the autotuner's tests: follows the contract in templates/__init__.py and wraps the
probe kernel of dskc/build/_probe.py (an fp16 tiled dot, C[M, N] = A[M, K] @ B[N, K]^T in fp32)."""
import os
import time

from dskc.build.triton_xc import CompileSpec

STEM = "probe_dot"
SPACE = {
    "BLOCK_M": (16, 32, 64),
    "BLOCK_N": (32, 64, 128),
    "BLOCK_K": (32, 64),
    "num_warps": (4, 8),
    "num_stages": (2, 3),
}
# 64x128x64 breaks the first (pruned before compiling). SPILLING (32x128x64, 4 warps) builds but spills on sm_80
# with both Triton versions CI runs (3.9: 16 B, 3.6: 36 B of spill stores), so a study for sm80 prunes it at compile
# time; on sm_90a only 3.9 spills it (16 B) and 3.6 builds all 68 feasible configs clean (HMMA below BLOCK_M 64,
# HGMMA from 64). Checked 2026-11 with each wheel's ptxas.
CONSTRAINTS = ("BLOCK_M * BLOCK_N * BLOCK_K <= 262144", "BLOCK_K <= K")
SPILLING = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
DEFAULTS = {
    "sm80": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "sm90": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "sm100": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
}
AUTOTUNE = {"buckets": {"M": "pow2"}, "known_good": {"sm90": [{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64,
                                                                "num_warps": 4, "num_stages": 3}]}}
_SIG = {"a": "*fp16", "b": "*fp16", "c": "*fp32", "M": "i32", "N": "i32", "K": "i32",
        "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}


def problem_names():
    return ("M", "N", "K")


def compile_specs(problem, config):
    delay = float(os.environ.get("PROBE_STEM_DELAY_S", "0"))   # tests: make each trial last, to kill one mid-way
    time.sleep(delay)
    consts = {"BM": config["BLOCK_M"], "BN": config["BLOCK_N"], "BK": config["BLOCK_K"]}
    return [CompileSpec.make("dskc.build._probe", "probe_dot_kernel", _SIG, consts,
                             num_warps=config["num_warps"], num_stages=config["num_stages"])]


def cost(problem):
    m, n, k = problem["M"], problem["N"], problem["K"]
    return 2.0 * m * n * k, 2.0 * (m * k + n * k) + 4.0 * m * n
