"""A running trial's user attrs written in one transaction (Optuna commits each on its own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from hpsearch.storage._resilient import rdb


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """Store user attrs of a running trial, in one transaction where the storage is a database.

    Optuna commits each ``set_user_attr`` on its own: on SQLite one disk sync each (3-10 ms on a
    busy disk). Optuna has no public call for several, so this does what ``set_user_attr`` does,
    for every key in one session (retried through a lost database like the storage's own calls).
    """
    storage = rdb(trial.study)
    if len(attrs) < 2 or not isinstance(storage, optuna.storages.RDBStorage):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    try:  # Optuna's internals: should a release move them, every key is set the public way
        from optuna.storages._rdb.models import TrialUserAttributeModel
        from optuna.storages._rdb.storage import _create_scoped_session
        storage._set_trial_attr_without_commit  # noqa: B018  (present, or AttributeError)
        trial._cached_frozen_trial  # noqa: B018
    except (ImportError, AttributeError):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return

    def write() -> None:
        with _create_scoped_session(storage.scoped_session, True) as session:
            for key, value in attrs.items():
                storage._set_trial_attr_without_commit(session, TrialUserAttributeModel, trial._trial_id, key, value)

    retrying = getattr(storage, "_retrying", None)  # hpsearch's ResilientStorage
    retrying(write) if retrying else write()
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what Trial.user_attrs reads, as set_user_attr keeps it
