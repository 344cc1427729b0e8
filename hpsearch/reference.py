"""The reference classifier of inpaint: a small CNN that reads in-painted digits, trained once per data.

:class:`hpsearch.tasks.Inpaint` scores a model's in-painting by how often this judge still reads
the right digit (``val_inpaint_success``). It is trained with :func:`hpsearch.train.fit` on the
study's training split and cached on disk, so this module sits above ``train``: the tasks that
training runs know nothing of it.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hpsearch.models import build_model
from hpsearch.tasks import Classify
from hpsearch.train import TrainConfig, fit

if TYPE_CHECKING:
    from hpsearch.data import SearchData

# Small and quick (about 0.8 MFLOP per 28x28 digit), yet ~98% on MNIST after 3 epochs.
REFERENCE_PARAMS: dict[str, Any] = {
    "n_layers": 1, "width": 64, "dropout": 0.0, "batchnorm": False, "activation": "relu",
    "conv_blocks": 2, "conv_channels": 8, "kernel_size": 3,
}

REFERENCE_BATCH_SIZE = 128
REFERENCE_MIN_STEPS = 600  # 3 epochs of 4k digits are ~100 steps: too few for a judge worth trusting


class Reference(nn.Module):
    """A classifier of [0, 1] pixels: it carries the normalisation it was trained with."""

    def __init__(self, net: nn.Module, *, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, images01: Tensor) -> Tensor:
        return self.net((images01 - self.mean) / self.std)


def _reference_net(data: SearchData) -> nn.Module:
    return build_model("cnn", REFERENCE_PARAMS, image_shape=tuple(data.image_shape), n_classes=data.n_classes)


def train_reference_classifier(data: SearchData, *, device: str | torch.device, seed: int = 0,
                               epochs: int = 3) -> Reference:
    """Return a small CNN trained on ``data.train`` to judge in-painted digits (eval mode, frozen).

    Small datasets get more epochs than ``epochs``: at least ``REFERENCE_MIN_STEPS`` batches.
    """
    torch.manual_seed(seed)
    net = _reference_net(data)
    epochs = max(epochs, math.ceil(REFERENCE_MIN_STEPS * REFERENCE_BATCH_SIZE / len(data.train)))
    config = TrainConfig(epochs=epochs, batch_size=REFERENCE_BATCH_SIZE, optimizer="adam", lr=2e-3, seed=seed,
                         device=str(device))
    fit(net, data, Classify(), config, lambda step, metrics: None)
    return _frozen(Reference(net, mean=data.mean, std=data.std), device)


def reference_path(data: SearchData, cache_dir: Path) -> Path:
    """Return where the reference classifier of ``data`` is cached.

    Keyed by the exact training images and labels: a study with another seed, validation fraction
    or train limit gets its own judge, which never saw that study's validation digits.
    """
    digest = hashlib.sha256()
    digest.update(data.train.images.cpu().numpy().tobytes())
    digest.update(data.train.labels.cpu().numpy().tobytes())
    return Path(cache_dir) / f"reference-{data.provenance.sha256}-{digest.hexdigest()[:12]}.pt"


def load_or_train_reference(data: SearchData, cache_dir: Path, *, device: str | torch.device) -> Reference:
    """Return the cached reference classifier of ``data``, training (and caching) it the first time."""
    path = reference_path(data, cache_dir)
    if path.exists():
        model = Reference(_reference_net(data), mean=data.mean, std=data.std)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return _frozen(model, device)
    model = train_reference_classifier(data, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: workers starting together must never read a half-written file.
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return model


def _frozen(model: Reference, device: str | torch.device) -> Reference:
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model
