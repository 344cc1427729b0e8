"""What classify, denoise and inpaint feed the model, what they minimise and what they measure.

A :class:`Task` corrupts a batch of clean images (pixels in [0, 1]), gives the training loss,
and turns a model's outputs into summed statistics that :func:`hpsearch.train.evaluate`
accumulates over batches and :meth:`Task.summarize` turns into the ``val_*`` metrics.

Validation and test corruption is fixed: :func:`eval_generator` draws it on the CPU from one
seed, so every epoch of every trial, on any device, is scored on the same noisy or masked digits.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpsearch import knobs
from hpsearch.errors import SpecError
from hpsearch.vocab import MASK_PLACEMENTS, METRICS, NOISE_KINDS, TASKS

EVAL_SEED = 1234  # the one seed of every validation/test corruption: trials compare on the same inputs
_PSNR_FLOOR_MSE = 1e-10  # a perfect reconstruction scores 100 dB, not infinity


def eval_generator() -> torch.Generator:
    """Return a fresh CPU generator that draws the fixed validation/test corruption."""
    generator = torch.Generator()
    generator.manual_seed(EVAL_SEED)
    return generator


def to_unit(images: Tensor) -> Tensor:
    """Return uint8 images (0..255) as float32 pixels in [0, 1]."""
    return images.div(255.0)  # one pass: dividing uint8 by a float gives float32


def normalize(images01: Tensor, mean: float, std: float) -> Tensor:
    """Return what the model sees: pixels in [0, 1] standardised with the training split's statistics."""
    return images01.sub(mean).div_(std)


def input_stats(mean: float, std: float, *, standardise: bool) -> tuple[float, float]:
    """Return the (mean, std) a study's models see their inputs standardised with.

    ``task.normalize`` decides: the training pixels' ``mean`` and ``std``, or (0, 1), raw pixels
    in [0, 1]. Training, validation, pictures, the final test and the registered model's input
    example all take their numbers from here, so a model is never tested on other inputs than
    it was trained on.
    """
    return (float(mean), float(std)) if standardise else (0.0, 1.0)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` in eval mode, then put it back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _draw(kind: str, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Return random numbers from ``generator`` (on its own device), placed on ``device``."""
    if kind == "normal":
        values = torch.randn(shape, generator=generator, device=generator.device)
    else:
        values = torch.rand(shape, generator=generator, device=generator.device)
    return values.to(device, non_blocking=True)


# --------------------------------------------------------------------------- tasks


class Task:
    """One task: corruption, loss, and the statistics behind its validation metrics."""

    name: ClassVar[str]

    @property
    def metrics(self) -> dict[str, str]:
        """Return {metric: direction} of the validation metrics this task reports."""
        return METRICS[self.name]

    def corrupt(self, images01: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Return (model input in [0, 1], mask of hidden pixels or None) for clean images."""
        return images01, None

    def training_batch(self, images: Tensor, generator: torch.Generator, mean: float,
                       std: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Return (what the model sees, the clean images in [0, 1] or None, the mask or None) for uint8 images."""
        images01 = to_unit(images)
        inputs01, mask = self.corrupt(images01, generator)
        return normalize(inputs01, mean, std), images01, mask

    def loss(self, output: Tensor, images01: Tensor | None, labels: Tensor, mask: Tensor | None) -> Tensor:
        """Return the mean training loss of a batch (``images01`` is None where the task needs none)."""
        raise NotImplementedError

    def batch_sums(self, output: Tensor, images01: Tensor, labels: Tensor, inputs01: Tensor,
                   mask: Tensor | None) -> dict[str, Tensor]:
        """Return the batch's summed statistics (tensors on the device, added up over batches)."""
        raise NotImplementedError

    def summarize(self, sums: Mapping[str, Tensor], n: int) -> dict[str, float]:
        """Return the validation metrics from statistics summed over ``n`` samples."""
        raise NotImplementedError


class Classify(Task):
    """Clean digits in, class logits out; cross-entropy."""

    name = "classify"

    def training_batch(self, images: Tensor, generator: torch.Generator, mean: float,
                       std: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
        # Nothing to corrupt and no target image: scale and standardise in two passes (a uint8
        # tensor times a float is float32, so no separate conversion).
        return images.mul(1.0 / (255.0 * std)).sub_(mean / std), None, None

    def loss(self, output: Tensor, images01: Tensor | None, labels: Tensor, mask: Tensor | None) -> Tensor:
        return F.cross_entropy(output, labels)

    def batch_sums(self, output: Tensor, images01: Tensor, labels: Tensor, inputs01: Tensor,
                   mask: Tensor | None) -> dict[str, Tensor]:
        return {"loss": F.cross_entropy(output, labels, reduction="sum"),
                "correct": (output.argmax(dim=1) == labels).sum()}

    def summarize(self, sums: Mapping[str, Tensor], n: int) -> dict[str, float]:
        accuracy = sums["correct"].item() / n
        return {"val_loss": sums["loss"].item() / n, "val_accuracy": accuracy, "val_error": 1.0 - accuracy}


class _Reconstruct(Task):
    """Shared by denoise and inpaint: the model returns clean pixels in [0, 1]."""

    def loss(self, output: Tensor, images01: Tensor | None, labels: Tensor, mask: Tensor | None) -> Tensor:
        # Inpaint too is trained on the whole image: the visible pixels teach the model the digit's
        # style, and a hidden-only loss would leave the visible output unconstrained in the pictures.
        assert images01 is not None  # training_batch always gives the clean images here
        return F.mse_loss(output, images01)

    def batch_sums(self, output: Tensor, images01: Tensor, labels: Tensor, inputs01: Tensor,
                   mask: Tensor | None) -> dict[str, Tensor]:
        per_image = (output - images01).square().flatten(1).mean(dim=1)
        # Every image has as many pixels, so the mean of per-image MSEs is the MSE over all pixels.
        return {"mse": per_image.sum(),
                # PSNR per image, then averaged: one blurry digit cannot hide behind many easy ones.
                "psnr": (-10.0 * torch.log10(per_image.clamp_min(_PSNR_FLOOR_MSE))).sum()}

    def summarize(self, sums: Mapping[str, Tensor], n: int) -> dict[str, float]:
        return {"val_mse": sums["mse"].item() / n, "val_psnr": sums["psnr"].item() / n}


class Denoise(_Reconstruct):
    """Noisy digits in, clean digits out."""

    name = "denoise"

    def __init__(self, *, kind: str, std: float, amount: float) -> None:
        self.kind, self.std, self.amount = kind, std, amount

    def corrupt(self, images01: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        if self.kind == "gaussian":
            noise = _draw("normal", tuple(images01.shape), generator, images01.device)
            return (images01 + noise * self.std).clamp_(0.0, 1.0), None
        # Salt and pepper: a share `amount` of pixels, half set to white and half to black.
        u = _draw("uniform", tuple(images01.shape), generator, images01.device)
        noisy = torch.where(u < self.amount / 2, 1.0, images01)
        return noisy.masked_fill_((u >= self.amount / 2) & (u < self.amount), 0.0), None


class Inpaint(_Reconstruct):
    """Digits with a hidden square in, whole digits out; a reference classifier reads the result."""

    name = "inpaint"

    def __init__(self, *, size: int, placement: str, reference: nn.Module | None) -> None:
        self.size, self.placement, self.reference = size, placement, reference

    def hidden_mask(self, images01: Tensor, generator: torch.Generator) -> Tensor:
        """Return a bool mask, broadcastable to ``images01``, True on the hidden square."""
        n, channels, height, width = images01.shape
        s = self.size
        if s > min(height, width):
            raise SpecError(f"task.mask.size must be at most the image side ({height}x{width}), but got {s}.")
        device = images01.device
        if self.placement == "random":
            tops = (_draw("uniform", (n,), generator, device) * (height - s + 1)).long()
            lefts = (_draw("uniform", (n,), generator, device) * (width - s + 1)).long()
        else:
            top, left = {"center": ((height - s) // 2, (width - s) // 2), "top": (0, (width - s) // 2),
                         "bottom": (height - s, (width - s) // 2), "left": ((height - s) // 2, 0),
                         "right": ((height - s) // 2, width - s)}[self.placement]
            tops = torch.full((1,), top, device=device)
            lefts = torch.full((1,), left, device=device)
        rows = torch.arange(height, device=device)[None, :, None]
        cols = torch.arange(width, device=device)[None, None, :]
        tops, lefts = tops[:, None, None], lefts[:, None, None]
        mask = (rows >= tops) & (rows < tops + s) & (cols >= lefts) & (cols < lefts + s)
        return mask.unsqueeze(1)  # [n or 1, 1, H, W]: the same square in every channel

    def corrupt(self, images01: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        mask = self.hidden_mask(images01, generator).expand_as(images01)
        return images01.masked_fill(mask, 0.0), mask

    def batch_sums(self, output: Tensor, images01: Tensor, labels: Tensor, inputs01: Tensor,
                   mask: Tensor | None) -> dict[str, Tensor]:
        assert mask is not None  # corrupt always gives one
        sums = super().batch_sums(output, images01, labels, inputs01, mask)
        sums["se_hidden"] = ((output - images01).square() * mask).sum()
        sums["hidden"] = mask.sum()
        if self.reference is not None:
            # What a user would see: the visible pixels as given, the model's guess in the hole.
            painted = torch.where(mask, output, inputs01)
            logits = self.reference(painted)
            hits = (logits.argmax(dim=1) == labels).long()
            # scatter_add, not bincount: no device sync per batch.
            per_class = torch.zeros(logits.shape[1], dtype=torch.long, device=labels.device)
            sums["per_class"] = per_class.scatter_add(0, labels, torch.ones_like(labels))
            sums["per_class_success"] = per_class.scatter_add(0, labels, hits)
        return sums

    def summarize(self, sums: Mapping[str, Tensor], n: int) -> dict[str, float]:
        metrics = super().summarize(sums, n)
        metrics["val_mse_hidden"] = sums["se_hidden"].item() / max(1, int(sums["hidden"].item()))
        if "per_class" in sums:
            totals, successes = sums["per_class"].tolist(), sums["per_class_success"].tolist()
            metrics["val_inpaint_success"] = sum(successes) / n
            for k, (total, success) in enumerate(zip(totals, successes, strict=True)):
                if total:  # a class absent from the split has no success rate
                    metrics[f"val_inpaint_success_{k}"] = success / total
        return metrics


def make_task(name: str, params: Mapping[str, Any], *, mask_placement: str = "center",
              noise_kind: str = "gaussian", reference: nn.Module | None = None) -> Task:
    """Return the task ``name`` configured from a trial's params.

    ``reference`` (inpaint only) is the classifier from
    :func:`hpsearch.reference.load_or_train_reference`; without it, inpaint reports no
    ``val_inpaint_success``.
    """
    if name == "classify":
        return Classify()
    if name == "denoise":
        if noise_kind not in NOISE_KINDS:
            raise SpecError(f"task.noise.kind must be one of {list(NOISE_KINDS)}, but got {noise_kind!r}.")
        key = "noise_std" if noise_kind == "gaussian" else "noise_amount"
        knobs.check(key, params.get(key), where="task params")
        return Denoise(kind=noise_kind, std=float(params.get("noise_std", 0.0)),
                       amount=float(params.get("noise_amount", 0.0)))
    if name == "inpaint":
        size = knobs.check("mask_size", params.get("mask_size"), where="task params")
        if mask_placement not in MASK_PLACEMENTS:
            raise SpecError(f"task.mask.placement must be one of {list(MASK_PLACEMENTS)}, "
                            f"but got {mask_placement!r}.")
        return Inpaint(size=int(size), placement=mask_placement, reference=reference)
    raise SpecError(f"task.type must be one of {list(TASKS)}, but got {name!r}.")
