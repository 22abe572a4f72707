"""Run a suite: measure the ceilings, then every case's impls, and write JSON + markdown + PNG.

Output folder: <out>/<gpu slug>/ on a GPU (e.g. bench/results/nvidia-h200/), <out>/cpu-smoke/ for a smoke run,
whose files say plainly that their figures are not kernel performance. Files: <suite>.json (see
docs/bench-schema.md), <suite>.md (dskc vs baselines), <suite>.png (roofline; tokens/s for the model suite). The
JSON and markdown are rewritten after every case and the PNG after every sub-suite, so a run killed at any point
keeps what it measured.

Time: `budget_s` (per sub-suite), `compile_budget_s` (torch.compile rows per sub-suite) and `time_limit_s` (the
whole run, ceilings included) each bound every row they cover: a row starts only with time left, and a row still
running when its time is up is stopped (measure.time_limit) and recorded as skipped, saying which bound stopped it.
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
from dskc.benchmark.common import DEEPGEMM_DENSE, Ctx, have, make_ctx, rel_err

log = logging.getLogger("dskc.bench")
KERNEL_SUITES = ("gemm", "moe", "mla", "model")
# suite -> the sub-suites it runs, in order. "headline" holds the rows a first GPU check needs most
# (bench/gpu_check.sh runs it before anything optional; the MoE layer, 34 GB of weights, last); "rest" is
# everything else, the model first.
SUB_SUITES = {"smoke": KERNEL_SUITES, **{s: (s,) for s in KERNEL_SUITES}, "headline": ("gemm", "mla", "moe"),
              "rest": ("model", "gemm", "moe", "mla"), "all": KERNEL_SUITES}
SUITES = tuple(SUB_SUITES)
# The headline rows: stem -> test on the case's shape (None: every case). A smoke run keeps every case of these
# stems (its tiny shapes are not the published ones).
HEADLINE = {
    "fp8_gemm_1d2d": lambda s: (s["M"], s["N"], s["K"]) in DEEPGEMM_DENSE,   # DeepGEMM's dense shape table
    "fused_moe": None,                                                      # the V3 MoE layer, 1 / 128 / 4096 tokens
    "mla_decode": lambda s: s["h_q"] in (16, 128),                          # FlashMLA's grid at h_q 16 and 128
}


def is_headline(case: Case, smoke: bool) -> bool:
    test = HEADLINE.get(case.stem, False)
    return test is not False and (smoke or test is None or test(case.shape))


def selected(suite: str, case: Case, smoke: bool) -> bool:
    """Whether `suite` runs `case` (headline and rest split the cases of their sub-suites)."""
    if suite == "headline":
        return is_headline(case, smoke)
    if suite == "rest":
        return not is_headline(case, smoke)
    return True


@dataclasses.dataclass(frozen=True)
class Options:
    """suite: one of SUITES; out: results root; budget_s: per-sub-suite seconds; compile_mode: torch.compile mode for
    kernel baselines (None: off); plot: write the PNG; compile_budget_s: per-sub-suite seconds of torch.compile rows
    (max-autotune costs tens of seconds per shape); smoke: tiny shapes through the Triton interpreter on the CPU
    (implied by suite "smoke"); time_limit_s: seconds for the whole run; json_only: write only the JSON (render the
    markdown and PNG later with `dskc bench --render`). Each time bound stops the rows it covers (module doc)."""
    suite: str
    out: Path
    budget_s: float | None = None
    compile_mode: str | None = "max-autotune-no-cudagraphs"
    plot: bool = True
    progress: bool = True
    compile_budget_s: float | None = None
    smoke: bool = False
    time_limit_s: float | None = None
    json_only: bool = False


def _suite_cases(name: str, ctx: Ctx):
    from dskc.benchmark import gemm, mla, model, moe
    return {"gemm": gemm, "moe": moe, "mla": mla, "model": model}[name].cases(ctx)


def _output(result) -> torch.Tensor | None:
    out = result[0] if isinstance(result, (tuple, list)) else result
    return out if isinstance(out, torch.Tensor) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_impl(ctx: Ctx, case: Case, impl: Impl, ceilings: dict, limit: float | None = None,
             bound: str = "") -> dict:
    """One row: published figure, skip reason, error (type and first line) or the measured figures. `limit`:
    seconds the row may run (make, first call and timing), `bound` naming what sets it; a row past it is stopped
    and recorded as skipped."""
    if impl.published:
        return published_row(case, impl)
    row = empty_row(case, impl)
    if impl.skip:
        row.update(status="skipped", note=impl.skip)
        return row
    prefix = impl.note + "; " if impl.note else ""
    try:
        with measure.time_limit(limit):
            fn = impl.make()
            result = fn()  # first call: compile / autotune / warm-up outside the timing
            ms = measure.time_ms(fn, ctx.device)
    except measure.TimeLimit:
        row.update(status="skipped", note=f"{prefix}stopped after {limit:.1f} s: {bound}")
        log.warning("bench %s / %s stopped after %.1f s (%s)", case.name, impl.name, limit, bound)
        return row
    except Exception as exc:  # recorded in the row: a failing impl must not hide the others
        row.update(status="error", note=prefix + _first_line(exc))
        log.warning("bench %s / %s failed: %s", case.name, impl.name, _first_line(exc))
        return row
    fill_figures(row, case, ms, ceilings)
    if impl.count is not None:
        try:
            row["launches_per_step"] = int(impl.count())
        except Exception as exc:  # the figure is missing, the row stands
            row["note"] = prefix + f"launch count failed: {_first_line(exc)}"
    out = _output(result)
    if case.ref is not None and out is not None and impl.name.startswith("dskc"):  # baselines may differ by design
        ref = case.ref()
        if tuple(out.shape) == tuple(ref.shape):
            row["rel_err"] = rel_err(out, ref)
    return row


def _print_row(r: dict) -> None:
    fig = r[r["primary"]]
    shown = f"{fig:12.2f} {r['primary']}" if fig is not None else r["note"][:60]
    print(f"[dskc bench] {r['case']:<56} {r['impl']:<18} {r['status']:<7} {shown}", flush=True)


def _row_bound(opts: Options, suite: str, started: float, suite_start: float,
               compiling: float | None) -> tuple[float | None, str]:
    """(seconds left for the next row, what bounds it): the run's time limit, the sub-suite's budget and, for a
    torch.compile row (compiling = its seconds so far), the torch.compile budget; (None, "") when unbounded."""
    now = time.perf_counter()
    bounds = []
    if opts.time_limit_s is not None:
        bounds.append((started + opts.time_limit_s - now, f"time limit of {opts.time_limit_s:g} s for the run"))
    if opts.budget_s is not None:
        bounds.append((suite_start + opts.budget_s - now, f"time budget of {opts.budget_s:g} s for suite {suite}"))
    if compiling is not None and opts.compile_budget_s is not None:
        bounds.append((opts.compile_budget_s - compiling,
                       f"torch.compile budget of {opts.compile_budget_s:g} s for suite {suite}"))
    return min(bounds) if bounds else (None, "")


def run_cases(ctx: Ctx, suite: str, ceilings: dict, opts: Options, started: float | None = None,
              on_case=None) -> list[dict]:
    """The rows of sub-suite `suite` (the cases opts.suite selects), each bounded in time (module doc). started:
    perf_counter() at the run's start (default: now); on_case(rows so far) after every case."""
    rows, suite_start, compiling = [], time.perf_counter(), 0.0
    started = suite_start if started is None else started
    for case in _suite_cases(suite, ctx):
        if not selected(opts.suite, case, ctx.smoke):
            continue
        for impl in case.impls:
            timed = not (impl.skip or impl.published)
            is_compile = timed and impl.name == "torch-compile"
            limit, bound = _row_bound(opts, suite, started, suite_start, compiling if is_compile else None)
            if timed and limit is not None and limit <= 0:
                impl = dataclasses.replace(impl, skip=f"{bound} spent")
            t0 = time.perf_counter()
            rows.append(run_impl(ctx, case, impl, ceilings, limit, bound))
            if is_compile:
                compiling += time.perf_counter() - t0
            if opts.progress:
                _print_row(rows[-1])
        del case
        gc.collect()
        if ctx.gpu:
            torch.cuda.empty_cache()
        if on_case is not None:
            on_case(rows)
    return rows


def build_doc(opts: Options, on_update=None) -> dict:
    """Run the suite and return its validated result document. on_update(doc, complete), if given, receives the
    valid partial document after every case (complete=False) and after every sub-suite (complete=True)."""
    if opts.suite not in SUITES:
        raise ValueError(f"unknown suite {opts.suite!r}; choose one of {SUITES}")
    smoke = opts.suite == "smoke" or opts.smoke
    started = time.perf_counter()
    ctx = make_ctx(smoke, opts.compile_mode)
    date = measure.now_iso()
    threads = torch.get_num_threads()
    if smoke:  # small CPU matmuls on a shared box: one thread avoids oversubscription (~40x slower with two)
        torch.set_num_threads(1)
    try:
        ceilings = measure.ceilings(ctx.device)
        env = measure.environment(ctx.device)
        rows = []

        def publish(more: list, complete: bool) -> dict:
            doc = _document(opts.suite, smoke, date, env, ceilings, rows + more)
            if on_update is not None:
                on_update(doc, complete)
            return doc
        for name in SUB_SUITES[opts.suite]:
            rows.extend(run_cases(ctx, name, ceilings, opts, started, lambda more: publish(more, False)))
            doc = publish([], True)
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


def write(doc: dict, out: Path, plot: bool = True, markdown: bool = True) -> dict[str, Path]:
    """Write <suite>.json, and <suite>.md (markdown) and <suite>.png (plot) under result_dir; returns their paths."""
    from dskc.benchmark import report

    schema.validate(doc)
    folder = result_dir(doc, out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{doc['suite']}.json"}
    _replace(paths["json"], json.dumps(doc, indent=1, sort_keys=False) + "\n")
    if plot:
        paths["png"] = folder / f"{doc['suite']}.png"
        report.plot(doc, paths["png"])
    if markdown:
        paths["md"] = folder / f"{doc['suite']}.md"
        _replace(paths["md"], report.markdown(doc, paths.get("png")))
    return paths


def _replace(path: Path, text: str) -> None:
    """Write through a temporary file and rename: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run(opts: Options) -> dict[str, Path]:
    """Run the suite and write its files as it goes (module doc); returns the final files' paths."""
    plot, markdown = opts.plot and not opts.json_only, not opts.json_only
    if plot and not have("matplotlib"):
        raise RuntimeError("the PNG needs matplotlib (pip install 'dskc[plot]'); or pass --no-plot")
    paths = {}

    def update(doc: dict, complete: bool) -> None:
        paths.update(write(doc, opts.out, plot and complete, markdown))
    build_doc(opts, on_update=update)
    return paths
