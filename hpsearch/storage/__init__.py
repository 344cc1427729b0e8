"""Optuna storages that survive many workers: SQLite in WAL mode, pooled PostgreSQL, heartbeats,
and a database that goes away for a while (a restart, a network blip) and comes back.

One concept per module:

- ``_connect``: a database URL, its driver and engine settings, waits that say what they wait for;
- ``_resilient``: the storage that waits out an outage (:func:`make_storage`);
- ``_disk``: a full disk, recognised and said in one line;
- ``_heartbeats``: trials left RUNNING by dead workers;
- ``_claims``: study attrs inserted atomically, so that exactly one racing worker wins;
- ``_attrs``: a running trial's user attrs in one transaction.
"""

from hpsearch.storage._attrs import set_user_attrs
from hpsearch.storage._claims import Register, claim, claims, holder_gone, read_claim, release_claim, swap_claim
from hpsearch.storage._connect import (CONNECT_TIMEOUT_S, NOTICE_AFTER_S, PG_CONNECT_ARGS, SQLITE_TIMEOUT_S,
                                       announced_wait, checked_driver_url, driver_url, engine_kwargs, opening,
                                       prepare_sqlite, sync_on_checkpoint)
from hpsearch.storage._disk import disk_full_cause, disk_full_error, shrink_sqlite
from hpsearch.storage._heartbeats import RunningTrial, fail_stale_trials, running_trials
from hpsearch.storage._resilient import OUTAGE_S, ResilientStorage, is_connection_error, make_storage, rdb

__all__ = [
    "CONNECT_TIMEOUT_S", "NOTICE_AFTER_S", "OUTAGE_S", "PG_CONNECT_ARGS", "SQLITE_TIMEOUT_S", "Register",
    "ResilientStorage", "RunningTrial", "announced_wait", "checked_driver_url", "claim", "claims", "disk_full_cause",
    "disk_full_error", "driver_url", "engine_kwargs", "fail_stale_trials", "holder_gone", "is_connection_error",
    "make_storage", "opening", "prepare_sqlite", "rdb", "read_claim", "release_claim", "running_trials",
    "shrink_sqlite", "set_user_attrs", "swap_claim", "sync_on_checkpoint",
]
