"""Tasks: corruption and metrics."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from hpsearch import tasks
from hpsearch.data import SearchData, load_search_data
from hpsearch.errors import SpecError
from hpsearch.knobs import defaults
from hpsearch.models import build_model
from hpsearch.tasks import METRICS, TASKS, eval_generator, make_task
from hpsearch.train import evaluate


@pytest.fixture(scope="module")
def digits() -> SearchData:
    return load_search_data("digits", download=False)


def params(**overrides: Any) -> dict[str, Any]:
    return {**defaults(), **overrides}


def generator(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def images(n: int = 16, size: int = 28, value: float | None = None) -> torch.Tensor:
    if value is not None:
        return torch.full((n, 1, size, size), value)
    return torch.rand((n, 1, size, size), generator=generator(99))


class Echo(nn.Module):
    """A "model" that returns what it should have learned: the clean images it is told about."""

    def __init__(self, clean01: torch.Tensor) -> None:
        super().__init__()
        self.clean01 = clean01

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clean01[: len(x)]


# --------------------------------------------------------------------------- corruption


def test_classify_feeds_clean_images() -> None:
    x = images()
    inputs, mask = make_task("classify", params()).corrupt(x, generator())
    assert inputs is x and mask is None


@pytest.mark.parametrize("kind", ["gaussian", "salt_pepper"])
def test_denoise_noise_is_in_range_and_deterministic(kind: str) -> None:
    task = make_task("denoise", params(noise_std=0.3, noise_amount=0.2), noise_kind=kind)
    x = images()
    noisy, mask = task.corrupt(x, generator(1))
    assert mask is None and noisy.shape == x.shape
    assert noisy.min().item() >= 0.0 and noisy.max().item() <= 1.0  # clipped to pixel range
    assert not torch.equal(noisy, x)
    assert torch.equal(noisy, task.corrupt(x, generator(1))[0])  # same seed, same noise
    assert not torch.equal(noisy, task.corrupt(x, generator(2))[0])


def test_gaussian_noise_has_the_asked_std() -> None:
    x = images(64, value=0.5)  # mid-gray: std 0.1 noise is (almost) never clipped
    noisy, _ = make_task("denoise", params(noise_std=0.1)).corrupt(x, generator())
    assert (noisy - x).std().item() == pytest.approx(0.1, rel=0.02)


def test_salt_and_pepper_hits_the_asked_share_half_white_half_black() -> None:
    x = images(64, value=0.5)
    noisy, _ = make_task("denoise", params(noise_amount=0.2), noise_kind="salt_pepper").corrupt(x, generator())
    assert (noisy != x).float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert (noisy == 1.0).float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert (noisy == 0.0).float().mean().item() == pytest.approx(0.1, abs=0.01)


# Where the top-left corner of a 6x6 square lands in a 28x28 image.
CORNERS = {"center": (11, 11), "top": (0, 11), "bottom": (22, 11), "left": (11, 0), "right": (11, 22)}


@pytest.mark.parametrize("placement", list(CORNERS))
def test_inpaint_hides_a_square_where_asked(placement: str) -> None:
    x = images(4)
    inputs, mask = make_task("inpaint", params(mask_size=6), mask_placement=placement).corrupt(x, generator())
    assert mask is not None and mask.shape == x.shape and mask.dtype == torch.bool
    top, left = CORNERS[placement]
    expected = torch.zeros_like(mask)
    expected[:, :, top:top + 6, left:left + 6] = True
    assert torch.equal(mask, expected)
    assert torch.all(inputs[mask] == 0.0)  # hidden pixels are zeroed
    assert torch.equal(inputs[~mask], x[~mask])  # the rest is untouched


def test_random_placement_moves_the_square_but_keeps_its_size() -> None:
    x = images(64)
    task = make_task("inpaint", params(mask_size=5), mask_placement="random")
    _, mask = task.corrupt(x, generator())
    assert torch.all(mask.sum(dim=(1, 2, 3)) == 25)  # a whole 5x5 square in every image
    corners = {tuple(torch.nonzero(m[0])[0].tolist()) for m in mask}
    assert len(corners) > 10  # placed differently from image to image
    assert torch.equal(mask, task.corrupt(x, generator())[1])  # and reproducibly


def test_mask_bigger_than_the_image_is_refused() -> None:
    with pytest.raises(SpecError, match="mask.size"):
        make_task("inpaint", params(mask_size=14)).corrupt(images(2, size=8), generator())


def test_eval_generator_always_draws_the_same_corruption() -> None:
    task = make_task("denoise", params())
    x = images()
    assert torch.equal(task.corrupt(x, eval_generator())[0], task.corrupt(x, eval_generator())[0])


@pytest.mark.parametrize(
    ("name", "overrides", "kwargs", "named"),
    [
        ("regress", {}, {}, "task.type"),
        ("denoise", {}, {"noise_kind": "speckle"}, "noise.kind"),
        ("denoise", {"noise_std": 1.5}, {}, "noise_std"),
        ("denoise", {"noise_amount": -0.1}, {"noise_kind": "salt_pepper"}, "noise_amount"),
        ("inpaint", {"mask_size": 0}, {}, "mask_size"),
        ("inpaint", {}, {"mask_placement": "middle"}, "placement"),
    ],
)
def test_bad_task_settings_raise_spec_error(name: str, overrides: dict[str, Any], kwargs: dict[str, Any],
                                            named: str) -> None:
    with pytest.raises(SpecError, match=named):
        make_task(name, params(**overrides), **kwargs)


# --------------------------------------------------------------------------- metrics


def test_every_task_reports_exactly_its_metrics(digits: SearchData) -> None:
    for name in TASKS:
        family = "mlp" if name == "classify" else "autoencoder"
        model = build_model(family, params(), image_shape=digits.image_shape, n_classes=digits.n_classes)
        task = make_task(name, params(mask_size=3))
        metrics = evaluate(model, digits.val, task, mean=digits.mean, std=digits.std, device="cpu")
        # inpaint without a reference classifier has no success rate to report
        expected = {k for k in METRICS[name] if k != "val_inpaint_success"}
        assert set(metrics) == expected, name
        assert all(math.isfinite(v) for v in metrics.values())


def test_metric_directions_are_valid() -> None:
    assert set(METRICS) == set(TASKS)
    assert all(d in ("minimize", "maximize") for m in METRICS.values() for d in m.values())


@pytest.mark.parametrize("name", ["denoise", "inpaint"])
def test_a_perfect_reconstruction_scores_high_psnr(name: str, digits: SearchData) -> None:
    clean = tasks.to_unit(digits.val.images)
    metrics = evaluate(Echo(clean), digits.val, make_task(name, params(mask_size=3)), mean=0.0, std=1.0,
                       device="cpu", batch_size=len(clean))
    assert metrics["val_mse"] == 0.0
    assert metrics["val_psnr"] == pytest.approx(100.0)  # the floor that keeps it finite


def test_psnr_of_a_known_error() -> None:
    task = make_task("denoise", params())
    clean = images(8, value=0.2)
    sums = task.batch_sums(clean + 0.1, clean, torch.zeros(8, dtype=torch.long), clean, None)
    metrics = task.summarize(sums, 8)
    assert metrics["val_mse"] == pytest.approx(0.01)
    assert metrics["val_psnr"] == pytest.approx(20.0)  # 10 log10(1 / 0.01)


def test_inpaint_scores_the_hidden_region_apart() -> None:
    task = make_task("inpaint", params(mask_size=4))
    clean = images(8, size=8, value=0.5)
    inputs, mask = task.corrupt(clean, generator())
    output = torch.where(mask, clean + 0.2, clean)  # wrong only where hidden
    metrics = task.summarize(task.batch_sums(output, clean, torch.zeros(8, dtype=torch.long), inputs, mask), 8)
    assert metrics["val_mse_hidden"] == pytest.approx(0.04)
    assert metrics["val_mse"] == pytest.approx(0.04 * 16 / 64)  # the same error spread over the whole image
