"""An Optuna storage that waits: a database that goes away for a while (a restart, a network
blip) is waited for, and a worker whose database is gone for good says so."""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
from optuna.storages import RDBStorage

from hpsearch.errors import StorageError
from hpsearch.spec import StudySpec, hide_secrets, mask_password
from hpsearch.storage._connect import (checked_driver_url, engine_kwargs, first_line, opening, prepare_sqlite,
                                       sync_on_checkpoint)
from hpsearch.storage._disk import disk_full_cause, disk_full_error

T = TypeVar("T")
logger = logging.getLogger(__name__)

# How long a worker waits for a lost database before it gives up: long enough for a server
# restart or a failover, short enough that a worker whose database is gone for good says so.
OUTAGE_S = 120.0
_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # then 10 s between tries, with jitter so workers don't stampede
_OPEN_TRIES = 8  # creating the tables of a fresh database races with the other workers: retry that


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

    def __init__(self, url: str, *, outage_s: float = OUTAGE_S, **kwargs: Any) -> None:
        self.outage_s = outage_s
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
                            f"({hide_secrets(first_line(exc), self.url)}). Finished trials are kept; start the worker "
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
        logger.warning("lost the Optuna storage %s (%s); waiting up to %g s for it to come back.",
                       mask_password(self.url), hide_secrets(first_line(exc), self.url), self.outage_s)

    def _came_back(self) -> None:
        if self._down_since is None:  # the common case, without taking the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            down = time.monotonic() - self._down_since
            self._down_since = None
            self._up_since = time.monotonic()
        logger.info("the Optuna storage %s is back after %.0f s; the worker goes on.", mask_password(self.url), down)

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
) -> ResilientStorage:
    """Return a storage on the study's URL with heartbeats that rides out outages, or raise StorageError."""
    url = checked_driver_url(url or study.storage, what="the Optuna storage")
    for attempt in range(_OPEN_TRIES):
        try:
            with opening(url):
                if url.startswith("sqlite"):
                    prepare_sqlite(url)
                storage = ResilientStorage(
                    url,
                    outage_s=outage_s,
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
                f"cannot open the Optuna storage {mask_password(url)}: {hide_secrets(first_line(exc), url)}. "
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
