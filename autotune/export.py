"""Results out of the database: per-study summaries (the CLI's final table) and the export of winners to the
checked-in JSON files autotune/configs/<arch>/<stem>.json that the compiler reads (dskc/select/tuned.py has the
format and the reader; this module writes it).

Merging into an existing file: entries for other buckets are kept; a measured entry is never replaced by a MODEL
one; a corrupt existing file stops the export with an error (the file and the database are left as they are).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from pathlib import Path

import optuna

from dskc.arch import parse
from dskc.autotune.slots import SLOT, live
from dskc.select import tuned

COMPLETE = optuna.trial.TrialState.COMPLETE


@dataclasses.dataclass(frozen=True)
class StudyResult:
    study_name: str
    key: dict                 # StudyKey as a dict
    best_config: dict | None
    best_s: float | None
    default_s: float | None   # the per-arch default's score (None when it was pruned, failed or not run)
    counts: dict              # trial state name -> count
    gpu: str
    buckets: dict             # problem field -> "pow2" | "exact"

    @property
    def speedup(self) -> float | None:
        if self.best_s and self.default_s:
            return self.default_s / self.best_s
        return None


def results(storage, arch=None, stems=None) -> list[StudyResult]:
    """One StudyResult per autotune study in `storage` (optionally only one arch / some stems)."""
    arch_name = parse(arch).name if arch else None
    out = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        key = summary.user_attrs.get("key")
        if not key or (arch_name and key["arch"] != arch_name) or (stems and key["stem"] not in stems):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = live(study.get_trials(deepcopy=False))    # a dead worker's attempt, retried, does not count
        done = [t for t in trials if t.state == COMPLETE]
        # ties go to the earlier planned trial (seeds come first), whichever worker ran it and when
        best = min(done, key=lambda t: (t.value, t.user_attrs.get(SLOT, t.number))) if done else None
        default = next((t.value for t in done if t.user_attrs.get("seed") == "default"), None)
        counts = {}
        for t in trials:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        out.append(StudyResult(summary.study_name, key, best.user_attrs["config"] if best else None,
                               best.value if best else None, default, counts,
                               summary.user_attrs.get("gpu", "none (model)"), summary.user_attrs.get("buckets", {})))
    return out


def _entry(res: StudyResult) -> tuple[str, dict]:
    bucket = {f: v for f, v in res.key["bucket"]}
    name = ",".join(f"{f}={v}" for f, v in bucket.items())
    meta = {"gpu": res.gpu, "toolchain": {t: v for t, v in res.key["toolchain"]},
            "timing_mode": res.key["timing_mode"], "date": datetime.date.today().isoformat(),
            "dtype": res.key["dtype"], "template_hash": res.key["template_hash"],
            "extras": {k: v for k, v in res.key["extras"]}, "value_s": res.best_s, "default_s": res.default_s,
            "trials": sum(res.counts.values()), "study": res.study_name}
    if meta["toolchain"].get("cuda") == "none":
        meta["toolchain"]["cuda"] = None
    return name, {"bucket": bucket, "config": res.best_config, "meta": meta}


def _merge(doc: dict, name: str, entry: dict) -> bool:
    old = doc["entries"].get(name)
    if old and old["meta"].get("timing_mode") != "model" and entry["meta"]["timing_mode"] == "model":
        return False
    doc["entries"][name] = entry
    return True


def export(storage, arch, stems=None, root: Path | None = None) -> list[Path]:
    """Write the winners of every finished study for `arch` into <root>/<arch>/<stem>.json. Returns the files.

    Raises tuned.TunedFileError when an existing file is corrupt (nothing is written), ValueError when no study
    of this arch has a COMPLETE trial.
    """
    arch_name = parse(arch).name
    found = [r for r in results(storage, arch_name, stems) if r.best_config is not None]
    if not found:
        raise ValueError(f"no finished study for {arch_name}" + (f" and kernels {list(stems)}" if stems else ""))
    by_stem: dict[str, list[StudyResult]] = {}
    for r in found:
        by_stem.setdefault(r.key["stem"], []).append(r)
    docs = {}
    for stem, rows in by_stem.items():
        path = tuned.file_for(stem, arch_name, root)
        doc = tuned.read_file(path) if path.exists() else \
            {"format": tuned.FORMAT, "stem": stem, "arch": arch_name, "buckets": rows[0].buckets, "entries": {}}
        for r in rows:
            _merge(doc, *_entry(r))
        docs[path] = doc
    for path, doc in docs.items():   # every file validated before any is written
        _write_atomic(path, doc)
    return sorted(docs)


def _write_atomic(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
