"""The autotuner end to end on the CPU with the MODEL objective: seeds, compile-time pruning, export, lookup."""
import json
import logging

import optuna
import pytest

import probe_stem
from dskc.autotune import Task, export, open_storage, prepare, results, run
from dskc.autotune.space import bucket, decode, encode, feasible_configs, load_space, violated
from dskc.autotune.storage import StorageError
from dskc.select import tuned

PROBLEM = {"M": 200, "N": 300, "K": 256}


def _task(tmp_path, **kw):
    base = dict(stem="probe_stem", problem=PROBLEM, arch="sm90a", storage=str(tmp_path / "t.db"), n_trials=14,
                seed=0, imported_seeds=(probe_stem.SPILLING,))
    base.update(kw)
    return Task(**base)


def test_space_buckets_and_encoding():
    space = load_space("probe_stem")
    assert bucket(space, PROBLEM) == {"M": 256, "N": 300, "K": 256}
    assert bucket(space, {"M": 1, "N": 7, "K": 3}) == {"M": 1, "N": 7, "K": 3}
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    assert decode(space, encode(space, cfg)) == cfg
    assert encode(space, cfg)["BLOCK_M"] == 2      # ordinal: suggested by index
    assert violated(space, {**cfg, "BLOCK_N": 128}, PROBLEM) == "BLOCK_M * BLOCK_N * BLOCK_K <= 262144"
    assert len(feasible_configs(space, PROBLEM)) == 72 - 4
    with pytest.raises(ValueError, match="lacks"):
        bucket(space, {"M": 3})
    with pytest.raises(ValueError, match="not in the space"):
        encode(space, {**cfg, "BLOCK_M": 48})


def test_study_prunes_at_compile_time_exports_and_compiler_reads(tmp_path, caplog):
    task = _task(tmp_path)
    study, key = prepare(task)
    bad = encode(load_space("probe_stem"), {**probe_stem.SPILLING, "BLOCK_M": 64})   # breaks the constraint
    study.enqueue_trial(bad, user_attrs={"seed": "test-infeasible"})
    study = run(task)
    trials = study.get_trials()
    assert len(trials) == 14 and trials[0].user_attrs["seed"] == "default"
    reasons = [t.user_attrs.get("reason", "") for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    by_constraint = [r for r in reasons if r.startswith("constraint:")]
    by_compiler = [r for r in reasons if r.startswith("spills:")]
    print(f"pruned: {len(by_constraint)} by constraints (not compiled), {len(by_compiler)} by the compiler")
    assert len(by_constraint) >= 1 and len(by_compiler) >= 1
    for t in trials:
        if t.user_attrs.get("reason", "").startswith("constraint:"):
            assert "kernels" not in t.user_attrs       # nothing was compiled for it
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.user_attrs["timing_mode"] == "model" for t in done)
    assert all("not run" in t.user_attrs["verification"] for t in done)
    best = min(done, key=lambda t: t.value)
    (res,) = results(open_storage(task.storage))
    assert res.best_config == best.user_attrs["config"] and res.default_s >= res.best_s > 0

    (path,) = export(open_storage(task.storage), "sm90a", root=tmp_path / "configs")
    assert path == tmp_path / "configs" / "sm90a" / "probe_dot.json"
    doc = json.loads(path.read_text())
    entry = doc["entries"]["M=256,N=300,K=256"]
    assert entry["meta"]["timing_mode"] == "model" and entry["meta"]["toolchain"]["triton"]
    config, source = tuned.lookup("probe_dot", "sm90a", {"M": 130, "N": 300, "K": 256}, root=tmp_path / "configs")
    assert config == best.user_attrs["config"] and source == f"tuned:{path}"
    assert tuned.lookup("probe_dot", "sm90a", {"M": 130, "N": 301, "K": 256}, root=tmp_path / "configs")[0] is None
    assert tuned.lookup("probe_dot", "sm100a", PROBLEM, root=tmp_path / "configs") == \
        (None, f"untuned: no file {tmp_path / 'configs' / 'sm100a' / 'probe_dot.json'}")

    # a stale entry (another Triton) is reported and ignored
    entry["meta"]["toolchain"]["triton"] = "0.0.1"
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="dskc.select"):
        config, source = tuned.lookup("probe_dot", "sm90a", PROBLEM, root=tmp_path / "configs")
    assert config is None and source.startswith("untuned:")
    assert "tuned with triton 0.0.1" in caplog.text

    # a corrupt export file: clear errors from the reader and the exporter; the database keeps every trial
    path.write_text("{not json")
    with pytest.raises(tuned.TunedFileError, match="probe_dot.json"):
        tuned.lookup("probe_dot", "sm90a", PROBLEM, root=tmp_path / "configs")
    with pytest.raises(tuned.TunedFileError, match="cannot be read"):
        export(open_storage(task.storage), "sm90a", root=tmp_path / "configs")
    assert path.read_text() == "{not json"
    assert len(optuna.load_study(study_name=key.study_name, storage=open_storage(task.storage)).trials) == 14


def test_bad_inputs(tmp_path):
    with pytest.raises(KeyError, match="unknown kernel stem 'no_such_kernel'"):
        prepare(_task(tmp_path, stem="no_such_kernel"))
    with pytest.raises(ValueError, match="unknown target arch"):
        prepare(_task(tmp_path, arch="sm61x"))
    with pytest.raises(ValueError, match="no config of the space meets its constraints"):
        prepare(_task(tmp_path, problem={"M": 4, "N": 4, "K": 16}, imported_seeds=()))
    with pytest.raises(StorageError, match="cannot open tuning database"):
        open_storage("nosuchdialect://user@host/db")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot create the folder"):
        open_storage(str(blocker / "sub" / "t.db"))
    with pytest.raises(ValueError, match="unknown sampler"):
        prepare(_task(tmp_path, sampler="annealing"))
