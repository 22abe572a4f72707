"""Backend decisions for the compiler: Triton or CUTLASS, per (Triton stem, shape bucket), read from the file the
autotuner's backend comparison exports: <tuned root>/<arch>/_backends.json (autotune/configs/ or DSKC_TUNED_DIR).

dskc never imports the autotuner; it reads only this file. Format 1:

    {"format": 1, "arch": "sm90a",
     "entries": {"fp8_gemm_1d2d|K=2048,M=64,N=7168": {
         "op": "fp8_gemm_1d2d",                              # the Triton stem the CUTLASS stem competes with
         "bucket": {"M": 64, "N": 7168, "K": 2048},          # bucket(problem): M rounded up to a power of two
         "backend": "cutlass" | "triton",                     # the faster one
         "stem": "sm90_fp8_gemm_1d2d", "config": {...},       # the best CUTLASS kernel of the comparison
         "triton_us": 41.0, "cutlass_us": 30.5,
         "timing_mode": "cuda-graph" | "cuda-events" | "gpu" | "model",
         "meta": {"gpu": "NVIDIA H200", "toolchain": {"triton": "3.9.0", "cuda": "13.0", "nvcc": "13.0", ...}}}}}

Rules (the issue's): without a measurement the backend is Triton. Only a MEASURED decision (a GPU timing mode)
selects CUTLASS; a "model" decision (a roofline estimate) is shown in `dskc explain` but never applied. A decision
recorded under another toolchain (a tool known on both sides at another version) is stale: reported once in the
log and ignored. A corrupt or malformed file raises BackendFileError naming the file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

from dskc.logs import warn_once
from dskc.select import tuned

log = logging.getLogger("dskc.select")
FORMAT = 1
FILE_NAME = "_backends.json"
MEASURED_MODES = ("cuda-graph", "cuda-events", "gpu")
BACKENDS = ("triton", "cutlass")
# Triton stem -> the CUTLASS op that can replace it (dskc.templates.cutlass.OPS), per Triton problem dtype
_CUTLASS_OP = {"fp8_gemm_1d2d": "fp8_gemm_1d2d", "bf16_gemm": "bf16_gemm", "grouped_gemm": "fp8_grouped_gemm_1d2d"}


class BackendFileError(ValueError):
    """A backend decision file that cannot be read or does not follow format 1."""


@dataclasses.dataclass(frozen=True)
class Decision:
    backend: str                 # what selection uses: "triton" | "cutlass"
    stem: str | None             # the CUTLASS stem when backend == "cutlass"
    config: tuple                # its sorted (name, value) pairs; () for Triton
    why: str                     # for `dskc explain`
    source: str = ""             # "measured:<file>" for a CUTLASS pick


def cutlass_op(stem: str, problem: dict) -> str | None:
    """The CUTLASS op that could serve this Triton (stem, problem), or None: FP8 grouped GEMMs only, and none of
    the lean decode step's epilogues and row maps the CUTLASS kernels lack (a residual add, fp32 logits, token rows
    read through the layout, the dense one-expert mode)."""
    if stem == "grouped_gemm" and (problem.get("dtype") != "fp8" or problem.get("gather")
                                   or problem.get("rows_per_id") == 0):
        return None
    if problem.get("residual") or (stem == "bf16_gemm" and problem.get("out_dtype") == "fp32"):
        return None
    return _CUTLASS_OP.get(stem)


def bucket(problem: dict, stem: str | None = None) -> dict:
    """The decision bucket of a problem: the Triton stem's Problem bucket (its pow2 fields, M for the GEMMs, rounded
    up; fields a dict lacks take the Problem's defaults). Without a stem: M rounded up, the rest as given."""
    if stem is not None:
        from dskc.templates import registry
        return registry.problem(stem, problem).bucket().as_dict()
    return {k: (1 << max(0, int(v) - 1).bit_length() if k == "M" and isinstance(v, int) else v)
            for k, v in problem.items()}


def entry_name(op: str, bucket_: dict) -> str:
    return op + "|" + ",".join(f"{k}={v}" for k, v in sorted(bucket_.items()))


def file_for(arch, root: Path | None = None) -> Path:
    return tuned.file_for("_backends", arch, root).with_name(FILE_NAME)


def read_file(path: Path) -> dict:
    """The parsed, validated decision file. Raises BackendFileError naming the file and the problem."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BackendFileError(f"backend decision file {path} cannot be read: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), dict):
        raise BackendFileError(f"backend decision file {path}: expected a JSON object with \"format\": {FORMAT} "
                               "and an \"entries\" object")
    for name, e in doc["entries"].items():
        bad = [f for f, kind in (("op", str), ("bucket", dict), ("backend", str), ("config", dict),
                                 ("timing_mode", str), ("meta", dict)) if not isinstance(e.get(f), kind)] \
            if isinstance(e, dict) else ["the entry is not an object"]
        if not bad and e["backend"] not in BACKENDS:
            bad = [f"backend {e['backend']!r} is not one of {BACKENDS}"]
        if not bad and e["backend"] == "cutlass" and not isinstance(e.get("stem"), str):
            bad = ["stem (a CUTLASS decision names its stem)"]
        if bad:
            raise BackendFileError(f"backend decision file {path}: entry {name!r} lacks or has a bad {bad}")
    return doc


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int) -> str:
    return json.dumps(read_file(Path(path)))


def _speed(e: dict) -> str:
    t, c = e.get("triton_us"), e.get("cutlass_us")
    if not (isinstance(t, (int, float)) and isinstance(c, (int, float)) and t > 0 and c > 0):
        return f"{e['backend']} faster"
    fast, ratio = ("cutlass", t / c) if c < t else ("triton", c / t)
    return f"{fast} {ratio:.2f}x faster ({t:.1f} vs {c:.1f} us triton/cutlass)"


def decide(stem: str, problem: dict, arch, *, runs_on: str = "gpu", root: Path | None = None) -> Decision | None:
    """The backend for Triton `stem` on `problem`, or None when CUTLASS has no kernel for it on `arch`.

    runs_on: "gpu" (the target's GPU) or "cpu" (Triton's interpreter: CUTLASS never selected there).
    Raises BackendFileError for a corrupt file.
    """
    if runs_on not in ("gpu", "cpu"):
        raise ValueError(f"runs_on must be 'gpu' or 'cpu', got {runs_on!r}")
    from dskc.templates import cutlass

    op = cutlass_op(stem, problem)
    if op is None or not cutlass.candidates(op, arch, limit=1):
        return None
    triton = Decision("triton", None, (), "default: Triton (no measurement)")
    path = file_for(arch, root)
    if not path.exists():
        return triton
    st = path.stat()
    doc = json.loads(_read_cached(str(path), st.st_mtime_ns, st.st_size))
    name = entry_name(stem, bucket(problem, stem))
    e = doc["entries"].get(name)
    if e is None:
        return triton
    stale = tuned.stale_reason(e["meta"], tuned.current_toolchain())
    if stale:
        warn_once(log, f"dskc: backend decision {name} of {path} ignored: {stale}")
        return dataclasses.replace(triton, why=f"default: Triton (decision in {path} is stale: {stale})")
    said = f"{_speed(e)}, {e['timing_mode']} ({path})"
    if e["timing_mode"] not in MEASURED_MODES:
        return dataclasses.replace(triton, why=f"default: Triton (estimate only, not applied: {said})")
    if e["backend"] == "triton":
        return dataclasses.replace(triton, why=f"measured: {said}")
    if runs_on == "cpu":
        return dataclasses.replace(triton, why=f"Triton: CPU runtime (interpreter) cannot run CUTLASS; "
                                                f"on the GPU: {said}")
    if e["stem"] not in cutlass.stems():
        warn_once(log, f"dskc: backend decision {name} of {path} ignored: it names CUTLASS kernel {e['stem']!r}, which "
                  f"does not exist (known: {cutlass.stems()})")
        return dataclasses.replace(triton, why=f"default: Triton (decided CUTLASS kernel {e['stem']!r} unknown)")
    errors = cutlass.violations(e["stem"], e["config"], cutlass_problem(stem, problem))
    if errors:
        warn_once(log, f"dskc: backend decision for {stem} in {path} ignored: {'; '.join(errors)}")
        return dataclasses.replace(triton, why=f"default: Triton (decided CUTLASS config invalid: {errors[0]})")
    return Decision("cutlass", e["stem"], tuple(sorted(e["config"].items())), f"measured: {said}",
                    f"measured:{path}")


def cutlass_problem(stem: str, problem: dict) -> dict:
    """The CUTLASS stem's problem for a Triton (stem, problem) (grouped: G experts, M total rows)."""
    if stem not in _CUTLASS_OP:
        raise ValueError(f"no CUTLASS counterpart for Triton stem {stem!r}; known: {sorted(_CUTLASS_OP)}")
    if stem == "grouped_gemm":   # the Triton Problem's M is already the layout's total rows
        return {"G": problem["E"], "M": problem["M"], "N": problem["N"], "K": problem["K"]}
    return {k: problem[k] for k in ("M", "N", "K")}
