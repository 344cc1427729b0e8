"""Claims: study system attrs inserted atomically, so that of racing workers exactly one wins
(the final test of a study, a worker's stream of configurations)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import optuna
from optuna.storages import RDBStorage

from hpsearch.storage._resilient import ResilientStorage, rdb

T = TypeVar("T")


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


def holder_gone(held: Any, *, stale_s: float) -> bool:
    """Return whether the process that stored the claim value ``held`` ({"worker": "host:pid", "at": seconds,
    ...}) is gone: dead on this host, or its claim older than ``stale_s`` (a claim without them is old)."""
    held = held if isinstance(held, dict) else {}
    if time.time() - float(held.get("at", 0)) > stale_s:
        return True
    host, _, pid = str(held.get("worker", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def release_claim(study: optuna.Study, key: str, value: Any) -> None:
    """Remove the claim ``key`` if it still holds ``value`` (a claim taken over by another is left alone)."""
    _update_claim(study, key, value, None)


def read_claim(study: optuna.Study, key: str) -> Any:
    """Return the value of the claim ``key``, or None."""
    storage = rdb(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    text = _retried(storage, lambda: _read_claim(storage, study_id, key))
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class Register:
    """One claim as a value racing processes agree on: read it, take it while empty, replace one found stale."""

    study: optuna.Study
    key: str

    def read(self) -> Any:
        """Return the value held, or None."""
        return read_claim(self.study, self.key)

    def take(self, value: Any, *, over: Any = None) -> bool:
        """Store ``value`` if the register holds ``over`` (None: if it is empty); return whether this call did."""
        return claim(self.study, self.key, value) if over is None else swap_claim(self.study, self.key, over, value)


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
