"""Several processes on one SQLite storage: a killed worker's session resumes, two workers share one study."""
import signal
import subprocess
import time

import optuna
import pytest

from dskc.autotune import Task, open_storage, prepare, work
from dskc.autotune.study import finished

PROBLEM = {"M": 77, "N": 190, "K": 128}
States = optuna.trial.TrialState


def _task(tmp_path, n):
    return Task("probe_stem", PROBLEM, "sm90a", str(tmp_path / "w.db"), n_trials=n, seed=1, heartbeat_s=1, grace_s=2)


def _spawn(python, task, env):
    return subprocess.Popen([python, "-m", "dskc.autotune.worker", task.to_json()], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _has_heartbeat(study, trial_id) -> bool:
    """Optuna only fails a stale RUNNING trial that has a heartbeat row; a worker killed before its heartbeat
    thread first wrote one (a window that grows on a loaded machine) leaves the trial RUNNING for good."""
    engine = getattr(study._storage, "_backend", study._storage).engine
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT 1 FROM trial_heartbeats WHERE trial_id = ?", (trial_id,)).first() \
            is not None


def _wait_for(study, count, proc, limit_s=90, running=False):
    deadline = time.monotonic() + limit_s
    def in_trial():  # a trial past its suggestions and heartbeating: the worker sits in the (slow) build step
        return any(len(t.params) == 5 and _has_heartbeat(study, t._trial_id)
                   for t in study.get_trials(states=(States.RUNNING,)))
    while finished(study) < count or (running and not in_trial()):
        assert proc.poll() is None, f"worker exited early: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.02)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_killed_worker_resumes_and_trial_count_continues(tmp_path, python, worker_env):
    task = _task(tmp_path, 10)
    study, key = prepare(task)
    proc = _spawn(python, task, {**worker_env, "PROBE_STEM_DELAY_S": "0.5"})
    _wait_for(study, 3, proc, running=True)
    proc.send_signal(signal.SIGKILL)          # mid-trial: each trial of this worker lasts >= 0.5 s
    proc.wait()
    cut = study.get_trials()
    before = {t.number: (t.state, t.value) for t in cut if t.state in (States.COMPLETE, States.PRUNED)}
    killed = [t.number for t in cut if t.state == States.RUNNING]
    assert 3 <= len(before) < 10 and len(killed) == 1
    time.sleep(task.grace_s + 0.5)            # let the dead worker's heartbeat go stale
    work(task)                                # the resumed session (here: in this process)
    trials = optuna.load_study(study_name=key.study_name, storage=open_storage(task.storage)).get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert finished(study) >= 10 and not [t for t in trials if t.state == States.RUNNING]
    for t in trials:                          # nothing finished before the kill was lost or changed
        if t.number in before:
            assert (t.state, t.value) == before[t.number]
    assert trials[killed[0]].state == States.FAIL
    retried = [optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) for t in trials]
    assert retried.count(killed[0]) == 1      # its config was enqueued again and ran
    assert trials[retried.index(killed[0])].params == trials[killed[0]].params


def test_two_workers_share_one_study_without_losing_or_duplicating(tmp_path, python, worker_env):
    task = _task(tmp_path, 16)
    study, key = prepare(task)
    procs = [_spawn(python, task, worker_env) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name=key.study_name, storage=open_storage(task.storage)).get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert 16 <= len(trials) <= 17                                   # each worker may finish one in flight
    assert all(t.state in (States.COMPLETE, States.PRUNED) for t in trials)
    assert len({t._trial_id for t in trials}) == len(trials)
    seeds = [t for t in trials if "seed" in t.user_attrs]
    assert [t.user_attrs["seed"] for t in seeds].count("default") == 1   # seeds ran once, not once per worker


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
