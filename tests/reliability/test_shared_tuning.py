"""Shared tuning survives a dead machine: two `dskc tune` workers as separate processes with separate build caches
(two "machines") on one study; one is SIGKILLed in the middle of a trial; the survivor and a restarted worker finish
it. On SQLite, Optuna's journal file (NFS-safe) and a real PostgreSQL server: every planned trial completes
exactly once, the killed one is FAIL and its config ran again once, and the exported JSON equals the one of an
undisturbed single-worker run with the same seed.

The objective is the roofline MODEL (no GPU), the sampler "random" (its plan is drawn up front from the seed, so
the same seed gives the same trials however workers are scheduled; an adaptive sampler's trials depend on timing
even without a failure).
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import probe_stem
from dskc import knobs
from dskc.autotune import Task, export, open_storage, prepare, run
from dskc.autotune.slots import BEAT, SLOT, WORKER, live

PROBLEM = {"M": 77, "N": 190, "K": 128}
PLANNED = 6                 # 2 seeds (default, known_good) + 4 configs drawn from the seed
States = optuna.trial.TrialState


def _task(url: str) -> Task:
    return Task("probe_stem", PROBLEM, "sm90a", url, sampler="random", seed=11, n_trials=PLANNED,
                heartbeat_s=1, grace_s=6)


def _export(url: str, root) -> dict:
    (path,) = export(open_storage(url), "sm90a", root=root)
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed run: one worker, in this process, its own build cache. Returns its export."""
    tmp = tmp_path_factory.mktemp("reference")
    task = _task(str(tmp / "ref.db"))
    with knobs.scope(cache_dir=tmp / "cache"):
        run(task)
    trials = optuna.load_study(study_name=prepare(task)[1].study_name, storage=open_storage(task.storage)).trials
    assert len(trials) == PLANNED and all(t.state in (States.COMPLETE, States.PRUNED) for t in trials)
    return _export(task.storage, tmp / "configs")


def _spawn(task: Task, env: dict, cache) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dskc.autotune.worker", task.to_json()],
                            env={**env, "DSKC_CACHE_DIR": str(cache)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _running_in(study, proc):
    """A trial `proc` is in the middle of: taken, every parameter suggested, heartbeating."""
    for t in study.get_trials(states=(States.RUNNING,)):
        if t.system_attrs.get(WORKER, "").endswith(f":{proc.pid}") and len(t.params) == 5 and BEAT in t.system_attrs:
            return t
    return None


def _kill_mid_trial(study, proc, limit_s=120):
    deadline = time.monotonic() + limit_s
    while (trial := _running_in(study, proc)) is None:
        assert proc.poll() is None, f"worker exited before it was killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the worker never got into a trial"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return trial


def _storage_url(kind, tmp_path, request) -> str:
    if kind == "sqlite":
        return str(tmp_path / "shared.db")
    if kind == "journal":
        return f"journal:{tmp_path / 'shared.log'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_a_killed_machine_loses_and_duplicates_nothing(kind, tmp_path, request, worker_env, reference):
    url = _storage_url(kind, tmp_path, request)
    task = _task(url)
    study, key = prepare(task)                                        # the coordinator plans the study
    slow = {**worker_env, "PROBE_STEM_DELAY_S": "1.0"}               # machine A's trials last >= 1 s
    a = _spawn(task, slow, tmp_path / "machine-a")
    b = _spawn(task, worker_env, tmp_path / "machine-b")
    killed = _kill_mid_trial(study, a)
    a2 = _spawn(task, worker_env, tmp_path / "machine-a")            # machine A's worker, restarted
    for p in (b, a2):
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]

    trials = optuna.load_study(study_name=key.study_name, storage=open_storage(url)).get_trials()
    print(f"{kind}: {len(trials)} trials, killed #{killed.number}, states "
          f"{sorted((t.number, t.state.name) for t in trials)}")
    assert [t.number for t in trials] == list(range(PLANNED + 1))    # the plan plus one retry, nothing more
    assert trials[killed.number].state == States.FAIL
    retries = [t for t in trials if t.system_attrs.get("retry_history")]
    assert len(retries) == 1 and retries[0].system_attrs["retry_history"] == [killed.number]
    assert retries[0].params == killed.params and retries[0].user_attrs[SLOT] == killed.user_attrs[SLOT]
    current = live(trials)
    assert sorted(t.user_attrs[SLOT] for t in current) == list(range(PLANNED))   # each planned trial once
    assert all(t.state in (States.COMPLETE, States.PRUNED) for t in current)
    workers = {t.system_attrs[WORKER] for t in trials}
    assert len(workers) >= 2, workers         # A (killed) and B took trials; the restarted A' may find none left
    for cache in ("machine-a", "machine-b"):                          # and built them in their own caches
        assert any((tmp_path / cache / "triton").iterdir())
    assert _export(url, tmp_path / "configs") == reference


def test_a_full_disk_stops_the_worker_and_its_trial_runs_again(tmp_path, monkeypatch):
    """The build cache cannot take a write (ENOSPC) in the middle of a study: the worker stops with the cache's
    clear error and gives its trial back (FAIL, config enqueued again): the config is not recorded as failed.
    With space again, the next worker finishes the plan."""
    from dskc.build import cache, triton_xc
    from dskc.autotune import results, work
    from dskc.autotune.seeds import default_config
    from dskc.autotune.space import load_space

    task = Task("probe_stem", PROBLEM, "sm90a", str(tmp_path / "t.db"), sampler="random", seed=11, n_trials=3,
                heartbeat_s=1, grace_s=3)
    root = tmp_path / "cache"
    real_write = Path.write_bytes

    def full(self, data):
        if root in self.parents:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)
    with knobs.scope(cache_dir=root):
        study, key = prepare(task)
        default = default_config(load_space("probe_stem"), "sm90a")
        triton_xc.compile_kernels(probe_stem.compile_specs(PROBLEM, default), "sm90a")   # slot 0 (default) is warm
        monkeypatch.setattr(Path, "write_bytes", full)
        with pytest.raises(cache.CacheError, match="the disk is full"):
            work(task)
        trials = study.get_trials()
        assert [t.state for t in trials] == [States.COMPLETE, States.FAIL, States.WAITING, States.WAITING]
        assert trials[3].system_attrs["retry_history"] == [1] and trials[3].params == trials[1].params
        monkeypatch.setattr(Path, "write_bytes", real_write)
        work(task)
    trials = study.get_trials()
    assert sorted(t.user_attrs[SLOT] for t in live(trials)) == [0, 1, 2]
    assert all(t.state in (States.COMPLETE, States.PRUNED) for t in live(trials))
    (res,) = results(open_storage(task.storage))
    assert "FAIL" not in res.counts and sum(res.counts.values()) == 3
