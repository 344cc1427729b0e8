"""The pictures a trial draws of its model: reconstruction grids and confusion counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpsearch.data import SearchData, load_search_data
from hpsearch.errors import SpecError
from hpsearch.models import build_model
from hpsearch.pictures import confusion_matrix, reconstruction_grid
from hpsearch.tasks import make_task

from .test_tasks import params


@pytest.fixture(scope="module")
def digits() -> SearchData:
    return load_search_data("digits", download=False)


@pytest.mark.parametrize("name", ["denoise", "inpaint"])
def test_reconstruction_grid_is_a_fixed_rgb_picture(name: str, digits: SearchData) -> None:
    torch.manual_seed(0)
    model = build_model("autoencoder", params(), image_shape=digits.image_shape, n_classes=10)
    task = make_task(name, params(mask_size=3))
    model.train()
    grid = reconstruction_grid(model, digits.val, task, mean=digits.mean, std=digits.std, device="cpu", n=10)
    scale, gap = 4, 2  # 8x8 digits drawn 4x, 2-pixel gaps
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * (8 * scale + gap) + gap, 10 * (8 * scale + gap) + gap, 3)
    again = reconstruction_grid(model, digits.val, task, mean=digits.mean, std=digits.std, device="cpu", n=10)
    assert np.array_equal(grid, again)  # same digits, same corruption: runs compare side by side
    assert model.training  # the picture leaves the model as it found it


def test_reconstruction_grid_refuses_classify(digits: SearchData) -> None:
    model = build_model("mlp", params(), image_shape=digits.image_shape, n_classes=10)
    with pytest.raises(SpecError, match="classify"):
        reconstruction_grid(model, digits.val, make_task("classify", {}), mean=0.0, std=1.0, device="cpu")


def test_confusion_matrix_counts_every_sample(digits: SearchData) -> None:
    model = build_model("mlp", params(), image_shape=digits.image_shape, n_classes=digits.n_classes)
    counts = confusion_matrix(model, digits.val, mean=digits.mean, std=digits.std, device="cpu",
                              n_classes=digits.n_classes, batch_size=50)
    assert counts.shape == (10, 10)
    assert counts.sum() == len(digits.val)
    assert counts.sum(axis=1).tolist() == torch.bincount(digits.val.labels, minlength=10).tolist()  # rows: truth
