"""A study's planned trials and the workers that drain them: every planned trial completes exactly once, whichever
workers run, die or join.

The coordinator (study.prepare) enqueues one WAITING trial per planned trial ("slot": seeds, then configs drawn
up front for samplers that do not learn from results, else empty slots the sampler fills when a worker takes one).
A worker (`Worker.drain`) takes WAITING trials (atomically: a trial goes WAITING -> RUNNING in one storage
transaction, so one worker gets it) and never creates trials of its own, so a study ends with exactly its planned
trials, however many workers share it.

Liveness, the same on every storage: while a worker runs a trial, a thread bumps a counter in the trial's system
attributes every `heartbeat_s`. Another worker that sees a RUNNING trial's counter unchanged for `grace_s` of its
own clock (no clocks compared across machines) FAILs it (storage.fail_if_running: once, atomically) and enqueues
its config again, once (system_attrs "failed_trial" / "retry_history", as Optuna's RetryFailedTrialCallback
writes them). A worker whose own process is interrupted, or whose environment fails (the build cache unwritable,
the disk full), does the same for its trial before it exits: the config did not fail, the worker did. A retry
supersedes the attempts in its retry_history: `live` trials are one per slot, and results/export count only those.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

import optuna

from dskc.autotune.storage import fail_if_running

log = logging.getLogger("dskc.autotune")
States = optuna.trial.TrialState
SLOT = "slot"            # user attr: the index of the planned trial an attempt serves
BEAT = "dskc:beat"       # system attr: heartbeat counter of a RUNNING trial
WORKER = "dskc:worker"   # system attr: "<host>:<pid>" of the worker that took the trial
FINISHED = (States.COMPLETE, States.PRUNED, States.FAIL)
MAX_RETRY = 1            # a config whose worker died twice counts as FAIL


def live(trials) -> list:
    """The current attempt of every planned trial: all trials but those a retry superseded."""
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if t.number not in superseded]


def finished(study) -> int:
    """Planned trials that finished (COMPLETE, PRUNED, or FAIL not superseded by a retry)."""
    return sum(t.state in FINISHED for t in live(study.get_trials(deepcopy=False)))


def retry(study, trial) -> bool:
    """Enqueue a FAILed trial's config again (WAITING, same slot, params and user attrs) unless it was already
    retried MAX_RETRY times. Returns whether it was enqueued."""
    history = list(trial.system_attrs.get("retry_history", ())) + [trial.number]
    if len(history) > MAX_RETRY:
        log.warning("trial %d failed again after %d retries (its worker died): left FAIL", trial.number, MAX_RETRY)
        return False
    attrs = {k: v for k, v in trial.system_attrs.items() if k not in (BEAT, WORKER)}
    attrs.update(failed_trial=history[0], retry_history=history)
    study.add_trial(optuna.trial.create_trial(state=States.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=trial.user_attrs,
                                              system_attrs=attrs))
    return True


@contextlib.contextmanager
def heartbeat(storage, trial_id: int, every_s: float):
    """Bump the trial's BEAT counter now and every `every_s` until the block ends."""
    stop = threading.Event()

    def beat():
        n = 0
        while True:
            try:
                storage.set_trial_system_attr(trial_id, BEAT, n)
            except optuna.exceptions.UpdateFinishedTrialError:
                return                                    # another worker declared it dead: nothing to keep alive
            except Exception as exc:  # a transient database error must not kill the trial; the next beat retries
                log.warning("heartbeat of trial id %d not recorded: %s", trial_id, exc)
            n += 1
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=beat, name=f"dskc-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Worker:
    """Drains one study's WAITING trials; takes over the trials of workers that died."""

    def __init__(self, study, heartbeat_s: float = 5, grace_s: float = 20, failures: tuple = ()):
        """failures: the exceptions by which the objective says "this config failed" (the trial is FAIL, not
        retried); any other exception is this worker's failure (its trial is given back)."""
        if grace_s <= 2 * heartbeat_s:
            raise ValueError(f"grace_s ({grace_s}) must exceed two heartbeats ({heartbeat_s} s each)")
        self.study, self.heartbeat_s, self.grace_s, self.failures = study, heartbeat_s, grace_s, failures
        self._seen: dict[int, tuple] = {}    # trial id -> (last BEAT seen, monotonic time it was first seen)

    def drain(self, objective) -> int:
        """Run WAITING trials until none is WAITING or RUNNING. Returns how many this worker finished."""
        done, waited = 0, False
        while True:
            self.reap()
            trial_id = self.pop()
            if trial_id is not None:
                done += self.run(trial_id, objective)
                continue
            running = [t.number for t in self.study.get_trials(deepcopy=False, states=(States.RUNNING,))]
            if not running:
                return done
            if not waited:
                log.info("waiting on trials %s of other workers (taken over if silent for %g s)", running,
                         self.grace_s)
                waited = True
            time.sleep(min(1.0, self.heartbeat_s))

    def reap(self) -> list[int]:
        """FAIL and re-enqueue every RUNNING trial whose heartbeat stood still for grace_s. Returns their numbers."""
        now, reaped, running = time.monotonic(), [], set()
        for t in self.study.get_trials(deepcopy=False, states=(States.RUNNING,)):
            running.add(t._trial_id)
            beat = t.system_attrs.get(BEAT)
            seen = self._seen.get(t._trial_id)
            if seen is None or seen[0] != beat:
                self._seen[t._trial_id] = (beat, now)
            elif now - seen[1] >= self.grace_s and fail_if_running(self.study._storage, t._trial_id):
                log.warning("trial %d: no heartbeat for %.0f s (its worker died): FAIL, config enqueued again",
                            t.number, now - seen[1])
                retry(self.study, self.study._storage.get_trial(t._trial_id))
                reaped.append(t.number)
        self._seen = {k: v for k, v in self._seen.items() if k in running}
        return reaped

    def pop(self) -> int | None:
        """Take the first WAITING trial (WAITING -> RUNNING in one transaction); None when none is left."""
        storage = self.study._storage
        for t in self.study.get_trials(deepcopy=False, states=(States.WAITING,)):
            try:
                if storage.set_trial_state_values(t._trial_id, state=States.RUNNING):
                    return t._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    def run(self, trial_id: int, objective) -> int:
        """Run one taken trial and tell its outcome. Returns 1 when this worker's result was recorded, else 0."""
        self.study._storage.set_trial_system_attr(trial_id, WORKER, f"{socket.gethostname()}:{os.getpid()}")
        trial = optuna.Trial(self.study, trial_id)
        with heartbeat(self.study._storage, trial_id, self.heartbeat_s):
            try:
                value, state = objective(trial), States.COMPLETE
            except optuna.TrialPruned:
                value, state = None, States.PRUNED
            except self.failures:
                value, state = None, States.FAIL
            except BaseException as exc:                  # interrupted, or the environment failed: not the config
                self.give_back(trial_id, exc)
                raise
        try:
            frozen = self.study.tell(trial, value, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            frozen = None
        if frozen is None or frozen.state != state:
            log.warning("trial %d was declared dead while it ran; its retry's result counts", trial.number)
            return 0
        return 1

    def give_back(self, trial_id: int, exc: BaseException) -> None:
        """FAIL this worker's own trial and enqueue its config again (the process is going down)."""
        with contextlib.suppress(Exception):
            if fail_if_running(self.study._storage, trial_id):
                frozen = self.study._storage.get_trial(trial_id)
                log.warning("trial %d given back (%s: %s): its config is enqueued again", frozen.number,
                            type(exc).__name__, exc)
                retry(self.study, frozen)
