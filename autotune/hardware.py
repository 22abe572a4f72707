"""Per-architecture limits and ceilings, as data: what the pruner and the roofline MODEL objective assume.

Figures: H200 SXM datasheet (REFERENCE.md section 4) for sm90; B200 public datasheet for sm100; A100 SXM for sm80.
The model uses them only to rank candidates; it never claims to be a measurement.
"""
from __future__ import annotations

import dataclasses

from dskc.arch import parse


@dataclasses.dataclass(frozen=True)
class Hardware:
    family: str
    sms: int                   # streaming multiprocessors
    smem_per_block: int        # bytes of shared memory one block may use (opt-in maximum)
    smem_per_sm: int           # bytes of shared memory per SM
    regs_per_sm: int           # 32-bit registers per SM
    max_threads_per_sm: int
    max_blocks_per_sm: int
    peak_fp8: float            # dense tensor-core FLOP/s
    peak_16bit: float          # dense bf16/fp16 tensor-core FLOP/s
    peak_fp32: float           # CUDA-core FP32 FLOP/s (a kernel that lost its tensor-core path)
    hbm_bytes_per_s: float
    latency_s: float           # memory latency used for Little's-law bytes-in-flight
    launch_s: float            # fixed cost of one launch (graph replay or stream launch)


HARDWARE = {
    "sm80": Hardware("sm80", 108, 166912, 167936, 65536, 2048, 32, 624e12, 312e12, 19.5e12, 2.0e12, 1.0e-6, 3e-6),
    "sm90": Hardware("sm90", 132, 232448, 233472, 65536, 2048, 32, 1979e12, 990e12, 67e12, 4.8e12, 1.0e-6, 3e-6),
    "sm100": Hardware("sm100", 148, 232448, 233472, 65536, 2048, 32, 4500e12, 2250e12, 80e12, 8.0e12, 1.0e-6, 3e-6),
}

# Tensor-core SASS opcodes by operand width (see dskc.build.triton_xc.TENSOR_CORE_OPS).
FP8_OPS = frozenset({"QGMMA", "UTCQMMA", "IGMMA", "IMMA", "UTCIMMA"})
HALF_OPS = frozenset({"HGMMA", "UTCHMMA", "HMMA", "BGMMA", "UTCOMMA"})


def hardware(arch) -> Hardware:
    """The Hardware row for an arch name ('sm90a', 'h200', ...); ValueError for an unknown one."""
    family = parse(arch).family
    if family not in HARDWARE:
        raise ValueError(f"no hardware table for {family}; known: {sorted(HARDWARE)}")
    return HARDWARE[family]
