"""A full disk: recognised in whatever an error wraps, said in one line, and room made in SQLite."""

from __future__ import annotations

import contextlib
import errno
import sqlite3

from optuna.storages import RDBStorage

from hpsearch.errors import StorageError
from hpsearch.spec import hide_secrets
from hpsearch.storage._connect import first_line

_DISK_FULL = ("database or disk is full", "sqlite_full", "no space left on device", "could not extend file",
              "disk full", "disk is full", "disk quota exceeded")


def disk_full_cause(exc: BaseException) -> BaseException | None:
    """Return the error in ``exc``'s chain that says a disk is full (no wait helps: someone must free
    space), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        if getattr(current, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return current
        if any(s in str(current).lower() for s in _DISK_FULL):
            return current
        current = current.__cause__ or current.__context__
    return None


def disk_full_error(exc: BaseException, what: str, url: str) -> StorageError:
    """Return the error that stops a worker on a full disk, naming it as such: ``what`` could not be
    written (the message hides the secrets of the storage ``url``)."""
    cause = disk_full_cause(exc) or exc
    if isinstance(cause, StorageError):  # already said (by the storage)
        return cause
    return StorageError(f"{what}: the disk is full: {hide_secrets(first_line(cause), url)}. Finished trials are "
                        "kept; free some space (or point --runs-dir or the storage elsewhere), then run the same "
                        "command again to resume.")


def shrink_sqlite(storage: RDBStorage) -> None:
    """Give a SQLite storage's write-ahead log back to the disk (its pages are copied into the database).

    The log grows until a checkpoint, so on a full disk it is most of what the study took lately;
    after this, closing a trial fits again. No-op for other databases.
    """
    if storage.url.startswith("sqlite"):
        with contextlib.suppress(Exception), storage.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
