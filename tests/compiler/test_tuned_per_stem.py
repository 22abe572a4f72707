"""Per stem: a model-mode export (the study and export code `dskc tune` runs) changes the config the compiled tiny
model launches; the same export recorded under another Triton is stale and ignored with one log line.

The export holds one finished trial whose config is a feasible neighbour of the planned default (one parameter
changed) for the problem the compiled model poses at 4 tokens (what `dskc tune --model tiny --tokens 4` would tune);
the trial's score is set, not measured: what is under test is that an export reaches the launch.
"""
import json
import logging

import optuna
import pytest

from dskc import compiler, knobs
from dskc.autotune import Task, export
from dskc.autotune import study as study_mod
from dskc.autotune.space import bucket_kinds, encode, load_space, suggest
from dskc.model import Transformer, get_config, init_random
from dskc.ops import _config as ops_config
from dskc.templates import registry

from _launches import record, steps

STEMS = ["act_quant", "fp8_gemm_1d2d", "bf16_gemm", "grouped_gemm", "moe_route", "moe_permute", "mla_decode",
         "mla_rope"]
TOKENS = (4,)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    model = Transformer(cfg)
    init_random(model, seed=0)
    return cfg, model, compiler.plan(model, "sm90a", runs_on="cpu", tokens=TOKENS)


def _neighbour(stem: str, problem: dict, config: dict) -> dict:
    """A feasible config differing from `config` in one parameter (warps / stages first)."""
    mod = registry.get(stem)
    order = sorted(mod.SPACE, key=lambda k: (k not in ("num_stages", "num_warps"), k))
    for name in order:
        for value in mod.SPACE[name]:
            cand = {**config, name: value}
            if value != config[name] and registry.satisfies(mod, cand, problem):
                return cand
    raise AssertionError(f"no neighbour of {config} for {stem}")


def _export(stem: str, problem: dict, config: dict, root, toolchain: dict | None = None):
    """Write <root>/configs/sm90a/<stem>.json as `dskc tune --export` does, from a model-mode study with one
    finished trial of `config`."""
    storage = f"sqlite:///{root / 'optuna.db'}"
    task = Task(stem, problem, "sm90a", storage, n_trials=1, seed=0)
    study, key, timer, _ = study_mod._load(task, create=True)
    space = load_space(stem)
    study.set_user_attr("key", {**__import__("dataclasses").asdict(key),
                                **({"toolchain": tuple(toolchain.items())} if toolchain else {})})
    study.set_user_attr("problem", dict(key.bucket))
    study.set_user_attr("buckets", bucket_kinds(space))
    study.enqueue_trial(encode(space, config))

    def objective(trial):
        trial.set_user_attr("config", suggest(trial, space))
        trial.set_user_attr("timing_mode", timer.mode)
        return 1e-6

    study.optimize(objective, n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    return export(storage, "sm90a", [stem], root / "configs")


def _launched(model, cfg, tuned_dir):
    """(plan, {stem: {config items}}) the compiled model launched during a 1 x 4 prefill."""
    ops_config.clear()
    with knobs.scope(tuned_dir=tuned_dir):
        compiled = compiler.compile(model, "sm90a", build_kernels=False, progress=False, tokens=TOKENS)
        with record() as rec:
            steps(compiled, [(1, 4)], cfg.vocab_size)
    out = {}
    for _, _, _, stem, config in rec.lookups:
        out.setdefault(stem, set()).add(config)
    return compiled.plan, out


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Every stem's export in one tuned folder (and their stale twins in another): one compile and run each."""
    cfg, model, plan = tiny
    root, stale = tmp_path_factory.mktemp("tuned"), tmp_path_factory.mktemp("stale")
    wanted = {}
    for stem in STEMS:
        slot = "prefill" if stem == "mla_decode" else None   # a 4-token prompt runs MLA's prefill slot
        c = next(c for c in plan.choices if c.stem == stem and (slot is None or c.slot == slot))
        problem, default = dict(c.problem), dict(c.config)
        mine = _neighbour(stem, problem, default)
        paths = _export(stem, problem, mine, root)
        _export(stem, problem, mine, stale, toolchain={"triton": "0.0.1"})
        wanted[stem] = (default, mine, paths)
    logger = logging.getLogger("dskc.select")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    logger.addHandler(handler)
    try:
        tuned = _launched(model, cfg, root / "configs")
        stale_run = _launched(model, cfg, stale / "configs")
    finally:
        logger.removeHandler(handler)
    return wanted, tuned, stale_run, seen


@pytest.mark.parametrize("stem", STEMS)
def test_an_export_changes_the_launched_config(runs, stem):
    wanted, (tuned_plan, launched), (_, stale_launched), logged = runs
    default, mine, paths = wanted[stem]
    assert [p.name for p in paths] == [f"{stem}.json"]
    assert json.loads(paths[0].read_text())["entries"]     # the file `dskc tune --export` writes
    assert tuple(sorted(mine.items())) in launched[stem], (mine, launched[stem])
    assert any(x.source.startswith("tuned:") for x in tuned_plan.choices if x.stem == stem)
    # the same export under another Triton: stale, ignored with one log line, the default launches again
    assert tuple(sorted(default.items())) in stale_launched[stem]
    assert tuple(sorted(mine.items())) not in stale_launched[stem]
    lines = [m for m in logged if "ignored: tuned with triton 0.0.1" in m and f"/{stem}.json" in m]
    assert len(lines) == len(set(lines)) >= 1
