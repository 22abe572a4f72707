"""Triton against CUTLASS, per shape: time the Triton kernel the compiler would run (its exported tuned config, else
its default) and the CUTLASS candidates for the same problem, then export the decision to
<configs>/<arch>/_backends.json (format and reader: dskc/select/backends.py).

    compare(stem, problem, arch, timing="model"|"gpu", limit=4) -> decision entry (a dict, see the reader)
    export_decision(entry, arch, root=None) -> Path       merged per (stem, bucket); atomic write
    format_decisions(entries) -> str                      the CLI's table

Timing "model" scores both sides with roofline ESTIMATES (Triton: autotune/roofline.py on the cross-compiled
kernel; CUTLASS: `cutlass_model_s`, tiles and waves against the arch's peaks): it may rank, but the entry says
timing_mode "model" and the compiler never switches to CUTLASS on it. Timing "gpu" builds the CUTLASS candidates with
nvcc and times both sides with the same CUDA-graph / CUDA-events timer (autotune/gpu.py, a child process per
candidate, output checked against a PyTorch reference first); only that can select CUTLASS.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import types

from dskc.arch import parse
from dskc.select import backends as reader
from dskc.select import tuned
from dskc.autotune.objective import TrialFailed

_RUNNERS = {"sm90_fp8_gemm_1d2d": "fp8_gemm", "sm90_bf16_gemm": "bf16_gemm",
            "sm90_fp8_grouped_gemm_1d2d": "fp8_grouped_gemm"}


@dataclasses.dataclass(frozen=True)
class Timed:
    backend: str
    stem: str
    config: dict
    seconds: float            # math.inf when it failed
    note: str = ""            # why it failed


def triton_config(stem: str, problem: dict, arch) -> tuple[dict, str]:
    """The Triton config the compiler would select for this problem, and where it came from."""
    from dskc.templates import registry
    bucket = registry.problem(stem, problem).bucket()
    cfg, source = tuned.lookup(stem, arch, bucket.as_dict())
    if cfg is None:
        return registry.default_config(stem, parse(arch), bucket), f"default:{parse(arch).family}"
    return cfg, source


def cutlass_model_s(stem: str, problem: dict, config: dict, arch) -> float:
    """A roofline ESTIMATE for a CUTLASS config: padded tiles over waves of one CTA per SM against the tensor-core
    peak, or the bytes against HBM, whichever is slower, plus one launch. Ranks configs; never a measurement."""
    from dskc.autotune.hardware import hardware
    from dskc.templates import cutlass
    hw, spec = hardware(arch), cutlass.get(stem)
    flops, nbytes = spec.cost(problem)
    groups = problem.get("G", 1)
    rows = -(-problem["M"] // groups)
    tiles_m, tiles_n = -(-rows // config["TILE_M"]), -(-problem["N"] // config["TILE_N"])
    grid = groups * tiles_m * tiles_n
    padding = grid * config["TILE_M"] * config["TILE_N"] / max(1, problem["M"] * problem["N"])
    waves = max(1, -(-grid // hw.sms))
    wave_eff = grid / (waves * hw.sms)
    peak = hw.peak_fp8 if "fp8" in stem else hw.peak_16bit
    compute = flops * padding / (peak * wave_eff)
    memory = nbytes / (hw.hbm_bytes_per_s * min(1.0, grid / hw.sms))
    return max(compute, memory) + hw.launch_s


def time_triton(stem: str, problem: dict, config: dict, arch, timing: str) -> float:
    """Seconds for the Triton (stem, config): the roofline model or the GPU timer. Raises TrialFailed."""
    from dskc.autotune.objective import ModelTimer, compile_check
    from dskc.autotune.space import load_space
    space = load_space(stem)
    if timing == "model":
        reports, reason = compile_check(space, problem, config, parse(arch).name, None)
        if reason is not None:
            raise TrialFailed(f"Triton {stem} {config}: {reason}")
        return ModelTimer().measure(space, problem, config, reports, parse(arch).name)[0]
    from dskc.autotune.gpu import GpuTimer
    return GpuTimer.create().measure(space, problem, config, None, parse(arch).name)[0]


def time_cutlass(stem: str, problem: dict, config: dict, arch, timing: str) -> float:
    """Seconds for the CUTLASS (stem, config) on its own problem (dskc.select.backends.cutlass_problem)."""
    if timing == "model":
        return cutlass_model_s(stem, problem, config, arch)
    from dskc.autotune.gpu import GpuTimer
    from dskc.templates import cutlass
    built = cutlass.build(stem, config, parse(arch).name, problem)
    if not built.ok:
        raise TrialFailed(f"compile: {built.stage}: {built.message[:300]}")
    space = types.SimpleNamespace(stem=stem, module=None,
                                  data={"runner": f"dskc.autotune.cutlass_runners:{_RUNNERS[stem]}"})
    return GpuTimer.create().measure(space, problem, config, None, parse(arch).name)[0]


def _check(stem: str, arch, timing: str) -> str:
    if timing not in ("model", "gpu"):
        raise ValueError(f"timing must be 'model' or 'gpu', got {timing!r}")
    op = reader.cutlass_op(stem, {"dtype": "fp8"} if stem == "grouped_gemm" else {})
    if op is None:
        raise ValueError(f"no CUTLASS counterpart for Triton stem {stem!r}")
    return op


def compare(stem: str, problem: dict, arch, timing: str = "model", limit: int | None = 4) -> dict:
    """Time Triton `stem` and up to `limit` CUTLASS candidates (the default first) on `problem`; the decision entry.

    Raises ValueError when CUTLASS has no candidate for this problem on `arch` or when the Triton kernel fails
    (there is nothing to compare against). A failing CUTLASS candidate is recorded with its reason, never selected.
    """
    from dskc.templates import cutlass
    op = _check(stem, arch, timing)
    cproblem = reader.cutlass_problem(stem, problem)
    cands = cutlass.candidates(op, arch, cproblem, limit)
    if not cands:
        raise ValueError(f"no CUTLASS candidate for {stem} {problem} on {parse(arch).name}")
    t_cfg, t_source = triton_config(stem, problem, arch)
    try:
        t_s = time_triton(stem, problem, t_cfg, arch, timing)
    except TrialFailed as exc:
        raise ValueError(f"Triton {stem} {t_cfg} failed on {problem}: {exc}") from exc
    timed = []
    for c_stem, cfg in cands:
        try:
            timed.append(Timed("cutlass", c_stem, cfg, time_cutlass(c_stem, cproblem, cfg, arch, timing)))
        except TrialFailed as exc:
            timed.append(Timed("cutlass", c_stem, cfg, math.inf, str(exc)[:300]))
    best = min(timed, key=lambda t: t.seconds)
    return _entry(stem, problem, arch, timing, (t_cfg, t_source, t_s), best, timed)


def _entry(stem, problem, arch, timing, triton, best: Timed, timed: list) -> dict:
    from dskc.build import nvcc
    t_cfg, t_source, t_s = triton
    mode = "model" if timing == "model" else _gpu_mode()
    toolchain = dict(tuned.current_toolchain())
    try:
        toolchain["nvcc"] = nvcc.nvcc_version()
    except Exception as exc:  # recorded, not fatal: model mode needs no nvcc
        toolchain["nvcc"] = f"unavailable: {exc}"[:80]
    return {"op": stem, "bucket": reader.bucket(problem, stem), "problem": dict(problem),
            "backend": "cutlass" if best.seconds < t_s else "triton",
            "stem": best.stem, "config": dict(best.config),
            "triton_us": t_s * 1e6, "cutlass_us": best.seconds * 1e6 if math.isfinite(best.seconds) else None,
            "timing_mode": mode,
            "meta": {"gpu": _gpu_name() if mode != "model" else "none (model)", "toolchain": toolchain,
                     "date": datetime.date.today().isoformat(), "arch": parse(arch).name,
                     "triton_config": dict(t_cfg), "triton_source": t_source,
                     "candidates": [{"config": t.config, "us": t.seconds * 1e6 if math.isfinite(t.seconds) else None,
                                     "note": t.note} for t in timed]}}


def _gpu_mode() -> str:
    from dskc.autotune.gpu import MODE
    return MODE


def _gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name()


def export_decision(entry: dict, arch, root=None):
    """Merge `entry` into <root>/<arch>/_backends.json (atomic). A measured entry is never replaced by a model
    one (returns the path unchanged then). Raises BackendFileError when the existing file is corrupt."""
    from dskc.autotune.export import _write_atomic
    path = reader.file_for(arch, root)
    doc = reader.read_file(path) if path.exists() else {"format": reader.FORMAT, "arch": parse(arch).name,
                                                        "entries": {}}
    name = reader.entry_name(entry["op"], entry["bucket"])
    old = doc["entries"].get(name)
    if old and old["timing_mode"] in reader.MEASURED_MODES and entry["timing_mode"] not in reader.MEASURED_MODES:
        return path
    doc["entries"][name] = entry
    _write_atomic(path, doc)
    return path


def format_decisions(entries: list) -> str:
    """Per decision: kernel, bucket, timing, Triton and best CUTLASS time, the winner."""
    head = f"{'kernel':16s} {'bucket':34s} {'timing':11s} {'triton':>10s} {'cutlass':>10s}  winner"
    lines = [head, "-" * len(head)]
    us = lambda v: f"{v:9.1f}u" if v is not None else "    failed"  # noqa: E731
    for e in entries:
        shape = ",".join(f"{k}={v}" for k, v in e["bucket"].items())
        lines.append(f"{e['op'][:16]:16s} {shape[:34]:34s} {e['timing_mode']:11s} {us(e['triton_us'])} "
                     f"{us(e['cutlass_us'])}  {e['backend']}")
    if any(e["timing_mode"] == "model" for e in entries):
        lines.append("timing 'model': roofline ESTIMATES; the compiler keeps Triton unless a GPU measurement says "
                     "otherwise")
    return "\n".join(lines)
