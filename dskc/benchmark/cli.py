"""`dskc bench`: run a suite and write JSON + markdown + PNG under bench/results/<gpu>/ (cpu-smoke on the CPU)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dskc.benchmark import runner, schema
from dskc.benchmark.common import have


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dskc bench", description=(
        "Benchmark dskc's kernels and model next to torch eager, torch.compile and (when importable) DeepGEMM, "
        "FlashMLA and vLLM, with the compute and bandwidth ceilings measured in the same run. Suite 'smoke' runs "
        "tiny shapes through the Triton interpreter on the CPU (checks the bench code; not kernel performance); "
        "the others need a CUDA GPU unless --smoke is given. 'headline' is the FP8 GEMM on DeepGEMM's shapes, the "
        "V3 MoE layer and MLA decode at h_q 16 / 128; 'rest' is every other case of 'all'."))
    p.add_argument("--suite", choices=runner.SUITES, default="smoke")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes through the Triton interpreter on the CPU, for any suite (--suite smoke: all)")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="results root; files go to OUT/<gpu>/ or OUT/cpu-smoke/ (default bench/results)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds per sub-suite; rows past it are stopped or recorded as skipped (default: no limit)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="seconds for the whole run, ceilings included; rows past it are stopped or skipped")
    p.add_argument("--torch-compile", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode of the kernel baselines, or 'off' (default max-autotune-no-cudagraphs)")
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="seconds of torch.compile rows per sub-suite; a row past it is stopped, later ones skipped")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--json-only", action="store_true", help="write only the JSON (see --render)")
    p.add_argument("--quiet", action="store_true", help="no per-row progress lines")
    p.add_argument("--validate", type=Path, metavar="JSON", help="only check a result file against the schema")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="write the JSON, markdown and PNG of a result file under OUT/<gpu>/ (no run)")
    return p


def _load(path: Path) -> dict | None:
    try:
        return schema.load(path)
    except schema.ResultSchemaError as exc:
        print(f"dskc bench: invalid result file: {exc}", file=sys.stderr)
        return None


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.validate:
        if _load(args.validate) is None:
            return 1
        print(f"{args.validate}: valid dskc-bench result (schema version {schema.VERSION})")
        return 0
    if args.render:
        doc = _load(args.render)
        if doc is None:
            return 1
        if not args.no_plot and not have("matplotlib"):
            print("dskc bench: the PNG needs matplotlib (pip install 'dskc[plot]'); or pass --no-plot", file=sys.stderr)
            return 2
        for kind, path in runner.write(doc, args.out, plot=not args.no_plot).items():
            print(f"wrote {kind}: {path}")
        return 0
    for name in ("budget_s", "compile_budget_s", "time_limit_s"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            print(f"dskc bench: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    mode = None if args.torch_compile == "off" else args.torch_compile
    opts = runner.Options(args.suite, args.out, args.budget_s, mode, not args.no_plot, not args.quiet,
                          args.compile_budget_s, args.smoke, args.time_limit_s, args.json_only)
    try:
        paths = runner.run(opts)
    except RuntimeError as exc:
        print(f"dskc bench: {exc}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
