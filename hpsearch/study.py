"""Studies: storage, sampler, pruner, the worker loop that shares a study's total, and the finish.

`open_study` creates or resumes the study named in a spec; `work` runs trials until the study's
`n_trials` (a total, however many workers) is reached; `finish` evaluates the best model once on
the test split and registers it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpsearch import insights, refit, space, stopping, warmstart
from hpsearch.data import Provenance, SearchData, Split, load_search_data, load_test_split
from hpsearch.errors import DataError, HPSearchError, SpecError, StorageError
from hpsearch.insights import VIEW_ATTR
from hpsearch.objective import MODEL_FILE, TrialContext, TrialFailed, run_trial, set_user_attrs, track_late
from hpsearch.refit import Refit
from hpsearch.spec import PrunerSpec, Spec, hide_secrets, mask_password, spec_from_dict
from hpsearch.storage import (claim, claims, disk_full_cause, disk_full_error, fail_stale_trials, make_storage,
                              rdb, read_claim, release_claim, shrink_sqlite, swap_claim)
from hpsearch.tasks import input_stats
from hpsearch.tracking import DatasetRecord, Tracker, check_store
from hpsearch.trials import (DATA_ATTR, FINGERPRINT_ATTR, REPORTS_ATTR, SPEC_ATTR, Counts, auto_reports_per_epoch,
                             count, reports_per_epoch)
from hpsearch.vocab import STATIC_METRICS, pruner_class, sampler_class

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
TEST_ATTR = "hpsearch.test"
WORKER_ATTR = "worker"  # host:pid of the worker that ran a trial
SAMPLER_STREAM_ATTR = "sampler_stream"  # the sampler stream a trial was drawn from (see claim_sampler_stream)
SAMPLER_STREAM_KEY = "hpsearch.sampler_stream:"  # + stream number: study system attr, who claimed it, its seed
# A trial started after the study's total was reached (racing workers); FAIL, counted as lost.
SURPLUS_ATTR = "surplus"

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- building


def make_sampler(spec: Spec, *, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """Return the spec's sampler, seeded with ``seed`` (default: the study seed)."""
    s = spec.study.sampler
    seed = spec.study.seed if seed is None else seed
    options = dict(s.options)
    if s.type == "grid":
        return optuna.samplers.GridSampler(space.grid(spec), seed=seed, **options)
    cls = sampler_class(s.type)
    if s.type == "tpe" and "multivariate" not in options and not spec.study.multi_objective:
        # Conditional spaces (optimizer-specific params) are modelled jointly, not per parameter.
        options.update(multivariate=True, group=True)
    return cls(seed=seed, **options)


# Pruner options counted in epochs in a spec; the pruner counts reports (see trials.REPORTS_ATTR).
_EPOCH_OPTIONS = ("n_warmup_steps", "min_resource", "max_resource", "patience")


def make_pruner(p: PrunerSpec, *, reports_per_epoch: int = 1) -> optuna.pruners.BasePruner:
    """Return the pruner a spec names (the patient pruner wrapping its inner one).

    The spec gives warm-ups, resources and patience in epochs; with several reports an epoch,
    they become that many reports (``max_resource: auto`` stays auto).
    """
    if p.type == "none":
        return optuna.pruners.NopPruner()
    options = {k: v * reports_per_epoch if k in _EPOCH_OPTIONS and isinstance(v, int) and not isinstance(v, bool)
               else v for k, v in p.options.items()}
    cls = pruner_class(p.type)
    if p.type == "patient":
        assert p.wrapped is not None  # the spec checks this
        return cls(make_pruner(p.wrapped, reports_per_epoch=reports_per_epoch), **options)
    return cls(**options)


def stale_trial_callback(spec: Spec, warn: Warn) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Return what runs when a trial's worker died: mark its MLflow run killed, retry its params."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.study.max_retries)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        warn(f"trial {trial.number} of study {study.study_name!r} sent no heartbeat for "
             f"{spec.study.grace_period} s (its worker died): marked failed and retried with the same params.")
        retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and spec.tracking.enabled:
            tracker = Tracker(spec.tracking.uri, spec.tracking.experiment,
                              artifact_root=spec.tracking.artifact_root, warn=warn)
            tracker.end_run(run_id, "KILLED", tags={
                "hpsearch.state": "FAIL",
                "hpsearch.fail_reason": f"worker died: no heartbeat for {spec.study.grace_period} s"})

    return on_stale


def open_study(spec: Spec, *, allow_space_change: bool = False, warn: Warn = _stderr) -> optuna.Study:
    """Return the spec's study, created on first use and resumed after; refuse a changed search space."""
    if spec.tracking.enabled:
        check_store(spec.tracking.uri)  # a missing database driver fails here, before any trial, not in warnings
    storage = make_storage(spec.study, stale_trial_callback=stale_trial_callback(spec, warn), warn=warn)
    try:
        study = optuna.create_study(
            storage=storage, study_name=spec.study.name, sampler=make_sampler(spec),
            pruner=make_pruner(spec.study.pruner), directions=spec.study.directions, load_if_exists=True)
    except ValueError as exc:  # e.g. directions differ from the stored study's
        raise SpecError(f"{spec.path}: study {spec.study.name!r} already exists in "
                        f"{mask_password(spec.study.storage)} and does not match this spec: {exc}") from None
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
        study.set_metric_names([m.name for m in spec.study.metrics])
    elif stored != spec.fingerprint():
        if not allow_space_change:
            changes = _describe_change(study.user_attrs.get(SPEC_ATTR, {}), spec)
            raise SpecError(
                f"{spec.path}: study {spec.study.name!r} already exists in {mask_password(spec.study.storage)} with "
                f"a different search space, task, model or metric ({changes}). Its finished trials would not be "
                "comparable with new ones. Give the study a new name, or pass --allow-space-change to continue "
                "it with the new space on purpose.")
        warn(f"warning: study {spec.study.name!r} continues with a changed search space ({ _describe_change(study.user_attrs.get(SPEC_ATTR, {}), spec)}).")
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
    for params in spec.study.enqueue:
        study.enqueue_trial(dict(params), user_attrs={"enqueued": True}, skip_if_exists=True)
    return study


def _describe_change(stored: dict[str, Any], spec: Spec) -> str:
    if not stored:
        return "no spec stored"
    old = spec_from_dict(stored).space_dict()
    new = spec.space_dict()
    diffs = [k for k in new if old.get(k) != new.get(k)]
    if "space" in diffs:
        old_p = {p["name"]: p for p in old["space"]}
        new_p = {p["name"]: p for p in new["space"]}
        names = sorted(n for n in set(old_p) | set(new_p) if old_p.get(n) != new_p.get(n))
        return "changed: " + ", ".join(f"space.{n}" for n in names)
    return "changed: " + ", ".join(diffs)


def load_stored_spec(storage_url: str, study_name: str, *, runs_dir: str | None = None,
                     tracking_uri: str | None = None, data_dir: str | None = None) -> Spec:
    """Return the spec stored in an existing study (for workers that join from anywhere).

    ``tracking_uri`` and ``data_dir`` override the stored ones: another machine may reach the
    MLflow server by another name and keep its datasets elsewhere.
    """
    try:
        summaries = optuna.get_all_study_summaries(storage=_plain_storage(storage_url))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read studies from {mask_password(storage_url)}: "
                           f"{hide_secrets(str(exc), storage_url)}") from None
    found = [s for s in summaries if s.study_name == study_name]
    if not found:
        names = sorted(s.study_name for s in summaries)
        raise SpecError(f"study {study_name!r} does not exist in {mask_password(storage_url)} (studies there: "
                        f"{names}). Start it with `hpsearch run SPEC` first.")
    stored = found[0].user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise SpecError(f"study {study_name!r} in {mask_password(storage_url)} was not created by hpsearch "
                        "(it has no stored spec).")
    data = dict(stored)
    data["study"] = {**data["study"], "storage": storage_url}
    if tracking_uri:
        data["tracking"] = {**data["tracking"], "uri": tracking_uri}
    elif data["tracking"].get("enabled") and "***" in data["tracking"].get("uri", ""):
        raise SpecError(f"study {study_name!r} records its MLflow tracking URI without the password "
                        f"({data['tracking']['uri']}); pass --tracking-uri (or HPSEARCH_TRACKING_URI) with it.")
    if data_dir:
        data["task"] = {**data["task"], "data_dir": data_dir}
    if runs_dir:
        data["runs_dir"] = str(Path(runs_dir).resolve())
    return spec_from_dict(data)


def _load_existing(storage_url: str, study_name: str) -> optuna.Study:
    """Return an existing study by name, or raise SpecError naming the studies that are there."""
    storage = _plain_storage(storage_url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage=storage))
        raise SpecError(f"study {study_name!r} does not exist in {mask_password(storage_url)} (studies there: "
                        f"{names}).") from None


def _plain_storage(url: str) -> optuna.storages.RDBStorage:
    from hpsearch.storage import checked_driver_url, engine_kwargs, opening

    url = checked_driver_url(url, what="the Optuna storage")
    try:
        with opening(url):
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot open the Optuna storage {mask_password(url)}: "
                           f"{hide_secrets(first, url)}.") from None


# --------------------------------------------------------------------------- counting


def count_trials(study: optuna.Study) -> Counts:
    """Return the study's trials per state (see :func:`hpsearch.trials.count`)."""
    return count(study.get_trials(deepcopy=False))


# --------------------------------------------------------------------------- working


@dataclass
class WorkerSetup:
    """What a worker process decides once: device, threads, data, tracking."""

    device: torch.device
    threads: int
    data: SearchData
    input_stats: tuple[float, float]  # (mean, std) every input of this study is standardised with
    tracker: Tracker | None
    parent_run_id: str | None
    reference: torch.nn.Module | None = None
    reports_per_epoch: int = 1  # the study's (trials.REPORTS_ATTR)
    notes: list[str] = field(default_factory=list)
    datasets: list[DatasetRecord] = field(default_factory=list)  # the training and validation splits, for MLflow


def setup_worker(spec: Spec, study: optuna.Study, *, device: str | None = None, threads: int | None = None,
                 warn: Warn = _stderr) -> WorkerSetup:
    """Return a worker's device, data (checked against the study's) and tracking, ready for trials."""
    from hpsearch.train import resolve_device

    dev = resolve_device(device or spec.task.device)
    n_threads = threads or spec.task.threads or max(1, (os.cpu_count() or 1))
    torch.set_num_threads(n_threads)
    data = load_search_data(spec.task.dataset, data_dir=spec.task.data_dir, val_fraction=spec.task.val_fraction,
                            seed=spec.study.seed, fallback=spec.task.fallback, train_limit=spec.task.train_limit,
                            warn=warn)
    _check_fits_images(spec, data)
    provenance = {**data.provenance.__dict__, "mean": data.mean, "std": data.std, "n_classes": data.n_classes,
                  "image_shape": list(data.image_shape)}
    stored = study.user_attrs.get(DATA_ATTR)
    if stored is None:
        study.set_user_attr(DATA_ATTR, provenance)
    elif stored.get("sha256") != provenance["sha256"] or stored.get("n_train") != provenance["n_train"]:
        raise DataError(
            f"this worker's data differs from the data study {spec.study.name!r} was searched on: the study used "
            f"{stored.get('name')} (sha256 {stored.get('sha256')}, {stored.get('n_train')} training samples, from "
            f"{stored.get('source')}), this worker found {provenance['name']} (sha256 {provenance['sha256']}, "
            f"{provenance['n_train']} samples, from {provenance['source']}). Give it the same data dir.")
    if warmstart.needed(spec, study):
        assert spec.study.warm_start is not None
        source = _load_existing(spec.study.warm_start.storage, spec.study.warm_start.study)
        warmstart.warm_start(spec, study, source, provenance, warn=warn)
    per_epoch = _reports_per_epoch(spec, study, len(data.train))
    study.pruner = make_pruner(spec.study.pruner, reports_per_epoch=per_epoch)
    data = data.to(dev)
    tracker, parent, datasets = None, None, []
    if spec.tracking.enabled:
        tracker = Tracker(spec.tracking.uri, spec.tracking.experiment, artifact_root=spec.tracking.artifact_root,
                          warn=warn)
        datasets = dataset_records(data.provenance, {"training": data.train, "validation": data.val})
        parent = tracker.study_run(spec.study.name, params=_flat_spec_params(spec, data),
                                   tags={"hpsearch.study": spec.study.name,
                                         "optuna.storage": mask_password(spec.study.storage),
                                         "hpsearch.fingerprint": spec.fingerprint()})
        if parent:
            tracker.log_datasets(parent, datasets)  # logged once: MLflow keeps one input per dataset and run
            _link_experiment(spec, study, tracker, parent)
    reference = None
    if spec.task.type == "inpaint":
        from hpsearch.reference import load_or_train_reference

        reference = load_or_train_reference(data, Path(spec.cache_dir), device=dev)
    return WorkerSetup(device=dev, threads=n_threads, data=data, tracker=tracker, parent_run_id=parent,
                       input_stats=input_stats(data.mean, data.std, standardise=spec.task.normalize),
                       reference=reference, reports_per_epoch=per_epoch, datasets=datasets)


def _reports_per_epoch(spec: Spec, study: optuna.Study, n_train: int) -> int:
    """Return the study's reports per epoch: stored, else decided now (a study with trials from before: 1)."""
    stored = study.user_attrs.get(REPORTS_ATTR)
    if stored is not None:
        return int(stored)
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        per_epoch = 1  # its trials reported once per epoch: new ones must be comparable
    else:
        per_epoch = spec.task.reports_per_epoch or auto_reports_per_epoch(n_train)
    study.set_user_attr(REPORTS_ATTR, per_epoch)
    return per_epoch

def _link_experiment(spec: Spec, study: optuna.Study, tracker: Tracker, parent: str) -> None:
    """Store where the study is in MLflow (parent run, experiment, the saved view of its runs) on the study."""
    primary = spec.study.metrics[0]
    view = tracker.study_view(
        spec.study.name, order_by=primary.name, ascending=primary.direction == "minimize",
        metrics=[m.name for m in spec.study.metrics if m.name not in STATIC_METRICS] + [test_metric(primary.name)],
        params=[p.name for p in spec.space if p.type != "fixed" and not p.per_layer])
    attrs = {PARENT_RUN_ATTR: parent, EXPERIMENT_ATTR: tracker.experiment_id, VIEW_ATTR: view}
    for key, value in attrs.items():
        if value and study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def test_metric(name: str) -> str:
    """Return the name the test split's measure of validation metric ``name`` is logged under."""
    return "test_" + name[4:] if name.startswith("val_") else "test_" + name


def dataset_records(provenance: Provenance, splits: dict[str, Split]) -> list[DatasetRecord]:
    """Return the MLflow dataset inputs of ``splits`` ({context: split}): name, content digest, source, sizes.

    A fallback dataset says so in its name, so the UI's Dataset column shows it at a glance.
    """
    name = f"{provenance.name} (fallback for {provenance.requested})" if provenance.fallback else provenance.name
    sizes = {"train": provenance.n_train, "validation": provenance.n_val, "test": provenance.n_test}
    return [DatasetRecord(name=name, digest=split.digest(), source=provenance.source, context=context,
                          profile={"rows": len(split), **sizes, "dataset_sha256": provenance.sha256,
                                   "requested": provenance.requested, "fallback": provenance.fallback})
            for context, split in splits.items()]


def _check_fits_images(spec: Spec, data: SearchData) -> None:
    """Refuse, once and up front, a hidden square that would not fit the dataset's images."""
    if spec.task.type != "inpaint":
        return
    sizes = [spec.task.mask.size]
    for p in spec.space:
        if p.name == "mask_size":
            sizes.append(p.value if p.type == "fixed" else max(p.choices) if p.choices else p.high)
    side = min(data.image_shape[1:])
    if max(sizes) >= side:
        raise SpecError(f"{spec.path}: the in-painting mask (size up to {max(sizes)}) must be smaller than the "
                        f"images of {data.provenance.name!r} ({side}x{side} pixels); set task.mask.size or "
                        "space.mask_size below that.")


def _flat_spec_params(spec: Spec, data: SearchData) -> dict[str, Any]:
    d = spec.to_dict()
    out: dict[str, Any] = {
        "study.metrics": ",".join(f"{m.name}:{m.direction}" for m in spec.study.metrics),
        "study.n_trials": spec.study.n_trials, "study.seed": spec.study.seed,
        "study.sampler": json.dumps(d["study"]["sampler"]), "study.pruner": json.dumps(d["study"]["pruner"]),
        "model.family": spec.model.family,
    }
    for key, value in d["task"].items():
        out[f"task.{key}"] = json.dumps(value) if isinstance(value, dict) else value
    for p in d["space"]:
        out[f"space.{p['name']}"] = json.dumps({k: v for k, v in p.items() if v not in (None, [], {}, False)
                                                and k != "name"})
    out.update(data.provenance.as_params())
    return out


def work(spec: Spec, study: optuna.Study, setup: WorkerSetup, *, timeout: float | None = None,
         warn: Warn = _stderr) -> int:
    """Run trials until the study's total is reached, a stop rule holds, or the timeout; return how many ran.

    A trial that fails fails alone (see :func:`run_trial`); a fault of the whole worker ends the
    work, and the study's MLflow parent run with it (FAILED, the reason tagged), never left RUNNING.
    """
    try:
        return _work(spec, study, setup, timeout=timeout, warn=warn)
    except Exception as exc:
        if setup.tracker and setup.parent_run_id:
            setup.tracker.end_run(setup.parent_run_id, "FAILED",
                                  tags={"hpsearch.fail_reason": f"{type(exc).__name__}: {exc}"[:5000]})
        if isinstance(exc, OSError):  # a file the worker needs (artifacts, caches): one line, not a traceback
            raise StorageError(f"this worker cannot go on: {exc.strerror or exc}"
                               + (f": {exc.filename}" if exc.filename else "")
                               + ". Finished trials are kept; fix it and run again.") from None
        raise


def _work(spec: Spec, study: optuna.Study, setup: WorkerSetup, *, timeout: float | None = None,
          warn: Warn = _stderr) -> int:
    """Run trials until the study's total is reached, a stop rule holds, or the timeout; return how many ran.

    Stop rules (``study.stop``, see :mod:`hpsearch.stopping`) are read from the storage before each
    new trial, so every worker of the study stops starting trials at the same point.

    The worker's sampler draws from a random stream of its own (see :func:`claim_sampler_stream`):
    seeded alike, racing workers, or a rerun of the study, would propose the same parameters again.
    Ctrl-C (SIGINT), SIGTERM or SIGHUP ends the running trial as interrupted, never leaving it
    RUNNING, then raises KeyboardInterrupt.
    """
    ctx = TrialContext(spec=spec, data=setup.data, device=setup.device, tracker=setup.tracker,
                       parent_run_id=setup.parent_run_id, input_stats=setup.input_stats,
                       artifact_store=_TidyArtifactStore(_artifacts_dir(spec)),
                       reference=setup.reference, reports_per_epoch=setup.reports_per_epoch, warn=warn,
                       datasets=setup.datasets)
    deadline = None if timeout is None else time.monotonic() + timeout
    ran = 0
    stopped = False
    n_trials = spec.study.n_trials
    signals = _StopSignals()
    surplus: set[int] = set()  # trials this worker created past the total (workers raced)
    stream, seed = claim_sampler_stream(spec, study)
    study.sampler = make_sampler(spec, seed=seed)

    current: list[optuna.Trial] = []  # the trial this worker runs now

    def objective(trial: optuna.Trial) -> float | list[float]:
        current[:] = [trial]
        with signals.trial(trial):
            set_user_attrs(trial, {WORKER_ATTR: worker_id(), SAMPLER_STREAM_ATTR: stream})
            if _surplus(study, trial, n_trials):
                trial.set_user_attr(SURPLUS_ATTR, f"other workers had already started the study's {n_trials} "
                                                  "trials when this one was created")
                surplus.add(trial.number)
                raise _Surplus()
            if setup.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(setup.device)  # this trial's peak, not the worker's
            return run_trial(trial, ctx)

    def not_a_failure(record: logging.LogRecord) -> bool:
        # Optuna reports a surplus trial as failed, with a traceback; it is no failure. Nor is a
        # full disk the trial's: the worker stops with one line that says so.
        if record.exc_info and record.exc_info[1] is not None and disk_full_cause(record.exc_info[1]):
            return False
        return not any(record.getMessage().startswith(f"Trial {n} failed") for n in surplus)

    optuna_log = logging.getLogger("optuna.study._optimize")
    with signals, _log_filters(optuna_log, signals.filter, not_a_failure, _one_line_failures):
        while deadline is None or time.monotonic() < deadline:
            signals.check()
            trials = study.get_trials(deepcopy=False)
            if (verdict := stopping.verdict(spec.study.stop, spec.study.metrics[0], trials)) is not None:
                stopped = _record_stop(study, verdict, warn)
                break
            c = count(trials)
            if c.waiting > 0 or c.finished + c.running < n_trials:
                try:
                    study.optimize(objective, n_trials=1, catch=(TrialFailed, _Surplus))
                except Exception as exc:  # noqa: BLE001 - a full disk ends the worker, anything else as it was
                    if disk_full_cause(exc) is None:
                        raise
                    raise _stop_on_full_disk(spec, study, current, setup.tracker, exc, warn) from None
                ran += 1
                if setup.tracker and setup.tracker.failures:  # MLflow failed at some point: is it back?
                    track_late(study, setup.tracker, setup.parent_run_id)
                insights.refresh(spec, study, setup.tracker, setup.parent_run_id, min_interval_s=30.0, warn=warn)
            elif c.running > 0 and c.finished < n_trials:
                # Other workers hold the last trials. If one of them died, its trial goes stale and is
                # retried: stay to pick the retry up, so the study reaches its total.
                fail_stale_trials(study, grace_period=spec.study.grace_period)
                signals.sleep(min(0.5, spec.study.heartbeat_interval))  # the total may be reached any moment
            else:
                break
        signals.check()
    if setup.tracker:
        track_late(study, setup.tracker, setup.parent_run_id)
    if (stopped or count_trials(study).finished >= n_trials) and setup.tracker and setup.parent_run_id:
        setup.tracker.end_run(setup.parent_run_id, "FINISHED")  # each worker may say so: idempotent
    return ran


def _record_stop(study: optuna.Study, verdict: stopping.Verdict, warn: Warn) -> bool:
    """Record (once per study) the stop rule that holds, say it, and return True."""
    if stopping.STOPPED_ATTR not in study.user_attrs:
        study.set_user_attr(stopping.STOPPED_ATTR, verdict.as_attr())
    warn(f"study {study.study_name!r} stops early: {verdict.reason}; no new trial starts (running ones finish).")
    return True


def _stop_on_full_disk(spec: Spec, study: optuna.Study, trials: list[optuna.Trial], tracker: Tracker | None,
                       exc: BaseException, warn: Warn) -> StorageError:
    """Close the trial a full disk cut short (FAIL; its MLflow run FAILED); return the error that ends the worker.

    Optuna could not close it itself, and a waiting worker would only write to the full disk again.
    """
    error = disk_full_error(exc, f"worker {worker_id()} of study {spec.study.name!r}", spec.study.storage)
    reason = f"stopped: {error}"[:500]
    storage = rdb(study)
    shrink_sqlite(storage)
    for trial in trials:
        if not storage.get_trial(trial._trial_id).state.is_finished():  # else Optuna could close it after all
            try:
                study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
            except Exception:  # noqa: BLE001 - the storage itself is on the full disk
                warn(f"warning: trial {trial.number} could not be closed either (the disk is full); once its "
                     f"heartbeat is {spec.study.grace_period} s old, the next run or `hpsearch cleanup` fails and "
                     "retries it.")
                continue
            with suppress(Exception):  # a reason is a bonus on a full disk
                study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        frozen = storage.get_trial(trial._trial_id)
        run_id = frozen.user_attrs.get("mlflow_run_id")
        # The trial's own clean-up may have stopped before its run's end: end it, unless it did end.
        if tracker is not None and run_id and frozen.state == optuna.trial.TrialState.FAIL \
                and tracker.run_status(run_id) == "RUNNING":
            tracker.end_run(run_id, "FAILED", tags={"hpsearch.state": "FAIL", "hpsearch.fail_reason": reason})
    return error


class _TidyArtifactStore(optuna.artifacts.FileSystemArtifactStore):
    """Optuna's file store, minus the half-written file a failed write (a full disk) would leave behind.

    Removing it gives back the space the study needs to close the trial as failed.
    """

    def write(self, artifact_id: str, content_body: Any) -> None:
        try:
            super().write(artifact_id, content_body)
        except BaseException:
            with suppress(Exception):
                self.remove(artifact_id)
            raise


def worker_id() -> str:
    """Return this worker's name in trial attributes: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def sampler_seed(study_seed: int, stream: int) -> int:
    """Return the sampler seed of a study's stream ``stream``: the study seed itself for stream 0."""
    return study_seed if stream == 0 else zlib.crc32(f"{study_seed}:{stream}".encode()) % (2**31 - 1)


def claim_sampler_stream(spec: Spec, study: optuna.Study) -> tuple[int, int]:
    """Return (stream, seed): the study's next unused sampler stream, claimed for this worker, and its seed.

    Every process that samples for a study, at once or one after another (a rerun after Ctrl-C,
    a crash, or a raised n_trials), claims the lowest stream number nobody claimed before, in the
    storage (:func:`hpsearch.storage.claim`, atomic), and seeds its sampler with
    :func:`sampler_seed`. The first worker of a new study samples with the study seed, as a
    single run always did; nobody repeats another's stream. Each claim is kept as the study
    system attr ``hpsearch.sampler_stream:<n>`` (worker, seed, time), and every trial names its
    stream in the user attr ``sampler_stream``. QMC workers all take stream 0: its points come
    from one scrambled sequence that they share through the storage.
    """
    if spec.study.sampler.type == "qmc":
        return 0, spec.study.seed
    taken = [int(k.rsplit(":", 1)[1]) for k in claims(study, SAMPLER_STREAM_KEY)]
    stream = max(taken, default=-1) + 1
    while True:
        seed = sampler_seed(spec.study.seed, stream)
        record = {"worker": worker_id(), "seed": seed, "at": _now(), "token": uuid.uuid4().hex}
        if claim(study, f"{SAMPLER_STREAM_KEY}{stream}", record):
            return stream, seed
        stream += 1  # another worker claimed it between our look and our claim


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextmanager
def _log_filters(logger: logging.Logger, *filters: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    for f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for f in filters:
            logger.removeFilter(f)


def _one_line_failures(record: logging.LogRecord) -> bool:
    """Keep one line of Optuna's per failed trial: its reason without a traceback when the reason says it all,
    and without the second line about a value it never had."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, (TrialFailed, HPSearchError)):
        record.exc_info, record.exc_text = None, None
    return not _NO_VALUE_LINE.match(record.getMessage())


_NO_VALUE_LINE = re.compile(r"Trial \d+ failed with value None\.$")


class _Surplus(Exception):
    """The study's total was reached by other workers while this trial was being created."""


def _surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Return whether ``n_trials`` trials that count were created before this one."""
    # Counting and creating a trial are two steps, so racing workers may create one too many;
    # trial numbers are assigned in order under a lock, so the later trial can tell.
    before = count([t for t in study.get_trials(deepcopy=False) if t.number < trial.number])
    return before.finished + before.running + before.waiting >= n_trials


# Code that must not be cut off in the middle: an interrupted commit can leave a SQLite lock held
# (stalling every worker on the file) or a half-written record.
_IO_MODULES = ("sqlalchemy", "sqlite3", "psycopg2", "psycopg", "pymysql", "alembic", "mlflow", "requests",
               "urllib3", "http.client", "optuna.storages", "optuna.artifacts", "hpsearch.storage",
               "hpsearch.tracking")
_IO_RECHECK_S = 0.05


def _in_io(frame: Any) -> bool:
    """Return whether the stack under ``frame`` is inside a database, tracking or HTTP call."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith(_IO_MODULES):
            return True
        frame = frame.f_back
    return False


# What stops a worker: Ctrl-C, `kill` or `docker stop`, and a closed terminal or dropped SSH session.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Run ``handler`` on the stop signals while inside (main thread only; one ignored, as under nohup, stays so)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread gets signals
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def interrupt(signum: int, frame: Any) -> None:
    """A signal handler: stop as Ctrl-C does."""
    raise KeyboardInterrupt


class _StopSignals:
    """SIGINT, SIGTERM and SIGHUP as one KeyboardInterrupt inside a trial's own code, a stop elsewhere.

    A signal that lands while Optuna creates or closes a trial would leave it RUNNING; so it
    interrupts only the trial's code (which closes the trial as interrupted), once, and
    otherwise stops the worker loop at its next check. Inside the trial, a database or tracking
    call is let finish first (the signal is looked at again every 50 ms). A third signal
    interrupts at once, wherever it lands: the user insists (the trial may then go stale).
    """

    def __init__(self) -> None:
        self.requested = False
        self._count = 0  # signals received (re-checks of a deferred one excluded)
        self._rechecks = 0
        self._in_trial = False
        self._raised = False

    def __enter__(self) -> _StopSignals:
        self._handling = on_stop_signals(self._handle)
        self._handling.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handling.__exit__(*exc)

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop Optuna's failure report (a warning with a traceback) once stopping: Ctrl-C is no failure."""
        return not self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self._rechecks:
            self._rechecks -= 1
        else:
            self._count += 1
        if self._count >= 3:
            raise KeyboardInterrupt
        if not self._in_trial or self._raised:
            return
        if _in_io(frame) and hasattr(signal, "pthread_kill"):  # (not on Windows: interrupt at once there)
            threading.Timer(_IO_RECHECK_S, self._recheck, (signum,)).start()
            return
        self._raised = True  # a second Ctrl-C must not break the interrupted trial's clean-up
        raise KeyboardInterrupt

    def _recheck(self, signum: int) -> None:
        self._rechecks += 1
        signal.pthread_kill(threading.main_thread().ident or 0, signum)  # runs _handle in the main thread

    @contextmanager
    def trial(self, trial: optuna.Trial) -> Iterator[None]:
        if self.requested:
            trial.set_user_attr("interrupted", "stopped before the trial began")
            raise KeyboardInterrupt
        self._in_trial = True
        try:
            yield
        finally:
            self._in_trial = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            time.sleep(0.1)


def _artifacts_dir(spec: Spec) -> str:
    path = Path(spec.artifacts_dir)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# --------------------------------------------------------------------------- finishing


def best_trial(spec: Spec, study: optuna.Study) -> FrozenTrial | None:
    """Return the best complete trial whose model was kept (first objective decides on a Pareto front)."""
    from hpsearch.trials import best_trial as best

    return best(spec, [t for t in study.get_trials(deepcopy=False) if "model_artifact_id" in t.user_attrs])


def finish(spec: Spec, study: optuna.Study, *, device: str | None = None, use_refit: bool | None = None,
           warn: Warn = _stderr) -> dict[str, Any]:
    """Evaluate the final model once on the test split, log and register it; return the result.

    The final model is the best trial's configuration refit on training + validation data
    (``study.refit``, on by default for single-objective studies; ``use_refit`` overrides it), or
    the best trial's own model.

    Once per study, whoever finishes: a study whose best trial was already tested is not tested
    again, and of processes finishing at once one claims the test (see :func:`_finish_claim`)
    while the others wait for its record. Ctrl-C (or SIGTERM, SIGHUP) while the model is tested
    records nothing; once the record is being written (MLflow, the registry, the study) it is
    completed first, so the record is either absent or whole.
    """
    best = best_trial(spec, study)
    if best is None:
        return {}
    with on_stop_signals(interrupt), _finish_claim(study, best.number, warn) as done:
        if done is not None:
            return done
        model, test_metrics, example, n_test, refitted, test_data = _test_model(
            spec, study, best, device, use_refit=spec.study.refit.enabled if use_refit is None else use_refit)
        result: dict[str, Any] = {"trial": best.number, "metrics": test_metrics, "params": best.params,
                                  "values": best.values, "n_test": n_test}
        if refitted is not None:
            result["refit"] = refitted.as_record()
        tracker = None
        with _completed_first(warn):
            if spec.tracking.enabled:
                tracker = Tracker(spec.tracking.uri, spec.tracking.experiment,
                                  artifact_root=spec.tracking.artifact_root, warn=warn)
                track_late(study, tracker, study.user_attrs.get(PARENT_RUN_ATTR))
                result.update(_record_test(spec, study, tracker, best, model, test_metrics, example, refitted,
                                           test_data))
            study.set_user_attr(TEST_ATTR, json.loads(json.dumps(result, default=str)))
    insights.refresh(spec, study, tracker, study.user_attrs.get(PARENT_RUN_ATTR), force=True, warn=warn)
    return result


def _test_model(spec: Spec, study: optuna.Study, best: FrozenTrial, device: str | None, *,
                use_refit: bool) -> tuple[torch.nn.Module, dict[str, float], Any, int, Refit | None,
                                          list[DatasetRecord]]:
    """Return the final model, its test metrics, an input example, the test split's size, the refit (or None)
    and the test split as an MLflow dataset input.

    The final model is the best trial's configuration refit on training + validation data
    (:mod:`hpsearch.refit`) when ``use_refit``, else the best trial's own saved model.
    """
    from hpsearch import tasks
    from hpsearch.models import build_model
    from hpsearch.train import evaluate, resolve_device

    stored = study.user_attrs.get(DATA_ATTR)
    if stored is None:
        raise DataError(f"study {spec.study.name!r} records no data provenance; run a trial first.")
    provenance = Provenance(**{k: v for k, v in stored.items() if k in Provenance.__dataclass_fields__})
    dev = resolve_device(device or spec.task.device)
    params = _trial_params(spec, best)
    mean, std = input_stats(stored["mean"], stored["std"], standardise=spec.task.normalize)
    reference = None
    if spec.task.type == "inpaint":
        reference = _cached_reference(spec, provenance, dev)
    refitted = None
    if use_refit:
        refitted = refit.refit(spec, best, params, _search_data(spec, provenance), device=dev, mean=mean, std=std,
                               reference=reference, reports_per_epoch=reports_per_epoch(study.user_attrs))
        model = refitted.model
    else:
        model = build_model(spec.model.family, params, image_shape=tuple(stored["image_shape"]),
                            n_classes=int(stored["n_classes"]))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILE
            optuna.artifacts.download_artifact(
                artifact_store=optuna.artifacts.FileSystemArtifactStore(_artifacts_dir(spec)),
                file_path=str(path), artifact_id=best.user_attrs["model_artifact_id"])
            model.load_state_dict(torch.load(path, map_location="cpu"))
    model = model.to(dev).eval()
    # Only now, with the final model chosen and trained, is the test split read.
    test = load_test_split(provenance, data_dir=spec.task.data_dir).to(dev)
    task = tasks.make_task(spec.task.type, params, mask_placement=spec.task.mask.placement,
                           noise_kind=spec.task.noise.kind, reference=reference)
    metrics = evaluate(model, test, task, mean=mean, std=std, device=dev)
    test_metrics = {test_metric(k): v for k, v in metrics.items()}
    example = ((test.images[:4].float() / 255.0 - mean) / std).cpu().numpy()
    return model, test_metrics, example, len(test), refitted, dataset_records(provenance, {"test": test})


def _record_test(spec: Spec, study: optuna.Study, tracker: Tracker, best: FrozenTrial, model: torch.nn.Module,
                 test_metrics: dict[str, float], example: Any, refitted: Refit | None,
                 test_data: list[DatasetRecord]) -> dict[str, Any]:
    """Log the test metrics and the model, register it; return what to add to the result.

    The test metrics go on the study's parent run. The model goes on the refit's own run (a child
    of the parent, tagged with the trial it refits) when there is a refit, else on the parent run.
    """
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        return {}
    tracker.log_metrics(parent, test_metrics, step=best.number)
    tracker.set_tags(parent, {"hpsearch.best_trial": str(best.number),
                              "hpsearch.best_run_id": str(best.user_attrs.get("mlflow_run_id", ""))})
    model_run = parent
    out: dict[str, Any] = {}
    if refitted is not None:
        run_id = tracker.start_refit(parent, best.number, params={
            **_trial_params(spec, best), "epochs": refitted.epochs, "refit.epochs_rule": refitted.epochs_rule,
            "refit.n_train": refitted.n_train, "seed": refitted.seed}, tags={
            "hpsearch.best_run_id": str(best.user_attrs.get("mlflow_run_id", ""))})
        if run_id:
            now_ms = int(time.time() * 1000)
            tracker.log_epochs(run_id, [(epoch, now_ms, metrics) for epoch, metrics in enumerate(refitted.history, 1)])
            tracker.log_metrics(run_id, {**test_metrics, "refit_seconds": refitted.seconds}, step=refitted.epochs)
            model_run = out["refit_run_id"] = run_id
            tracker.log_datasets(run_id, dataset_records(refitted.data.provenance, {"training": refitted.data.train}))
    version = tracker.log_model(model_run, model.cpu(), input_example=example,
                                registered_name=spec.study.name if spec.tracking.register_model else None)
    for run_id in dict.fromkeys((parent, model_run)):  # the study's run, and the refit's that was tested
        tracker.log_datasets(run_id, test_data)
    if version:
        out["champion"] = _crown(spec, study, tracker, version, best, test_metrics, test_data[0].digest)
    if refitted is not None and model_run != parent:
        tracker.end_run(model_run, "FINISHED")
    return {**out, "model_version": version, "registered_model": spec.study.name if version else None,
            "experiment_id": tracker.experiment_id, "parent_run_id": parent}


@contextmanager
def _completed_first(warn: Warn) -> Iterator[None]:
    """Hold off stop signals while inside: a record half written is worse than one finished (third signal: stop)."""
    received = 0

    def defer(signum: int, frame: Any) -> None:
        nonlocal received
        received += 1
        if received >= 3:
            raise KeyboardInterrupt
        if received == 1:
            warn("finishing the test record first (a few seconds); a third Ctrl-C leaves it half written.")

    with on_stop_signals(defer):
        yield


FINISH_KEY = "hpsearch.finish:"  # + the best trial's number: study system attr held while one process tests it
FINISH_BEAT_S = 5.0  # how often the process testing the model says it is alive...
FINISH_STALE_S = 60.0  # ...and after how long without it another process takes the test over


@contextmanager
def _finish_claim(study: optuna.Study, trial: int, warn: Warn) -> Iterator[dict[str, Any] | None]:
    """Yield the test record of ``trial`` if there is one; else claim its test for this process and yield None.

    The claim is a study system attr inserted atomically (:func:`hpsearch.storage.claim`): of
    processes finishing at once, one wins; the others wait for its record. The winner renews
    the claim every few seconds; a claim not renewed for a minute (its process died), or left
    by a dead process on this host, is taken over. The claim is released on the way out, test
    recorded or not.
    """
    key = f"{FINISH_KEY}{trial}"
    said = False
    while True:
        done = study.user_attrs.get(TEST_ATTR)
        if done and done.get("trial") == trial:
            yield done
            return
        mine = {"worker": worker_id(), "at": time.time(), "token": uuid.uuid4().hex}
        if claim(study, key, mine):
            break
        held = read_claim(study, key)
        if held is not None and _claim_dead(held) and swap_claim(study, key, held, mine):
            warn(f"the final test of trial {trial} had been claimed by {held.get('worker')}, which stopped; "
                 "this process takes it over.")
            break
        if held is not None and not said:
            warn(f"waiting for {held.get('worker')} to finish testing and registering trial {trial}'s model.")
            said = True
        time.sleep(1.0)
    stop = threading.Event()
    holding = {"value": mine}

    def renew() -> None:
        while not stop.wait(FINISH_BEAT_S):
            renewed = {**holding["value"], "at": time.time()}
            with contextlib.suppress(Exception):  # a missed renewal is retried at the next beat
                if swap_claim(study, key, holding["value"], renewed):
                    holding["value"] = renewed

    beat = threading.Thread(target=renew, daemon=True)
    beat.start()
    try:
        yield None
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(Exception):  # a claim not released goes stale
            release_claim(study, key, holding["value"])


def _claim_dead(held: dict[str, Any]) -> bool:
    """Return whether the process holding a finish claim is gone: silent too long, or dead on this host."""
    if time.time() - float(held.get("at", 0)) > FINISH_STALE_S:
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


def _search_data(spec: Spec, provenance: Provenance) -> SearchData:
    """Return the study's training and validation splits again, as its trials had them."""
    return load_search_data(provenance.name, data_dir=spec.task.data_dir, val_fraction=spec.task.val_fraction,
                            seed=spec.study.seed, train_limit=spec.task.train_limit)


def _crown(spec: Spec, study: optuna.Study, tracker: Tracker, version: str, best: FrozenTrial,
           test_metrics: dict[str, float], test_digest: str) -> str | None:
    """Tag the registered version with where it comes from and give it the champion alias if it is the best."""
    from hpsearch.tracking import VERSION_METRIC_TAG

    primary = spec.study.metrics[0]
    data = study.user_attrs.get(DATA_ATTR) or {}
    tags = {"hpsearch.study": spec.study.name, "hpsearch.trial": str(best.number),
            "hpsearch.data_sha256": str(data.get("sha256")), "hpsearch.data": str(data.get("name")),
            **{f"{VERSION_METRIC_TAG}{m.name}": f"{v:.8g}" for m, v in zip(spec.study.metrics, best.values)},
            **{f"{VERSION_METRIC_TAG}{k}": f"{v:.8g}" for k, v in test_metrics.items()}}
    return tracker.crown(spec.study.name, version, tags=tags, metric=test_metric(primary.name),
                         maximize=primary.direction == "maximize", data=test_digest)


def _cached_reference(spec: Spec, provenance: Provenance, device: torch.device) -> torch.nn.Module:
    from hpsearch.reference import load_or_train_reference

    return load_or_train_reference(_search_data(spec, provenance).to(device), Path(spec.cache_dir), device=device)


def _trial_params(spec: Spec, trial: FrozenTrial) -> dict[str, Any]:
    params = space.base_params(spec)
    params.update(trial.params)
    return params
