"""Datasets → uint8 tensors with provenance; the validation split; the test split kept apart.

No Optuna, no MLflow: a trial's objective gets a :class:`SearchData` (train and validation
only); the test split is loaded by :func:`load_test_split`, once, for the final best model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpsearch.errors import DataError
from hpsearch.log import LOUD
from hpsearch.provenance import Provenance
from hpsearch.sources import (N_CLASSES, TORCHVISION, Full, check_name, failure_reasons, find_files,
                              folder_layouts, load_full, read_folder, resolve_data_dir, search_folders)
from hpsearch.vocab import DATASETS

__all__ = ["DATASETS", "IMAGE_SHAPES", "N_CLASSES", "TRAIN_SIZES", "Provenance", "SearchData", "Split",
           "load_search_data", "load_test_split", "resolve_data_dir", "split_sizes"]

logger = logging.getLogger(__name__)

# What each dataset holds, known before it is loaded: (channels, height, width) of its images and
# the size of its train split (validation is carved from it); its classes are sources.N_CLASSES.
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28),
                                                 "kmnist": (1, 28, 28), "mnist-5k": (1, 28, 28), "digits": (1, 8, 8)}
TRAIN_SIZES: dict[str, int] = {"mnist": 60_000, "fashion-mnist": 60_000, "kmnist": 60_000, "mnist-5k": 4_000,
                               "digits": 1_438}


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W], raw pixel values 0..255
    labels: torch.Tensor  # int64 [N]

    def to(self, device: str | torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def digest(self) -> str:
        """Return a content hash of the split (its images and labels, in order), 16 hex digits."""
        digest = hashlib.sha256()
        for tensor in (self.images, self.labels):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class SearchData:
    """What a trial's objective gets: train and validation only, never the test split."""

    train: Split
    val: Split
    n_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: float  # of the train pixels scaled to [0, 1], for normalisation
    std: float
    provenance: Provenance

    def to(self, device: str | torch.device) -> SearchData:
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device))


# --------------------------------------------------------------------------- public


def load_search_data(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    fallback: str | None = None,
    train_limit: int | None = None,
    download: bool = True,
) -> SearchData:
    """Return the train and validation splits of ``name`` (or, loudly, of ``fallback``)."""
    # 1. Check every argument before touching any file: a typo must not turn into a fallback.
    check_name(name, "dataset")
    if fallback is not None:
        check_name(fallback, "fallback dataset")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"`0 < val_fraction < 1` must hold, but got val_fraction={val_fraction!r}.")
    if train_limit is not None and (isinstance(train_limit, bool) or not isinstance(train_limit, int)
                                    or train_limit <= 0):
        raise DataError(f"train_limit must be a positive integer, but got {train_limit!r}.")
    # 2. The requested dataset, else the fallback with a warning nobody can miss.
    used = name
    try:
        full = load_full(name, data_dir, download)
    except DataError as exc:
        if fallback is None or fallback == name:
            raise
        try:
            full = load_full(fallback, data_dir, download)
        except DataError as fallback_exc:
            raise DataError(f"{exc} The fallback {fallback!r} could not be loaded either "
                            f"({failure_reasons(fallback_exc)}).") from None
        used = fallback
        logger.warning(
            f"dataset {name!r} could not be loaded ({failure_reasons(exc)}); using fallback {fallback!r} "
            f"({len(full.train_labels):,} train samples, source {full.source}). Results are NOT results on "
            f"{name!r}; the data actually used is recorded on the study and on every run.", extra=LOUD)
    # 3. The seeded validation split, and the normalisation statistics of what is trained on.
    train, val = _carve(full, val_fraction, seed, train_limit)
    mean, std = _pixel_mean_std(train.images)
    provenance = Provenance(name=used, requested=name, source=full.source, n_train=len(train), n_val=len(val),
                            n_test=len(full.test_labels), sha256=full.sha256, fallback=used != name)
    c, h, w = train.images.shape[1:]
    return SearchData(train=train, val=val, n_classes=full.n_classes, image_shape=(int(c), int(h), int(w)),
                      mean=mean, std=std, provenance=provenance)


def load_test_split(provenance: Provenance, *, data_dir: str | os.PathLike[str] | None = None) -> Split:
    """Return the test split of the dataset ``provenance`` names, checked against its content hash."""
    check_name(provenance.name, "dataset")
    if provenance.name in TORCHVISION:
        # Where the search found it, and wherever it would be found now: the first copy with the
        # recorded hash wins, so a data dir given on another machine works as well as the original.
        recorded = Path(provenance.source)
        folders = search_folders(provenance.name, resolve_data_dir(data_dir)) + folder_layouts(provenance.name, recorded)
        found: list[str] = []
        for folder in dict.fromkeys(folders):
            files = find_files(folder)
            if isinstance(files, str):
                continue
            full = read_folder(files, str(folder))
            if full.sha256 == provenance.sha256:
                return _split(full.test_images, full.test_labels)
            found.append(f"{folder} has sha256 {full.sha256}")
        where = "; ".join(found) if found else f"no copy found in {', '.join(str(f) for f in folders)}"
    else:
        full = load_full(provenance.name, data_dir, download=False)
        if full.sha256 == provenance.sha256:
            return _split(full.test_images, full.test_labels)
        where = f"{full.source} has sha256 {full.sha256}"
    raise DataError(
        f"the test split of {provenance.name!r} must come from the data the study was searched on "
        f"({provenance.source}, sha256 {provenance.sha256}), but {where}; refusing to report test metrics on "
        "other data. Point --data-dir (or HPSEARCH_DATA_DIR) at the study's data.")


# --------------------------------------------------------------------------- splitting


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    """Return a Split of the arrays, copied when read-only (cached) so the cache stays untouched."""
    return Split(torch.from_numpy(np.require(images, np.uint8, ["C", "W"])),
                 torch.from_numpy(np.require(labels, np.int64, ["C", "W"])))


def _carve(full: Full, val_fraction: float, seed: int, train_limit: int | None) -> tuple[Split, Split]:
    """Return (train, val): a seeded validation split carved from the (optionally capped) train split."""
    order = torch.randperm(len(full.train_labels), generator=torch.Generator().manual_seed(seed))
    if train_limit is not None:
        order = order[:train_limit]  # the cap comes first, so val_fraction is a fraction of what is used
    n_val = _n_val(len(order), val_fraction)
    if n_val >= len(order):
        raise DataError(f"a validation fraction of {val_fraction} must leave training samples, but it takes "
                        f"{n_val} of {len(order)}.")
    # Kept in shuffled order: packaged sets are sorted by class, and the first validation digits
    # are the ones pictured in every reconstruction grid, so they must be a mix of classes.
    val_idx, train_idx = order[:n_val].numpy(), order[n_val:].numpy()
    return (_split(full.train_images[train_idx], full.train_labels[train_idx]),
            _split(full.train_images[val_idx], full.train_labels[val_idx]))


def _n_val(n: int, val_fraction: float) -> int:
    """Return how many of ``n`` samples the validation split takes (at least one)."""
    return max(1, round(n * val_fraction))


def split_sizes(name: str, *, val_fraction: float, train_limit: int | None = None) -> tuple[int, int]:
    """Return the (training, validation) sizes a search on ``name`` will have, without loading it."""
    n = TRAIN_SIZES[name] if train_limit is None else min(train_limit, TRAIN_SIZES[name])
    n_val = _n_val(n, val_fraction)
    return n - n_val, n_val


def _pixel_mean_std(images: torch.Tensor) -> tuple[float, float]:
    """Return the mean and std of uint8 pixels scaled to [0, 1], exactly and without a float copy."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean = float((counts * values).sum() / counts.sum())
    variance = float((counts * (values - mean) ** 2).sum() / counts.sum())
    return mean, math.sqrt(variance)
