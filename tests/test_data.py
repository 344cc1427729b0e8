"""Datasets: torchvision IDX files in both layouts, the system Fashion-MNIST, the packaged sets,
seeded validation splits, the test split kept apart, fallbacks and clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from hpsearch.data import SearchData, load_search_data, load_test_split
from hpsearch.errors import DataError


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _fake_dataset(folder: Path, *, gz: bool, n_train: int = 200, n_test: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        _write_idx(folder / name, array, gz)
    return arrays


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_in_both_layouts(tmp_path: Path, layout: str, gz: bool) -> None:
    folder = tmp_path / "KMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = _fake_dataset(folder, gz=gz)
    data = load_search_data("kmnist", data_dir=tmp_path, val_fraction=0.25, download=False)
    assert len(data.train) + len(data.val) == 200 and len(data.val) == 50
    assert data.image_shape == (1, 28, 28) and data.train.images.dtype.is_floating_point is False
    # Every training image is one of the file's images, labels kept alongside.
    first = data.train.images[0, 0].numpy()
    matches = np.where((arrays["train-images-idx3-ubyte"] == first).all(axis=(1, 2)))[0]
    assert len(matches) == 1
    assert arrays["train-labels-idx1-ubyte"][matches[0]] == int(data.train.labels[0])
    test = load_test_split(data.provenance, data_dir=tmp_path)
    assert len(test) == 50 and data.provenance.source.startswith(str(tmp_path))


def test_env_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dataset(tmp_path / "MNIST" / "raw", gz=True)
    monkeypatch.setenv("HPSEARCH_DATA_DIR", str(tmp_path))
    assert load_search_data("mnist", download=False).provenance.n_test == 50


def test_system_fashion_mnist() -> None:
    # CI installs Debian's dataset-fashion-mnist: the full 60k/10k set.
    data = load_search_data("fashion-mnist", val_fraction=0.1, download=False)
    assert (len(data.train), len(data.val), data.provenance.n_test) == (54000, 6000, 10000)
    assert data.n_classes == 10 and data.provenance.source == "/usr/share/datasets/fashion-mnist"
    assert 0.2 < data.mean < 0.4 and 0.3 < data.std < 0.4


@pytest.mark.parametrize("name,shape,total,n_test", [("mnist-5k", (1, 28, 28), 5000, 1000),
                                                     ("digits", (1, 8, 8), 1797, 359)])
def test_packaged_sets_have_a_fixed_test_split(name: str, shape: tuple, total: int, n_test: int) -> None:
    a = load_search_data(name, seed=0)
    b = load_search_data(name, seed=1)
    assert a.image_shape == shape and a.provenance.n_test == n_test
    assert len(a.train) + len(a.val) == total - n_test
    test = load_test_split(a.provenance)
    # The test split does not move with the study seed and never overlaps train or validation.
    test_rows = {bytes(x) for x in test.images.numpy()}
    for data in (a, b):
        for split in (data.train, data.val):
            assert not test_rows & {bytes(x) for x in split.images.numpy()}


def test_validation_split_is_seeded_and_disjoint() -> None:
    a, a2, b = (load_search_data("digits", seed=s, val_fraction=0.2) for s in (3, 3, 4))
    assert (a.val.images == a2.val.images).all()  # same seed, same split
    assert not (a.val.images == b.val.images).all()  # another seed, another split
    train_rows = {bytes(x) for x in a.train.images.numpy()}
    assert not train_rows & {bytes(x) for x in a.val.images.numpy()}
    assert not hasattr(a, "test") and "test" not in SearchData.__dataclass_fields__


def test_train_limit() -> None:
    data = load_search_data("mnist-5k", train_limit=500, val_fraction=0.2)
    assert (len(data.train), len(data.val)) == (400, 100)


def test_fallback_warns_and_records(tmp_path: Path) -> None:
    warnings: list[str] = []
    data = load_search_data("kmnist", data_dir=tmp_path, fallback="digits", download=False, warn=warnings.append)
    assert data.provenance.name == "digits" and data.provenance.requested == "kmnist"
    assert data.provenance.fallback is True and data.provenance.as_params()["data.fallback"] == "true"
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "NOT results on 'kmnist'" in warnings[0]
    assert all(isinstance(v, str) for v in data.provenance.as_params().values())


def test_missing_dataset_says_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_search_data("kmnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path) in message and "/usr/share/datasets/kmnist" in message
    assert "--data-dir" in message and "fallback" in message


def test_offline_download_fails_fast(tmp_path: Path) -> None:
    import time

    started = time.monotonic()
    with pytest.raises(DataError) as info:
        load_search_data("kmnist", data_dir=tmp_path, download=True)
    assert "download into" in str(info.value)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "bad magic"])
def test_corrupt_file_is_a_data_error(tmp_path: Path, damage: str) -> None:
    _fake_dataset(tmp_path, gz=True)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    if damage == "truncated":
        target.write_bytes(gzip.compress(raw[:1000]))
    elif damage == "not gzip":
        target.write_bytes(b"this is not gzip")
    else:
        target.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + raw[4:]))
    with pytest.raises(DataError) as info:
        load_search_data("kmnist", data_dir=tmp_path, download=False)
    assert str(target) in str(info.value)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_val_fraction(fraction: float) -> None:
    with pytest.raises(DataError):
        load_search_data("digits", val_fraction=fraction)


def test_test_split_checks_the_hash(tmp_path: Path) -> None:
    _fake_dataset(tmp_path, gz=True)
    data = load_search_data("kmnist", data_dir=tmp_path, download=False)
    other = tmp_path / "other"
    _fake_dataset(other, gz=True, n_train=210)
    with pytest.raises(DataError) as info:
        load_test_split(data.provenance, data_dir=other)
    assert "not the data the study was searched on" in str(info.value)
