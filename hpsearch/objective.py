"""One Optuna trial: suggest params, build and train a model, report, track, keep the model.

This is the edge where Optuna and MLflow meet the training code: `train.fit` sees only the
`report(step, metrics)` callable built here.

What a trial records costs it little: its user attrs are written in two transactions (at the start
and at the end), not one commit each; per-epoch metrics go to MLflow in batches at most every
few seconds (each epoch at once when epochs are slower than that), and the rest with the run's end.
Its MLflow writes after the run's start are queued for the process's background writer
(``Tracker.later``), so training never waits for the store; the trial waits for them (``flush``)
before it ends, so Optuna is told its state only once its run is whole in MLflow (or its failure
counted, and the trial marked untracked).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import optuna
import sqlalchemy.exc
import torch
from optuna.trial import TrialState

from hpsearch import pictures, space, tasks
from hpsearch.data import SearchData
from hpsearch.errors import DataError, StorageError
from hpsearch.models import build_model, count_params
from hpsearch.spec import Spec
from hpsearch.storage import (claim, holder_gone, is_connection_error, read_claim, release_claim, set_user_attrs,
                              swap_claim)
from hpsearch.tracking import DatasetRecord, Tracker
from hpsearch.train import Diverged, TrainConfig, TrainResult, fit
from hpsearch.record import (ARTIFACT_PREFIX, DEVICE_ATTR, FAIL_REASON_ATTR, FAIL_REASON_TAG, INTERRUPTED_ATTR,
                             LATE_STALE_S, MODEL_ATTR, N_PARAMS_ATTR, RETRIED_FROM_TAG, RUN_ID_ATTR, RUN_URL_ATTR,
                             SAMPLER_STREAM_ATTR, SEED_ATTR, STATE_TAG, STUDY_TAG, TRACKED_LATE_KEY, TRACKED_LATE_TAG,
                             TRAIN_SECONDS_ATTR, TRIAL_NUMBER_TAG, UNTRACKED_ATTR, epoch_text, untracked, worker_id)

MODEL_FILE = "model.pt"
_T = TypeVar("_T")
METRICS_EVERY_S = 5.0  # per-epoch metrics reach MLflow at most this late: live curves, one write per batch

logger = logging.getLogger(__name__)


class TrialFailed(Exception):
    """The trial ended without a result (diverged, bad combination); the study goes on."""


class TakenOver(TrialFailed):
    """Another worker closed this trial while it ran (declared it stale, see study._taken_over)."""


def say_taken_over(number: int, grace_period: float) -> None:
    """Say that trial ``number``, this worker's, was declared stale by another worker, which failed and retried it."""
    logger.warning(f"trial {number} was declared stale by another worker (its heartbeat was over {grace_period} s "
                   "late: an overloaded machine or a paused process?), and failed and retried there; this worker "
                   "drops its result and goes on.")


@dataclass
class TrialContext:
    """What every trial of one worker shares: spec, data on the device, tracking."""

    spec: Spec
    data: SearchData
    device: torch.device
    tracker: Tracker | None
    parent_run_id: str | None
    artifact_store: optuna.artifacts.FileSystemArtifactStore
    input_stats: tuple[float, float]  # (mean, std) inputs are standardised with: see tasks.input_stats
    reference: torch.nn.Module | None = None  # inpaint's reference classifier
    reports_per_epoch: int = 1  # the study's: see record.REPORTS_ATTR
    datasets: Sequence[DatasetRecord] = ()  # the splits trials train and validate on, as MLflow inputs


def trial_seed(study_seed: int, trial_number: int) -> int:
    """Return the training seed of a trial: distinct per trial, reproducible from the study seed."""
    return (study_seed * 1_000_003 + trial_number) % (2**31 - 1)


def run_trial(trial: optuna.Trial, ctx: TrialContext) -> float | list[float]:
    """Return the trial's objective value(s); raise TrialPruned or TrialFailed.

    Whatever fails in one trial (a combination of params, a model too large for memory, a bug)
    fails that trial, with its reason in the user attr ``fail_reason``; only a fault of the
    whole worker (storage or data gone, a full disk) or an interruption propagates as it is.
    """
    return guarded(trial, ctx, lambda: _run_trial(trial, ctx))


def guarded(trial: optuna.Trial, ctx: TrialContext, part: Callable[[], _T]) -> _T:
    """Return ``part()``, a part of the trial's life; what fails in it fails the trial alone, as TrialFailed
    with its reason recorded (see :func:`run_trial`)."""
    try:
        return part()
    except (TrialFailed, optuna.TrialPruned):
        raise
    except optuna.exceptions.UpdateFinishedTrialError:  # the trial is no longer this worker's to write
        raise TakenOver(f"trial {trial.number} was closed by another worker") from None
    except Exception as exc:
        if worker_fault(exc):
            raise
        reason = trial.user_attrs.get(FAIL_REASON_ATTR) or _reason(exc)
        if FAIL_REASON_ATTR not in trial.user_attrs:  # failed outside training: nothing recorded it yet
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            run_id = trial.user_attrs.get(RUN_ID_ATTR)
            if ctx.tracker is not None and run_id:
                queued = ctx.tracker.later(run_id)  # after the run's records still queued
                queued.end_run("FAILED", tags={STATE_TAG: "FAIL", FAIL_REASON_TAG: reason})
                queued.flush()
        raise TrialFailed(reason) from None


def worker_fault(exc: BaseException) -> bool:
    """Return whether ``exc`` is a fault of the whole worker, which no other trial would escape."""
    # The database, the data, the disk: what every next trial would meet as well.
    faults = (StorageError, DataError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, OSError)
    return isinstance(exc, faults) or is_connection_error(exc)


def _reason(exc: BaseException) -> str:
    """Return why a trial failed, in one line: the exception's type and first line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:500]


def _run_trial(trial: optuna.Trial, ctx: TrialContext) -> float | list[float]:
    def build(this: _Running) -> torch.nn.Module:
        torch.manual_seed(this.seed)
        return build_model(ctx.spec.model.family, this.params, image_shape=ctx.data.image_shape,
                           n_classes=ctx.data.n_classes).to(ctx.device)

    this = begin_trial(trial, ctx, build)
    mean, std = ctx.input_stats
    config = TrainConfig.from_params(this.params, seed=this.seed, device=str(ctx.device),
                                     precision=ctx.spec.task.precision, channels_last=ctx.spec.task.channels_last)
    try:
        result = fit(this.model, ctx.data, this.task, config, this.report, mean=mean, std=std,
                     reports_per_epoch=ctx.reports_per_epoch)
    except BaseException as exc:
        this.left_early(exc)
    return this.completed(result)


def begin_trial(trial: optuna.Trial, ctx: TrialContext, build: Callable[[_Running], torch.nn.Module]) -> _Running:
    """Return the trial under way: its params suggested, its model built by ``build(this)`` from its params,
    seed and reporter (alone, or into a pack), its MLflow run started and its first attrs stored."""
    spec = ctx.spec
    params = space.suggest(trial, spec)
    # A retried trial (its worker died) trains with the seed of the trial it repeats.
    retried_from = _retried_from(trial)
    seed = trial_seed(spec.study.seed, trial.number if retried_from is None else retried_from)
    task = tasks.make_task(spec.task.type, params, mask_placement=spec.task.mask.placement,
                           noise_kind=spec.task.noise.kind, reference=ctx.reference)
    this = _Running(trial, ctx, params, seed, task)
    this.model = build(this)
    this.n_params = count_params(this.model)
    failures = ctx.tracker.failures if ctx.tracker else 0  # MLflow calls failed before this trial
    this.run_id = _start_run(trial, ctx, params, seed, this.n_params, retried_from)
    this.epochs = _EpochLog(ctx.tracker, this.run_id, failures_before=failures)
    this.started = time.perf_counter()
    return this


def _retried_from(trial: optuna.Trial) -> int | None:
    """Return the number of the first trial this one retries (its worker died), or None."""
    # Optuna's retry callback stores the first failed trial's number as the system attr
    # "failed_trial"; Trial has no public system attrs in Optuna 5, so ask the storage.
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    number = attrs.get("failed_trial")
    return None if number is None else int(number)


def _start_run(trial: optuna.Trial, ctx: TrialContext, params: dict[str, Any], seed: int, n_params: int,
               retried_from: int | None) -> str | None:
    """Return the trial's MLflow run id (None without tracking), with the trial's first attrs stored."""
    attrs: dict[str, Any] = {SEED_ATTR: seed, DEVICE_ATTR: str(ctx.device), N_PARAMS_ATTR: n_params}
    run_id = None
    if ctx.tracker is not None and ctx.parent_run_id is not None:
        run_id = _start_mlflow_run(trial, ctx, params, seed, n_params, retried_from)
        if run_id:
            if ctx.spec.tracking.system_metrics:
                ctx.tracker.monitor_system(run_id)  # stopped by end_run
            ctx.tracker.later(run_id).log_datasets(ctx.datasets)
            attrs[RUN_ID_ATTR] = run_id
            if url := ctx.tracker.run_url(run_id):
                attrs[RUN_URL_ATTR] = url
    set_user_attrs(trial, attrs)
    return run_id


def _start_mlflow_run(trial: optuna.Trial, ctx: TrialContext, params: dict[str, Any], seed: int, n_params: int,
                      retried_from: int | None) -> str | None:
    assert ctx.tracker is not None and ctx.parent_run_id is not None  # _start_run checks
    tags = {STUDY_TAG: ctx.spec.study.name, TRIAL_NUMBER_TAG: str(trial.number)}
    if retried_from is not None:
        tags[RETRIED_FROM_TAG] = str(retried_from)
    logged = {**params, "seed": seed, "n_params": n_params, "device": str(ctx.device),
              **ctx.data.provenance.as_params()}
    return ctx.tracker.start_trial(ctx.parent_run_id, trial.number, params=logged, tags=tags, params_later=True)


@dataclass
class _EpochLog:
    """A trial's per-epoch metrics on their way to MLflow: held for a batch, sent every few seconds."""

    tracker: Tracker | None
    run_id: str | None
    failures_before: int = 0  # the tracker's failed calls when the trial began
    held: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)  # (step, time in ms, metrics)
    sent_at: float = field(default_factory=time.monotonic)

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        self.held.append((step, int(time.time() * 1000), dict(metrics)))
        if time.monotonic() - self.sent_at >= METRICS_EVERY_S:
            self.send()

    def send(self) -> None:
        if self.tracker and self.run_id and self.held:
            self.tracker.later(self.run_id).log_epochs(self.held)
        self.held = []
        self.sent_at = time.monotonic()

    def take(self) -> list[tuple[int, int, dict[str, float]]]:
        """Return the epochs not sent yet, and forget them (the caller sends them)."""
        held, self.held = self.held, []
        return held


@dataclass
class _Running:
    """One trial under way: the Optuna trial, its MLflow run, its model; what it reports and how it ends."""

    trial: optuna.Trial
    ctx: TrialContext
    params: dict[str, Any]
    seed: int
    task: Any  # tasks.Task
    model: torch.nn.Module = None  # type: ignore[assignment]  # set by begin_trial, before anything reads it
    n_params: int = 0
    run_id: str | None = None  # None without tracking, or when MLflow could not start it
    epochs: _EpochLog = field(default_factory=lambda: _EpochLog(None, None))
    started: float = 0.0  # when its training began (perf_counter)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """The reporter training sees: metrics to MLflow, the primary value to Optuna; raise TrialPruned."""
        spec, per_epoch = self.ctx.spec, self.ctx.reports_per_epoch
        if self.ctx.tracker and self.run_id:
            self.epochs.add(step, metrics)
            if step % (per_epoch * spec.tracking.log_images_every) == 0:  # pictures at epochs' ends
                self.log_images(step // per_epoch)
        primary = spec.study.metrics[0].name
        value = metrics[primary]
        if not spec.study.multi_objective and math.isfinite(value):
            self.trial.report(value, step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch_text(step, per_epoch)}: {primary}={value:.5g}")

    def left_early(self, exc: BaseException) -> NoReturn:
        """Record why training ended before its last epoch (pruned, diverged, interrupted, failed); raise
        TrialPruned, TrialFailed or ``exc`` itself, as the study expects them."""
        if isinstance(exc, optuna.TrialPruned):
            self.end("FINISHED", "PRUNED", images=True)
            raise exc
        if isinstance(exc, Diverged):
            reason = f"diverged: {exc}"
            self.end("FAILED", "FAIL", reason=reason, attrs={FAIL_REASON_ATTR: reason})
            raise TrialFailed(reason) from None
        # Ctrl-C, out of memory, a bug: record it, then let the study fail the trial.
        reason = _reason(exc)
        interrupted = isinstance(exc, KeyboardInterrupt)
        # An interrupted trial is not the trial's fault: it does not count towards n_trials.
        attrs = {INTERRUPTED_ATTR if interrupted else FAIL_REASON_ATTR: reason or "interrupted"}
        self.end("KILLED" if interrupted else "FAILED", "FAIL", reason=reason, attrs=attrs)
        raise exc

    def completed(self, result: TrainResult) -> float | list[float]:
        """Return the objective value(s) of a trial that trained to its end, with its model kept; raise
        TrialFailed when a value is not finite.

        A stop signal that comes while the records are written (waiting for the background writer,
        say) ends the trial as one that comes during training: interrupted, its run KILLED.
        """
        try:
            return self._completed(result)
        except KeyboardInterrupt as exc:
            self.left_early(exc)

    def _completed(self, result: TrainResult) -> float | list[float]:
        ctx = self.ctx
        finished: dict[str, Any] = {TRAIN_SECONDS_ATTR: round(time.perf_counter() - self.started, 3),
                                    **result.metrics}
        if ctx.device.type == "cuda":
            finished["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1)
        values = [float(self.n_params) if m.name == "n_params" else result.metrics[m.name]
                  for m in ctx.spec.study.metrics]
        if not all(math.isfinite(v) for v in values):
            reason = f"non-finite objective value(s) {values}"
            self.end("FAILED", "FAIL", reason=reason, attrs={**finished, FAIL_REASON_ATTR: reason})
            raise TrialFailed(reason)
        finished[MODEL_ATTR] = self.save_model()
        self.end("FINISHED", "COMPLETE", images=True, attrs=finished)
        return values[0] if len(values) == 1 else values

    def log_images(self, epoch: int) -> None:
        """Log the reconstructions of the validation images at the end of ``epoch`` (not for classifiers)."""
        ctx = self.ctx
        if ctx.spec.task.type == "classify" or ctx.tracker is None or self.run_id is None:
            return
        mean, std = ctx.input_stats
        grid = pictures.reconstruction_grid(self.model, ctx.data.val, self.task, mean=mean, std=std,
                                            device=ctx.device)
        ctx.tracker.later(self.run_id).log_image(grid, f"images/reconstruction_epoch_{epoch:03d}.png")

    def end(self, status: str, state: str, *, images: bool = False, reason: str | None = None,
            attrs: Mapping[str, Any] | None = None) -> None:
        """Close the trial's MLflow run (``status``; tagged with the Optuna ``state`` and the ``reason``) with
        the epochs not sent yet, store its last attrs (with its final picture if ``images``), and wait for
        its queued MLflow records: the trial is told only after this."""
        ctx = self.ctx
        attrs = dict(attrs or {})
        # A pruned classifier's confusion matrix tells little; reconstructions of pruned autoencoders
        # do show why they were pruned.
        if images and not (state == "PRUNED" and ctx.spec.task.type == "classify"):
            try:
                attrs.update(self._final_images())
            except Exception as exc:  # noqa: BLE001 - pictures are a bonus; never lose the trial over them
                logger.warning(f"could not draw trial {self.trial.number}'s images: {exc}")
        queued = None
        if ctx.tracker is not None and self.run_id is not None:
            tags = {STATE_TAG: state}
            if reason:
                tags[FAIL_REASON_TAG] = reason[:5000]
            queued = ctx.tracker.later(self.run_id)
            queued.end_run(status, tags=tags, epochs=self.epochs.take())
        set_user_attrs(self.trial, attrs)  # while the writer ends the run
        if queued is not None:
            queued.flush()  # its records in MLflow, or their failures counted, before the trial is told
        if ctx.spec.tracking.enabled and (self.run_id is None or ctx.tracker is None
                                          or ctx.tracker.failures > self.epochs.failures_before):
            # Said in the study, where `status` and the report see it; `track_late` records the run once MLflow is back.
            set_user_attrs(self.trial, {UNTRACKED_ATTR: "the MLflow server was unreachable while this trial ran: "
                                                        "its run is missing or incomplete"})

    def _final_images(self) -> dict[str, str]:
        """Return the user attr that names the trial's final picture, uploaded as an Optuna artifact."""
        from hpsearch.figures import confusion_matrix_image, save_png

        ctx = self.ctx
        mean, std = ctx.input_stats
        if ctx.spec.task.type == "classify":
            counts = pictures.confusion_matrix(self.model, ctx.data.val, mean=mean, std=std, device=ctx.device,
                                            n_classes=ctx.data.n_classes)
            image, name = confusion_matrix_image(counts), "confusion_matrix.png"
        else:
            image = pictures.reconstruction_grid(self.model, ctx.data.val, self.task, mean=mean, std=std,
                                              device=ctx.device)
            name = "reconstruction.png"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            save_png(image, path)  # encoded once, for both stores
            if ctx.tracker is not None and self.run_id is not None:
                ctx.tracker.later(self.run_id).log_artifact(path, "images")  # a copy: the directory goes
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=ctx.artifact_store, file_path=str(path), study_or_trial=self.trial,
                mimetype="image/png")
        return {f"{ARTIFACT_PREFIX}{name}": artifact_id}

    def save_model(self) -> str:
        """Return the id of the trained weights kept as an Optuna artifact, so the best model is never trained twice."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILE
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, path)
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=self.ctx.artifact_store, file_path=str(path), study_or_trial=self.trial,
                mimetype="application/octet-stream")
        return artifact_id


_RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


def track_late(study: optuna.Study, tracker: Tracker, parent_run_id: str | None, *,
               limit: int | None = 20) -> list[int]:
    """Give MLflow runs to trials that ran while it was unreachable; return their numbers.

    A trial marked untracked gets its run closed with its final state if it has one (it may
    have been left RUNNING), or a new run with its params, per-epoch values and final metrics
    if it has none. Each is claimed in the study first (``hpsearch.tracked_late:<n>``), so
    workers doing this at once record each trial once; the claim stays as the record that the
    trial is in MLflow now; a claim that names no run yet, left by a process that died (or silent for
    ``LATE_STALE_S``), is taken over. While MLflow is still down, nothing is claimed and it stops at once.
    At most ``limit`` trials a call (None: all), so that a worker between trials is not held up long.
    """
    if parent_run_id is None:
        return []
    trials = study.get_trials(deepcopy=False)
    if not any(UNTRACKED_ATTR in t.user_attrs for t in trials):  # the common case: no study attrs read
        return []
    todo = untracked(trials, study._storage.get_study_system_attrs(study._study_id))[:limit]
    done = []
    for number in todo:
        t = trials[number]
        key = f"{TRACKED_LATE_KEY}{number}"
        mine = {"run_id": None, "token": uuid.uuid4().hex, "worker": worker_id(), "at": time.time()}
        if not claim(study, key, mine):
            held = read_claim(study, key)  # under way elsewhere, or left by a process that died before its run
            if held is None or held.get("run_id") is not None or not holder_gone(held, stale_s=LATE_STALE_S) \
                    or not swap_claim(study, key, held, mine):
                continue
            logger.info(f"trial {number}'s late MLflow run had been claimed by {held.get('worker', 'a process')}, "
                        "which stopped before writing it; this process takes it over.")
        failures = tracker.failures
        run_id = t.user_attrs.get(RUN_ID_ATTR) or tracker.find_trial_run(parent_run_id, number)
        if run_id is None and tracker.failures == failures:
            logged = {**t.params, **{k: t.user_attrs[k] for k in (SEED_ATTR, N_PARAMS_ATTR, DEVICE_ATTR)
                                     if k in t.user_attrs}}
            run_id = tracker.start_trial(parent_run_id, number, params=logged,
                                         tags={STUDY_TAG: study.study_name, TRIAL_NUMBER_TAG: str(number)})
        if run_id is not None:
            now = int(time.time() * 1000)
            metric = (study.metric_names or ["objective"])[0]
            history = [(step, now, {metric: value}) for step, value in sorted(t.intermediate_values.items())]
            final = {k: v for k, v in t.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and k not in (SEED_ATTR, N_PARAMS_ATTR, SAMPLER_STREAM_ATTR)}
            if final:
                history.append((max(t.intermediate_values, default=0), now + 1, final))  # the latest values
            status = "KILLED" if INTERRUPTED_ATTR in t.user_attrs else _RUN_STATUS.get(t.state, "FAILED")
            tags = {STATE_TAG: t.state.name, TRACKED_LATE_TAG: "true"}
            if FAIL_REASON_ATTR in t.user_attrs:
                tags[FAIL_REASON_TAG] = str(t.user_attrs[FAIL_REASON_ATTR])
            tracker.end_run(run_id, status, tags=tags, epochs=history)
        if run_id is None or tracker.failures > failures:
            release_claim(study, key, mine)  # still down: try again later
            break
        swap_claim(study, key, mine, {**mine, "run_id": run_id})
        done.append(number)
    return done
