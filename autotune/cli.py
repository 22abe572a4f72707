"""`dskc tune`: tune kernels for a model and a target, export winners, plot studies.

    dskc tune --model NAME --target ARCH [--kernels a,b] [--trials N] [--workers K] [--storage URL]
              [--timing model|gpu|auto] [--sampler tpe|random|cmaes|gp|qmc] [--tokens 1,64,...]
              [--problem JSON] [--seeds-from vllm.json] [--routing gate:<model>|recorded:<path>]
    dskc tune --export --target ARCH [--kernels ...] [--storage URL] [--out DIR]
    dskc tune --plot DIR --target ARCH [--kernels ...] [--storage URL]
    dskc tune --backends triton,cutlass --target ARCH [--model NAME | --problem JSON] [--kernels ...]
              [--timing model|gpu|auto] [--out DIR]
        times the Triton kernel the compiler would run (exported tuned config, else default) against the CUTLASS
        candidates per shape and writes the decisions to <configs>/<arch>/_backends.json (autotune/backends.py)

Progress goes to stderr; the final table (per study: default vs tuned, speedup, trials) to stdout. Timing "model"
is a roofline ESTIMATE from compiled kernels (no GPU needed) and is labelled so in the table and the export.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dskc.arch import parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dskc tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model config name (dskc.model.get_config): problems from its layer shapes")
    p.add_argument("--target", required=True, help="arch: sm90a, sm100a, sm80, h200, ...")
    p.add_argument("--kernels", help="comma-separated stems (default: every stem the model maps)")
    p.add_argument("--problem", action="append", default=[], help="explicit problem as JSON (repeatable)")
    p.add_argument("--tokens", help="comma-separated token counts for --model (default 1,16,64,256,1024,4096)")
    p.add_argument("--trials", type=int, default=32, help="planned trials per study (total, across resumes and "
                                                          "machines)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the storage")
    p.add_argument("--storage", help="sqlite file, SQLAlchemy URL (postgresql://user@host/db to share a server "
                                     "between machines) or journal:PATH (a journal file on a shared folder, NFS-safe); "
                                     "default: <cache>/autotune/optuna.db")
    p.add_argument("--timing", choices=("model", "gpu", "auto"), default="auto")
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--seeds-from", help="vLLM/SGLang fused-MoE config JSON to seed studies with")
    p.add_argument("--routing", help="MoE routing for GPU timing: gate:<model> (its gate on sample inputs) or "
                                     "recorded:<path> (top-k ids of a real run); part of the study key")
    p.add_argument("--export", action="store_true", help="export winners to autotune/configs/<arch>/<stem>.json")
    p.add_argument("--out", help="export root (default: the package's autotune/configs)")
    p.add_argument("--backends", help="'triton,cutlass': compare the backends per shape and export the decisions")
    p.add_argument("--cutlass-candidates", type=int, default=4, help="CUTLASS configs timed per shape (default 4)")
    p.add_argument("--plot", metavar="DIR", help="write optimisation-history and importance PNGs to DIR")
    return p


def main(argv=None) -> int:
    """Entry point of `dskc tune` (dispatched from dskc.cli). Returns the exit status; errors print one line."""
    args = build_parser().parse_args(argv)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from dskc.autotune.storage import StorageError, normalize_url
    try:
        parse(args.target)
        args.storage = normalize_url(args.storage)
        if args.export:
            return _export(args)
        if args.plot:
            return _plot(args)
        if args.backends:
            return _compare_backends(args)
        return _tune(args)
    except (ValueError, KeyError, StorageError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dskc tune: error: {msg}", file=sys.stderr)
        return 2


def _timing(mode: str) -> str:
    if mode != "auto":
        return mode
    import torch
    if torch.cuda.is_available():
        return "gpu"
    print("dskc tune: no GPU visible: scoring with the roofline MODEL (an estimate, not a measurement)",
          file=sys.stderr)
    return "model"


def _kernels(args) -> list[str]:
    from dskc.templates import registry
    if args.kernels:
        from dskc.autotune.space import resolve_module
        names = [k.strip() for k in args.kernels.split(",") if k.strip()]
        for k in names:
            resolve_module(k)          # KeyError naming the known stems
        return names
    if args.model:
        from dskc.autotune.problems import model_stems
        from dskc.model import get_config
        return model_stems(get_config(args.model))
    return registry.stems()


def _problems(args, stem: str) -> list[dict]:
    if args.problem:
        return [json.loads(p) for p in args.problem]
    if not args.model:
        raise ValueError("give --model NAME or --problem JSON")
    from dskc.model import get_config
    from dskc.autotune.problems import TOKENS, model_problems
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else TOKENS
    return model_problems(stem, get_config(args.model), tokens)


def _tasks(args) -> list:
    from dskc.autotune import seeds
    from dskc.autotune.space import bucket, load_space
    from dskc.autotune.study import Task
    timing, tasks, seen = _timing(args.timing), [], set()
    for stem in _kernels(args):
        space = load_space(stem)
        for problem in _problems(args, stem):
            b = bucket(space, problem)
            if (stem, tuple(b.items())) in seen:
                continue
            seen.add((stem, tuple(b.items())))
            imported = ()
            if args.seeds_from:
                imported = tuple(seeds.imported_for(args.seeds_from, space, args.target, int(b.get("M", 1))))
            routing = args.routing if args.routing and {"E"} <= set(b) else None
            tasks.append(Task(stem, b, args.target, args.storage, timing, args.sampler, args.seed, args.trials,
                              imported_seeds=imported, routing=routing))
    if not tasks:
        raise ValueError("nothing to tune: no kernel/problem selected")
    return tasks


def _tune(args) -> int:
    from dskc.autotune.export import results
    from dskc.autotune.study import prepare
    names = []
    for i, task in enumerate(_tasks(args)):
        study, key = prepare(task)
        names.append(key.study_name)
        _run_workers(task, args.workers, study, f"[{i + 1}] {key.study_name}")
    from dskc.autotune.storage import open_storage
    rows = [r for r in results(open_storage(args.storage), args.target) if r.study_name in names]
    print(format_table(rows))
    return 0


def _run_workers(task, workers: int, study, label: str) -> None:
    """Run `workers` worker processes (or this process for 1) on the study, drawing a progress bar on stderr."""
    from dskc.autotune.study import finished, work
    if workers <= 1:
        import threading
        done = threading.Event()
        t = threading.Thread(target=_progress, args=(study, task.n_trials, label, done), daemon=True)
        t.start()
        try:
            work(task)
        finally:
            done.set()
            t.join()
        return
    procs = [subprocess.Popen([sys.executable, "-m", "dskc.autotune.worker", task.to_json()])
             for _ in range(workers)]
    while any(p.poll() is None for p in procs):
        _bar(finished(study), task.n_trials, label)
        time.sleep(1.0)
    _bar(finished(study), task.n_trials, label, end="\n")
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {workers} workers failed (exit {bad}); the study keeps what finished")


def _progress(study, total, label, done) -> None:
    from dskc.autotune.study import finished
    while not done.wait(1.0):
        _bar(finished(study), total, label)
    _bar(finished(study), total, label, end="\n")


def _bar(n: int, total: int, label: str, end: str = "\r") -> None:
    width = 30
    fill = min(width, width * n // max(1, total))
    sys.stderr.write(f"{label[:70]:70s} [{'#' * fill}{'.' * (width - fill)}] {n}/{total}{end}")
    sys.stderr.flush()


def format_table(rows) -> str:
    """Per study: kernel, bucket, timing mode, default and tuned time, speedup, trials by state."""
    head = f"{'kernel':16s} {'bucket':34s} {'timing':11s} {'default':>10s} {'tuned':>10s} {'speedup':>8s}  trials"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r.key["bucket"])
        us = lambda s: f"{s * 1e6:9.1f}u" if s else "       n/a"  # noqa: E731
        sp = f"{r.speedup:7.2f}x" if r.speedup else "     n/a"
        counts = " ".join(f"{k.lower()}={v}" for k, v in sorted(r.counts.items()))
        lines.append(f"{r.key['stem'][:16]:16s} {shape[:34]:34s} {r.key['timing_mode']:11s} {us(r.default_s)} "
                     f"{us(r.best_s)} {sp}  {counts}")
    if any(r.key["timing_mode"] == "model" for r in rows):
        lines.append("timing 'model': roofline ESTIMATES from compiled kernels, not measurements")
    return "\n".join(lines)


def _stem_names(args) -> list[str] | None:
    """STEM names of --kernels (a test module's name may differ from its STEM); None: every stem."""
    from dskc.autotune.space import resolve_module
    return [resolve_module(k).STEM for k in _kernels(args)] if args.kernels else None


def _export(args) -> int:
    from dskc.autotune.export import export
    from dskc.autotune.storage import open_storage
    kernels = _stem_names(args)
    for path in export(open_storage(args.storage), args.target, kernels, Path(args.out) if args.out else None):
        print(path)
    return 0


def _plot(args) -> int:
    from dskc.autotune.plot import plot_studies
    from dskc.autotune.storage import open_storage
    kernels = _stem_names(args)
    for path in plot_studies(open_storage(args.storage), args.target, kernels, Path(args.plot)):
        print(path)
    return 0


def _compare_backends(args) -> int:
    from dskc.autotune.backends import compare, export_decision, format_decisions
    from dskc.select.backends import bucket, cutlass_op
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    if sorted(wanted) != ["cutlass", "triton"]:
        raise ValueError(f"--backends takes 'triton,cutlass' (the only pair there is to compare), got {wanted}")
    timing, entries, seen = _timing(args.timing), [], set()
    stems = [s for s in _kernels(args) if s in ("fp8_gemm_1d2d", "bf16_gemm", "grouped_gemm")]
    for stem in stems:
        for problem in _problems(args, stem):
            key = (stem, tuple(sorted(bucket(problem, stem).items())))
            if key in seen or cutlass_op(stem, problem) is None:
                continue
            seen.add(key)
            entry = compare(stem, problem, args.target, timing, args.cutlass_candidates)
            print(export_decision(entry, args.target, Path(args.out) if args.out else None), file=sys.stderr)
            entries.append(entry)
    if not entries:
        raise ValueError(f"no problem of {stems or 'these kernels'} has a CUTLASS counterpart on {args.target}")
    print(format_decisions(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
