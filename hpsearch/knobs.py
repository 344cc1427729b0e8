"""The hyperparameters ("knobs") a study may fix or search, with their defaults and rules.

Every trial gets a value for every knob: the default here, overridden by the spec's fixed
values, overridden by what the sampler suggests. Models, training and tasks read only this
flat dict, so a knob means the same thing in every family.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpsearch.errors import SpecError
from hpsearch.vocab import ACTIVATIONS, ENCODERS, FAMILIES, LR_SCHEDULES, OPTIMIZERS, TASKS


@dataclass(frozen=True)
class Knob:
    """One hyperparameter: its kind, default, allowed values and where it applies."""

    name: str
    kind: str  # "int" | "float" | "bool" | "choice"
    default: Any
    help: str
    low: float | None = None  # inclusive bound on any value
    high: float | None = None
    high_exclusive: bool = False
    choices: tuple[Any, ...] = ()
    families: tuple[str, ...] = FAMILIES
    tasks: tuple[str, ...] = TASKS
    # Values of another knob under which this one matters; used as an implicit `when`.
    only_when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    extra_check: Callable[[Any], str | None] | None = None

    def problem(self, value: Any, *, bounds_only: bool = False) -> str | None:
        """Return why ``value`` is not allowed for this knob, or None if it is."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "choice":
            return None if value in self.choices else f"must be one of {list(self.choices)}"
        if self.kind == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            return "must be an integer"
        if self.kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                     or not math.isfinite(value)):
            return "must be a finite number"
        if self.low is not None and value < self.low:
            return f"must be >= {self.low}"
        if self.high is not None:
            if self.high_exclusive and value >= self.high:
                return f"must be < {self.high}"
            if not self.high_exclusive and value > self.high:
                return f"must be <= {self.high}"
        if self.extra_check is not None and not bounds_only:
            return self.extra_check(value)
        return None


def _odd(value: Any) -> str | None:
    return None if value % 2 == 1 else "must be odd (so that padding keeps the image size)"


_DENSE = FAMILIES
_CONV = ("cnn", "autoencoder")

KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        # --- model ---
        Knob("n_layers", "int", 2, "dense hidden layers", low=0, high=16, families=_DENSE),
        Knob("width", "int", 128, "units per dense hidden layer", low=1, high=16384, families=_DENSE),
        Knob("dropout", "float", 0.0, "dropout after each dense hidden layer", low=0.0, high=1.0,
             high_exclusive=True, families=_DENSE),
        Knob("batchnorm", "bool", False, "batch normalisation after each layer", families=_DENSE),
        Knob("activation", "choice", "relu", "activation function", choices=ACTIVATIONS, families=_DENSE),
        Knob("conv_blocks", "int", 2, "convolution blocks (cnn: 0 means none, a plain dense net)", low=0,
             high=6, families=_CONV),
        Knob("conv_channels", "int", 32, "channels of the first conv block (doubled per block)",
             low=1, high=1024, families=_CONV),
        Knob("kernel_size", "int", 3, "convolution kernel size", low=1, high=9, families=_CONV,
             extra_check=_odd),
        Knob("bottleneck_dim", "int", 32, "autoencoder code size", low=1, high=4096,
             families=("autoencoder",)),
        Knob("encoder", "choice", "dense", "autoencoder architecture", choices=ENCODERS,
             families=("autoencoder",)),
        # --- training ---
        Knob("optimizer", "choice", "adam", "optimizer", choices=OPTIMIZERS),
        Knob("lr", "float", 1e-3, "learning rate", low=1e-8, high=10.0),
        Knob("momentum", "float", 0.9, "momentum (sgd, rmsprop)", low=0.0, high=1.0, high_exclusive=True,
             only_when=(("optimizer", ("sgd", "rmsprop")),)),
        Knob("nesterov", "bool", False, "Nesterov momentum (sgd)", only_when=(("optimizer", ("sgd",)),)),
        Knob("beta1", "float", 0.9, "Adam beta1", low=0.0, high=1.0, high_exclusive=True,
             only_when=(("optimizer", ("adam", "adamw")),)),
        Knob("beta2", "float", 0.999, "Adam beta2", low=0.0, high=1.0, high_exclusive=True,
             only_when=(("optimizer", ("adam", "adamw")),)),
        Knob("weight_decay", "float", 0.0, "L2 weight decay", low=0.0, high=1.0),
        Knob("batch_size", "int", 128, "training batch size", low=1, high=65536),
        Knob("lr_schedule", "choice", "none", "learning-rate schedule", choices=LR_SCHEDULES),
        # --- augmentation of training batches (never of validation or test; see hpsearch/augment.py) ---
        Knob("augment_shift", "int", 0, "random shift of training images, up to this many pixels each way",
             low=0, high=16),
        Knob("augment_rotate", "float", 0.0, "random rotation of training images, up to this many degrees "
             "either way", low=0.0, high=180.0),
        Knob("augment_scale", "float", 0.0, "random zoom of training images by a factor in [1 - s, 1 + s]",
             low=0.0, high=0.9),
        Knob("augment_flip", "bool", False, "mirror training images left to right, each with probability 1/2 "
             "(for mirror-symmetric classes, like clothes; not digits)"),
        # --- task ---
        Knob("noise_std", "float", 0.3, "gaussian noise std (pixels in [0, 1])", low=0.0, high=1.0,
             tasks=("denoise",)),
        Knob("noise_amount", "float", 0.1, "share of pixels hit by salt-and-pepper noise", low=0.0,
             high=1.0, tasks=("denoise",)),
        Knob("mask_size", "int", 14, "side of the hidden square (pixels)", low=1, high=64,
             tasks=("inpaint",)),
    )
}

# Knobs that may be searched per dense layer: `width: {..., per_layer: true}` gives width_0, width_1, ...
PER_LAYER = ("width",)


def defaults() -> dict[str, Any]:
    """Return a fresh dict of every knob's default value."""
    return {name: knob.default for name, knob in KNOBS.items()}


def check(name: str, value: Any, *, where: str, shown: str | None = None) -> Any:
    """Return ``value`` if the knob ``name`` allows it; else raise SpecError naming where, the rule and the value.

    ``shown`` is the name the message gives (``width_1`` for a per-layer value of ``width``).
    """
    problem = KNOBS[name].problem(value)
    if problem:
        raise SpecError(f"{where}: `{shown or name}` {problem}, but got {value!r}.")
    return value
