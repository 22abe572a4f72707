"""The Python steps of bench/gpu_check.sh (the script keeps the order, the deadline and the files):

    python -m dskc.benchmark.gpucheck env OUT.json     environment, device properties and the ceilings (step a)
    python -m dskc.benchmark.gpucheck prebuild         the CUTLASS builds of the GPU tier and bench (step d), cached
    python -m dskc.benchmark.gpucheck table RESULT     a bench result as markdown, with its row counts

On a machine without a GPU `env` measures the CPU ceilings (the script's dry mode), labelled with the device.
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import sys
import time
from pathlib import Path

# (stem, config) the CUTLASS GPU tests and bench rows build: each stem's default (tests/cutlass, bench_cutlass.py),
# the first two candidates of the dense FP8 GEMM (autotune's Triton-vs-CUTLASS comparison test) and the first
# hand-verified dense FP8 config (the KernelLinear GPU test). Built ahead, they cost the check no time of their own.
PREBUILD_STEMS = ("sm90_fp8_grouped_gemm_1d2d", "sm90_fp8_gemm_1d2d", "sm90_bf16_gemm")


def prebuild_items() -> list[tuple[str, dict]]:
    from dskc.templates import cutlass
    from dskc.templates.cutlass.spaces import VERIFIED

    items = [(stem, cutlass.default_config(stem, "sm90a")) for stem in PREBUILD_STEMS]
    items += cutlass.candidates("fp8_gemm_1d2d", "sm90a", limit=2)
    items.append(("sm90_fp8_gemm_1d2d", dict(VERIFIED["sm90_fp8_gemm_1d2d"][0])))
    unique = {(stem, tuple(sorted(cfg.items()))): (stem, cfg) for stem, cfg in items}
    return list(unique.values())


def prebuild() -> int:
    from dskc import knobs
    from dskc.templates import cutlass

    items = prebuild_items()
    print(f"[prebuild] {len(items)} CUTLASS builds for sm90a, {knobs.get().jobs} at a time", flush=True)
    t0 = time.monotonic()
    results = cutlass.build_many(items, "sm90a")
    failed = [r for r in results if not r.ok]
    print(f"[prebuild] {len(results) - len(failed)} built or cached, {len(failed)} failed, "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    for r in failed:
        print(f"[prebuild] FAILED {r.name} ({r.stage}): {r.message[:400]}", flush=True)
    return 1 if failed else 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions, device properties and ceilings, measured now."""
    import torch

    from dskc.benchmark import measure

    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = {"env": measure.environment(device), "date": measure.now_iso()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        doc["device"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability()),
                         "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                         "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1)}
    doc["packages"] = {d: _version(d) for d in ("numpy", "optuna", "nvidia-cutlass", "pytest", "pytest-xdist",
                                                "pytest-benchmark", "matplotlib", "deep-gemm", "flash-mla", "vllm")}
    try:
        from dskc.build.nvcc import nvcc_version
        doc["nvcc"] = nvcc_version()
    except (OSError, FileNotFoundError) as exc:
        doc["nvcc"] = f"unavailable: {exc}"
    t0 = time.perf_counter()
    doc["ceilings"] = measure.ceilings(device)
    doc["ceilings_s"] = round(time.perf_counter() - t0, 2)
    return doc


def table(path: Path) -> str:
    """A dskc bench result as its markdown tables (the KV-cache table left out) headed by its row counts, or a
    pytest-benchmark file (bench/bench_cutlass.py) as one row per benchmark with its recorded figures."""
    from dskc.benchmark import report, schema

    raw = json.loads(Path(path).read_text())
    if "benchmarks" in raw:
        lines = ["| benchmark | mean ms | recorded |", "|---|---|---|"]
        for b in raw["benchmarks"]:
            info = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in b.get("extra_info", {}).items())
            lines.append(f"| {b['name']} | {b['stats']['mean'] * 1e3:.4g} | {info} |")
        return "\n".join(lines) + "\n"
    doc = schema.validate(raw)
    counts = collections.Counter(r["status"] for r in doc["results"] if r["kind"] == "measured")
    text = report.markdown(doc).split("## KV cache bytes per token")[0].rstrip()
    head = f"{len(doc['results'])} rows: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return head + "\n\n" + text.split("\n", 1)[1].lstrip() + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m dskc.benchmark.gpucheck", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env").add_argument("out", type=Path)
    sub.add_parser("prebuild")
    sub.add_parser("table").add_argument("result", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "prebuild":
        return prebuild()
    if args.cmd == "table":
        print(table(args.result), end="")
        return 0
    doc = environment()
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    ce = ", ".join(f"{c['name']}: {c['value']:,.1f} {c['unit']}" for c in doc["ceilings"].values())
    print(f"device: {doc.get('device', doc['env']['device'])}\nnvcc: {doc['nvcc']}\npackages: {doc['packages']}\n"
          f"ceilings ({doc['ceilings_s']} s): {ce}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
