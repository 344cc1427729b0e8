"""Optuna storages that survive many workers: SQLite in WAL mode, pooled PostgreSQL, heartbeats."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage

from hpsearch.errors import StorageError
from hpsearch.spec import StudySpec, mask_password

# A busy SQLite file is waited for, not failed: trials write a handful of rows per epoch, so a
# lock is held for milliseconds and 120 s covers even a slow shared disk.
SQLITE_TIMEOUT_S = 120


def engine_kwargs(url: str) -> dict[str, Any]:
    """Return SQLAlchemy engine settings for ``url`` that suit long trials and many workers."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    return {
        "pool_pre_ping": True,  # a connection dropped during a long trial is replaced, not failed
        "pool_size": 2,  # a worker needs one connection plus one for its heartbeat thread
        "max_overflow": 2,  # bounded: 100 workers stay under PostgreSQL's default 100 x 4 connections
        "pool_recycle": 300,  # below common server/proxy idle timeouts
        "pool_timeout": 60,
    }


def prepare_sqlite(url: str) -> None:
    """Create the SQLite file's folder and switch the file to WAL (readers never block the writer)."""
    path = Path(url.split(":///", 1)[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
    finally:
        conn.close()


def driver_url(url: str) -> str:
    """Return ``url`` with a PostgreSQL driver that is installed (psycopg2 ships with hpsearch)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        try:
            import psycopg  # noqa: F401 - SQLAlchemy's default driver, if the user has it
        except ImportError:
            return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def make_storage(
    study: StudySpec,
    *,
    url: str | None = None,
    stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> RDBStorage:
    """Return an RDBStorage on the study's URL with heartbeats, or raise StorageError."""
    url = driver_url(url or study.storage)
    try:
        if url.startswith("sqlite"):
            prepare_sqlite(url)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs(url),
            heartbeat_interval=study.heartbeat_interval,
            grace_period=study.grace_period,
            heartbeat_stale_trial_callback=stale_trial_callback,
        )
    except Exception as exc:  # noqa: BLE001 - any driver error means: cannot use this storage
        raise StorageError(
            f"cannot open the Optuna storage {mask_password(url)}: {_safe(_first_line(exc), url)}. Check that the "
            "database "
            "server is running and reachable, that the user and password (from the environment) are right, "
            "and that the URL has the form sqlite:///path.db or postgresql://user@host:5432/db."
        ) from None


def _safe(text: str, url: str) -> str:
    """Return ``text`` without the URL's password, wherever a driver quoted it."""
    masked = mask_password(url)
    password = url.split("://", 1)[-1].split("@", 1)[0].partition(":")[2] if "@" in url else ""
    text = text.replace(url, masked)
    return text.replace(password, "***") if password else text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
