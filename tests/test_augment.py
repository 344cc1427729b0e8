"""On-device augmentation: what it does to a batch, that only training sees it, and that it is seeded."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from hpsearch.augment import Augmentation, make_augmenter
from hpsearch.cli import cli
from hpsearch.data import SearchData, load_search_data
from hpsearch.knobs import defaults
from hpsearch.models import build_model
from hpsearch.tasks import make_task, normalize, to_unit
from hpsearch.train import TrainConfig, fit

CPU = torch.device("cpu")
SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def digits() -> SearchData:
    return load_search_data("digits", download=False)


def generator(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def random_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *SHAPE), generator=generator(seed), dtype=torch.uint8)


def shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Return ``image`` (H, W) moved dx pixels right and dy down, black where nothing comes in."""
    out = torch.zeros_like(image)
    h, w = image.shape
    out[max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)] = \
        image[max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)]
    return out


def disc(radius: float) -> torch.Tensor:
    """Return a (1, 1, 28, 28) uint8 image of a white disc centred on the image."""
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    inside = (ys - 13.5) ** 2 + (xs - 13.5) ** 2 <= radius ** 2
    return (inside.to(torch.uint8) * 255).reshape(1, 1, 28, 28)


def test_off_means_no_augmenter_and_no_draws() -> None:
    g = generator()
    assert make_augmenter(Augmentation(), SHAPE, g, CPU) is None
    assert torch.equal(g.get_state(), generator().get_state())  # nothing drawn: training is as without it


@pytest.mark.parametrize("shift", [1, 3])
def test_shift_moves_each_image_by_whole_pixels_within_range(shift: int) -> None:
    images = random_images()
    out = make_augmenter(Augmentation(shift=shift), SHAPE, generator(), CPU)(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    moves = set()
    for i in range(len(images)):
        found = [(dx, dy) for dx, dy in itertools.product(range(-shift, shift + 1), repeat=2)
                 if torch.equal(out[i, 0], shifted(images[i, 0], dx, dy))]
        assert found, f"image {i} is not a whole-pixel shift of at most {shift}"
        moves.add(found[0])
    assert len(moves) > 1  # each image draws its own shift


def test_rotation_turns_a_bar_and_keeps_a_disc() -> None:
    bar = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    bar[..., 12:16, 2:26] = 255  # horizontal
    rotate = make_augmenter(Augmentation(rotate=45.0), SHAPE, generator(), CPU)
    bars = rotate(bar.expand(32, -1, -1, -1).contiguous())
    assert (bars != bar).flatten(1).any(dim=1).float().mean() > 0.9  # almost every angle moves the bar
    rows_hit = (bars[:, 0] > 0).any(dim=2).sum(dim=1)
    assert rows_hit.max() > 8  # a turned bar spans more rows than its 4
    discs = rotate(disc(8).expand(32, -1, -1, -1).contiguous())
    # Rotation about the centre leaves a centred disc where it was, up to its rim's rounding.
    assert (discs != disc(8)).flatten(1).float().mean(dim=1).max() < 0.03


def test_zoom_changes_a_discs_area_within_the_factor() -> None:
    area = (disc(8) > 0).sum().item()
    zoomed = make_augmenter(Augmentation(scale=0.2), SHAPE, generator(), CPU)(disc(8).expand(64, -1, -1, -1)
                                                                               .contiguous())
    ratios = (zoomed > 0).flatten(1).sum(dim=1).float() / area
    assert ratios.min() >= 0.8 ** 2 * 0.9 and ratios.max() <= 1.2 ** 2 * 1.1
    assert ratios.max() - ratios.min() > 0.3  # zooms differ from image to image


@pytest.mark.parametrize("settings", [Augmentation(flip=True), Augmentation(flip=True, rotate=0.001)],
                         ids=["flip", "flip through the warp"])
def test_flip_mirrors_about_half_the_images_left_to_right(settings: Augmentation) -> None:
    images = random_images(n=200)
    out = make_augmenter(settings, SHAPE, generator(), CPU)(images)
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    assert all(k != m for k, m in zip(kept, mirrored))  # each image is itself or its mirror image, never both
    assert 70 < sum(mirrored) < 130  # each one flips a coin


def test_flip_with_shift_is_a_shift_of_the_image_or_of_its_mirror() -> None:
    images = random_images()
    out = make_augmenter(Augmentation(shift=1, flip=True), SHAPE, generator(), CPU)(images)
    sides = set()
    for i in range(len(images)):
        found = [(mirror, dx, dy) for mirror in (False, True) for dx, dy in itertools.product(range(-1, 2), repeat=2)
                 if torch.equal(out[i, 0], shifted(images[i, 0].flip(-1) if mirror else images[i, 0], dx, dy))]
        assert found, f"image {i} is not a shift of at most 1 of itself or its mirror"
        sides.add(found[0][0])
    assert sides == {False, True}


def test_same_generator_state_same_batches() -> None:
    images = random_images()
    settings = Augmentation(shift=2, rotate=10.0, scale=0.1, flip=True)
    first = make_augmenter(settings, SHAPE, generator(5), CPU)(images)
    assert torch.equal(first, make_augmenter(settings, SHAPE, generator(5), CPU)(images))
    assert not torch.equal(first, make_augmenter(settings, SHAPE, generator(6), CPU)(images))


def _fit_recording(data: SearchData, *, family: str = "cnn", task: str = "classify", seed: int = 0,
                   **knobs: Any) -> tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor], list[Any]]:
    """Return the model after 2 epochs and what it saw in training and in evaluation (and the loss targets)."""
    p = {**defaults(), "epochs": 2, "conv_channels": 4, "conv_blocks": 1, "width": 16, **knobs}
    torch.manual_seed(seed)
    model = build_model(family, p, image_shape=data.image_shape, n_classes=data.n_classes)
    seen_train: list[torch.Tensor] = []
    seen_eval: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda module, args: (seen_train if module.training else seen_eval).append(args[0].detach().clone()))
    task_obj = make_task(task, p)
    targets: list[Any] = []
    loss = task_obj.loss
    task_obj.loss = lambda output, images01, labels, mask: (targets.append(images01), loss(output, images01,
                                                                                           labels, mask))[1]
    fit(model, data, task_obj, TrainConfig.from_params(p, seed=seed, device="cpu"), lambda step, metrics: None)
    return model, seen_train, seen_eval, targets


def _rows(images: torch.Tensor) -> set[bytes]:
    """Return the images as a set of rows, to 1e-3 (training and evaluation scale pixels in other orders)."""
    return {row.numpy().tobytes() for row in torch.round(images.flatten(1) * 1000).to(torch.int32)}


def test_fit_augments_training_batches_only(digits: SearchData) -> None:
    originals = _rows(normalize(to_unit(digits.train.images), digits.mean, digits.std))
    _, train_plain, _, _ = _fit_recording(digits)
    _, train_aug, eval_aug, _ = _fit_recording(digits, augment_shift=2)
    plain_rows = _rows(torch.cat(train_plain))
    assert plain_rows <= originals  # without augmentation the model trains on the images themselves
    aug_rows = _rows(torch.cat(train_aug))
    assert len(aug_rows - originals) > 0.5 * len(aug_rows)  # most training inputs are moved images
    # Validation sees exactly the validation images, never augmented.
    val = normalize(to_unit(digits.val.images), digits.mean, digits.std)
    assert _rows(torch.cat(eval_aug)) == _rows(val)


def test_fit_with_augmentation_is_reproducible_and_differs_from_without(digits: SearchData) -> None:
    def weights(**knobs: Any) -> torch.Tensor:
        model, *_ = _fit_recording(digits, family="mlp", seed=3, **knobs)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    augmented = weights(augment_shift=1, augment_rotate=10.0)
    assert torch.equal(augmented, weights(augment_shift=1, augment_rotate=10.0))
    assert not torch.equal(augmented, weights())


def test_denoise_target_is_the_augmented_clean_image(digits: SearchData) -> None:
    # With zero noise the model's input is its target: both are the same augmented image.
    _, seen, _, targets = _fit_recording(digits, family="autoencoder", task="denoise", noise_std=0.0,
                                         augment_shift=2, bottleneck_dim=4)
    originals = _rows(to_unit(digits.train.images))
    for inputs, target in zip(seen, targets):
        assert torch.allclose(inputs * digits.std + digits.mean, target, atol=1e-5)
    moved = _rows(torch.cat(targets))
    assert len(moved - originals) > 0.5 * len(moved)


SPEC = """\
study: {{name: aug, n_trials: 2, sampler: {{type: random}}}}
task: {{type: classify, dataset: digits, epochs: 1}}
model: {{family: mlp}}
space:
  lr: 0.01
{space}
tracking: {{enabled: false}}
"""


@pytest.mark.parametrize("space, ok", [
    ("  augment_shift: 2\n  augment_rotate: {type: float, low: 0, high: 15}", True),
    ("  augment_scale: [0.0, 0.1]", True),
    ("  augment_flip: [true, false]", True),
    ("  augment_flip: 2", False),
    ("  augment_shift: 40", False),
    ("  augment_rotate: {type: float, low: -5, high: 15}", False),
])
def test_spec_takes_augmentation_knobs_fixed_or_searched(tmp_path: Path, space: str, ok: bool) -> None:
    path = tmp_path / "aug.yaml"
    path.write_text(SPEC.format(space=space))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert (result.exit_code == 0) is ok, result.output
    if not ok:
        assert "augment_" in result.output and "Traceback" not in result.output
