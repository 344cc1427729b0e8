"""Trials left RUNNING: which are running, how long since their heartbeat, and failing the stale ones."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hpsearch.storage._resilient import ResilientStorage, rdb


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
