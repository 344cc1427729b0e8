"""One Optuna trial: suggest params, build and train a model, report, track, keep the model.

This is the edge where Optuna and MLflow meet the training code: `train.fit` sees only the
`report(step, metrics)` callable built here.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from hpsearch import space, tasks
from hpsearch.data import SearchData
from hpsearch.models import build_model, count_params
from hpsearch.spec import Spec
from hpsearch.tracking import Tracker
from hpsearch.train import Diverged, TrainConfig, fit

MODEL_FILE = "model.pt"


class TrialFailed(Exception):
    """The trial ended without a result (diverged, bad combination); the study goes on."""


@dataclass
class TrialContext:
    """What every trial of one worker shares: spec, data on the device, tracking."""

    spec: Spec
    data: SearchData
    device: torch.device
    tracker: Tracker | None
    parent_run_id: str | None
    artifact_store: optuna.artifacts.FileSystemArtifactStore
    reference: torch.nn.Module | None = None  # inpaint's reference classifier
    warn: Callable[[str], None] = print


def trial_seed(study_seed: int, trial_number: int) -> int:
    """Return the training seed of a trial: distinct per trial, reproducible from the study seed."""
    return (study_seed * 1_000_003 + trial_number) % (2**31 - 1)


def run_trial(trial: optuna.Trial, ctx: TrialContext) -> float | list[float]:
    """Return the trial's objective value(s); raise TrialPruned or TrialFailed."""
    spec = ctx.spec
    params = space.suggest(trial, spec)
    # A retried trial (its worker died) trains with the seed of the trial it repeats.
    retried_from = _retried_from(trial)
    seed = trial_seed(spec.study.seed, trial.number if retried_from is None else retried_from)
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("device", str(ctx.device))
    task = tasks.make_task(spec.task.type, params, mask_placement=spec.task.mask.placement,
                           noise_kind=spec.task.noise.kind, reference=ctx.reference)
    torch.manual_seed(seed)
    model = build_model(spec.model.family, params, image_shape=ctx.data.image_shape,
                        n_classes=ctx.data.n_classes).to(ctx.device)
    n_params = count_params(model)
    trial.set_user_attr("n_params", n_params)

    run_id = _start_run(trial, ctx, params, seed, n_params, retried_from)
    primary = spec.study.metrics[0].name
    mean, std = _stats(ctx)
    last_images_epoch = 0

    def report(step: int, metrics: dict[str, float]) -> None:
        nonlocal last_images_epoch
        if ctx.tracker and run_id:
            ctx.tracker.log_metrics(run_id, metrics, step)
            if step % spec.tracking.log_images_every == 0:
                _log_images(ctx, run_id, model, task, mean, std, step)
                last_images_epoch = step
        value = metrics[primary]
        if not spec.study.multi_objective and math.isfinite(value):
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {step}: {primary}={value:.5g}")

    config = TrainConfig.from_params(params, seed=seed, device=str(ctx.device))
    started = time.perf_counter()
    try:
        result = fit(model, ctx.data, task, config, report)
    except optuna.TrialPruned:
        _end_run(ctx, run_id, "FINISHED", "PRUNED", model, task, mean, std, last_images_epoch, trial)
        raise
    except Diverged as exc:
        reason = f"diverged: {exc}"
        trial.set_user_attr("fail_reason", reason)
        _end_run(ctx, run_id, "FAILED", "FAIL", None, task, mean, std, last_images_epoch, trial, reason=reason)
        raise TrialFailed(reason) from None
    except BaseException as exc:  # Ctrl-C, out of memory, a bug: record it, then let Optuna fail the trial
        reason = f"{type(exc).__name__}: {exc}"[:500]
        interrupted = isinstance(exc, KeyboardInterrupt)
        # An interrupted trial is not the trial's fault: it does not count towards n_trials.
        trial.set_user_attr("interrupted" if interrupted else "fail_reason", reason or "interrupted")
        status = "KILLED" if interrupted else "FAILED"
        _end_run(ctx, run_id, status, "FAIL", None, task, mean, std, last_images_epoch, trial, reason=reason)
        raise
    trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 3))
    for name, value in result.metrics.items():
        trial.set_user_attr(name, value)
    if ctx.device.type == "cuda":
        trial.set_user_attr("peak_gpu_memory_mb", round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1))
    values = [float(n_params) if m.name == "n_params" else result.metrics[m.name] for m in spec.study.metrics]
    if not all(math.isfinite(v) for v in values):
        reason = f"non-finite objective value(s) {values}"
        trial.set_user_attr("fail_reason", reason)
        _end_run(ctx, run_id, "FAILED", "FAIL", None, task, mean, std, last_images_epoch, trial, reason=reason)
        raise TrialFailed(reason)
    _save_model(trial, ctx, model)
    _end_run(ctx, run_id, "FINISHED", "COMPLETE", model, task, mean, std, last_images_epoch, trial)
    return values[0] if len(values) == 1 else values


def _retried_from(trial: optuna.Trial) -> int | None:
    """Return the number of the first trial this one retries (its worker died), or None."""
    # Optuna's retry callback stores the first failed trial's number as the system attr
    # "failed_trial"; Trial has no public system attrs in Optuna 5, so ask the storage.
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    number = attrs.get("failed_trial")
    return None if number is None else int(number)


def _stats(ctx: TrialContext) -> tuple[float, float]:
    if ctx.spec.task.normalize:
        return ctx.data.mean, ctx.data.std
    return 0.0, 1.0


def _start_run(trial: optuna.Trial, ctx: TrialContext, params: dict[str, Any], seed: int, n_params: int,
               retried_from: int | None) -> str | None:
    if ctx.tracker is None or ctx.parent_run_id is None:
        return None
    tags = {"hpsearch.study": ctx.spec.study.name, "optuna.trial_number": str(trial.number)}
    if retried_from is not None:
        tags["hpsearch.retried_from"] = str(retried_from)
    logged = {**params, "seed": seed, "n_params": n_params, "device": str(ctx.device),
              **ctx.data.provenance.as_params()}
    run_id = ctx.tracker.start_trial(ctx.parent_run_id, trial.number, params=logged, tags=tags)
    if run_id:
        trial.set_user_attr("mlflow_run_id", run_id)
        url = ctx.tracker.run_url(run_id)
        if url:
            trial.set_user_attr("mlflow_run_url", url)
    return run_id


def _log_images(ctx: TrialContext, run_id: str, model: torch.nn.Module, task: Any, mean: float, std: float,
                step: int) -> None:
    if ctx.spec.task.type == "classify" or ctx.tracker is None:
        return
    grid = tasks.reconstruction_grid(model, ctx.data.val, task, mean=mean, std=std, device=ctx.device)
    ctx.tracker.log_image(run_id, grid, f"images/reconstruction_epoch_{step:03d}.png")


def _end_run(ctx: TrialContext, run_id: str | None, status: str, state: str, model: torch.nn.Module | None,
             task: Any, mean: float, std: float, last_images_epoch: int, trial: optuna.Trial,
             reason: str | None = None) -> None:
    """Log the final pictures (to MLflow and as Optuna artifacts) and close the trial's run."""
    # A pruned classifier's confusion matrix tells little and costs ~0.2 s; reconstructions of
    # pruned autoencoders do show why they were pruned.
    if model is not None and not (state == "PRUNED" and ctx.spec.task.type == "classify"):
        try:
            _final_images(ctx, run_id, model, task, mean, std, trial)
        except Exception as exc:  # noqa: BLE001 - pictures are a bonus; never lose the trial over them
            ctx.warn(f"warning: could not draw trial {trial.number}'s images: {exc}")
    if ctx.tracker is None or run_id is None:
        return
    tags = {"hpsearch.state": state}
    if reason:
        tags["hpsearch.fail_reason"] = reason[:5000]
    ctx.tracker.end_run(run_id, status, tags=tags)


def _final_images(ctx: TrialContext, run_id: str | None, model: torch.nn.Module, task: Any, mean: float,
                  std: float, trial: optuna.Trial) -> None:
    from hpsearch.figures import save_png

    if ctx.spec.task.type == "classify":
        counts = tasks.confusion_matrix(model, ctx.data.val, mean=mean, std=std, device=ctx.device,
                                        n_classes=ctx.data.n_classes)
        image, name = tasks.confusion_matrix_image(counts), "confusion_matrix.png"
    else:
        image = tasks.reconstruction_grid(model, ctx.data.val, task, mean=mean, std=std, device=ctx.device)
        name = "reconstruction.png"
    if ctx.tracker is not None and run_id is not None:
        ctx.tracker.log_image(run_id, image, f"images/{name}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        save_png(image, path)
        artifact_id = optuna.artifacts.upload_artifact(
            artifact_store=ctx.artifact_store, file_path=str(path), study_or_trial=trial, mimetype="image/png")
    trial.set_user_attr(f"artifact:{name}", artifact_id)


def _save_model(trial: optuna.Trial, ctx: TrialContext, model: torch.nn.Module) -> None:
    """Keep the trained weights as an Optuna artifact, so the best model is never trained twice."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        artifact_id = optuna.artifacts.upload_artifact(
            artifact_store=ctx.artifact_store, file_path=str(path), study_or_trial=trial,
            mimetype="application/octet-stream")
    trial.set_user_attr("model_artifact_id", artifact_id)
