"""The training loop: learning, reporting, pruning, divergence, reproducibility, every task end to end."""

from __future__ import annotations

import math
import pickle
import types
from typing import Any

import pytest
import torch

from hpsearch.data import SearchData, load_search_data
from hpsearch.errors import SpecError
from hpsearch.knobs import defaults
from hpsearch.models import build_model
from hpsearch.reference import load_or_train_reference
from hpsearch.tasks import METRICS, input_stats, make_task
from hpsearch.train import (Diverged, TrainConfig, TrainResult, evaluate, fit, fused_step, make_scheduler,
                            memory_format, resolve_device)

REPORTED = {"train_loss", "epoch_seconds", "lr"}  # besides the task's val metrics


@pytest.fixture(scope="module")
def digits() -> SearchData:
    return load_search_data("digits", download=False)


@pytest.fixture(scope="module")
def digits_reference(digits: SearchData, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """The in-painting judge of digits, trained once for the module (each training takes seconds)."""
    return load_or_train_reference(digits, tmp_path_factory.mktemp("reference"), device="cpu")


@pytest.fixture(scope="module")
def mnist() -> SearchData:
    return load_search_data("mnist-5k", train_limit=2000, download=False)


def params(**overrides: Any) -> dict[str, Any]:
    return {**defaults(), "epochs": 3, **overrides}


def train(data: SearchData, *, family: str = "mlp", task: str = "classify", seed: int = 0,
          report: Any = None, reference: torch.nn.Module | None = None, precision: str = "fp32",
          channels_last: bool | None = None, **overrides: Any) -> TrainResult:
    p = params(**overrides)
    torch.manual_seed(seed)
    model = build_model(family, p, image_shape=data.image_shape, n_classes=data.n_classes)
    config = TrainConfig.from_params(p, seed=seed, device="cpu", precision=precision, channels_last=channels_last)
    return fit(model, data, make_task(task, p, reference=reference), config, report or (lambda step, metrics: None))


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_digits_are_learned(digits: SearchData, family: str) -> None:
    result = train(digits, family=family, epochs=8, conv_channels=8, lr=3e-3)
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"] / 2
    assert last["val_accuracy"] > 0.85  # chance is 0.1
    assert result.metrics == last and result.epochs_run == 8


@pytest.mark.parametrize(("family", "task"), [("mlp", "classify"), ("cnn", "classify"), ("autoencoder", "denoise")])
def test_bf16_autocast_trains_and_reports_float_metrics(digits: SearchData, family: str, task: str) -> None:
    fp32 = train(digits, family=family, task=task, epochs=4, conv_channels=8, lr=3e-3)
    bf16 = train(digits, family=family, task=task, epochs=4, conv_channels=8, lr=3e-3, precision="bf16")
    loss, quality = ("val_loss", "val_accuracy") if task == "classify" else ("val_mse", "val_psnr")
    assert bf16.history[-1]["train_loss"] < bf16.history[0]["train_loss"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in bf16.metrics.values())
    # Rounded differently, so not equal; close to the float32 fit on the same seed.
    assert bf16.metrics[loss] != fp32.metrics[loss]
    assert abs(bf16.metrics[quality] - fp32.metrics[quality]) < (0.08 if task == "classify" else 1.0)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_channels_last_on_the_cpu_trains_like_the_default_layout(digits: SearchData, batchnorm: bool) -> None:
    nchw = train(digits, family="cnn", epochs=2, conv_channels=8, batchnorm=batchnorm, channels_last=False)
    nhwc = train(digits, family="cnn", epochs=2, conv_channels=8, batchnorm=batchnorm)  # auto: NHWC on the CPU
    # Same arithmetic in another memory order: equal up to float summation order, epoch by epoch.
    for a, b in zip(nchw.history, nhwc.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=2 / len(digits.val))


@pytest.mark.parametrize(("family", "encoder", "device", "setting", "expected"), [
    ("cnn", "dense", "cpu", None, torch.channels_last),
    ("cnn", "dense", "cuda", None, torch.channels_last),
    ("cnn", "dense", "mps", None, torch.contiguous_format),
    ("cnn", "dense", "cpu", False, torch.contiguous_format),
    ("cnn", "dense", "cuda", False, torch.contiguous_format),
    ("autoencoder", "conv", "cpu", None, torch.contiguous_format),  # transposed convs: not measured on the CPU
    ("autoencoder", "conv", "cuda", None, torch.channels_last),
    ("autoencoder", "conv", "cpu", True, torch.channels_last),
    ("mlp", "dense", "cuda", None, torch.contiguous_format),
    ("mlp", "dense", "cpu", True, torch.contiguous_format),  # no convolution: nothing to lay out
])
def test_memory_format_follows_device_model_and_setting(digits: SearchData, family: str, encoder: str, device: str,
                                                         setting: bool | None, expected: torch.memory_format) -> None:
    model = build_model(family, params(encoder=encoder), image_shape=digits.image_shape, n_classes=digits.n_classes)
    assert memory_format(model, torch.device(device), setting) == expected


def test_mnist_slice_is_learned(mnist: SearchData) -> None:
    result = train(mnist, epochs=3, width=64)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.metrics["val_accuracy"] > 0.8


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("schedule", ["none", "cosine", "step", "onecycle"])
def test_every_optimizer_and_schedule_trains(digits: SearchData, optimizer: str, schedule: str) -> None:
    lr = {"sgd": 0.05, "rmsprop": 1e-3}.get(optimizer, 3e-3)
    result = train(digits, optimizer=optimizer, lr_schedule=schedule, lr=lr, epochs=4, nesterov=True,
                   batchnorm=True, weight_decay=1e-4)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    lrs = [m["lr"] for m in result.history]
    if schedule == "none":
        assert lrs == [lr] * 4
    elif schedule == "onecycle":
        assert max(lrs) <= lr and lrs[-1] < lr / 10  # warms up to lr, anneals far below it
    else:
        assert lrs[0] == lr and lrs[-1] < lr  # cosine and step decay from lr


@pytest.mark.parametrize(("encoder", "task"), [("dense", "denoise"), ("conv", "denoise"), ("dense", "inpaint"),
                                               ("conv", "inpaint")])
def test_autoencoders_train_end_to_end(digits: SearchData, encoder: str, task: str,
                                       request: pytest.FixtureRequest) -> None:
    reference = request.getfixturevalue("digits_reference") if task == "inpaint" else None
    seen: list[dict[str, float]] = []
    result = train(digits, family="autoencoder", task=task, encoder=encoder, epochs=6, mask_size=3, lr=3e-3,
                   conv_channels=8, report=lambda step, metrics: seen.append(metrics), reference=reference)
    assert result.history[-1]["val_mse"] < result.history[0]["val_mse"]
    assert all(set(METRICS[task]) | REPORTED <= set(m) for m in seen)
    if task == "inpaint":
        assert 0.0 <= result.metrics["val_inpaint_success"] <= 1.0
        assert "val_inpaint_success_0" in result.metrics  # per class, for the record


# --------------------------------------------------------------------------- the reporter


OPTIMIZERS_FOR_FUSED_STEP = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
    "adam, weight decay": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2, fused=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, fused=True),
    "sgd, nesterov momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True,
                                                            weight_decay=1e-3, fused=True),
    "rmsprop (no fused kernel)": lambda params: torch.optim.RMSprop(params, lr=1e-2, foreach=True),
    "adam, amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True, fused=True),
    "adam, two groups": lambda params: torch.optim.Adam([{"params": list(params)[:2]}, {"params": []}], lr=1e-2,
                                                        fused=True),
}


def _train_steps(make_optimizer: Any, *, direct: bool, steps: int = 25) -> tuple[list[torch.Tensor], int]:
    """Return the weights after ``steps`` steps with a one-cycle schedule, and how often ``step()`` ran."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = make_optimizer(model.parameters())
    calls = []
    step_method = optimizer.step
    # A bound method, as the scheduler (which wraps step) expects.
    optimizer.step = types.MethodType(lambda self, *args, **kwargs: (calls.append(1), step_method(*args, **kwargs))[1],
                                      optimizer)
    config = TrainConfig(epochs=1, lr=1e-2, lr_schedule="onecycle")
    scheduler, _ = make_scheduler(optimizer, config, steps_per_epoch=steps + 1)
    take_step = fused_step(optimizer) if direct else optimizer.step
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(8, 20, generator=generator)).square().mean().backward()
        take_step()
        scheduler.step()  # lr, betas and momentum change every step: the direct path must follow them
    return [p.detach().clone() for p in model.parameters()], len(calls)


@pytest.mark.parametrize("name", list(OPTIMIZERS_FOR_FUSED_STEP))
def test_fused_step_gives_the_same_weights_as_step(name: str) -> None:
    make_optimizer = OPTIMIZERS_FOR_FUSED_STEP[name]
    direct, step_calls = _train_steps(make_optimizer, direct=True)
    reference, _ = _train_steps(make_optimizer, direct=False)
    # The same kernel on the same state: bit for bit the same weights.
    assert all(torch.equal(a, b) for a, b in zip(direct, reference, strict=True))
    # Fused Adam, AdamW and SGD go through step() once, to create their state; the rest always.
    has_direct_path = name in ("adam", "adam, weight decay", "adamw", "sgd", "sgd, nesterov momentum")
    assert step_calls == (1 if has_direct_path else 25)


def test_fused_step_falls_back_when_a_parameter_has_no_gradient() -> None:
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam([*used.parameters(), *unused.parameters()], lr=0.1, fused=True)
    take_step = fused_step(optimizer)
    before = unused.weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        used(torch.randn(3, 4)).sum().backward()
        take_step()
    # As with step(): a parameter without a gradient is left alone, and has no state.
    assert torch.equal(unused.weight, before)
    assert unused.weight not in optimizer.state


def test_fused_step_honours_hooks_by_stepping_through_step() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    seen: list[int] = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(1))
    take_step = fused_step(optimizer)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(3, 4)).sum().backward()
        take_step()
    assert len(seen) == 3


def test_report_is_called_once_per_epoch_with_the_promised_keys(digits: SearchData) -> None:
    calls: list[tuple[int, dict[str, float]]] = []
    result = train(digits, epochs=3, report=lambda step, metrics: calls.append((step, metrics)))
    assert [step for step, _ in calls] == [1, 2, 3]  # 1-based epochs
    for _, metrics in calls:
        assert set(metrics) == REPORTED | set(METRICS["classify"])
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert [m for _, m in calls] == list(result.history)


def test_an_exception_from_report_ends_the_fit(digits: SearchData) -> None:
    class Pruned(Exception):
        pass

    steps: list[int] = []

    def report(step: int, metrics: dict[str, float]) -> None:
        steps.append(step)
        if step == 2:
            raise Pruned(f"pruned at {step}")

    with pytest.raises(Pruned):
        train(digits, epochs=5, report=report)
    assert steps == [1, 2]  # no epoch after the prune


# --------------------------------------------------------------------------- divergence


def test_a_huge_learning_rate_raises_diverged(digits: SearchData) -> None:
    calls: list[int] = []
    with pytest.raises(Diverged) as caught:
        # The largest rate the knob table allows (lr <= 10), on a deep, wide net with heavy momentum.
        train(digits, optimizer="sgd", lr=10.0, momentum=0.99, n_layers=6, width=512, epochs=3,
              report=lambda s, m: calls.append(s))
    error = caught.value
    assert error.epoch == 1 and error.step >= 1 and not math.isfinite(error.value)
    assert "diverged" in str(error) and "epoch 1" in str(error)
    assert calls == []  # a NaN never reaches the reporter


def test_diverged_survives_pickling() -> None:
    # Worker processes send exceptions back pickled.
    error = pickle.loads(pickle.dumps(Diverged(2, 130, float("nan"))))
    assert (error.epoch, error.step) == (2, 130) and "epoch 2" in str(error)


# --------------------------------------------------------------------------- reproducibility


def test_fits_are_reproducible_on_the_cpu(digits: SearchData) -> None:
    # Dropout, batchnorm and salt-and-pepper noise: every source of randomness in one run.
    def run(seed: int) -> list[dict[str, float]]:
        result = train(digits, seed=seed, dropout=0.3, batchnorm=True, epochs=2)
        return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in result.history]

    assert run(seed=3) == run(seed=3)
    assert run(seed=3) != run(seed=4)


def test_denoise_fit_is_reproducible(digits: SearchData) -> None:
    def run() -> dict[str, float]:
        p = params(epochs=2, noise_amount=0.2)
        torch.manual_seed(0)
        model = build_model("autoencoder", p, image_shape=digits.image_shape, n_classes=10)
        task = make_task("denoise", p, noise_kind="salt_pepper")
        metrics = fit(model, digits, task, TrainConfig.from_params(p, seed=1, device="cpu"), lambda s, m: None).metrics
        return {k: v for k, v in metrics.items() if k != "epoch_seconds"}

    assert run() == run()


def test_evaluate_is_the_same_every_time_and_restores_the_mode(digits: SearchData) -> None:
    model = build_model("autoencoder", params(dropout=0.5), image_shape=digits.image_shape, n_classes=10)
    task = make_task("denoise", params())
    model.train()
    first = evaluate(model, digits.val, task, mean=digits.mean, std=digits.std, device="cpu")
    assert first == evaluate(model, digits.val, task, mean=digits.mean, std=digits.std, device="cpu")
    assert model.training


@pytest.mark.parametrize("standardise", [True, False])
def test_fit_and_evaluate_see_the_inputs_the_study_resolved(digits: SearchData, standardise: bool) -> None:
    # task.normalize: false means raw pixels in [0, 1] in training and evaluation alike.
    mean, std = input_stats(digits.mean, digits.std, standardise=standardise)
    p = params(epochs=1, conv_channels=4)  # a CNN: the hand-written MLP step would bypass forward()
    model = build_model("cnn", p, image_shape=digits.image_shape, n_classes=10)
    seen: dict[bool, list[float]] = {True: [], False: []}  # training -> smallest input values seen
    model.register_forward_pre_hook(lambda m, args: seen[m.training].append(float(args[0].min())))
    config = TrainConfig.from_params(p, seed=0, device="cpu")
    fit(model, digits, make_task("classify", p), config, lambda s, m: None, mean=mean, std=std)
    evaluate(model, digits.val, make_task("classify", p), mean=mean, std=std, device="cpu")
    assert seen[True] and seen[False]
    lowest = -digits.mean / digits.std  # a black pixel, standardised
    for inputs_min in seen[True] + seen[False]:
        assert inputs_min == (pytest.approx(lowest, rel=1e-5) if standardise else 0.0)


# --------------------------------------------------------------------------- edges


def test_fit_leaves_the_thread_count_alone(digits: SearchData) -> None:
    before = torch.get_num_threads()
    train(digits, epochs=1)
    assert torch.get_num_threads() == before


def test_a_lone_last_sample_is_dropped_for_batchnorm(digits: SearchData) -> None:
    n = len(digits.train)
    batch_size = next(b for b in range(16, n) if n % b == 1)  # leaves exactly one sample over
    result = train(digits, batchnorm=True, batch_size=batch_size, epochs=1)
    assert math.isfinite(result.metrics["train_loss"])


def test_a_batch_larger_than_the_data_is_one_batch(digits: SearchData) -> None:
    result = train(digits, batch_size=65_536, epochs=2)  # the knob table's largest; digits train on ~1,300 images
    assert math.isfinite(result.metrics["train_loss"])


def test_batchnorm_with_batches_of_one_is_refused(digits: SearchData) -> None:
    with pytest.raises(SpecError, match="batch_size"):
        train(digits, batchnorm=True, batch_size=1, epochs=1)


def test_config_from_params_reads_every_training_knob() -> None:
    config = TrainConfig.from_params(params(optimizer="sgd", lr=0.1, momentum=0.5, nesterov=True, batch_size=64),
                                     seed=7, device="cpu")
    assert (config.optimizer, config.lr, config.momentum, config.nesterov, config.batch_size) == (
        "sgd", 0.1, 0.5, True, 64)
    assert (config.seed, config.device, config.epochs) == (7, "cpu", 3)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"beta2": -0.1}, "beta2"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"nesterov": "yes"}, "nesterov"),
    ],
)
def test_bad_training_values_raise_spec_error(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(SpecError, match=named):
        TrainConfig.from_params(params(**overrides), seed=0, device="cpu")


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(SpecError, match=r"`precision` must be one of \['fp32', 'bf16'\], but got 'fp16'"):
        TrainConfig.from_params(params(), seed=0, device="cpu", precision="fp16")


def test_missing_training_params_are_named() -> None:
    p = params()
    del p["epochs"]
    with pytest.raises(SpecError, match="epochs"):
        TrainConfig.from_params(p, seed=0, device="cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(SpecError, match="tpu"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_asking_for_cuda_without_cuda_is_a_spec_error(name: str) -> None:
    with pytest.raises(SpecError, match="CUDA"):
        resolve_device(name)
    assert resolve_device("auto") != torch.device("cuda")
