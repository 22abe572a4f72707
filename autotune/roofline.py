"""The MODEL objective: a roofline ESTIMATE of a kernel's time from its compiled resources. Not a measurement.

Inputs: the KernelReports of the compiled config (registers, shared memory, tensor-core opcodes), the config's block
sizes, the problem's (flops, bytes) from the stem's cost(), and the arch's ceilings (autotune/hardware.py).

    blocks/SM   = min(regs_per_sm // (regs * threads), smem_per_sm // shared, max_threads // threads, max_blocks)
    grid        = prod(ceil(P_f / BLOCK_f) for tiled fields f) * prod(batch fields) * split-K
    padding     = prod(ceil(P_f / BLOCK_f) * BLOCK_f) / prod(P_f)       (work done on padded tiles)
    waves       = ceil(grid / (SMs * blocks/SM)); wave_eff = grid / (waves * SMs * blocks/SM)
    compute     = flops * padding / (peak(tensor-core ops) * wave_eff * mma_eff(tile))
    memory      = (bytes + split-K partials) / (HBM * min(1, bytes_in_flight / (HBM * latency / SMs)) * sm_fill)
    time        = max(compute, memory) + launch + per-wave tail

The terms are simple on purpose; they rank candidates and are labelled timing_mode "model" wherever they go.
"""
from __future__ import annotations

import math

from dskc.autotune.hardware import FP8_OPS, HALF_OPS, Hardware


def _tile_fields(space, problem: dict) -> dict:
    """problem field -> config block-size name, from the data's "tiles" or the BLOCK_<field> convention (every
    field but K, the reduction, which the grid does not span)."""
    tiles = space.data.get("tiles")
    if tiles is None:
        tiles = {f: f"BLOCK_{f}" for f in problem if f != "K" and f"BLOCK_{f}" in space.names}
    return {f: b for f, b in tiles.items() if f in problem}


def grid_and_padding(space, problem: dict, config: dict) -> tuple[int, float]:
    """(number of blocks, padded-work ratio >= 1) of a config for a problem."""
    grid, padded, real = 1, 1.0, 1.0
    for field, block in _tile_fields(space, problem).items():
        size, bs = int(problem[field]), int(config[block])
        tiles = max(1, -(-size // bs))
        grid *= tiles
        padded *= tiles * bs
        real *= max(1, size)
    for field in space.data.get("batch", ()):
        grid *= max(1, int(problem[field]))
    return grid * _split(space, config), padded / real


def _split(space, config: dict) -> int:
    """Split-K / num-splits factor: the data's "split" parameter (default SPLIT_K when the space has it)."""
    name = space.data.get("split", "SPLIT_K" if "SPLIT_K" in space.names else None)
    return int(config[name]) if name else 1


def _peak(reports, hw: Hardware) -> float:
    ops = set().union(*(set(r.tensor_core_ops) for r in reports)) if reports else set()
    if ops & FP8_OPS:
        return hw.peak_fp8
    if ops & HALF_OPS:
        return hw.peak_16bit
    return hw.peak_fp32


def blocks_per_sm(report, num_warps: int, hw: Hardware) -> int:
    threads = 32 * num_warps
    by_regs = hw.regs_per_sm // max(1, report.registers * threads)
    by_smem = hw.smem_per_sm // report.shared_bytes if report.shared_bytes else hw.max_blocks_per_sm
    return max(0, min(by_regs, by_smem, hw.max_threads_per_sm // threads, hw.max_blocks_per_sm))


def estimate(space, problem: dict, config: dict, reports: list, hw: Hardware) -> dict:
    """The modelled time (seconds) and its terms. The main kernel is the report with the most shared memory."""
    if not reports:
        raise ValueError(f"{space.stem}: no compiled kernels to model")
    flops, nbytes = space.module.cost(problem)
    main = max(reports, key=lambda r: (r.shared_bytes, r.registers))
    warps = int(config.get("num_warps", 4))
    occ = blocks_per_sm(main, warps, hw)
    if occ == 0:
        return {"time_s": math.inf, "why": "does not fit on an SM"}
    grid, padding = grid_and_padding(space, problem, config)
    slots = hw.sms * occ
    waves = max(1, -(-grid // slots))
    wave_eff = grid / (waves * slots)
    sm_fill = min(1.0, grid / hw.sms)
    tile = 1
    for field, block in _tile_fields(space, problem).items():
        tile *= int(config[block])
    mma_eff = min(1.0, math.sqrt(tile / (128 * 128))) if tile > 1 else 1.0
    compute = flops * padding / (_peak(reports, hw) * max(wave_eff, 1e-9) * max(mma_eff, 0.05))
    stages = int(config.get("num_stages", 2))
    in_flight = occ * main.shared_bytes * max(1, stages - 1) / max(1, stages)
    need = hw.hbm_bytes_per_s * hw.latency_s / hw.sms
    bw = hw.hbm_bytes_per_s * min(1.0, max(in_flight, 1024) / need) * sm_fill
    split = _split(space, config)
    if split > 1:   # fp32 partials written and read back once per split
        outputs = 1
        for field in _tile_fields(space, problem):
            outputs *= int(problem[field])
        nbytes += 8.0 * outputs * split
    memory = nbytes / bw
    tail = waves * 1e-7
    return {"time_s": max(compute, memory) + hw.launch_s + tail, "compute_s": compute, "memory_s": memory,
            "grid": grid, "padding": padding, "blocks_per_sm": occ, "waves": waves, "wave_eff": wave_eff}
