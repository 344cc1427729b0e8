"""Opening a database: its URL, its driver, its engine settings, and waits that say what they wait for."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from hpsearch.errors import StorageError
from hpsearch.spec import mask_password

logger = logging.getLogger(__name__)

# A busy SQLite file is waited for, not failed: trials write a handful of rows per epoch, so a
# lock is held for milliseconds and 120 s covers even a slow shared disk.
SQLITE_TIMEOUT_S = 120
# A database host that accepts the connection and never answers is given up on after this long
# (then a worker's outage wait, or the command's error, takes over), rather than hanging for ever.
CONNECT_TIMEOUT_S = 10
# What a PostgreSQL connection is opened with, unless its URL sets the same option:
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    # A peer that vanished (host down, network cut) is noticed in about a minute, not hours.
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    # A statement stuck behind a lock (or on a wedged server) fails after 2 minutes and is retried
    # like a lost connection; Optuna's statements take milliseconds.
    "options": "-c statement_timeout=120000",
}
# Drivers on libpq, which takes the options above (another driver, such as pg8000, gets none).
_LIBPQ_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg", "postgresql+psycopg2cffi")
NOTICE_AFTER_S = 3.0  # a wait longer than this says what it waits for; a quick one says nothing


def engine_kwargs(url: str) -> dict[str, Any]:
    """Return SQLAlchemy engine settings for ``url`` that suit long trials and many workers."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,  # a connection dropped during a long trial is replaced, not failed
        "pool_size": 2,  # a worker needs one connection plus one for its heartbeat thread
        "max_overflow": 2,  # bounded: 100 workers stay under PostgreSQL's default 100 x 4 connections
        "pool_recycle": 300,  # below common server/proxy idle timeouts
        "pool_timeout": 60,
    }
    # Options the URL sets itself win: SQLAlchemy would let connect_args override them.
    given = set(parse_qs(url.partition("?")[2]))
    scheme = url.partition("://")[0]
    if scheme in _LIBPQ_SCHEMES:
        kwargs["connect_args"] = {k: v for k, v in PG_CONNECT_ARGS.items() if k not in given}
    elif scheme in ("mysql", "mysql+pymysql", "mysql+mysqldb") and "connect_timeout" not in given:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


@contextlib.contextmanager
def announced_wait(what: str, *, after_s: float = NOTICE_AFTER_S) -> Iterator[None]:
    """Run the block; should it last longer than ``after_s``, say once that it waits for ``what``."""
    timer = threading.Timer(after_s, logger.info, ("waiting for %s...", what))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def prepare_sqlite(url: str, *, timeout: float = SQLITE_TIMEOUT_S) -> bool:
    """Create the SQLite file's folder, switch the file to WAL (readers never block the writer), and
    return whether it is in WAL mode now (not when another process holds it past ``timeout``)."""
    path = Path(url.split(":///", 1)[1].split("?", 1)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=timeout)
    try:
        # Persistent: stored in the database file.
        return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() == "wal"
    finally:
        conn.close()


def sync_on_checkpoint(engine: Any) -> None:
    """Make every connection of a SQLite ``engine`` in WAL mode commit without waiting for the disk.

    With WAL, synchronous=NORMAL still never corrupts the file and never loses a commit when a
    process dies (a killed worker, Ctrl-C): only a power cut or OS crash can undo the last few
    commits. It spares each commit a disk sync: 3.4 ms each here, some twenty per trial. Used for
    Optuna's storage here and for MLflow's SQLite store (``tracking``); calling it twice is harmless.
    """
    from sqlalchemy import event

    if event.contains(engine, "connect", _sync_normal):
        return
    event.listen(engine, "connect", _sync_normal)
    engine.dispose()  # connections already pooled were opened before the listener


def _sync_normal(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def driver_url(url: str) -> str:
    """Return ``url`` with a PostgreSQL driver that is installed (psycopg2 ships with hpsearch)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        try:
            import psycopg  # noqa: F401 - SQLAlchemy's default driver, if the user has it
        except ImportError:
            return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def opening(url: str) -> contextlib.AbstractContextManager[None]:
    """Return a context for opening the Optuna storage ``url`` that says what it waits for, if it is slow."""
    if url.startswith("sqlite"):
        return contextlib.nullcontext()  # a local file: its lock waits are no news
    return announced_wait(f"the Optuna storage {mask_password(url)} (given up on after {CONNECT_TIMEOUT_S} s "
                          "without an answer)")


_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                    "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "asyncpg": "asyncpg"}


def checked_driver_url(url: str, *, what: str) -> str:
    """Return :func:`driver_url` of a database URL once its driver imports; raise StorageError naming it.

    Without this, a missing driver shows up late and in another shape: as an import traceback in
    optuna-dashboard, or, for an MLflow store, as warnings while nothing is recorded. ``what``
    names the URL in the message ("the Optuna storage", "the MLflow tracking URI").
    """
    url = driver_url(url)
    if "://" not in url or url.split(":", 1)[0].split("+", 1)[0] not in ("postgresql", "mysql"):
        return url
    try:
        from sqlalchemy.engine import make_url

        make_url(url).get_dialect().import_dbapi()
    except ImportError as exc:
        module = exc.name or str(exc)
        package = _DRIVER_PACKAGES.get(module.split(".", 1)[0], module)
        raise StorageError(
            f"{what} {mask_password(url)} needs the Python database driver {module!r}, which is not installed "
            f"here ({exc}). Install it (pip install '{package}'), or name an installed driver in the URL: "
            "postgresql://... and postgresql+psycopg2://... use psycopg2, which hpsearch installs.") from None
    except Exception:  # noqa: BLE001, S110 - a malformed URL: whoever opens it says what is wrong
        pass
    return url


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
