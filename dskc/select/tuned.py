"""Tuned configs for the compiler: read the per-arch JSON files the autotuner exports (autotune/configs/<arch>/).

dskc never imports the autotuner; it reads only these files. File format (format 1):

    {"format": 1, "stem": "fp8_gemm_1d2d", "arch": "sm90a",
     "buckets": {"M": "pow2", "N": "exact", "K": "exact"},          # how each problem field is bucketed
     "entries": {"M=64,N=7168,K=2048": {
         "bucket": {"M": 64, "N": 7168, "K": 2048},
         "config": {"BLOCK_M": 64, ...},
         "meta": {"gpu": "NVIDIA H200", "toolchain": {"triton": "3.9.0", "cuda": "13.0"},
                  "timing_mode": "cuda-events" | "model", "date": "2026-11-23", ...}}}}

`lookup(stem, arch, problem)` takes the entry whose exact fields equal the problem's and whose pow2 fields are
nearest (in log2 distance); ties go to the smaller bucket. Bad data never reaches a launch:
- a file that is not JSON, truncated, of another format version or for another arch than its folder says, or
  whose entries lack bucket/config/meta: TunedFileError naming the file (the compile is refused);
- an entry tuned under a different toolchain (a tool present on both sides with another version), measured on
  another GPU than this one, whose config has parameters or values outside the stem's space, or that breaks the
  stem's declared constraints for the actual problem: ignored, with one log line each.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
from pathlib import Path

from dskc.arch import parse
from dskc.logs import warn_once

log = logging.getLogger("dskc.select")
FORMAT = 1


class TunedFileError(ValueError):
    """An export file that cannot be read or does not follow format 1."""


def configs_root() -> Path:
    """autotune/configs of the installed package, found without importing dskc.autotune."""
    spec = importlib.util.find_spec("dskc.autotune")
    if spec is None or not spec.submodule_search_locations:
        raise TunedFileError("package dskc.autotune is not installed; no tuned configs can be found")
    return Path(list(spec.submodule_search_locations)[0]) / "configs"


def file_for(stem: str, arch, root: Path | None = None) -> Path:
    from dskc import knobs
    return Path(root or knobs.get().tuned_dir or configs_root()) / parse(arch).name / f"{stem}.json"


def read_file(path: Path) -> dict:
    """The parsed, validated content of an export file. Raises TunedFileError naming the file and the problem."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TunedFileError(f"tuned config file {path} cannot be read: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise TunedFileError(f"tuned config file {path}: expected a JSON object with \"format\": {FORMAT}, got "
                             f"format {got!r} (written by another dskc? export it again with `dskc tune --export`)")
    for field, kind in (("stem", str), ("arch", str), ("buckets", dict), ("entries", dict)):
        if not isinstance(doc.get(field), kind):
            raise TunedFileError(f"tuned config file {path}: field {field!r} missing or not a {kind.__name__}")
    for name, entry in doc["entries"].items():
        ok = isinstance(entry, dict) and all(isinstance(entry.get(f), dict) for f in ("bucket", "config", "meta"))
        if not ok or set(entry["bucket"]) != set(doc["buckets"]):
            raise TunedFileError(f"tuned config file {path}: entry {name!r} lacks bucket/config/meta or its "
                                 f"bucket fields differ from {sorted(doc['buckets'])}")
    return doc


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, mtime_ns: int, size: int) -> str:
    return json.dumps(read_file(Path(path)))


def current_gpu() -> str | None:
    """The name of this machine's GPU (None without one: a cross-compile accepts any GPU's measurements)."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def current_toolchain() -> dict:
    import triton
    import torch
    return {"triton": triton.__version__, "cuda": torch.version.cuda}


def stale_reason(meta: dict, current: dict) -> str | None:
    """Why an entry is stale (a tool known on both sides at another version), or None."""
    tools = meta.get("toolchain", {})
    for tool, have in current.items():
        was = tools.get(tool)
        if have is not None and was is not None and str(was) != str(have):
            return f"tuned with {tool} {was}, installed {have}"
    return None


def _distance(doc: dict, bucket: dict, problem: dict) -> float | None:
    dist = 0.0
    for field, kind in doc["buckets"].items():
        want, have = problem[field], bucket[field]
        if kind == "exact":
            if want != have:
                return None
        else:
            dist += abs(math.log2(max(1, want)) - math.log2(max(1, have)))
    return dist


def _meets_constraints(stem: str, config: dict, problem: dict) -> str | None:
    """Why `config` cannot launch `stem` on `problem` (outside the space, or a broken constraint), or None."""
    from dskc.templates import registry
    try:
        mod = registry.get(stem)
    except KeyError:
        return None  # not a registered Triton stem (e.g. a CUTLASS one): its own builder checks the config
    if set(config) != set(mod.SPACE):
        return f"its config has parameters {sorted(config)}, the stem's space {sorted(mod.SPACE)}"
    outside = [f"{k}={v!r}" for k, v in config.items() if v not in mod.SPACE[k]]
    if outside:
        return f"its config has values outside the stem's space: {', '.join(outside)}"
    broken = registry.broken_constraints(mod, config, problem)
    return f"breaks the stem's constraints {broken}" if broken else None


def _other_gpu(meta: dict, gpu: str | None) -> str | None:
    """Why a measured entry does not apply on this GPU (measured on another one), or None."""
    was = meta.get("gpu")
    if gpu is None or meta.get("timing_mode") == "model" or not isinstance(was, str) or was.startswith("none"):
        return None
    return None if was == gpu else f"measured on {was}, this GPU is {gpu}"


def lookup(stem: str, arch, problem: dict, *, root: Path | None = None) -> tuple[dict | None, str]:
    """(config, "tuned:<file>") for the nearest fresh bucket, or (None, why) when there is none.

    Raises TunedFileError for a corrupt or malformed file (never silently ignored), ValueError when the problem
    lacks a field the file buckets on.
    """
    path = file_for(stem, arch, root)
    if not path.exists():
        return None, f"untuned: no file {path}"
    st = path.stat()
    doc = json.loads(_read_cached(str(path), st.st_mtime_ns, st.st_size))
    missing = [f for f in doc["buckets"] if f not in problem]
    if missing:
        raise ValueError(f"problem for {stem!r} lacks {missing}; {path} buckets on {sorted(doc['buckets'])}")
    if doc["stem"] != stem or doc["arch"].replace("_", "").lower() != parse(arch).name:
        raise TunedFileError(f"tuned config file {path} holds {doc['stem']} for {doc['arch']}, not {stem} for "
                             f"{parse(arch).name}: a file copied to the wrong place")
    current, gpu = current_toolchain(), current_gpu()
    best = None
    for name, entry in doc["entries"].items():
        why = (stale_reason(entry["meta"], current) or _other_gpu(entry["meta"], gpu)
               or _meets_constraints(stem, entry["config"], problem))
        if why is not None:
            warn_once(log, f"dskc: tuned entry {name} of {path} ignored: {why}")
            continue
        dist = _distance(doc, entry["bucket"], problem)
        if dist is not None and (best is None or (dist, _size(entry)) < best[:2]):
            best = (dist, _size(entry), entry)
    if best is None:
        return None, f"untuned: no fresh entry of {path} matches {problem}"
    return dict(best[2]["config"]), f"tuned:{path}"


def _size(entry: dict) -> float:
    return sum(math.log2(max(1, v)) for v in entry["bucket"].values() if isinstance(v, (int, float)))
