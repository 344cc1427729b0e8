"""Every closed list of names hpsearch accepts, each written once.

The spec checks user input against these lists; data, models, training, tasks and studies
import them rather than keeping copies. To add a dataset, a task, a metric, an optimizer, a
sampler or a pruner, add its name here first (and the code that implements it where that lives:
a dataset's loader in data.py, an optimizer's torch class in train.py, ...). No torch and no
Optuna at import time: the spec imports this module, and neither belongs there.
"""

from __future__ import annotations

import math
from typing import Any

# --- data and tasks ---
DATASETS = ("mnist", "fashion-mnist", "kmnist", "mnist-5k", "digits")
TASKS = ("classify", "denoise", "inpaint")
NOISE_KINDS = ("gaussian", "salt_pepper")  # denoise: what corrupts the input
MASK_PLACEMENTS = ("center", "random", "top", "bottom", "left", "right")  # inpaint: where the hole is

# --- models ---
FAMILIES = ("mlp", "cnn", "autoencoder")
FAMILY_TASKS = {"mlp": ("classify",), "cnn": ("classify",), "autoencoder": ("denoise", "inpaint")}
ENCODERS = ("dense", "conv")  # autoencoder architectures
ACTIVATIONS = ("relu", "gelu", "tanh", "leaky_relu", "silu", "elu")  # torch classes: models.py

# --- training ---
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")  # torch classes: train.make_optimizer
LR_SCHEDULES = ("none", "cosine", "step", "onecycle")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
INDEXED_DEVICES = ("cuda",)  # ...and one GPU of several by its index: cuda:0, cuda:1, ...
DEVICE_RULE = f"must be one of {list(DEVICES)} or cuda:<index> (e.g. cuda:1)"


def is_device(name: Any) -> bool:
    """Return whether ``name`` is a device a spec may name (see DEVICES and INDEXED_DEVICES)."""
    if not isinstance(name, str):
        return False
    kind, colon, index = name.partition(":")
    return name in DEVICES or (bool(colon) and kind in INDEXED_DEVICES and index.isdigit())


# --- metrics ---
DIRECTIONS = ("minimize", "maximize")
# What each task reports per epoch, and which way is better (besides train_loss, epoch_seconds
# and lr). Inpaint also reports val_inpaint_success_<k> for each class k: for the record, not to optimise.
METRICS: dict[str, dict[str, str]] = {
    "classify": {"val_loss": "minimize", "val_accuracy": "maximize", "val_error": "minimize"},
    "denoise": {"val_mse": "minimize", "val_psnr": "maximize"},
    "inpaint": {
        "val_mse": "minimize",
        "val_mse_hidden": "minimize",
        "val_psnr": "maximize",
        "val_inpaint_success": "maximize",
    },
}
# Known before training (model size): serves multi-objective studies (accuracy vs size), never first.
STATIC_METRICS = {"n_params": "minimize"}
DEFAULT_METRIC = {"classify": "val_accuracy", "denoise": "val_mse", "inpaint": "val_mse_hidden"}

# --- search: spec name -> class name in optuna.samplers / optuna.pruners ---
SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
    "grid": "GridSampler",
    "nsga2": "NSGAIISampler",
}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "wilcoxon": "WilcoxonPruner",
    "patient": "PatientPruner",
    "threshold": "ThresholdPruner",
    "none": "NopPruner",
}

# Pruner options a spec counts in epochs, whole or not (0.5: half an epoch); the pruner counts reports, so
# hpsearch turns each into reports with `epoch_reports` once the study's reports per epoch are known.
EPOCH_OPTIONS = ("n_warmup_steps", "min_resource", "max_resource", "patience")


def epoch_reports(epochs: float, reports_per_epoch: int) -> int:
    """Return the reports an epoch-counted pruner option of ``epochs`` stands for: up to the first report at or
    after that many epochs (ceil, so 0.5 epochs with one report an epoch is 1 report: the end of epoch 1)."""
    return math.ceil(round(epochs * reports_per_epoch, 9))  # round: 0.3 x 10 is 3.0000000000000004


def sampler_class(name: str) -> type:
    """Return the Optuna sampler class the spec name ``name`` stands for."""
    import optuna  # lazily: the spec imports this module, and most commands never build a sampler

    return getattr(optuna.samplers, SAMPLERS[name])


def pruner_class(name: str) -> type:
    """Return the Optuna pruner class the spec name ``name`` stands for."""
    import optuna

    return getattr(optuna.pruners, PRUNERS[name])
