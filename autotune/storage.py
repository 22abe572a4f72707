"""Where studies live: an SQLite file by default, any SQLAlchemy URL (a PostgreSQL server for several machines), or
an Optuna journal file (`journal:PATH`, for a shared file system such as NFS where SQLite's locks are unsafe).

    <path> or sqlite:///<path>          one machine (or several processes on it)
    postgresql://user@host:port/db      several machines on one server (pip install psycopg2-binary)
    journal:<path>                      several machines on one shared folder (Optuna's JournalFileBackend with its
                                        NFS-safe lock: a link(2)-created lock file)

Liveness of trials is dskc's own (autotune/slots.py: a heartbeat counter in the trial's system attributes), the same
on every storage; `fail_if_running` is the one step that must be atomic across processes for it.
"""
from __future__ import annotations

import time
from pathlib import Path

import optuna

from dskc import knobs

JOURNAL = "journal:"


class StorageError(RuntimeError):
    """The tuning database cannot be opened (bad URL, unwritable path, server down)."""


def default_url() -> str:
    """sqlite file under the dskc cache dir: <cache_dir>/autotune/optuna.db."""
    return f"sqlite:///{knobs.get().cache_dir / 'autotune' / 'optuna.db'}"


def normalize_url(url: str | Path | None) -> str:
    """A storage URL from a URL, `journal:PATH`, a plain file path (-> sqlite) or None (-> default_url())."""
    if url is None or url == "":
        return default_url()
    url = str(url)
    if url.startswith(JOURNAL):
        return JOURNAL + str(Path(url[len(JOURNAL):]).expanduser().resolve())
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def open_storage(url: str | Path | None = None):
    """Open (creating if needed) the storage at `url`. Raises StorageError with the URL and the cause."""
    url = normalize_url(url)
    if url.startswith(JOURNAL):
        return _open_journal(Path(url[len(JOURNAL):]))
    kwargs = {}
    if url.startswith("sqlite:///"):
        _make_parent(Path(url[len("sqlite:///"):]))
        # isolation_level=None: pysqlite stops opening transactions itself (it did so only before a write, so
        # Optuna's read-check-write of a WAITING trial was not atomic and two workers could both run one enqueued
        # trial: optuna/optuna#4621); _serialize_sqlite_writes then starts every transaction with BEGIN IMMEDIATE.
        kwargs = {"connect_args": {"timeout": 120, "isolation_level": None}}
    storage = _open_rdb(url, kwargs)
    if url.startswith("sqlite:"):
        _serialize_sqlite_writes(storage.engine)
    return storage


def _open_rdb(url: str, kwargs: dict, attempts: int = 4):
    """RDBStorage(url). Two processes opening a new database at the same moment both create its schema and one
    of them fails (a duplicate table or alembic_version row): that one tries again and finds the schema made."""
    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except DBAPIError as exc:   # IntegrityError / OperationalError / ProgrammingError: maybe the schema race
            if attempt == attempts - 1:
                raise StorageError(f"cannot open tuning database {url!r}: {type(exc).__name__}: {exc}") from exc
            time.sleep(0.25 * (attempt + 1))
        except Exception as exc:  # SQLAlchemy raises many types (ArgumentError, ModuleNotFound...)
            raise StorageError(f"cannot open tuning database {url!r}: {type(exc).__name__}: {exc}") from exc


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the folder of tuning database {path}: {exc}") from exc


def _serialize_sqlite_writes(engine) -> None:
    """Every transaction on this engine starts with BEGIN IMMEDIATE: it takes SQLite's write lock up front, so a
    read-check-write (Optuna popping an enqueued trial, telling a result) is atomic across processes; others wait
    (busy timeout) instead of interleaving. The SQLAlchemy recipe for pysqlite's transaction handling."""
    from sqlalchemy import event

    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    engine.dispose()


class JournalStorage(optuna.storages.JournalStorage):
    """Optuna's journal storage over one file, plus the lock file that makes `fail_if_running` atomic."""

    def __init__(self, path: Path):
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        super().__init__(JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path))))
        self.path = path
        self._fail_lock = JournalFileSymlinkLock(f"{path}.fail")

    def fail_if_running(self, trial_id: int) -> bool:
        """Under the lock every dskc worker takes for this step: FAIL the trial if it is still RUNNING. (The
        journal itself records a second FAIL of a finished trial and ignores it on replay, without telling the
        writer, so two workers would both think they had failed it and both retry it.)"""
        from optuna.storages.journal._file import get_lock_file

        with get_lock_file(self._fail_lock):
            if self.get_trial(trial_id).state != optuna.trial.TrialState.RUNNING:   # get_trial re-reads the log
                return False
            self.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            # the owner may have told its result (without this lock) between the check and the write: the log's
            # order decides, and a finished trial ignores what comes after
            return self.get_trial(trial_id).state == optuna.trial.TrialState.FAIL


def _open_journal(path: Path) -> JournalStorage:
    _make_parent(path)
    try:
        return JournalStorage(path)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot open tuning journal {path}: {type(exc).__name__}: {exc}") from exc


def fail_if_running(storage, trial_id: int) -> bool:
    """Mark a RUNNING trial FAIL, atomically across processes; False when it had already finished (another worker
    failed it first, or its owner told its result). RDB: the row is locked (FOR UPDATE; BEGIN IMMEDIATE on
    SQLite) and a finished trial raises; journal: JournalStorage.fail_if_running."""
    if isinstance(storage, JournalStorage):
        return storage.fail_if_running(trial_id)
    try:
        return storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
