"""What members of one pack must share (the structure key), and which trials can be packed at all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hpsearch.errors import SpecError
from hpsearch.models import Arch, read_arch

# The families a pack trains, each with the tasks it trains them on: the dense classifier, the CNN classifier,
# and the dense denoising / in-painting autoencoder (issue 13). Each task's training batch is drawn per member.
PACKABLE = {"mlp": ("classify",), "cnn": ("classify",), "autoencoder": ("denoise", "inpaint")}
PACKABLE_FAMILIES = tuple(PACKABLE)
PACKABLE_TASKS = tuple(dict.fromkeys(task for tasks in PACKABLE.values() for task in tasks))
PACKABLE_ENCODERS = ("dense",)  # an autoencoder's `encoder`: the conv one (transposed convs) is not packed yet


@dataclass(frozen=True)
class StructureKey:
    """The params every member of a pack shares: they fix the pack's arithmetic, not its numbers.

    Field names are param names where a trial's params hold them (``n_layers`` ... ``kernel_size``):
    the study loop fixes those of a pack for its refills. ``family`` and ``task`` are the study's.
    A CNN's ``conv_channels`` is not here: members' channels are padded, as dense widths are.
    """

    n_layers: int
    activation: str
    batchnorm: bool
    optimizer: str
    batch_size: int
    encoder: str = "dense"
    conv_blocks: int = 0  # the CNN's; 0 for dense nets (read_arch's)
    kernel_size: int = 1
    family: str = "mlp"
    task: str = "classify"


def structure_key(params: Mapping[str, Any], *, family: str = "mlp", task: str = "classify") -> StructureKey:
    """Return the structure key of a trial's flat params (checked as ``build_model`` checks them)."""
    arch = read_arch(family, params)
    return StructureKey(n_layers=len(arch.widths), activation=arch.activation, batchnorm=arch.batchnorm,
                        optimizer=params["optimizer"], batch_size=params["batch_size"], encoder=arch.encoder,
                        conv_blocks=arch.conv_blocks, kernel_size=arch.kernel_size, family=family, task=task)


def layer_widths(family: str, arch: Arch) -> tuple[int, ...]:
    """Return the output width of every dense layer but the last, in the order ``build_model`` stacks them.

    The classifier: its hidden widths. The dense autoencoder: the encoder's widths, the code
    (``bottleneck_dim``), then the decoder's (the encoder's, mirrored).
    """
    if family == "autoencoder":
        return (*arch.widths, arch.bottleneck_dim, *reversed(arch.widths))
    return arch.widths


def hidden_layers(key: StructureKey) -> tuple[bool, ...]:
    """Return, for each layer of ``layer_widths``, whether it is hidden (batchnorm?, activation, dropout?).

    The autoencoder's code layer is a plain linear map, as in PCA (see ``hpsearch.models``).
    """
    if key.family == "autoencoder":
        return (True,) * key.n_layers + (False,) + (True,) * key.n_layers
    return (True,) * key.n_layers


def pack_refusal(family: str, task: str, *, precision: str = "fp32", encoders: tuple[str, ...] = ("dense",)
                 ) -> str | None:
    """Return why trials of this family, task and precision cannot be packed, in one sentence; None if they can.

    ``encoders``: the autoencoder encoders the study's trials can have. Everything else a trial of a
    packable family may vary is packed per member: learning rate and schedule, momentum and betas,
    weight decay, dropout, widths (the code size and a CNN's channels too), seed, augmentation,
    noise level and mask size.
    """
    if family not in PACKABLE:
        return f"model.family {family!r} cannot be packed yet (packs train {list(PACKABLE_FAMILIES)}); " \
               "each trial trains alone."
    if task not in PACKABLE[family]:
        return f"task.type {task!r} cannot be packed yet with model.family {family!r} (packs train it on " \
               f"{list(PACKABLE[family])}); each trial trains alone."
    conv = [e for e in encoders if e not in PACKABLE_ENCODERS] if family == "autoencoder" else []
    if conv:
        return f"encoder {conv[0]!r} cannot be packed yet (packs train the {list(PACKABLE_ENCODERS)} autoencoder; " \
               "fix `encoder: dense` in the space to pack); each trial trains alone."
    if precision != "fp32":
        return f"task.precision {precision!r} cannot be packed (packs train in fp32); each trial trains alone."
    return None


def check_batchnorm_batches(key: StructureKey) -> None:
    """Raise SpecError where batchnorm meets batches of one sample, as ``fit`` does."""
    if key.batchnorm and key.batch_size < 2:
        raise SpecError(f"training params: batchnorm needs `batch_size` >= 2, but got {key.batch_size}.")
