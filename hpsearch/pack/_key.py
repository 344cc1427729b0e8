"""What members of one pack must share (the structure key), and which trials can be packed at all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hpsearch.errors import SpecError
from hpsearch.models import read_arch

PACKABLE_FAMILIES = ("mlp",)  # the dense classifier first (issue 13); autoencoders and CNNs later
PACKABLE_TASKS = ("classify",)  # its training batch draws no noise or masks from the trial's generator


@dataclass(frozen=True)
class StructureKey:
    """The params every member of a pack shares: they fix the pack's arithmetic, not its numbers."""

    n_layers: int
    activation: str
    batchnorm: bool
    optimizer: str
    batch_size: int


def structure_key(params: Mapping[str, Any]) -> StructureKey:
    """Return the structure key of a trial's flat params (checked as ``build_model`` checks them)."""
    arch = read_arch("mlp", params)
    return StructureKey(n_layers=len(arch.widths), activation=arch.activation, batchnorm=arch.batchnorm,
                        optimizer=params["optimizer"], batch_size=params["batch_size"])


def pack_refusal(family: str, task: str, *, precision: str = "fp32") -> str | None:
    """Return why trials of this family, task and precision cannot be packed, in one sentence; None if they can.

    Everything else a trial of a packable family may vary is packed per member: learning rate and
    schedule, momentum and betas, weight decay, dropout, widths, seed and augmentation.
    """
    if family not in PACKABLE_FAMILIES:
        return f"model.family {family!r} cannot be packed yet (packs train {list(PACKABLE_FAMILIES)}); " \
               "each trial trains alone."
    if task not in PACKABLE_TASKS:
        return f"task.type {task!r} cannot be packed yet (packs train {list(PACKABLE_TASKS)}); " \
               "each trial trains alone."
    if precision != "fp32":
        return f"task.precision {precision!r} cannot be packed (packs train in fp32); each trial trains alone."
    return None


def check_batchnorm_batches(key: StructureKey) -> None:
    """Raise SpecError where batchnorm meets batches of one sample, as ``fit`` does."""
    if key.batchnorm and key.batch_size < 2:
        raise SpecError(f"training params: batchnorm needs `batch_size` >= 2, but got {key.batch_size}.")
