"""Optuna storages that survive many workers: SQLite in WAL mode, pooled PostgreSQL, heartbeats,
and a database that goes away for a while (a restart, a network blip) and comes back.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hpsearch.errors import StorageError
from hpsearch.spec import StudySpec, hide_secrets, mask_password

T = TypeVar("T")
Warn = Callable[[str], None]

# A busy SQLite file is waited for, not failed: trials write a handful of rows per epoch, so a
# lock is held for milliseconds and 120 s covers even a slow shared disk.
SQLITE_TIMEOUT_S = 120
# How long a worker waits for a lost database before it gives up: long enough for a server
# restart or a failover, short enough that a worker whose database is gone for good says so.
OUTAGE_S = 120.0
_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # then 10 s between tries, with jitter so workers don't stampede
_OPEN_TRIES = 8  # creating the tables of a fresh database races with the other workers: retry that


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
def announced_wait(what: str, warn: Warn | None = None, *, after_s: float = NOTICE_AFTER_S) -> Iterator[None]:
    """Run the block; should it last longer than ``after_s``, say once that it waits for ``what``."""
    timer = threading.Timer(after_s, warn or _stderr, (f"waiting for {what}...",))
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


def opening(url: str, warn: Warn | None = None) -> contextlib.AbstractContextManager[None]:
    """Return a context for opening the Optuna storage ``url`` that says what it waits for, if it is slow."""
    if url.startswith("sqlite"):
        return contextlib.nullcontext()  # a local file: its lock waits are no news
    return announced_wait(f"the Optuna storage {mask_password(url)} (given up on after {CONNECT_TIMEOUT_S} s "
                          "without an answer)", warn)


# --------------------------------------------------------------------------- a full disk


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
    return StorageError(f"{what}: the disk is full: {hide_secrets(_first_line(cause), url)}. Finished trials are "
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


# The pip package of each database driver SQLAlchemy may ask for, for the error message.
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


# --------------------------------------------------------------------------- a storage that waits


def is_connection_error(exc: BaseException) -> bool:
    """Return whether ``exc`` means the database is unreachable or busy for now (worth waiting for)."""
    import sqlalchemy.exc

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if getattr(current, "connection_invalidated", False):
            return True
        # The driver's own class (psycopg2.OperationalError, sqlite3.OperationalError), unwrapped.
        if type(current).__name__ in ("OperationalError", "InterfaceError") and \
                type(current).__module__.split(".")[0] in ("psycopg2", "psycopg", "sqlite3", "pymysql"):
            return True
        current = current.__cause__ or current.__context__
    return False


class ResilientStorage(RDBStorage):
    """An RDBStorage whose calls wait for a lost database instead of failing the worker.

    Every storage call that fails on a connection error is retried with backoff for up to
    ``outage_s`` seconds; then StorageError says the database is gone. Heartbeats never wait
    (a missed one is sent at the next interval) and never kill the heartbeat thread. After an
    outage, every running trial looks stale, so for one grace period this worker judges none.
    """

    def __init__(self, url: str, *, outage_s: float = OUTAGE_S, warn: Warn | None = None,
                 **kwargs: Any) -> None:
        self.outage_s = outage_s
        self._warn = warn or _stderr
        self._lock = threading.Lock()
        self._down_since: float | None = None  # monotonic time the current outage was first seen
        self._up_since = 0.0  # monotonic time the last outage ended (0: none seen)
        self._local = threading.local()
        super().__init__(url, **kwargs)

    def _retrying(self, call: Callable[[], T]) -> T:
        if getattr(self._local, "inside", False):  # an inner call: the outer one already waits
            return call()
        self._local.inside = True
        try:
            started, attempt = time.monotonic(), 0
            while True:
                try:
                    result = call()
                except Exception as exc:  # noqa: BLE001 - sorted below: only connection errors wait
                    if disk_full_cause(exc) is not None:  # not an outage: waiting would not free the disk
                        raise disk_full_error(exc, f"the Optuna storage {mask_password(self.url)}", self.url) from None
                    if not is_connection_error(exc):
                        raise
                    waited = time.monotonic() - started
                    if waited >= self.outage_s:
                        raise StorageError(
                            f"lost the Optuna storage {mask_password(self.url)} for {waited:.0f} s "
                            f"({hide_secrets(_first_line(exc), self.url)}). Finished trials are kept; start the worker "
                            "again once the database is back."
                        ) from None
                    self._went_down(exc)
                    delay = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)] * random.uniform(0.8, 1.2)
                    time.sleep(min(delay, max(0.05, self.outage_s - waited)))
                    attempt += 1
                    continue
                self._came_back()
                return result
        finally:
            self._local.inside = False

    def _went_down(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        self._warn(f"warning: lost the Optuna storage {mask_password(self.url)} "
                   f"({hide_secrets(_first_line(exc), self.url)}); waiting up to {self.outage_s:g} s for it to come "
                   "back.")

    def _came_back(self) -> None:
        if self._down_since is None:  # the common case, without taking the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            down = time.monotonic() - self._down_since
            self._down_since = None
            self._up_since = time.monotonic()
        self._warn(f"the Optuna storage {mask_password(self.url)} is back after {down:.0f} s; the worker goes on.")

    def recovering(self) -> bool:
        """Return whether an outage ended less than a grace period ago (every heartbeat looks old)."""
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        return self._down_since is not None or (self._up_since > 0 and time.monotonic() - self._up_since < grace)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - the heartbeat thread must outlive an outage
            if disk_full_cause(exc) is not None:
                return  # the worker's own next write says so, and stops
            if not is_connection_error(exc):
                raise
            self._went_down(exc)  # no waiting: the next beat is one interval away
            return
        self._came_back()

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self.recovering():
            # Right after an outage every heartbeat is old: give the live workers a grace period
            # to beat again before calling any of their trials dead.
            return []
        return self._retrying(lambda: super(ResilientStorage, self)._get_stale_trial_ids(study_id))


def _waiting(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(lambda: method(self, *args, **kwargs))

    return call


# Every call a worker makes between and during trials. Reads are safe to repeat; a write whose
# commit was lost with the connection is repeated too (the rare duplicate is the price of
# keeping the worker alive). Listed, not discovered, so a new Optuna method is a conscious choice.
_WAITED_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_id_from_study_id_trial_number", "get_trial_param", "set_trial_state_values",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
    "get_all_trials", "get_best_trial", "get_n_trials",
)
for _name in _WAITED_CALLS:
    setattr(ResilientStorage, _name, _waiting(_name))


def make_storage(
    study: StudySpec,
    *,
    url: str | None = None,
    stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    outage_s: float = OUTAGE_S,
    warn: Warn | None = None,
) -> ResilientStorage:
    """Return a storage on the study's URL with heartbeats that rides out outages, or raise StorageError."""
    url = checked_driver_url(url or study.storage, what="the Optuna storage")
    for attempt in range(_OPEN_TRIES):
        try:
            with opening(url, warn):
                if url.startswith("sqlite"):
                    prepare_sqlite(url)
                storage = ResilientStorage(
                    url,
                    outage_s=outage_s,
                    warn=warn,
                    engine_kwargs=engine_kwargs(url),
                    heartbeat_interval=study.heartbeat_interval,
                    grace_period=study.grace_period,
                    heartbeat_stale_trial_callback=stale_trial_callback,
                )
            if url.startswith("sqlite"):
                sync_on_checkpoint(storage.engine)
            return storage
        except Exception as exc:  # noqa: BLE001 - any driver error means: cannot use this storage
            if _creation_race(exc) and attempt < _OPEN_TRIES - 1:
                # Several workers on a fresh database all create Optuna's tables at once; the
                # losers see "already exists" (or a lock). The tables are there now: open again.
                time.sleep(random.uniform(0.2, 1.0))
                continue
            raise StorageError(
                f"cannot open the Optuna storage {mask_password(url)}: {hide_secrets(_first_line(exc), url)}. "
                "Check that the database server is running and reachable, that the user and password (from the "
                "environment) are right, and that the URL has the form sqlite:///path.db or "
                "postgresql://user@host:5432/db."
            ) from None
    raise AssertionError  # unreachable


def _creation_race(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("already exists", "duplicate key", "database is locked", "unique constraint"))


def rdb(study: optuna.Study) -> RDBStorage:
    """Return the RDBStorage under a study (Optuna wraps it in a cache; heartbeats live in the RDB)."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


# --------------------------------------------------------------------------- heartbeats


@dataclass(frozen=True)
class RunningTrial:
    """A RUNNING trial and how recently its worker showed signs of life."""

    trial_id: int
    number: int
    silent_s: float  # seconds since its last heartbeat (since its start when it never sent one)
    heartbeat: bool  # False: it never sent a heartbeat (its worker died between creating and starting it)


def running_trials(study: optuna.Study) -> list[RunningTrial]:
    """Return the study's RUNNING trials with the seconds since each one's last heartbeat."""
    from optuna.storages._rdb import models  # Optuna has no public API for heartbeat times
    from sqlalchemy import func

    storage = rdb(study)
    if not isinstance(storage, RDBStorage):
        return []
    study_id = storage.get_study_id_from_name(study.study_name)

    def query() -> list[RunningTrial]:
        session = storage.scoped_session()
        try:
            # The database's clock stamps heartbeats, so it also tells their age (naive, as in Optuna).
            now = session.execute(func.now()).scalar().replace(tzinfo=None)
            trials = (session.query(models.TrialModel)
                      .filter(models.TrialModel.study_id == study_id)
                      .filter(models.TrialModel.state == TrialState.RUNNING).all())
            out = []
            for t in trials:
                beats = list(t.heartbeats)
                if beats:
                    out.append(RunningTrial(t.trial_id, t.number, max(0.0, (now - beats[0].heartbeat)
                                                                      .total_seconds()), True))
                else:
                    # datetime_start is the worker's local time; good enough to tell minutes from seconds.
                    silent = (datetime.datetime.now() - (t.datetime_start or datetime.datetime.now())).total_seconds()
                    out.append(RunningTrial(t.trial_id, t.number, max(0.0, silent), False))
            return sorted(out, key=lambda r: r.number)
        finally:
            session.close()

    if isinstance(storage, ResilientStorage):
        return storage._retrying(query)
    return query()


def fail_stale_trials(study: optuna.Study, *, grace_period: float) -> list[int]:
    """Fail RUNNING trials silent for longer than ``grace_period`` s, run the stale-trial callback
    (retry, MLflow run KILLED) on each, and return their numbers.

    Unlike Optuna's own check this also catches trials that never sent a heartbeat.
    """
    storage = rdb(study)
    if isinstance(storage, ResilientStorage) and storage.recovering():
        return []  # see ResilientStorage._get_stale_trial_ids
    callback = storage.get_heartbeat_stale_trial_callback() if isinstance(storage, RDBStorage) else None
    failed = []
    for trial in running_trials(study):
        if trial.silent_s <= grace_period:
            continue
        try:
            if not study._storage.set_trial_state_values(trial.trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        failed.append(trial.number)
        if callback is not None:
            callback(study, study._storage.get_trial(trial.trial_id))
    return failed


# --------------------------------------------------------------------------- claims


def claim(study: optuna.Study, key: str, value: Any) -> bool:
    """Store the study system attr ``key`` = ``value`` unless it exists; return whether this call stored it.

    Atomic on SQLite and PostgreSQL alike: the row is inserted, and Optuna's table is unique on
    (study, key), so of processes claiming one key at once exactly one insert succeeds. ``value``
    should be unique to the claimant (a token in it), so that an insert repeated after a lost
    connection, which finds its own row, still counts as won.
    """
    import sqlalchemy
    from optuna.storages._rdb import models  # Optuna has no insert-if-absent

    storage = rdb(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    text = json.dumps(value)

    def insert() -> bool:
        session = storage.scoped_session()
        try:
            session.add(models.StudySystemAttributeModel(study_id=study_id, key=key, value_json=text))
            session.commit()
            return True
        except sqlalchemy.exc.IntegrityError:
            session.rollback()
            return _read_claim(storage, study_id, key) == text
        finally:
            session.close()

    return _retried(storage, insert)


def swap_claim(study: optuna.Study, key: str, old: Any, new: Any) -> bool:
    """Replace the claim ``key`` by ``new`` if it still holds ``old``; return whether it did (compare and swap)."""
    return _update_claim(study, key, old, new)


def release_claim(study: optuna.Study, key: str, value: Any) -> None:
    """Remove the claim ``key`` if it still holds ``value`` (a claim taken over by another is left alone)."""
    _update_claim(study, key, value, None)


def read_claim(study: optuna.Study, key: str) -> Any:
    """Return the value of the claim ``key``, or None."""
    storage = rdb(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    text = _retried(storage, lambda: _read_claim(storage, study_id, key))
    return None if text is None else json.loads(text)


def claims(study: optuna.Study, prefix: str) -> dict[str, Any]:
    """Return the study system attrs whose key starts with ``prefix``."""
    return {k: v for k, v in study._storage.get_study_system_attrs(study._study_id).items() if k.startswith(prefix)}


def _update_claim(study: optuna.Study, key: str, old: Any, new: Any) -> bool:
    from optuna.storages._rdb import models

    storage = rdb(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    table = models.StudySystemAttributeModel.__table__
    where = (table.c.study_id == study_id) & (table.c.key == key) & (table.c.value_json == json.dumps(old))

    def update() -> bool:
        session = storage.scoped_session()
        try:
            statement = table.delete() if new is None else table.update().values(value_json=json.dumps(new))
            changed = session.execute(statement.where(where)).rowcount
            session.commit()
            # A repeat after a lost commit finds the row already changed: it is ours if it holds `new`.
            return changed == 1 or (new is not None and _read_claim(storage, study_id, key) == json.dumps(new))
        finally:
            session.close()

    return _retried(storage, update)


def _read_claim(storage: RDBStorage, study_id: int, key: str) -> str | None:
    from optuna.storages._rdb import models

    table = models.StudySystemAttributeModel.__table__
    session = storage.scoped_session()
    try:
        return session.execute(table.select().with_only_columns(table.c.value_json)
                               .where((table.c.study_id == study_id) & (table.c.key == key))).scalar()
    finally:
        session.close()


def _retried(storage: RDBStorage, call: Callable[[], T]) -> T:
    return storage._retrying(call) if isinstance(storage, ResilientStorage) else call()


# --------------------------------------------------------------------------- messages


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
