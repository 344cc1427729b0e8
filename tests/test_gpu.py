"""The CUDA path: data on the GPU, bf16 autocast, channels_last, several workers sharing one GPU.

These need an NVIDIA GPU, so the default run deselects them (pyproject's ``-m "not gpu"``);
on a machine with one, ``make test-gpu`` (``pytest -m gpu``) runs them. CI has no GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from hpsearch.cli import cli
from hpsearch.data import SearchData, load_search_data
from hpsearch.knobs import defaults
from hpsearch.models import build_model
from hpsearch.tasks import make_task
from hpsearch.train import TrainConfig, evaluate, fit

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def mnist() -> SearchData:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU, and PyTorch sees none: run them with `make test-gpu` "
                    "on a machine with one")
    return load_search_data("mnist-5k", download=False)


def _fit(data: SearchData, family: str, precision: str, channels_last: bool | None = None,
         epochs: int = 4, task: str = "classify") -> tuple[torch.nn.Module, dict[str, float]]:
    params = {**defaults(), "conv_blocks": 2, "conv_channels": 32, "width": 128, "lr": 2e-3, "epochs": epochs}
    torch.manual_seed(0)
    model = build_model(family, params, image_shape=data.image_shape, n_classes=data.n_classes)
    config = TrainConfig.from_params(params, seed=0, device="cuda", precision=precision, channels_last=channels_last)
    result = fit(model, data, make_task(task, params), config, lambda step, metrics: None)
    return model, result.metrics


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_cnn_trains_on_the_gpu_in_both_precisions(mnist: SearchData, precision: str) -> None:
    torch.cuda.reset_peak_memory_stats()
    model, metrics = _fit(mnist, "cnn", precision)
    assert metrics["val_accuracy"] > 0.9  # chance is 0.1; 4 epochs on 4,500 digits
    assert all(math.isfinite(v) for v in metrics.values())
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights in fp32
    assert torch.cuda.max_memory_allocated() > 0


def _last_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    # Not the first: with one input channel, NCHW and NHWC weights are laid out alike.
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def test_conv_models_default_to_channels_last_on_cuda(mnist: SearchData) -> None:
    model, _ = _fit(mnist, "cnn", "bf16", epochs=1)
    assert _last_conv(model).weight.is_contiguous(memory_format=torch.channels_last)
    model, _ = _fit(mnist, "cnn", "bf16", channels_last=False, epochs=1)
    weight = _last_conv(model).weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)


def test_the_data_stays_on_the_gpu(mnist: SearchData) -> None:
    on_gpu = mnist.train.to(torch.device("cuda"))
    assert on_gpu.images.device.type == "cuda" and on_gpu.images.dtype == torch.uint8  # 1 byte a pixel
    assert on_gpu.labels.device.type == "cuda"


def test_bf16_and_fp32_agree_on_what_a_model_scores(mnist: SearchData) -> None:
    model, _ = _fit(mnist, "cnn", "fp32", epochs=2)
    task = make_task("classify", defaults())
    fp32 = evaluate(model, mnist.val, task, mean=mnist.mean, std=mnist.std, device="cuda")
    bf16 = evaluate(model, mnist.val, task, mean=mnist.mean, std=mnist.std, device="cuda", precision="bf16",
                    layout=torch.channels_last)
    assert abs(fp32["val_accuracy"] - bf16["val_accuracy"]) < 0.01
    assert fp32["val_loss"] == pytest.approx(bf16["val_loss"], rel=0.05)


def test_a_denoising_autoencoder_trains_in_bf16_about_as_well_as_in_fp32(mnist: SearchData) -> None:
    _, fp32 = _fit(mnist, "autoencoder", "fp32", task="denoise")
    _, bf16 = _fit(mnist, "autoencoder", "bf16", task="denoise")
    assert math.isfinite(bf16["val_mse"]) and bf16["val_psnr"] > 10.0
    assert abs(bf16["val_psnr"] - fp32["val_psnr"]) < 1.0, (fp32, bf16)


def test_two_workers_share_one_gpu(mnist: SearchData, tmp_path: Path) -> None:
    spec = {
        "study": {"name": "gpu-shared", "metric": "val_accuracy", "n_trials": 6, "sampler": {"type": "random"},
                  "pruner": "none"},
        "task": {"type": "classify", "dataset": "mnist-5k", "epochs": 3, "batch_size": 128, "precision": "bf16"},
        "model": {"family": "cnn"},
        "space": {"conv_channels": {"type": "int", "low": 16, "high": 32}, "lr": {"type": "float", "low": 1e-3,
                                                                                  "high": 3e-3, "log": True}},
    }
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(cli, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--gpus", "0",
                                      "--workers-per-gpu", "2"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="gpu-shared", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6
    assert {t.user_attrs["device"] for t in done} == {"cuda:0"}
    assert all(t.user_attrs["peak_gpu_memory_mb"] > 0 for t in done)
    assert max(t.value for t in done) > 0.9  # type: ignore[operator]
    # Two workers on one GPU: some trials ran at the same time.
    spans = sorted((t.datetime_start, t.datetime_complete) for t in done)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
