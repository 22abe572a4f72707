"""A tuning worker process: `python -m dskc.autotune.worker '<Task JSON>'` runs the planned trials of the task's
study until none is left (slots.Worker.drain). Several workers on one storage, on one machine or several,
cooperate; the coordinator (`dskc tune`, study.prepare) plans the study first."""
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
