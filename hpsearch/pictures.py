"""The pictures a trial draws of its model: reconstruction grids (denoise, inpaint) and confusion counts.

Both run the model on validation digits, so they need torch and the task; :mod:`hpsearch.figures`
draws from numbers and stored images alone (the confusion matrix's picture, the study's plots).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from hpsearch.errors import SpecError
from hpsearch.tasks import Classify, Task, eval_generator, evaluating, normalize, to_unit

if TYPE_CHECKING:
    from hpsearch.data import Split

_HIDDEN_RGB = (40, 90, 200)  # the hidden square in the corrupted row: blue, so it shows on black
_GAP_GRAY = 128


def reconstruction_grid(model: nn.Module, split: Split, task: Task, *, mean: float, std: float,
                        device: str | torch.device, n: int = 10) -> np.ndarray:
    """Return an RGB uint8 picture: rows clean | corrupted | reconstruction of the split's first n digits.

    The digits and their corruption are the same in every trial and epoch, so runs compare side by side.
    """
    if isinstance(task, Classify):
        raise SpecError("reconstruction_grid needs a denoise or inpaint task, but got 'classify'.")
    images01 = to_unit(split.images[:n].to(device))
    inputs01, mask = task.corrupt(images01, eval_generator())
    with evaluating(model), torch.inference_mode():
        output = model(normalize(inputs01, mean, std)).clamp(0.0, 1.0)
    rows = [_gray_rgb(images01), _gray_rgb(inputs01), _gray_rgb(output)]
    if mask is not None:
        hidden = mask[:, 0].cpu().numpy()
        rows[1][hidden] = _HIDDEN_RGB
    height, width = images01.shape[-2:]
    scale = max(1, math.ceil(28 / min(height, width)))  # 8x8 digits drawn 4x: big enough to see
    return _tile(rows, scale)


def _gray_rgb(images01: Tensor) -> np.ndarray:
    """Return [N, H, W, 3] uint8 from [N, C, H, W] pixels in [0, 1] (channels averaged)."""
    gray = (images01.mean(dim=1) * 255.0).round().to(torch.uint8).cpu().numpy()
    return np.repeat(gray[..., None], 3, axis=-1)


def _tile(rows: list[np.ndarray], scale: int, gap: int = 2) -> np.ndarray:
    n, height, width, _ = rows[0].shape
    cell_h, cell_w = height * scale, width * scale
    grid = np.full((len(rows) * (cell_h + gap) + gap, n * (cell_w + gap) + gap, 3), _GAP_GRAY, np.uint8)
    for r, row in enumerate(rows):
        big = row.repeat(scale, axis=1).repeat(scale, axis=2)
        for i in range(n):
            top, left = gap + r * (cell_h + gap), gap + i * (cell_w + gap)
            grid[top:top + cell_h, left:left + cell_w] = big[i]
    return grid


def confusion_matrix(model: nn.Module, split: Split, *, mean: float, std: float, device: str | torch.device,
                     n_classes: int, batch_size: int = 1024) -> np.ndarray:
    """Return the [true, predicted] counts of ``model`` on ``split`` (int64, n_classes x n_classes)."""
    counts = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=device)
    with evaluating(model), torch.inference_mode():
        for start in range(0, len(split), batch_size):
            images = split.images[start:start + batch_size].to(device)
            labels = split.labels[start:start + batch_size].to(device)
            predicted = model(normalize(to_unit(images), mean, std)).argmax(dim=1)
            counts += torch.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes)
    return counts.view(n_classes, n_classes).cpu().numpy()

