"""Studies: the public entry points, and the worker loop that shares a study's total.

`open_study` creates or resumes the study named in a spec (with its sampler and pruner);
`setup_worker` (:mod:`hpsearch.worker_setup`) readies a worker; `work` runs trials until the
study's `n_trials` (a total, however many workers) is reached or a stop rule holds; `finish`
(:mod:`hpsearch.finish`) tests the best model once on the test split and registers it. Stop
signals are :mod:`hpsearch.signals`'; the names of what a study stores, :mod:`hpsearch.record`'s.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from hpsearch import insights, space, stopping
from hpsearch.errors import HPSearchError, SpecError, StorageError
from hpsearch.finish import finish
from hpsearch.pack_loop import pack_capacity, work_packed
from hpsearch.objective import TakenOver, TrialContext, TrialFailed, run_trial, say_taken_over, track_late
from hpsearch.record import (ENQUEUED_ATTR, FAIL_REASON_ATTR, FAIL_REASON_TAG, FINGERPRINT_ATTR, INTERRUPTED_ATTR,
                             RUN_ID_ATTR, SAMPLER_STREAM_ATTR, SAMPLER_STREAM_KEY, SPEC_ATTR, STATE_TAG, STOPPED_ATTR,
                             SURPLUS_ATTR, WORKER_ATTR, artifact_store, count, count_trials, open_existing, read_spec,
                             stored_spec, worker_id)
from hpsearch.signals import StopSignals
from hpsearch.spec import PrunerSpec, Spec, mask_password, spec_from_dict
from hpsearch.storage import claim, claims, disk_full_cause, disk_full_error, fail_stale_trials, make_storage, rdb, \
    set_user_attrs, shrink_sqlite
from hpsearch.tracking import Tracker, check_store
from hpsearch.worker_setup import WorkerSetup, setup_worker
from hpsearch.vocab import EPOCH_OPTIONS, epoch_reports, pruner_class, sampler_class

__all__ = ["claim_sampler_stream", "count_trials", "finish", "load_stored_spec", "make_pruner", "make_sampler",
           "open_study", "sampler_seed", "setup_worker", "stale_trial_callback", "work", "WorkerSetup"]

logger = logging.getLogger(__name__)


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


def make_pruner(p: PrunerSpec, *, reports_per_epoch: int = 1) -> optuna.pruners.BasePruner:
    """Return the pruner a spec names (the patient pruner wrapping its inner one).

    The spec gives warm-ups, resources and patience in epochs, whole or not; they become reports
    (``vocab.epoch_reports``: 0.5 epochs with 4 reports an epoch is 2; ``max_resource: auto`` stays auto).
    """
    if p.type == "none":
        return optuna.pruners.NopPruner()
    options = {k: epoch_reports(v, reports_per_epoch) if k in EPOCH_OPTIONS and isinstance(v, (int, float))
               and not isinstance(v, bool) else v for k, v in p.options.items()}  # max_resource: auto stays auto
    cls = pruner_class(p.type)
    if p.type == "patient":
        assert p.wrapped is not None  # the spec checks this
        return cls(make_pruner(p.wrapped, reports_per_epoch=reports_per_epoch), **options)
    return cls(**options)


def stale_trial_callback(spec: Spec) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Return what runs when a trial's worker died: mark its MLflow run killed, retry its params."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.study.max_retries)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        logger.info(f"trial {trial.number} of study {study.study_name!r} sent no heartbeat for "
                    f"{spec.study.grace_period} s (its worker died): marked failed and retried with the same params.")
        retry(study, trial)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and spec.tracking.enabled:
            tracker = Tracker(spec.tracking.uri, spec.tracking.experiment,
                              artifact_root=spec.tracking.artifact_root)
            tracker.end_run(run_id, "KILLED", tags={
                STATE_TAG: "FAIL",
                FAIL_REASON_TAG: f"worker died: no heartbeat for {spec.study.grace_period} s"})

    return on_stale


def open_study(spec: Spec, *, allow_space_change: bool = False) -> optuna.Study:
    """Return the spec's study, created on first use and resumed after; refuse a changed search space."""
    if spec.tracking.enabled:
        check_store(spec.tracking.uri)  # a missing database driver fails here, before any trial, not in warnings
    storage = make_storage(spec.study, stale_trial_callback=stale_trial_callback(spec))
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
        changes = _describe_change(study.user_attrs, spec)
        if not allow_space_change:
            raise SpecError(
                f"{spec.path}: study {spec.study.name!r} already exists in {mask_password(spec.study.storage)} with "
                f"a different search space, task, model or metric ({changes}). Its finished trials would not be "
                "comparable with new ones. Give the study a new name, or pass --allow-space-change to continue "
                "it with the new space on purpose.")
        logger.warning(f"study {spec.study.name!r} continues with a changed search space ({changes}).")
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
    for params in spec.study.enqueue:
        if not _tried(study, params):
            study.enqueue_trial(dict(params), user_attrs={ENQUEUED_ATTR: True})
    return study


def _tried(study: optuna.Study, params: dict[str, Any]) -> bool:
    """Return whether a trial of the study has tried ``params``, is trying them or waits to.

    One stopped by Ctrl-C or SIGTERM (interrupted) has not: resuming the study tries its
    configuration again, as a user who listed it first expects. One that failed on its own has.
    """
    for t in study.get_trials(deepcopy=False):
        if t.system_attrs.get("fixed_params", t.params) == dict(params):
            if not (t.state == optuna.trial.TrialState.FAIL and INTERRUPTED_ATTR in t.user_attrs):
                return True
    return False


def _describe_change(attrs: dict[str, Any], spec: Spec) -> str:
    stored = read_spec(attrs)
    if stored is None:
        return "no spec stored"
    old = stored.space_dict()
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
    data = stored_spec(open_existing(storage_url, study_name).user_attrs)
    if data is None:
        raise SpecError(f"study {study_name!r} in {mask_password(storage_url)} was not created by hpsearch "
                        "(it has no stored spec).")
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


def work(spec: Spec, study: optuna.Study, setup: WorkerSetup, *, timeout: float | None = None) -> int:
    """Run trials until the study's total is reached, a stop rule holds, or the timeout; return how many ran.

    A trial that fails fails alone (see :func:`run_trial`); a fault of the whole worker ends the
    work, and the study's MLflow parent run with it (FAILED, the reason tagged), never left RUNNING.
    """
    try:
        return _work(spec, study, setup, timeout=timeout)
    except Exception as exc:
        if setup.tracker and setup.parent_run_id:
            setup.tracker.end_run(setup.parent_run_id, "FAILED",
                                  tags={FAIL_REASON_TAG: f"{type(exc).__name__}: {exc}"[:5000]})
        if isinstance(exc, OSError):  # a file the worker needs (artifacts, caches): one line, not a traceback
            raise StorageError(f"this worker cannot go on: {exc.strerror or exc}"
                               + (f": {exc.filename}" if exc.filename else "")
                               + ". Finished trials are kept; fix it and run again.") from None
        raise


def _work(spec: Spec, study: optuna.Study, setup: WorkerSetup, *, timeout: float | None = None) -> int:
    """Run trials until the study's total is reached, a stop rule holds, or the timeout; return how many ran.

    Stop rules (``study.stop``, see :mod:`hpsearch.stopping`) are read from the storage before each
    new trial, so every worker of the study stops starting trials at the same point.

    The worker's sampler draws from a random stream of its own (see :func:`claim_sampler_stream`):
    seeded alike, racing workers, or a rerun of the study, would propose the same parameters again.
    Its pruner counts in the study's reports (several an epoch on large datasets).
    Ctrl-C (SIGINT), SIGTERM or SIGHUP ends the running trial as interrupted, never leaving it
    RUNNING, then raises KeyboardInterrupt.
    """
    ctx = TrialContext(spec=spec, data=setup.data, device=setup.device, tracker=setup.tracker,
                       parent_run_id=setup.parent_run_id, input_stats=setup.input_stats,
                       artifact_store=artifact_store(spec),
                       reference=setup.reference, reports_per_epoch=setup.reports_per_epoch,
                       datasets=setup.datasets)
    deadline = None if timeout is None else time.monotonic() + timeout
    ran = 0
    stopped = False
    n_trials = spec.study.n_trials
    signals = StopSignals()
    surplus: set[int] = set()  # trials this worker created past the total (workers raced)
    stream, seed = claim_sampler_stream(spec, study)
    study.sampler = make_sampler(spec, seed=seed)
    study.pruner = make_pruner(spec.study.pruner, reports_per_epoch=setup.reports_per_epoch)

    current: list[optuna.Trial] = []  # the trial this worker runs now

    def admit(trial: optuna.Trial) -> bool:
        """Tag a new trial with this worker; return False when it is surplus (marked so)."""
        set_user_attrs(trial, {WORKER_ATTR: worker_id(), SAMPLER_STREAM_ATTR: stream})
        if not _surplus(study, trial, n_trials):
            return True
        trial.set_user_attr(SURPLUS_ATTR, f"other workers had already started the study's {n_trials} "
                                          "trials when this one was created")
        surplus.add(trial.number)
        return False

    def objective(trial: optuna.Trial) -> float | list[float]:
        current[:] = [trial]
        with signals.trial(trial):
            if not admit(trial):
                raise _Surplus()
            if setup.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(setup.device)  # this trial's peak, not the worker's
            return run_trial(trial, ctx)

    def decide() -> str:
        """Return what this worker does next: "start" a trial, "wait" for others' last ones, or "stop"."""
        nonlocal stopped
        trials = study.get_trials(deepcopy=False)
        if (verdict := stopping.verdict(spec.study.stop, spec.study.metrics[0], trials)) is not None:
            stopped = _record_stop(study, verdict)
            return "stop"
        c = count(trials)
        if c.waiting > 0 or c.finished + c.running < n_trials:
            return "start"
        # Other workers may hold the last trials. If one of them died, its trial goes stale and is
        # retried: stay to pick the retry up, so the study reaches its total.
        return "wait" if c.running > 0 and c.finished < n_trials else "stop"

    def wait() -> None:
        fail_stale_trials(study, grace_period=spec.study.grace_period)
        signals.sleep(min(0.5, spec.study.heartbeat_interval))  # the total may be reached any moment

    def after_trial() -> None:
        if setup.tracker and setup.tracker.failures:  # MLflow failed at some point: is it back?
            track_late(study, setup.tracker, setup.parent_run_id)
        insights.refresh(spec, study, setup.tracker, setup.parent_run_id, min_interval_s=30.0)

    def not_a_failure(record: logging.LogRecord) -> bool:
        # Optuna reports a surplus trial as failed, with a traceback; it is no failure. Nor is a
        # full disk the trial's (the worker stops with one line that says so), nor one another worker took over.
        if record.exc_info and record.exc_info[1] is not None and disk_full_cause(record.exc_info[1]):
            return False
        if record.exc_info and isinstance(record.exc_info[1], TakenOver):  # said once, by _taken_over
            return False
        return not any(record.getMessage().startswith(f"Trial {n} failed") for n in surplus)

    optuna_log = logging.getLogger("optuna.study._optimize")
    capacity = pack_capacity(spec, setup.device)
    with signals, _log_filters(optuna_log, signals.filter, not_a_failure, _one_line_failures):
        if capacity > 1:
            try:
                ran = work_packed(ctx, study, capacity, decide=decide, admit=admit, wait=wait,
                                  after_trial=after_trial, signals=signals, deadline=deadline)
            except Exception as exc:  # a full disk ends the worker with its members closed, anything else as it was
                if disk_full_cause(exc) is None:
                    raise
                members = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                           if t.user_attrs.get(WORKER_ATTR) == worker_id()]  # those the pack could not close
                raise _stop_on_full_disk(spec, study, members, setup.tracker, exc) from None
        while capacity == 1 and (deadline is None or time.monotonic() < deadline):
            signals.check()
            what = decide()
            if what == "start":
                try:
                    study.optimize(objective, n_trials=1, catch=(TrialFailed, _Surplus))
                except Exception as exc:  # noqa: BLE001 - a full disk ends the worker, anything else as it was
                    if disk_full_cause(exc) is not None:
                        raise _stop_on_full_disk(spec, study, current, setup.tracker, exc) from None
                    if not _taken_over(spec, study, current):
                        raise
                ran += 1
                after_trial()
            elif what == "wait":
                wait()
            else:
                break
        signals.check()
    if setup.tracker:
        track_late(study, setup.tracker, setup.parent_run_id)
    if (stopped or count_trials(study).finished >= n_trials) and setup.tracker and setup.parent_run_id:
        setup.tracker.end_run(setup.parent_run_id, "FINISHED")  # each worker may say so: idempotent
    return ran


def _taken_over(spec: Spec, study: optuna.Study, trials: list[optuna.Trial]) -> bool:
    """Return whether another worker closed one of this worker's ``trials`` (declared it stale), saying so.

    A worker stalled past the grace period (an overloaded machine, a paused process) finds its
    trial failed, and retried, by another: Optuna then cannot tell it. Its result is dropped.
    """
    lost = [t.number for t in trials if study._storage.get_trial(t._trial_id).state.is_finished()]
    for number in lost:
        say_taken_over(number, spec.study.grace_period)
    return bool(lost)


def _record_stop(study: optuna.Study, verdict: stopping.Verdict) -> bool:
    """Record (once per study) the stop rule that holds, say it, and return True."""
    if STOPPED_ATTR not in study.user_attrs:
        study.set_user_attr(STOPPED_ATTR, verdict.as_attr())
    logger.info(f"study {study.study_name!r} stops early: {verdict.reason}; no new trial starts (running ones finish).")
    return True


def _stop_on_full_disk(spec: Spec, study: optuna.Study, trials: list[optuna.Trial] | list[FrozenTrial],
                       tracker: Tracker | None, exc: BaseException) -> StorageError:
    """Close the trials a full disk cut short (FAIL; its MLflow run FAILED); return the error that ends the worker.

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
                logger.warning(f"trial {trial.number} could not be closed either (the disk is full); once its "
                               f"heartbeat is {spec.study.grace_period} s old, the next run or `hpsearch cleanup` "
                               "fails and retries it.")
                continue
            with suppress(Exception):  # a reason is a bonus on a full disk
                study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, reason)
        frozen = storage.get_trial(trial._trial_id)
        run_id = frozen.user_attrs.get(RUN_ID_ATTR)
        # The trial's own clean-up may have stopped before its run's end: end it, unless it did end.
        if tracker is not None and run_id and frozen.state == optuna.trial.TrialState.FAIL \
                and tracker.run_status(run_id) == "RUNNING":
            tracker.end_run(run_id, "FAILED", tags={STATE_TAG: "FAIL", FAIL_REASON_TAG: reason})
    return error



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
