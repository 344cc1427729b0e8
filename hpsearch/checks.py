"""Checks of a spec against what it will meet, before anything is stored: the device's memory for the
largest model its space allows (refused if it does not fit), and the sizes of its splits (warned).

They need torch (so they are not in `spec`), not Optuna or MLflow; `hpsearch validate` and
`hpsearch run` call them.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpsearch import space
from hpsearch.data import IMAGE_SHAPES, N_CLASSES, TRAIN_SIZES, split_sizes
from hpsearch.errors import SpecError
from hpsearch.models import build_model, count_params
from hpsearch.spec import ParamSpec, Spec

logger = logging.getLogger(__name__)

_BYTES_PER_PARAM = 16  # float32 weights, their gradients and Adam's two moments
_ACTIVATION_COPIES = 3  # each layer's output is kept for the backward pass, gets a gradient, and a temporary
MIN_VAL_SAMPLES = 100  # below this, validation metrics move in steps of over 1 % and pruning follows their noise
# Architecture knobs that never make a model smaller when they grow: their largest value is enough. The
# others are tried at each value (n_layers at both ends: with narrow layers, fewer can be larger).
_GROWING = ("width", "conv_channels", "kernel_size", "bottleneck_dim", "batch_size")


@dataclass(frozen=True)
class ModelSize:
    """The largest model a spec's space allows, and what training it needs."""

    params: dict[str, Any]  # its architecture knobs
    n_params: int
    bytes: int  # weights, gradients, optimizer state, a batch's activations and the data on the device

    def describe(self, family: str) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{family} with {knobs}: {self.n_params:,} parameters, about {_gb(self.bytes)} to train"


def check_memory(spec: Spec, device: str | None = None) -> ModelSize:
    """Return the largest model of ``spec``; refuse it if it does not fit the memory free on the device.

    ``device`` overrides task.device. A device this machine lacks is not checked here (running on it
    is refused with its own message).
    """
    from hpsearch.train import resolve_device

    size = largest_model(spec)
    try:
        dev = resolve_device(device or spec.task.device)
    except SpecError:
        return size
    available = available_memory(dev)
    if available is not None and size.bytes > available:
        raise SpecError(
            f"{spec.path}: the largest model the space allows ({size.describe(spec.model.family)}) does not fit "
            f"the {_gb(available)} available on {dev}. Lower the largest values of the space (width, n_layers, "
            "conv_channels, batch_size...) or run on a device with more memory.")
    return size


def largest_model(spec: Spec) -> ModelSize:
    """Return the model of ``spec``'s space that needs the most memory to train (built on the meta device)."""
    base = space.base_params(spec)
    options = {p.name: _values_to_try(p) for p in spec.space if p.type != "fixed" and p.name in _SIZE_KNOBS}
    shown = [k for k in _SIZE_KNOBS if k == "batch_size" or any(p.name == k for p in spec.space)]
    best: ModelSize | None = None
    for dataset in dict.fromkeys(d for d in (spec.task.dataset, spec.task.fallback) if d):
        data_bytes = TRAIN_SIZES[dataset] * math.prod(IMAGE_SHAPES[dataset])
        for values in itertools.product(*options.values()):
            params = {**base, **dict(zip(options, values))}
            size = _model_size(spec.model.family, params, IMAGE_SHAPES[dataset], data_bytes, shown)
            if best is None or size.bytes > best.bytes:
                best = size
    assert best is not None  # a spec always names a dataset
    return best


# The knobs that shape a model or its batch, and the values of each worth trying.
_SIZE_KNOBS = ("n_layers", "width", "batchnorm", "conv_blocks", "conv_channels", "kernel_size", "bottleneck_dim",
               "encoder", "batch_size")


def _values_to_try(p: ParamSpec) -> list[Any]:
    if p.name in _GROWING:
        return [p.largest()]
    if p.type == "categorical":
        return list(p.choices)
    if p.name == "conv_blocks":  # pooling shrinks the dense part: a middle value can be the largest
        return list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))  # type: ignore[arg-type]
    return [p.smallest(), p.largest()]


def _model_size(family: str, params: dict[str, Any], image_shape: tuple[int, int, int], data_bytes: int,
                shown: list[str]) -> ModelSize:
    with torch.device("meta"):  # shapes only: nothing is allocated, however large
        model = build_model(family, params, image_shape=image_shape, n_classes=N_CLASSES)
        activations = _activations_per_sample(model, image_shape)
    n_params = count_params(model)
    batch = int(params["batch_size"])
    total = n_params * _BYTES_PER_PARAM + batch * activations * 4 * _ACTIVATION_COPIES + data_bytes
    return ModelSize(params={k: params[k] for k in shown}, n_params=n_params, bytes=total)


def _activations_per_sample(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Return how many values the layers of ``model`` output for one sample.

    The shapes are carried through the layers by hand, in the order they were built (the order
    they run): a forward pass on the meta device would import much of torch's compiler first,
    seconds per process.
    """
    shape: tuple[int, ...] = tuple(image_shape)
    total = 0
    for layer in (m for m in model.modules() if not any(m.children())):
        shape = _output_shape(layer, shape)
        total += math.prod(shape)
    return total


def _output_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the shape of one sample's output of ``layer`` for an input of ``shape``."""
    if isinstance(layer, nn.Linear):
        return (layer.out_features,)
    if isinstance(layer, nn.Flatten):
        return (math.prod(shape),)
    if isinstance(layer, nn.Unflatten):
        return tuple(layer.unflattened_size)  # type: ignore[arg-type]
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)):
        channels = getattr(layer, "out_channels", shape[0])
        return (channels, *(_side(layer, size, axis) for axis, size in enumerate(shape[1:])))
    return shape  # element-wise: activations, batchnorm, dropout, sigmoid


def _side(layer: nn.Module, size: int, axis: int) -> int:
    """Return the output size along one spatial ``axis`` of a convolution or pooling ``layer``."""
    def at(value: Any) -> int:
        return int(value[axis] if isinstance(value, tuple) else value)

    kernel, stride, padding = at(layer.kernel_size), at(layer.stride), at(layer.padding)
    dilation = at(getattr(layer, "dilation", 1))
    if isinstance(layer, nn.ConvTranspose2d):
        return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + at(layer.output_padding) + 1
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def available_memory(device: torch.device) -> int | None:
    """Return the bytes free for a new model on ``device`` (None where that cannot be known)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:  # Linux: what can be had without swapping
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def warn_about_splits(spec: Spec) -> None:
    """Warn about splits too small to measure on, or batches larger than the training split."""
    t = spec.task
    n_train, n_val = split_sizes(t.dataset, val_fraction=t.val_fraction, train_limit=t.train_limit)
    used = n_train + n_val
    if n_val < MIN_VAL_SAMPLES:
        logger.warning(f"{spec.path}: task.val_fraction {t.val_fraction:g} leaves {n_val} validation image(s) "
                       f"of the {used} used from {t.dataset}: validation metrics move in steps of "
                       f"{100 / n_val:.2g} % and pruning follows their noise. Validate on at least "
                       f"{MIN_VAL_SAMPLES} (val_fraction >= {MIN_VAL_SAMPLES / used:.2g}).")
    if n_val > n_train:
        logger.warning(f"{spec.path}: task.val_fraction {t.val_fraction:g} keeps {n_train} of the {used} "
                       f"images of {t.dataset} for training and validates on {n_val}: the models learn from less "
                       "than they are judged on.")
    batch_sizes = [t.batch_size] + [p.largest() for p in spec.space if p.name == "batch_size"]
    if max(batch_sizes) > n_train:
        logger.warning(f"{spec.path}: a batch size of {max(batch_sizes)} is larger than the {n_train} training "
                       f"images of {t.dataset}: every epoch is then a single step on all of them.")


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.3g} MB"
