"""Several processes on one SQLite storage: two workers share one study (a killed worker, on SQLite, a journal file
and PostgreSQL: tests/reliability/test_shared_tuning.py), enqueued trials are popped once, a dead worker's trial
is taken over."""
import subprocess
import time

import optuna
import pytest

from dskc.autotune import Task, open_storage, prepare, slots
from dskc.autotune.slots import SLOT, WORKER
from dskc.autotune.study import finished

PROBLEM = {"M": 77, "N": 190, "K": 128}
States = optuna.trial.TrialState


def _task(tmp_path, n):
    return Task("probe_stem", PROBLEM, "sm90a", str(tmp_path / "w.db"), n_trials=n, seed=1, heartbeat_s=1, grace_s=3)


def _spawn(python, task, env):
    return subprocess.Popen([python, "-m", "dskc.autotune.worker", task.to_json()], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_one_study_without_losing_or_duplicating(tmp_path, python, worker_env):
    """TPE (adaptive: each empty slot is filled when a worker takes it): exactly the planned trials, none twice."""
    task = _task(tmp_path, 12)
    study, key = prepare(task)
    procs = [_spawn(python, task, worker_env) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name=key.study_name, storage=open_storage(task.storage)).get_trials()
    assert [t.number for t in trials] == list(range(12))            # no worker ran past the plan
    assert sorted(t.user_attrs[SLOT] for t in trials) == list(range(12))
    assert all(t.state in (States.COMPLETE, States.PRUNED) for t in trials)
    assert len({t.system_attrs[WORKER] for t in trials}) == 2       # both took trials
    seeds = [t for t in trials if "seed" in t.user_attrs]
    assert [t.user_attrs["seed"] for t in seeds].count("default") == 1   # seeds ran once, not once per worker
    assert finished(study) == 12


def test_a_silent_trial_is_taken_over_once(tmp_path):
    """A RUNNING trial whose heartbeat stands still for grace_s: one of two reapers FAILs it and re-enqueues its
    config once (the other sees it finished); a beating trial is left alone; a second death leaves it FAIL."""
    storage = open_storage(str(tmp_path / "r.db"))
    study = optuna.create_study(study_name="reap", storage=storage)
    study.enqueue_trial({"x": 3}, user_attrs={SLOT: 0})
    study.enqueue_trial({"x": 4}, user_attrs={SLOT: 1})
    dead, alive = slots.Worker(study, 1, 3), slots.Worker(study, 1, 3)
    t_dead, t_alive = dead.pop(), alive.pop()
    for tid in (t_dead, t_alive):
        optuna.Trial(study, tid).suggest_int("x", 0, 10)
    reapers = [slots.Worker(study, 1, 3), slots.Worker(study, 1, 3)]
    with slots.heartbeat(storage, t_alive, 1):
        assert [r.reap() for r in reapers] == [[], []]               # first look: nothing is stale yet
        time.sleep(3.2)
        assert [r.reap() for r in reapers] == [[0], []]              # one reaper wins; the beating trial stays
    trials = study.get_trials()
    assert [t.state for t in trials] == [States.FAIL, States.RUNNING, States.WAITING]
    assert trials[2].params == {"x": 3} and trials[2].user_attrs[SLOT] == 0
    assert trials[2].system_attrs["retry_history"] == [0]
    assert slots.live(trials) == trials[1:]
    retry_id = reapers[0].pop()
    assert retry_id == trials[2]._trial_id and reapers[1].pop() is None
    assert slots.fail_if_running(storage, retry_id) and not slots.fail_if_running(storage, retry_id)
    assert not slots.retry(study, storage.get_trial(retry_id))      # died twice: left FAIL, no third attempt


_RACE_WORKER = """
import sys, warnings, optuna
warnings.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
from dskc.autotune import open_storage
study = optuna.load_study(study_name="race", storage=open_storage(sys.argv[1]))
study.optimize(lambda t: t.suggest_int("x", 0, 10**6), n_trials=30)
"""


def test_enqueued_trials_are_popped_once_under_contention(tmp_path, python, worker_env):
    """Three processes racing through 90 enqueued trials with an instant objective. Before writes were serialised
    (BEGIN IMMEDIATE) two workers could pop the same enqueued trial and one crashed telling it (optuna#4621):
    reproduced on the first try with this test."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for x in range(90):
        study.enqueue_trial({"x": x})
    procs = [subprocess.Popen([python, "-c", _RACE_WORKER, url], env=worker_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    trials = study.get_trials()
    assert len(trials) == 90 and all(t.state == States.COMPLETE for t in trials)
    assert sorted(t.params["x"] for t in trials) == list(range(90))


def test_a_worker_declared_dead_while_it_ran_records_nothing(tmp_path, caplog):
    """A worker that stalled past grace_s was declared dead (FAIL, config re-enqueued): its late result is dropped
    with a warning, so the slot gets exactly one result (the retry's)."""
    study = optuna.create_study(study_name="late", storage=open_storage(str(tmp_path / "l.db")))
    study.enqueue_trial({"x": 1}, user_attrs={SLOT: 0})
    worker = slots.Worker(study, 1, 3)
    tid = worker.pop()

    def objective(trial):
        x = trial.suggest_int("x", 0, 9)
        assert slots.fail_if_running(study._storage, tid)            # meanwhile a reaper gave up on us
        slots.retry(study, study._storage.get_trial(tid))
        return float(x)
    with caplog.at_level("WARNING", logger="dskc.autotune"):
        assert worker.run(tid, objective) == 0
    assert "declared dead" in caplog.text
    assert worker.drain(lambda t: float(t.suggest_int("x", 0, 9))) == 1
    trials = study.get_trials()
    assert [t.state for t in trials] == [States.FAIL, States.COMPLETE] and trials[1].value == 1.0


def test_coordinators_starting_one_study_at_once_plan_it_once(tmp_path, monkeypatch):
    """Two machines run `dskc tune` on one study at the same moment: the one that creates the study plans it, the
    other waits for the plan and adds nothing. A plan that never comes (its coordinator died) is a clear error."""
    import threading

    from dskc.autotune import study as study_mod
    task = _task(tmp_path, 6)
    barrier, out = threading.Barrier(2), []

    def coordinator():
        barrier.wait()
        out.append(prepare(task)[0])
    threads = [threading.Thread(target=coordinator) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    trials = out[0].get_trials()
    assert len(out) == 2 and sorted(t.user_attrs[SLOT] for t in trials) == list(range(6))
    assert prepare(task)[0].user_attrs["planned"] == 6 and len(out[0].get_trials()) == 6   # a rerun adds nothing
    bigger = Task(**{**task.__dict__, "n_trials": 8})
    assert len(prepare(bigger)[0].get_trials()) == 8                  # a resume with more trials extends the plan

    orphan = Task(**{**task.__dict__, "storage": str(tmp_path / "o.db")})
    optuna.create_study(study_name=study_mod.make_key(orphan, study_mod.make_timer("model")).study_name,
                        storage=open_storage(orphan.storage))          # created, never planned
    monkeypatch.setattr(study_mod, "PLAN_WAIT_S", 0.5)
    with pytest.raises(RuntimeError, match="coordinator died while planning"):
        prepare(orphan)


def test_a_study_from_before_plans_is_extended_not_waited_for(tmp_path):
    """A study an older dskc made (trials without a slot, no plan) counts its trials as planned."""
    from dskc.autotune import study as study_mod
    task = _task(tmp_path, 4)
    name = study_mod.make_key(task, study_mod.make_timer("model")).study_name
    old = optuna.create_study(study_name=name, storage=open_storage(task.storage))
    old.enqueue_trial({"BLOCK_M": 1, "BLOCK_N": 0, "BLOCK_K": 0, "num_warps": 0, "num_stages": 0})
    study, _ = prepare(task)
    trials = study.get_trials()
    assert len(trials) == 4 and SLOT not in trials[0].user_attrs
    assert [t.user_attrs[SLOT] for t in trials[1:]] == [1, 2, 3]
