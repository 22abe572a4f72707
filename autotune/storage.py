"""Where studies live: Optuna RDB storage, an SQLite file by default, any SQLAlchemy URL for a shared server.

Several worker processes share one storage and cooperate on one study; a heartbeat marks the trials of a killed
worker FAIL once `grace_s` passes (a finished trial cannot take a user attr; the retry that re-enqueues its config
carries system_attrs["failed_trial"] = its id), so a killed session resumes where it stopped.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import optuna

from dskc import knobs


class StorageError(RuntimeError):
    """The tuning database cannot be opened (bad URL, unwritable path, server down)."""


def default_url() -> str:
    """sqlite file under the dskc cache dir: <cache_dir>/autotune/optuna.db."""
    return f"sqlite:///{knobs.get().cache_dir / 'autotune' / 'optuna.db'}"


def normalize_url(url: str | Path | None) -> str:
    """A SQLAlchemy URL from a URL, a plain file path (-> sqlite) or None (-> default_url())."""
    if url is None or url == "":
        return default_url()
    url = str(url)
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def open_storage(url: str | Path | None = None, heartbeat_s: int = 5, grace_s: int = 20) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the RDB storage at `url`. Raises StorageError with the URL and the cause."""
    url = normalize_url(url)
    kwargs = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder of tuning database {path}: {exc}") from exc
        # isolation_level=None: pysqlite stops opening transactions itself (it did so only before a write, so
        # Optuna's read-check-write of a WAITING trial was not atomic and two workers could both run one enqueued
        # trial: optuna/optuna#4621); _serialize_sqlite_writes then starts every transaction with BEGIN IMMEDIATE.
        kwargs = {"connect_args": {"timeout": 120, "isolation_level": None}}
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_cls(max_retry=1, inherit_intermediate_values=False)
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    cb_name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else \
        "failed_trial_callback"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                                 grace_period=grace_s, **{cb_name: retry})
    except Exception as exc:  # SQLAlchemy raises many types (ArgumentError, OperationalError, ModuleNotFound...)
        raise StorageError(f"cannot open tuning database {url!r}: {type(exc).__name__}: {exc}") from exc
    if url.startswith("sqlite:"):
        _serialize_sqlite_writes(storage.engine)
    return storage


def _serialize_sqlite_writes(engine) -> None:
    """Every transaction on this engine starts with BEGIN IMMEDIATE: it takes SQLite's write lock up front, so a
    read-check-write (Optuna popping an enqueued trial, telling a result) is atomic across processes; others wait
    (busy timeout) instead of interleaving. The SQLAlchemy recipe for pysqlite's transaction handling."""
    from sqlalchemy import event

    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    engine.dispose()
