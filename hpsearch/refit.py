"""Refit: the best configuration trained once more, on training + validation data, before the test.

A search trial trains on the training split less the validation share, for the epochs the search
allowed. Once the search has chosen, the validation split has done its job, so the final model
is trained again on all of the training data, as scikit-learn's searches do by default
(``refit=True``), with the same params and seed as the trial, for the epoch count at which the
trial's own validation curve peaked (``study.refit.epochs: best``) or a fixed N. That model is the
one tested once on the test split and registered. Nothing here sees the test split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from optuna.trial import FrozenTrial

from hpsearch import tasks
from hpsearch.data import SearchData, Split
from hpsearch.models import build_model
from hpsearch.objective import trial_seed
from hpsearch.record import SEED_ATTR
from hpsearch.spec import Spec
from hpsearch.train import TrainConfig, fit


@dataclass(frozen=True)
class Refit:
    """The refit model and how it was trained."""

    model: torch.nn.Module
    trial: int  # the search trial whose configuration it is
    epochs: int
    epochs_rule: str  # "best" (the trial's validation peak) or "fixed"
    n_train: int  # training + validation images it trained on
    seed: int
    seconds: float
    history: tuple[dict[str, float], ...]  # per epoch: train_loss, epoch_seconds, lr
    data: SearchData  # what it trained on: training + validation as its training split

    def as_record(self) -> dict[str, Any]:
        """Return what the study and the summary keep of it (no model; see record.FinalTest.refit)."""
        return {"trial": self.trial, "epochs": self.epochs, "epochs_rule": self.epochs_rule, "n_train": self.n_train,
                "seed": self.seed, "seconds": round(self.seconds, 3)}


def refit_epochs(spec: Spec, best: FrozenTrial, *, reports_per_epoch: int = 1) -> tuple[int, str]:
    """Return (epochs, rule): a fixed N, or the epoch at which ``best``'s validation curve was best.

    A peak within an epoch (several reports an epoch) counts that epoch whole.
    """
    rule = spec.study.refit.epochs
    if rule != "best":
        return int(rule), "fixed"
    curve = {step: value for step, value in best.intermediate_values.items() if math.isfinite(value)}
    if not curve:  # a multi-objective trial reports no curve: it trained for the whole budget
        return spec.task.epochs, "best"
    sign = 1.0 if spec.study.metrics[0].direction == "minimize" else -1.0
    peak = min(curve, key=lambda step: (sign * curve[step], step))  # the earliest of equal bests
    return math.ceil(peak / reports_per_epoch), "best"


def merged(data: SearchData) -> SearchData:
    """Return ``data`` with the validation split added to the training split, and no validation split."""
    train = Split(torch.cat([data.train.images, data.val.images]), torch.cat([data.train.labels, data.val.labels]))
    empty = Split(data.val.images[:0], data.val.labels[:0])
    return SearchData(train=train, val=empty, n_classes=data.n_classes, image_shape=data.image_shape,
                      mean=data.mean, std=data.std, provenance=data.provenance)


def refit(spec: Spec, best: FrozenTrial, params: dict[str, Any], data: SearchData, *, device: torch.device,
          mean: float, std: float, reference: torch.nn.Module | None = None, reports_per_epoch: int = 1) -> Refit:
    """Return the best trial's configuration trained on ``data``'s training + validation splits.

    ``params`` are the trial's full params (defaults, fixed and searched); ``mean`` / ``std`` the
    study's input standardisation, so the refit model sees its inputs as the trial's did.
    """
    epochs, rule = refit_epochs(spec, best, reports_per_epoch=reports_per_epoch)
    seed = int(best.user_attrs.get(SEED_ATTR, trial_seed(spec.study.seed, best.number)))
    full = merged(data).to(device)
    task = tasks.make_task(spec.task.type, params, mask_placement=spec.task.mask.placement,
                           noise_kind=spec.task.noise.kind, reference=reference)
    torch.manual_seed(seed)  # the trial's initial weights
    model = build_model(spec.model.family, params, image_shape=data.image_shape, n_classes=data.n_classes)
    config = TrainConfig.from_params({**params, "epochs": epochs}, seed=seed, device=str(device),
                                     precision=spec.task.precision, channels_last=spec.task.channels_last)
    started = time.perf_counter()
    result = fit(model, full, task, config, lambda step, metrics: None, mean=mean, std=std)
    return Refit(model=model.eval(), trial=best.number, epochs=epochs, epochs_rule=rule, n_train=len(full.train),
                 seed=seed, seconds=time.perf_counter() - started, history=result.history, data=full)
