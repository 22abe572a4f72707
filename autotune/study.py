"""One Optuna study per StudyKey (stem, arch, dtype, shape bucket, toolchain, timing mode, template hash, extras).

`Task` holds everything a worker needs (JSON-serialisable, so worker subprocesses get it on the command line).
`prepare(task)` creates or loads the study and enqueues its plan: `task.n_trials` planned trials, seeds first
(the coordinator calls it once; coordinators on several machines may call it at once: the one that creates the
study plans it, the others wait for the plan). `work(task)` drains the planned trials (slots.Worker): several
workers on one storage cooperate, a dead worker's trial is run again by another, and a killed session resumes
where it stopped. Samplers that do not learn from results ("random", "qmc") have their whole plan drawn up front
(distinct configs that meet the constraints), so the same seed gives the same trials and the same winner however
the workers are scheduled or fail; the others fill each slot when a worker takes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time

import optuna

from dskc.arch import parse
from dskc.build.triton_xc import toolchain
from dskc.autotune import seeds as seeds_mod
from dskc.autotune.objective import ModelTimer, Objective, TrialFailed, default_tensor_cores
from dskc.autotune.space import bucket, bucket_kinds, check_problem, feasible_configs, load_space, suggest, violated
from dskc.autotune import slots
from dskc.autotune.storage import open_storage

log = logging.getLogger("dskc.autotune")
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
PLANNED = ("random", "qmc")   # samplers whose draws do not depend on results: the whole plan is drawn up front
PLAN_WAIT_S = 60              # how long a second coordinator waits for the first one's plan


@dataclasses.dataclass(frozen=True)
class StudyKey:
    """The identity of a study. Two runs share trials only when every field matches."""
    stem: str
    arch: str
    dtype: str
    bucket: tuple            # ((field, value), ...) in problem_names order
    toolchain: tuple         # ((tool, version), ...)
    timing_mode: str         # "model" | "cuda-events" | "cuda-graph"
    template_hash: str
    extras: tuple = ()       # ((name, value), ...), e.g. (("routing", "gate:16b"),)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()).hexdigest()

    @property
    def study_name(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.bucket)
        return f"{self.stem}/{self.arch}/{self.dtype}/{shape}/{self.timing_mode}/{self.digest()[:12]}"


@dataclasses.dataclass(frozen=True)
class Task:
    stem: str                # registered stem name or importable module path
    problem: dict
    arch: str
    storage: str             # SQLAlchemy URL or sqlite path
    timing: str = "model"    # "model" | "gpu"
    sampler: str = "tpe"
    seed: int | None = None
    n_trials: int = 32       # planned trials of the study (total, across resumes)
    extras: tuple = ()
    imported_seeds: tuple = ()   # configs from vLLM/SGLang files (already mapped onto the space)
    heartbeat_s: int = 5
    grace_s: int = 20
    routing: str | None = None   # MoE routing for GPU runs: "gate:<model>" or "recorded:<path>" (see routing.py)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Task":
        raw = json.loads(text)
        raw["extras"] = tuple(tuple(x) for x in raw.get("extras", ()))
        raw["imported_seeds"] = tuple(raw.get("imported_seeds", ()))
        return Task(**raw)


def make_timer(mode: str, routing: dict | None = None):
    """'model' -> the roofline MODEL; 'gpu' -> CUDA-graph timing (needs a GPU; clear error without one)."""
    if mode == "model":
        return ModelTimer()
    if mode == "gpu":
        from dskc.autotune.gpu import GpuTimer
        return GpuTimer.create(routing=routing)
    raise ValueError(f"unknown timing {mode!r}; expected 'model' or 'gpu'")


def resolve_routing(spec: str | None, problem: dict) -> dict | None:
    """{"ids": [[...]], "signature": str} for "gate:<model>" (the model's gate on seeded sample inputs) or
    "recorded:<path>" (top-k ids from a real run); None for None."""
    if spec is None:
        return None
    import torch
    from dskc.autotune import routing
    kind, _, arg = spec.partition(":")
    if kind == "recorded":
        ids = routing.recorded_topk(arg)
        n_experts = int(problem.get("E", int(ids.max()) + 1))
    elif kind == "gate":
        from dskc.model import get_config
        args = get_config(arg)
        tokens = int(problem.get("T", max(1, int(problem.get("M", 1)) // args.n_activated_experts)))
        hidden = torch.randn(tokens, args.dim, generator=torch.Generator().manual_seed(0))
        ids, n_experts = routing.gate_topk(args, hidden), args.n_routed_experts
    else:
        raise ValueError(f"routing {spec!r}: expected 'gate:<model>' or 'recorded:<path>'")
    return {"ids": ids.tolist(), "signature": routing.signature(ids, n_experts, kind)}


def make_key(task: Task, timer) -> StudyKey:
    space = load_space(task.stem)
    arch = parse(task.arch)
    prob = check_problem(space, task.problem)
    default = seeds_mod.default_config(space, arch, prob)
    specs = space.module.compile_specs(prob, default)
    dtype = next((t.lstrip("*") for _, t in specs[0].signature if t.startswith("*")), "none") if specs else "none"
    tools = toolchain() + (("cuda", _cuda_version()),)
    extras = tuple(tuple(x) for x in task.extras)
    if task.routing is not None:
        extras += (("routing", resolve_routing(task.routing, prob)["signature"]),)
    return StudyKey(space.stem, arch.name, dtype, tuple(bucket(space, prob).items()), tools, timer.mode,
                    space.template_hash(), extras)


def _cuda_version() -> str:
    import torch
    return torch.version.cuda or "none"


def make_sampler(name: str, seed: int | None):
    if name == "tpe":   # 4 startup trials, not 8: 19.4 vs 24+ distinct configs to reach 2 % (bench_search.py)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=4)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


def _load(task: Task, create: bool):
    """(study, key, timer, created): `create` makes the study when it does not exist yet (created=True then)."""
    timer = make_timer(task.timing, resolve_routing(task.routing, task.problem) if task.timing == "gpu" else None)
    key = make_key(task, timer)
    storage = open_storage(task.storage)
    sampler = make_sampler(task.sampler, task.seed)
    created = False
    if create:
        try:
            study = optuna.create_study(storage=storage, sampler=sampler, study_name=key.study_name,
                                        direction="minimize")
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    if not created:
        study = optuna.load_study(storage=storage, sampler=sampler, study_name=key.study_name)
    return study, key, timer, created


def prepare(task: Task) -> tuple[optuna.Study, StudyKey]:
    """Create (or load) the task's study, record its key and problem, enqueue its plan. Coordinator only.

    Checked before the database is touched: the stem, arch, problem, sampler, and that some config is feasible.
    A study planned for fewer trials is extended to task.n_trials (do that from one machine: two coordinators
    extending one study at once would both add the missing slots).
    """
    space = load_space(task.stem)
    make_sampler(task.sampler, task.seed)
    key = make_key(task, make_timer(task.timing))
    bucketed = dict(key.bucket)
    seeds = seeds_mod.seed_configs(space, key.arch, bucketed, list(task.imported_seeds))
    if not seeds or not feasible_configs(space, bucketed):
        raise ValueError(f"{space.stem}: no config of the space meets its constraints for {bucketed}; nothing to tune")
    study, key, timer, created = _load(task, create=True)
    if created:
        study.set_user_attr("key", dataclasses.asdict(key))
        study.set_user_attr("problem", bucketed)
        study.set_user_attr("buckets", bucket_kinds(space))
        study.set_user_attr("gpu", getattr(timer, "gpu_name", "none (model)"))
        planned = 0
    else:
        planned = _wait_for_plan(study)
    if task.n_trials > planned:
        _enqueue_plan(study, task, space, bucketed, seeds, planned)
        study.set_user_attr("planned", task.n_trials)   # last: the plan is complete once this is set
    return study, key


def _wait_for_plan(study: optuna.Study) -> int:
    """The study's planned trial count, once its creator (maybe on another machine) has written it."""
    deadline = time.monotonic() + PLAN_WAIT_S
    while "planned" not in study.user_attrs:
        trials = study.get_trials(deepcopy=False)
        if any(slots.SLOT not in t.user_attrs for t in trials):   # made by a dskc from before plans: as it is
            return len(trials)
        if time.monotonic() > deadline:
            raise RuntimeError(f"study {study.study_name} has no plan {PLAN_WAIT_S} s after it was created: its "
                               "coordinator died while planning; delete the study (optuna delete-study) and rerun")
        time.sleep(0.5)
    return int(study.user_attrs["planned"])


def _enqueue_plan(study, task: Task, space, problem: dict, seeds: list, start: int) -> None:
    """Enqueue slots start..n_trials-1: the seeds not yet planned first, then configs drawn up front (PLANNED
    samplers; fewer slots when the feasible space runs out) or empty slots the sampler fills later."""
    items = list(seeds[start:])
    wanted = task.n_trials - start
    if task.sampler in PLANNED:
        taken = [p for _, p in seeds] + [t.system_attrs.get("fixed_params", t.params)
                                         for t in study.get_trials(deepcopy=False)]
        items += [(None, p) for p in draw_plan(space, problem, task.sampler, task.seed, wanted - len(items), taken)]
        if len(items) < wanted:
            log.warning("%s: the space holds only %d more feasible configs; planned %d trials, not %d",
                        space.stem, len(items), start + len(items), task.n_trials)
    else:
        items += [(None, {})] * (wanted - len(items))
    for slot, (label, params) in enumerate(items[:wanted], start):
        attrs = {slots.SLOT: slot, **({"seed": label} if label else {})}
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)


def draw_plan(space, problem: dict, sampler: str, seed: int | None, count: int, taken: list) -> list[dict]:
    """Up to `count` distinct params drawn by `sampler` (in memory) that meet the constraints and are not in
    `taken`; the same (sampler, seed, taken) gives the same list. Fewer when the feasible space runs out."""
    memory = optuna.create_study(sampler=make_sampler(sampler, seed))
    out, seen = [], [dict(p) for p in taken]
    for _ in range(50 * max(count, 0)):
        if len(out) >= count:
            break
        trial = memory.ask()
        config = suggest(trial, space)
        memory.tell(trial, 0.0)
        if violated(space, config, problem) is None and trial.params not in seen:
            seen.append(dict(trial.params))
            out.append(dict(trial.params))
    return out


def finished(study: optuna.Study) -> int:
    """Planned trials that finished (a dead worker's attempt, superseded by its retry, does not count)."""
    return slots.finished(study)


def work(task: Task) -> int:
    """Drain the study's planned trials (with any other workers on it). Returns the trials this call finished."""
    study, key, timer, _ = _load(task, create=False)
    space = load_space(task.stem)
    problem = dict(key.bucket)
    default = seeds_mod.default_config(space, key.arch, problem)
    objective = Objective(space, problem, key.arch, timer, default_tensor_cores(space, problem, key.arch, default))
    return slots.Worker(study, task.heartbeat_s, task.grace_s, failures=(TrialFailed,)).drain(objective)


def run(task: Task) -> optuna.Study:
    """prepare + work in this process (one worker)."""
    prepare(task)
    work(task)
    return _load(task, create=False)[0]
