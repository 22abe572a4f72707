"""Content-addressed build cache: one directory per key, written in a temp dir and renamed atomically.

Safe when several processes build the same key at once: a builder holds the key's lock file (flock) from its
second lookup until its entry is published, so the others wait and then find the entry (one build per key, not one
per process); without locks (a read-only cache, a file system without flock) the first rename wins and the others
discard theirs. A reader never sees a half-written entry: entries appear whole, by rename.
Each entry carries a manifest with the sha256 of every file; an entry that does not match it (a truncated or
edited file, an edited manifest) is detected on read, moved aside and rebuilt. `read_verified` gives a file's bytes
only when they match the manifest at the moment they are read. A cache that cannot be written (no permission,
read-only, the disk full) is a CacheError that says so and names DSKC_CACHE_DIR, never a failed kernel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from dskc import knobs

log = logging.getLogger("dskc.build")
MANIFEST = "manifest.json"
LOCKS = ".locks"
# errors that say "this folder cannot take a write": the environment, not the kernel
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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


def environment_error(exc: OSError, where: Path | str) -> CacheError | None:
    """A CacheError naming the cause when `exc` says the folder cannot be written (full, read-only, no
    permission); None for other errors."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "it is not writable"
    return CacheError(f"cannot write dskc build files in {where}: {why} ({exc.strerror}); free space or set "
                      "DSKC_CACHE_DIR to a writable folder with room")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_root() -> Path:
    return knobs.get().cache_dir


def _entry_path(key: CacheKey) -> Path:
    return cache_root() / key.kind / key.digest()


def _manifest_files(entry: Path) -> dict:
    return json.loads((entry / MANIFEST).read_text())["files"]


def _verify(entry: Path) -> bool:
    try:
        files = _manifest_files(entry)
        return bool(files) and all(_sha(entry / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _quarantine(entry: Path) -> None:
    """Move a corrupt entry aside (one rename: a concurrent publisher never loses files to our delete), then
    delete it. A read-only cache keeps it: the rebuild reports that the cache cannot be written."""
    trash = entry.parent / f".trash-{uuid.uuid4().hex}"
    try:
        os.rename(entry, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def lookup(key: CacheKey) -> Path | None:
    """The entry's directory if it is present and intact; a corrupt entry is moved aside (and logged)."""
    entry = _entry_path(key)
    if not entry.exists():
        return None
    if _verify(entry):
        return entry
    log.warning("dskc cache entry %s does not match its manifest (truncated, edited or corrupt); rebuilding it",
                entry)
    _quarantine(entry)
    return None


@contextlib.contextmanager
def lock(keys):
    """Hold the lock file of every key (sorted, so two processes never wait on each other in a cycle) for the
    block: one process builds a key while the others wait, then find it. Without a writable lock folder (a
    read-only cache) or flock, nothing is locked: atomic publication alone keeps the cache consistent."""
    import fcntl

    held = []
    try:
        folder = cache_root() / LOCKS
        folder.mkdir(parents=True, exist_ok=True)
        for digest in sorted({k.digest() for k in keys}):
            fd = os.open(folder / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            held.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        log.info("dskc cache: builds not locked (%s); concurrent builders may build a kernel twice", exc)
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)                                # closing releases the flock


def check_writable(kind: str) -> None:
    """Raise CacheError now, before a build is spent, when entries of `kind` cannot be published."""
    root = cache_root() / kind
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    except OSError as exc:
        raise CacheError(f"dskc cache directory {root} is not writable ({exc}); set DSKC_CACHE_DIR to a writable "
                         "folder") from exc


def publish(key: CacheKey, build: Callable[[Path], dict]) -> Path:
    """Run `build(tmpdir)` (it writes files there and returns extra metadata), then publish the folder as the
    key's entry with a manifest of sha256s, atomically. Returns the entry. Call it under `lock([key])`."""
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
        return _rename_into_place(tmp, _entry_path(key))
    except OSError as exc:
        env = environment_error(exc, root)
        if env is None:
            raise
        raise env from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _rename_into_place(tmp: Path, entry: Path) -> Path:
    try:
        os.rename(tmp, entry)          # atomic; fails if another process published first
    except OSError:
        if not _verify(entry):
            _quarantine(entry)
            os.rename(tmp, entry)
    return entry


def get_or_build(key: CacheKey, build: Callable[[Path], dict]) -> tuple[Path, bool]:
    """Return (entry dir, hit). On a miss, `build(tmpdir)` writes files there and returns extra metadata."""
    found = lookup(key)
    if found is not None:
        return found, True
    with lock([key]):
        found = lookup(key)            # another process may have built it while we waited for the lock
        if found is not None:
            return found, True
        return publish(key, build), False


def read_meta(entry: Path) -> dict:
    return json.loads((entry / MANIFEST).read_text())["meta"]


def read_verified(entry: Path, name: str) -> bytes:
    """The bytes of one file of an entry, checked against the entry's manifest as they are read (a file changed
    since lookup is a CacheError, never a wrong file passed on)."""
    try:
        want = _manifest_files(entry)[name]
        data = (entry / name).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"dskc cache entry {entry} cannot give {name}: {type(exc).__name__}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != want:
        raise CacheError(f"{entry / name} changed since it was built (it does not match the entry's manifest); "
                         "rebuild it (remove the entry) before using it")
    return data
