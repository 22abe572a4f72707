"""`dskc bench`: run a suite and write JSON + markdown + PNG under bench/results/<gpu>/ (cpu-smoke on the CPU)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dskc.benchmark import runner, schema


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dskc bench", description=(
        "Benchmark dskc's kernels and model next to torch eager, torch.compile and (when importable) DeepGEMM, "
        "FlashMLA and vLLM, with the compute and bandwidth ceilings measured in the same run. Suite 'smoke' runs "
        "tiny shapes through the Triton interpreter on the CPU (checks the bench code; not kernel performance); "
        "the others need a CUDA GPU."))
    p.add_argument("--suite", choices=runner.SUITES, default="smoke")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="results root; files go to OUT/<gpu>/ or OUT/cpu-smoke/ (default bench/results)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="per-suite seconds; cases after it are recorded as skipped (default: no limit)")
    p.add_argument("--torch-compile", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode of the kernel baselines, or 'off' (default max-autotune-no-cudagraphs)")
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="per-suite seconds for torch.compile rows; later ones are recorded as skipped")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no per-row progress lines")
    p.add_argument("--validate", type=Path, metavar="JSON", help="only check a result file against the schema")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.validate:
        try:
            schema.load(args.validate)
        except schema.ResultSchemaError as exc:
            print(f"dskc bench: invalid result file: {exc}", file=sys.stderr)
            return 1
        print(f"{args.validate}: valid dskc-bench result (schema version {schema.VERSION})")
        return 0
    for name in ("budget_s", "compile_budget_s"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            print(f"dskc bench: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    mode = None if args.torch_compile == "off" else args.torch_compile
    opts = runner.Options(args.suite, args.out, args.budget_s, mode, not args.no_plot, not args.quiet,
                          args.compile_budget_s)
    try:
        paths = runner.run(opts)
    except RuntimeError as exc:
        print(f"dskc bench: {exc}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
