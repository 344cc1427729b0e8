"""Random shifts, rotations, zooms and mirror flips of training batches, on the device, with no per-sample Python.

A batch of uint8 images is resampled in one gather: every output pixel reads the input pixel that
its sample's random affine map (a left-right mirror, rotation and zoom about the image centre, then
a whole-pixel shift) sends it to, rounded to the nearest pixel; pixels that come from outside the image are
black, as the background of MNIST-like images is. Nearest-neighbour keeps the images uint8 and
costs one gather of the batch, so augmentation stays a small share of a small model's step;
a bilinear ``grid_sample`` costs several times more on the CPU for a barely different picture at
these angles (see docs/benchmarks.md).

Only training batches are augmented (``hpsearch.train.fit``); validation and test images never
are. For denoise and in-paint, the clean image is augmented before it is corrupted, so the target
is the augmented clean image and input and target stay consistent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augmentation:
    """How far training images may be moved: all zero means no augmentation."""

    shift: int = 0  # whole pixels, drawn uniformly in [-shift, shift] on each axis
    rotate: float = 0.0  # degrees, drawn uniformly in [-rotate, rotate]
    scale: float = 0.0  # zoom factor drawn uniformly in [1 - scale, 1 + scale]
    flip: bool = False  # mirror left to right, each image with probability 1/2 (clothes, not digits)

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.rotate > 0 or self.scale > 0 or self.flip


def make_augmenter(augmentation: Augmentation, image_shape: tuple[int, ...], generator: torch.Generator,
                   device: torch.device) -> Callable[[Tensor], Tensor] | None:
    """Return a function that augments a (N, C, H, W) uint8 batch, drawing from ``generator``; None if off.

    The draws come from ``generator`` (the trial's seeded training generator), so a seed gives the
    same augmented batches every time; with augmentation off nothing is drawn, and training is
    exactly what it is without this module.
    """
    if not augmentation.active:
        return None
    _, height, width = image_shape
    warps = augmentation.rotate > 0 or augmentation.scale > 0
    # Images get a zero border: wide enough for any shift when only shifting (then every index is
    # inside and no clamping is needed), one pixel when warping (indices are clamped onto it).
    pad = 1 if warps else augmentation.shift
    padded_w = width + 2 * pad
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    base = ((ys + pad) * padded_w + (xs + pad)).reshape(1, -1)  # each output pixel's own place, padded
    mirrored = ((ys + pad) * padded_w + (width - 1 - xs + pad)).reshape(1, -1)  # its mirror image's place
    # Output pixel coordinates about the image centre, flattened: (1, H*W).
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    u = (xs - cx).reshape(1, -1).to(torch.float32)
    v = (ys - cy).reshape(1, -1).to(torch.float32)
    max_angle = math.radians(augmentation.rotate)

    def uniform(n: int, half_width: float, centre: float) -> Tensor:
        if half_width == 0:
            return torch.full((n, 1), centre, device=device)
        return torch.rand(n, 1, generator=generator, device=device).mul_(2 * half_width).add_(centre - half_width)

    def shifts(n: int) -> tuple[Tensor, Tensor]:
        if augmentation.shift == 0:
            return torch.zeros(n, 1, dtype=torch.int64, device=device), torch.zeros(n, 1, dtype=torch.int64,
                                                                                      device=device)
        drawn = torch.randint(-augmentation.shift, augmentation.shift + 1, (n, 2), generator=generator,
                              device=device)
        return drawn[:, :1], drawn[:, 1:]

    def flips(n: int) -> Tensor | None:
        """Return which images are mirrored, (n, 1) bool; None (and nothing drawn) with flips off."""
        if not augmentation.flip:
            return None
        return torch.rand(n, 1, generator=generator, device=device) < 0.5

    def source_index(n: int) -> Tensor:
        """Return where each output pixel reads in the padded image: (n, H*W) int64."""
        if not warps:
            dx, dy = shifts(n)
            flipped = flips(n)
            own = base if flipped is None else torch.where(flipped, mirrored, base)
            return own - (dy * padded_w + dx)  # output (y, x) reads input (y - dy, x - dx), mirrored or not
        # The inverse map: an output pixel reads the input at R(-angle) / zoom of its position,
        # less the shift, rounded to the nearest pixel, mirrored about the centre column where
        # flipped; outside the image it reads the border.
        angle = uniform(n, max_angle, 0.0)
        zoom = uniform(n, augmentation.scale, 1.0)
        dx, dy = shifts(n)
        flipped = flips(n)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        col = cos * u + sin * v
        if flipped is not None:
            col = torch.where(flipped, -col, col)
        col = col.add_(cx + 1.5 - dx).floor_().clamp_(0, width + 1)
        row = (cos * v - sin * u).add_(cy + 1.5 - dy).floor_().clamp_(0, height + 1)
        return row.mul_(padded_w).add_(col).to(torch.int64)

    def augment(images: Tensor) -> Tensor:
        n, channels = images.shape[0], images.shape[1]
        index = source_index(n)
        padded = F.pad(images, (pad, pad, pad, pad)).reshape(n, channels, -1)
        return padded.gather(2, index.unsqueeze(1).expand(n, channels, -1)).reshape(images.shape)

    return augment
