"""Run a suite: measure the ceilings, then every case's impls, and write JSON + markdown + PNG.

Output folder: <out>/<gpu slug>/ on a GPU (e.g. bench/results/nvidia-h200/), <out>/cpu-smoke/ for the CPU smoke
run, whose files say plainly that their figures are not kernel performance. Files: <suite>.json (see
docs/bench-schema.md), <suite>.md (dskc vs baselines), <suite>.png (roofline; tokens/s for the model suite).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from pathlib import Path

import torch

from dskc.benchmark import measure, schema
from dskc.benchmark.cases import IMPLS, Case, Impl, empty_row, fill_figures, published_row
from dskc.benchmark.common import Ctx, have, make_ctx, rel_err

log = logging.getLogger("dskc.bench")
SUITES = ("smoke", "gemm", "moe", "mla", "model", "all")
KERNEL_SUITES = ("gemm", "moe", "mla", "model")


@dataclasses.dataclass(frozen=True)
class Options:
    """suite: one of SUITES; out: results root; budget_s: per-suite seconds after which the remaining cases are
    recorded as skipped; compile_mode: torch.compile mode for kernel baselines (None: off); plot: write the PNG;
    compile_budget_s: per-suite seconds of torch.compile rows (compile + timing) after which the remaining
    torch.compile rows of that suite are recorded as skipped (max-autotune costs tens of seconds per shape)."""
    suite: str
    out: Path
    budget_s: float | None = None
    compile_mode: str | None = "max-autotune-no-cudagraphs"
    plot: bool = True
    progress: bool = True
    compile_budget_s: float | None = None


def _suite_cases(name: str, ctx: Ctx):
    from dskc.benchmark import gemm, mla, model, moe
    return {"gemm": gemm, "moe": moe, "mla": mla, "model": model}[name].cases(ctx)


def _output(result) -> torch.Tensor | None:
    out = result[0] if isinstance(result, (tuple, list)) else result
    return out if isinstance(out, torch.Tensor) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_impl(ctx: Ctx, case: Case, impl: Impl, ceilings: dict) -> dict:
    """One row: published figure, skip reason, error (type and first line) or the measured figures."""
    if impl.published:
        return published_row(case, impl)
    row = empty_row(case, impl)
    if impl.skip:
        row.update(status="skipped", note=impl.skip)
        return row
    try:
        fn = impl.make()
        result = fn()  # first call: compile / autotune / warm-up outside the timing
        ms = measure.time_ms(fn, ctx.device)
    except Exception as exc:  # recorded in the row: a failing impl must not hide the others
        row.update(status="error", note=(impl.note + "; " if impl.note else "") + _first_line(exc))
        log.warning("bench %s / %s failed: %s", case.name, impl.name, _first_line(exc))
        return row
    fill_figures(row, case, ms, ceilings)
    out = _output(result)
    if case.ref is not None and out is not None and impl.name.startswith("dskc"):  # baselines may differ by design
        ref = case.ref()
        if tuple(out.shape) == tuple(ref.shape):
            row["rel_err"] = rel_err(out, ref)
    return row


def _skipped(case: Case, reason: str) -> list[dict]:
    rows = []
    for impl in case.impls:
        row = published_row(case, impl) if impl.published else empty_row(case, impl)
        if not impl.published:
            row.update(status="skipped", note=reason)
        rows.append(row)
    return rows


def _print_row(r: dict) -> None:
    fig = r[r["primary"]]
    shown = f"{fig:12.2f} {r['primary']}" if fig is not None else r["note"][:60]
    print(f"[dskc bench] {r['case']:<56} {r['impl']:<18} {r['status']:<7} {shown}", flush=True)


def run_cases(ctx: Ctx, suite: str, ceilings: dict, opts: Options) -> list[dict]:
    rows, start, compiling = [], time.perf_counter(), 0.0
    for case in _suite_cases(suite, ctx):
        spent = time.perf_counter() - start
        if opts.budget_s is not None and spent > opts.budget_s:
            rows.extend(_skipped(case, f"time budget of {opts.budget_s:.0f} s for suite {suite} spent"))
            continue
        for impl in case.impls:
            if impl.name == "torch-compile" and opts.compile_budget_s is not None and not impl.skip \
                    and compiling > opts.compile_budget_s:
                impl = dataclasses.replace(impl, skip=f"torch.compile budget of {opts.compile_budget_s:.0f} s "
                                                      f"for suite {suite} spent")
            t0 = time.perf_counter()
            rows.append(run_impl(ctx, case, impl, ceilings))
            if impl.name == "torch-compile":
                compiling += time.perf_counter() - t0
            if opts.progress:
                _print_row(rows[-1])
        del case
        gc.collect()
        if ctx.gpu:
            torch.cuda.empty_cache()
    return rows


def build_doc(opts: Options, on_suite=None) -> dict:
    """Run the suite and return its validated result document. on_suite(doc), if given, receives the valid partial
    document after each sub-suite of "smoke" / "all" (run() writes it, so a run killed later keeps its results)."""
    if opts.suite not in SUITES:
        raise ValueError(f"unknown suite {opts.suite!r}; choose one of {SUITES}")
    smoke = opts.suite == "smoke"
    ctx = make_ctx(smoke, opts.compile_mode)
    started = measure.now_iso()
    threads = torch.get_num_threads()
    if smoke:  # small CPU matmuls on a shared box: one thread avoids oversubscription (~40x slower with two)
        torch.set_num_threads(1)
    try:
        ceilings = measure.ceilings(ctx.device)
        env = measure.environment(ctx.device)
        rows = []
        for name in KERNEL_SUITES if opts.suite in ("smoke", "all") else (opts.suite,):
            rows.extend(run_cases(ctx, name, ceilings, opts))
            doc = _document(opts.suite, smoke, started, env, ceilings, rows)
            if on_suite is not None:
                on_suite(doc)
    finally:
        torch.set_num_threads(threads)
    return doc


def _document(suite: str, smoke: bool, started: str, env: dict, ceilings: dict, rows: list) -> dict:
    from dskc.benchmark.model import kv_cache_rows

    doc = {"schema": "dskc-bench", "version": schema.VERSION, "suite": suite, "mode": "cpu-smoke" if smoke else "gpu",
           "label": schema.SMOKE_LABEL if smoke else "GPU run: figures measured on the GPU named in env",
           "date": started, "env": env, "ceilings": ceilings,
           "impls": {r["impl"]: IMPLS[r["impl"]] for r in rows}, "results": list(rows), "kv_cache": kv_cache_rows()}
    return schema.validate(doc)


def result_dir(doc: dict, out: Path) -> Path:
    """<out>/cpu-smoke for the smoke run, else <out>/<gpu slug>."""
    return Path(out) / ("cpu-smoke" if doc["mode"] == "cpu-smoke" else measure.gpu_slug(doc["env"]["gpu"]))


def write(doc: dict, out: Path, plot: bool = True) -> dict[str, Path]:
    """Write <suite>.json, <suite>.md and (plot) <suite>.png under result_dir; returns their paths."""
    from dskc.benchmark import report

    schema.validate(doc)
    folder = result_dir(doc, out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{doc['suite']}.json", "md": folder / f"{doc['suite']}.md"}
    paths["json"].write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    if plot:
        paths["png"] = folder / f"{doc['suite']}.png"
        report.plot(doc, paths["png"])
    paths["md"].write_text(report.markdown(doc, paths.get("png")))
    return paths


def run(opts: Options) -> dict[str, Path]:
    """Run the suite and write its files (again after every sub-suite, so a killed run keeps what it measured)."""
    if opts.plot and not have("matplotlib"):
        raise RuntimeError("the PNG needs matplotlib (pip install 'dskc[plot]'); or pass --no-plot")
    return write(build_doc(opts, on_suite=lambda doc: write(doc, opts.out, opts.plot)), opts.out, opts.plot)
