"""Search efficiency of the autotuner: trials the Optuna search needs to come within 2 % of the exhaustive optimum
of a fixed table of candidate times, against random search, averaged over seeds.

The table (autotune/fixtures/search_*.json) holds the roofline MODEL's value of every constraint-feasible config of
a real stem's (sub)space, computed once from cross-compiled kernels by `python -m dskc.autotune.table`; configs
the compiler prunes (spills, shared memory, lost tensor cores) have no value. Trials here are pure table lookups,
run through the same encoding, seeding (the per-arch default first) and pruning as a real study.

    .venv/bin/python bench/bench_search.py          # prints the numbers
Goal: under 10 % of the exhaustive count.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import optuna

from dskc.autotune.space import TuneSpace, encode, suggest
from dskc.autotune.study import make_sampler

FIXTURES = Path(__file__).resolve().parent.parent / "autotune" / "fixtures"
SEEDS = tuple(range(16))
WITHIN = 1.02


def load_table(path: Path) -> dict:
    table = json.loads(Path(path).read_text())
    values = [r["value"] for r in table["rows"] if r["value"] is not None]
    if not values:
        raise ValueError(f"{path}: no feasible row")
    table["optimum"] = min(values)
    return table


def _table_space(table: dict) -> TuneSpace:
    """The searched space as the fixture recorded it (so later edits of the live stem do not change the bench)."""
    params = tuple((n, tuple(v)) for n, v in table["space"])
    return TuneSpace(table["stem"], None, params, (), {})


def trials_to_target(table: dict, sampler_name: str, seed: int) -> tuple[int, int]:
    """(trials, distinct configs looked up) until a value is within 2 % of the optimum; cap: 2x the table.

    Distinct configs are the cost that matters: a repeated suggestion is answered from the study without building
    or timing anything (objective.py), and a constraint-breaking one is pruned before the compiler runs.
    """
    space = _table_space(table)
    lookup = {json.dumps(r["config"], sort_keys=True): r["value"] for r in table["rows"]}
    target, cap = table["optimum"] * WITHIN, 2 * len(table["rows"])
    study = optuna.create_study(sampler=make_sampler(sampler_name, seed), direction="minimize")
    study.enqueue_trial(encode(space, table["default"]))      # the per-arch default competes first, as in a study
    seen = set()

    def objective(trial):
        key = json.dumps(suggest(trial, space), sort_keys=True)
        if key in lookup:
            seen.add(key)
        value = lookup.get(key)
        if value is None:             # constraint-breaking (absent) or compiler-pruned (null)
            raise optuna.TrialPruned()
        return value
    for n in range(1, cap + 1):
        study.optimize(objective, n_trials=1)
        last = study.trials[-1]
        if last.value is not None and last.value <= target:
            return n, len(seen)
    return cap, len(seen)


def measure(path: Path, seeds=SEEDS) -> dict:
    table = load_table(path)
    out = {"table": path.name, "exhaustive": len(table["rows"]),
           "feasible": sum(r["value"] is not None for r in table["rows"])}
    for name in ("tpe", "random"):
        runs = [trials_to_target(table, name, s) for s in seeds]
        evals = [e for _, e in runs]
        out[name] = {"trials": statistics.mean(t for t, _ in runs), "evaluated": statistics.mean(evals),
                     "max_evaluated": max(evals), "runs": evals,
                     "fraction": statistics.mean(evals) / len(table["rows"])}
    return out


def fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("search_*.json"))


def test_search_efficiency():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    found = fixtures()
    assert found, f"no search table under {FIXTURES}"
    for path in found:
        res = measure(path, seeds=SEEDS[:4])
        print(json.dumps(res))
        assert 1 <= res["tpe"]["evaluated"] <= res["exhaustive"]
        assert res["tpe"]["evaluated"] < res["random"]["evaluated"] * 1.25   # guided search no worse than random


def main() -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for path in fixtures():
        res = measure(path)
        print(f"{res['table']}: exhaustive {res['exhaustive']} configs ({res['feasible']} feasible after compile)")
        for name in ("tpe", "random"):
            r = res[name]
            print(f"  {name:6s}: {r['evaluated']:6.1f} configs evaluated on average (max {r['max_evaluated']}) = "
                  f"{100 * r['fraction']:.1f} % of exhaustive; {r['trials']:.1f} trials incl. repeats; runs {r['runs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
