"""Content-addressed build cache: one directory per key, written in a temp dir and renamed atomically.

Safe when several processes build the same key at once (the first rename wins; the others discard theirs).
Each entry carries a manifest with the sha256 of every file; a corrupt entry is detected on read and rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from dskc import knobs

log = logging.getLogger("dskc.build")
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """Everything that changes a build's output. Hashing a frozen dataclass, never a repr string."""
    kind: str                     # "triton" | "cutlass"
    name: str                     # kernel name
    source_hash: str              # sha256 of the template/kernel source
    config: tuple                 # sorted (param, value) pairs
    arch: str
    toolchain: tuple              # sorted (tool, version) pairs

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


class CacheError(RuntimeError):
    pass


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_root() -> Path:
    return knobs.get().cache_dir


def _verify(entry: Path) -> bool:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        return all(_sha(entry / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def lookup(key: CacheKey) -> Path | None:
    """The entry's directory if it is present and intact; a corrupt entry is removed (and logged)."""
    entry = cache_root() / key.kind / key.digest()
    if not entry.exists():
        return None
    if _verify(entry):
        return entry
    log.warning("dskc cache entry %s is corrupt; rebuilding it", entry)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def get_or_build(key: CacheKey, build: Callable[[Path], dict]) -> tuple[Path, bool]:
    """Return (entry dir, hit). On a miss, `build(tmpdir)` writes files there and returns extra metadata."""
    found = lookup(key)
    if found is not None:
        return found, True
    root = cache_root() / key.kind
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    except OSError as exc:
        raise CacheError(f"dskc cache directory {root} is not writable ({exc}); set DSKC_CACHE_DIR to a writable "
                         "folder") from exc
    try:
        meta = build(tmp) or {}
        files = {p.name: _sha(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps({"key": dataclasses.asdict(key), "files": files, "meta": meta},
                                               indent=1, default=str))
        entry = root / key.digest()
        try:
            os.rename(tmp, entry)      # atomic; fails if another process published first
        except OSError:
            if not _verify(entry):
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
        return entry, False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(entry: Path) -> dict:
    return json.loads((entry / MANIFEST).read_text())["meta"]
