"""One Optuna trial: suggest a config, reject it by its constraints, compile it for the target, prune what the
compiler says cannot be fast, then score it (MODEL estimate on any machine, or a GPU measurement).

Trial outcomes (reason in user_attrs["reason"]):
  PRUNED   "constraint: <expr>"            declared constraint broken; nothing compiled
  PRUNED   "spills: <n> B"                 the kernel spills registers (ptxas report)
  PRUNED   "shared: <n> B > <limit> B"     shared memory over the arch's per-block limit (232448 B on sm90)
  PRUNED   "lost tensor cores: <kernel>"   the default config's tensor-core opcodes are missing from the SASS
  FAIL     "compile: ..."                  the build failed or timed out (isolated in a subprocess)
  FAIL     "run: ..."                      (GPU) crashed, hung or gave a wrong answer; never selected
  COMPLETE value = seconds; user_attrs["timing_mode"] says "model" (an estimate) or a measurement mode.
"""
from __future__ import annotations

import dataclasses
import math

import optuna

from dskc.build.triton_xc import CompileError, compile_kernels
from dskc.autotune import roofline
from dskc.autotune.hardware import FP8_OPS, HALF_OPS, hardware
from dskc.autotune.space import TuneSpace, suggest, violated


class TrialFailed(RuntimeError):
    """A config that crashed, hung, did not build or gave a wrong answer: the trial is FAIL, never selected."""


def compile_check(space: TuneSpace, problem: dict, config: dict, arch: str, expected_tc: tuple | None):
    """Compile a config; return (reports, prune reason or None). Raises TrialFailed if a kernel does not build.

    expected_tc: per kernel, the tensor-core opcodes the default config has (None: do not check); a config whose
    kernel falls to a lower class (fp8 -> 16-bit -> none) is pruned.
    """
    hw = hardware(arch)
    results = compile_kernels(space.module.compile_specs(problem, config), arch)
    errors = [r for r in results if isinstance(r, CompileError)]
    if errors:
        raise TrialFailed(f"compile: {str(errors[0])[:300]}")
    for r in results:
        if r.spills:
            return results, f"spills: {r.spill_store_bytes} B stored, {r.spill_load_bytes} B loaded in {r.name}"
        if r.shared_bytes > hw.smem_per_block:
            return results, f"shared: {r.shared_bytes} B > {hw.smem_per_block} B in {r.name}"
    if expected_tc is not None:
        for r, want in zip(results, expected_tc):
            if _tc_rank(r.tensor_core_ops) < _tc_rank(want):
                return results, f"lost tensor cores: {r.name} has {list(r.tensor_core_ops)}, default {list(want)}"
    return results, None


def _tc_rank(ops) -> int:
    """2: fp8/int8 tensor cores, 1: 16-bit tensor cores, 0: none (mma.sync HMMA and wgmma HGMMA rank alike)."""
    ops = set(ops)
    return 2 if ops & FP8_OPS else (1 if ops & HALF_OPS else 0)


@dataclasses.dataclass(frozen=True)
class ModelTimer:
    """Scores a config by the roofline MODEL (roofline.py). An estimate, labelled as such; runs nothing."""
    mode: str = "model"
    verification: str = "not run: model mode scores compiled resources only; no output is checked"

    def measure(self, space, problem, config, reports, arch) -> tuple[float, dict]:
        terms = roofline.estimate(space, problem, config, reports, hardware(arch))
        return terms["time_s"], {"model_terms": {k: v for k, v in terms.items() if k != "time_s"}}


@dataclasses.dataclass(frozen=True)
class Objective:
    """Callable Optuna objective for one (stem, problem, arch, timer). Returns seconds (lower is better)."""
    space: TuneSpace
    problem: dict
    arch: str
    timer: object
    expected_tc: tuple | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        config = suggest(trial, self.space)
        trial.set_user_attr("config", config)
        trial.set_user_attr("timing_mode", self.timer.mode)
        broken = violated(self.space, config, self.problem)
        if broken is not None:
            self._prune(trial, f"constraint: {broken}")
        same = _finished_twin(trial, config)
        if same is not None:
            trial.set_user_attr("duplicate_of", same.number)
            trial.set_user_attr("verification", same.user_attrs.get("verification", ""))
            return same.value
        try:
            return self._score(trial, config)
        except TrialFailed as exc:
            trial.set_user_attr("reason", str(exc))
            raise

    def _score(self, trial, config: dict) -> float:
        reports, reason = compile_check(self.space, self.problem, config, self.arch, self.expected_tc)
        trial.set_user_attr("kernels", [_summary(r) for r in reports])
        if reason is not None:
            self._prune(trial, reason)
        seconds, attrs = self.timer.measure(self.space, self.problem, config, reports, self.arch)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("verification", self.timer.verification)
        if not math.isfinite(seconds):
            raise TrialFailed(f"run: no finite time ({attrs})")
        return seconds

    @staticmethod
    def _prune(trial, reason: str):
        trial.set_user_attr("reason", reason)
        raise optuna.TrialPruned(reason)


def _finished_twin(trial: optuna.Trial, config: dict):
    """A COMPLETE trial of this study with the same config (TPE re-suggests; do not rebuild or re-time it)."""
    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for t in done:
        if t.user_attrs.get("config") == config and t.number != trial.number:
            return t
    return None


def _summary(r) -> dict:
    return {"name": r.name, "registers": r.registers, "shared_bytes": r.shared_bytes,
            "spill_bytes": r.spill_store_bytes + r.spill_load_bytes, "tensor_core_ops": list(r.tensor_core_ops)}


def default_tensor_cores(space: TuneSpace, problem: dict, arch: str, default: dict) -> tuple | None:
    """Per kernel, the tensor-core opcodes of the default config (the reference for 'lost tensor cores').

    None when the default itself does not build (then nothing is pruned on this ground, and the report says so).
    """
    results = compile_kernels(space.module.compile_specs(problem, default), arch)
    if any(isinstance(r, CompileError) for r in results):
        return None
    return tuple(tuple(r.tensor_core_ops) for r in results)
