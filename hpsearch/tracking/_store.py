"""The store: the tracking URI checked by the spec's rule, and MLflow opened on it safely and with time limits.

A new SQLite store's tables are created under a file lock (workers may open one together), a
SQLite store is switched to WAL with ``synchronous=NORMAL`` (see :func:`_tune_sqlite`): MLflow's
default waits for the disk on every commit, and a trial makes several. MLflow's settings that
have no per-client knob (HTTP retries and timeouts, libpq's connect timeout, the directory store)
are set in the environment around the tracker's own calls only (:class:`_ScopedEnv`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hpsearch.spec import check_tracking_uri
from hpsearch.storage import CONNECT_TIMEOUT_S, checked_driver_url

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a new SQLite store there must not be started by two at once
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from mlflow import MlflowClient

_HTTP_LIMITS = {
    # MLflow retries an HTTP call 7 times with a backoff factor of 2 and waits 120 s for an answer:
    # minutes per call against a dead server. One immediate retry (urllib3 waits only before the
    # second) and a 15 s timeout make it milliseconds when refused, 30 s at most when silent.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    # MLflow prints "View run ... at: <tracking URI>" as each run ends: noise under the progress line,
    # and the URI as given, with any password in it.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def check_store(uri: str) -> str:
    """Return the URI to give MLflow for ``uri``: checked, and a database URL with an installed driver.

    Raises SpecError for a malformed URI (the spec's one rule, :func:`hpsearch.spec.check_tracking_uri`),
    StorageError for one whose database driver is not installed (MLflow would otherwise fail on
    every call, and a study would record nothing but warnings).
    """
    check_tracking_uri(uri)
    return checked_driver_url(uri, what="the MLflow tracking URI")


def open_client(store_uri: str) -> MlflowClient:
    """Return an MlflowClient on ``store_uri`` (which creates a new SQLite store's tables), tuned."""
    from mlflow import MlflowClient

    with _schema_lock(store_uri):
        client = MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
        _tune_sqlite(store_uri, client)
    return client


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a new SQLite store's file while MLflow opens it.

    Opening a new store creates its tables and runs its migrations, and MLflow's tracking store
    does that unguarded: workers opening one new store together break it ("table already
    exists", a half-migrated schema). A file beside the database serializes them, also across
    machines that share the file system. A store already at MLflow's schema needs no lock.
    """
    match = re.match(r"^sqlite(\+\w+)?:///([^?]+)", uri)
    if match is None or fcntl is None or _schema_ready(Path(match.group(2))):
        yield
        return
    try:
        Path(match.group(2)).parent.mkdir(parents=True, exist_ok=True)
        handle = open(match.group(2) + ".lock", "a")  # noqa: SIM115 - closed below, which unlocks it
    except OSError:  # a read-only directory: no store will be created there either
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _tune_sqlite(uri: str, client: MlflowClient) -> None:
    """Make commits to a SQLite store cheap: WAL, and no disk sync per commit (``synchronous=NORMAL``).

    MLflow opens SQLite with a rollback journal and full syncs: every write (a run, a batch of
    metrics, tags, the end) waits for the disk, 3-20 ms on a busy machine. With WAL and NORMAL a
    commit is a write to the log, synced at checkpoints: nothing is lost when the process dies,
    and an OS crash or a power cut may lose the last commits but never corrupts the file. Readers
    (the MLflow UI) never block the writer, as with Optuna's storage. Only speed is at stake, so
    any failure (another process holds the file, an MLflow without ``store.engine``) leaves the
    store as MLflow opened it.
    """
    if not uri.startswith("sqlite"):
        return
    try:
        from hpsearch.storage import prepare_sqlite, sync_on_checkpoint

        engine = client._tracking_client.store.engine  # MLflow has no knob for its SQLite connections
        if prepare_sqlite(uri, timeout=1.0):  # NORMAL is safe with WAL only; one engine per URI, tuned once
            sync_on_checkpoint(engine)
    except Exception:  # noqa: BLE001, S110 - see the docstring
        pass


def _schema_ready(db: Path) -> bool:
    """Return whether the SQLite file ``db`` holds MLflow's latest schema."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row is not None and row[0] == _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - no file, no table, another layout: take the lock
        return False


class _ScopedEnv:
    """Environment variables set while any caller is inside, removed when the last one leaves.

    MLflow reads some settings (HTTP retries, whether a directory store may be used) from the
    environment when it needs them and has no per-client knob, so they are set around the
    tracker's own calls only, never left behind. Variables the user has set are left alone.
    (Other threads' MLflow calls made meanwhile see them too.)
    """

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self._lock = threading.Lock()
        self._depth = 0
        self._added: list[str] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._added = [k for k in self._values if k not in os.environ]
                os.environ.update({k: self._values[k] for k in self._added})
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for key in self._added:
                        os.environ.pop(key, None)


_http_limits = _ScopedEnv(_HTTP_LIMITS)
# MLflow 3 refuses a directory store unless this is set, to steer people off an accidental
# ./mlruns; a user who names a directory store has chosen it.
_file_store = _ScopedEnv({"MLFLOW_ALLOW_FILE_STORE": "true"})
# MLflow opens its own PostgreSQL connections: libpq reads this, so a host that never answers is given up on.
_pg_limits = _ScopedEnv({"PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT_S)})
_URIS_LOCK = threading.Lock()


@contextlib.contextmanager
def process_uris(uri: str) -> Iterator[None]:
    """Point mlflow's process-wide tracking and registry URIs at ``uri``; put back what was there."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _URIS_LOCK:
        # mlflow.set_*_uri(None) would also delete the variables a user set, so restore by hand.
        saved = tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in _URI_VARS}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
            for key, value in saved[2].items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
