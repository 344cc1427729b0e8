"""The hand-written MLP step: which models take it, and that it trains exactly as autograd does."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import hpsearch.train
from hpsearch.data import SearchData, load_search_data
from hpsearch.knobs import defaults
from hpsearch.mlp_step import mlp_step
from hpsearch.models import build_model
from hpsearch.tasks import Classify, make_task
from hpsearch.train import TrainConfig, fit

CPU = torch.device("cpu")
SHAPE = (1, 28, 28)


def mlp(**overrides: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", {**defaults(), **overrides}, image_shape=SHAPE, n_classes=10)


@pytest.fixture(scope="module")
def mnist() -> SearchData:
    return load_search_data("mnist-5k", train_limit=1500, download=False)


@pytest.mark.parametrize("overrides", [
    {"n_layers": 0},  # logistic regression: the output Linear alone
    {"n_layers": 1, "dropout": 0.0},
    {"n_layers": 2, "width_0": 128, "width_1": 64, "dropout": 0.2},  # the benchmark's MLP
    {"n_layers": 3, "width": 40, "dropout": 0.5},
])
def test_plain_mlps_take_the_step_and_match_autograd(overrides: dict[str, Any]) -> None:
    model = mlp(**overrides)
    step = mlp_step(model, CPU, "fp32")
    assert step is not None
    inputs, labels = torch.randn(100, *SHAPE), torch.randint(0, 10, (100,))  # 100: not a power of two

    torch.manual_seed(7)  # the same dropout masks on both sides
    loss = step(inputs, labels)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    reference = F.cross_entropy(model(inputs), labels)
    reference.backward()

    # The forward pass runs the same ops on the same masks: the loss is bit for bit autograd's.
    assert torch.equal(loss, reference.detach())
    assert not loss.requires_grad
    # The gradients differ from autograd's at most by float rounding (sums in another order).
    for mine, theirs in zip(ours, (p.grad for p in model.parameters()), strict=True):
        assert mine.shape == theirs.shape and mine.is_contiguous()
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("why", "model", "precision"), [
    ("batchnorm", mlp(batchnorm=True), "fp32"),
    ("another activation", mlp(activation="gelu"), "fp32"),
    ("a cnn", build_model("cnn", {**defaults(), "conv_blocks": 1}, image_shape=SHAPE, n_classes=10), "fp32"),
    ("an autoencoder", build_model("autoencoder", defaults(), image_shape=SHAPE, n_classes=10), "fp32"),
    ("torch's own dropout", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.ReLU(),
                                                torch.nn.Dropout(0.2), torch.nn.Linear(8, 10)), "fp32"),
    ("no Flatten first", torch.nn.Sequential(torch.nn.Linear(784, 10)), "fp32"),
    ("bf16", mlp(), "bf16"),
])
def test_other_models_and_precisions_train_through_autograd(why: str, model: torch.nn.Module,
                                                            precision: str) -> None:
    assert mlp_step(model, CPU, precision) is None, why


class Smoothed(Classify):
    """Classify with another loss: the step's cross-entropy would be the wrong gradient."""

    def loss(self, output: torch.Tensor, images01: torch.Tensor | None, labels: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(output, labels, label_smoothing=0.1)


@pytest.mark.parametrize(("task", "asked"), [(Classify(), 1), (Smoothed(), 0)])
def test_fit_asks_for_the_step_only_for_classify(task: Classify, asked: int, mnist: SearchData,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def recording(*args: Any) -> Any:
        calls.append(args)
        return mlp_step(*args)

    monkeypatch.setattr(hpsearch.train, "mlp_step", recording)
    p = {**defaults(), "n_layers": 1, "epochs": 1}
    fit(mlp(n_layers=1), mnist, task, TrainConfig.from_params(p, seed=0, device="cpu"), lambda step, metrics: None)
    # The step computes cross-entropy: any other loss (any other task) trains through autograd.
    assert len(calls) == asked


def test_a_frozen_parameter_or_a_hook_means_autograd() -> None:
    frozen = mlp(n_layers=1)
    frozen[1].weight.requires_grad_(False)
    assert mlp_step(frozen, CPU, "fp32") is None
    hooked = mlp(n_layers=1)
    hooked[2].register_forward_hook(lambda module, args, output: None)
    assert mlp_step(hooked, CPU, "fp32") is None
    param_hooked = mlp(n_layers=1)
    param_hooked[1].weight.register_hook(lambda grad: grad)
    assert mlp_step(param_hooked, CPU, "fp32") is None


def test_fit_trains_the_same_with_and_without_the_step(mnist: SearchData, monkeypatch: pytest.MonkeyPatch) -> None:
    p = {**defaults(), "n_layers": 2, "width": 64, "dropout": 0.2, "epochs": 3, "optimizer": "adam", "lr": 3e-3}

    def run() -> list[dict[str, float]]:
        torch.manual_seed(0)
        model = build_model("mlp", p, image_shape=mnist.image_shape, n_classes=mnist.n_classes)
        config = TrainConfig.from_params(p, seed=3, device="cpu")
        return list(fit(model, mnist, make_task("classify", p), config, lambda step, metrics: None).history)

    ours = run()
    monkeypatch.setattr(hpsearch.train, "mlp_step", lambda *args: None)  # force the autograd path
    reference = run()
    # Three epochs of Adam on float-rounding differences: the same training, to six digits.
    for mine, theirs in zip(ours, reference, strict=True):
        for name in ("train_loss", "val_loss", "val_accuracy"):
            assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name
