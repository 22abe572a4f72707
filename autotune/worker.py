"""A tuning worker process: `python -m dskc.autotune.worker '<Task JSON>'` runs trials of the task's study until
it holds task.n_trials finished trials. Several workers on one storage cooperate (the coordinator prepares the
study and enqueues the seeds first)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    import optuna

    from dskc.autotune.study import Task, work

    optuna.logging.set_verbosity(optuna.logging.WARNING)   # the coordinator draws the progress bar on stderr

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dskc.autotune.worker '<Task JSON>'", file=sys.stderr)
        return 2
    work(Task.from_json(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
