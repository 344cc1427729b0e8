"""One training epoch: hpsearch's `fit` loop against the usual DataLoader pipeline and the FLOP floor.

For each model (the MLP, the CNN, the denoising autoencoder) both pipelines see the same data
(Fashion-MNIST's training images, split train / validation by hpsearch.data, optionally capped
with --train-limit), the same model, the same optimizer (Adam, lr 1e-3) and batch size (128).
An "epoch" is one pass over the training split plus one over the validation split, in both.

    (a) hpsearch  `hpsearch.train.fit`: uint8 tensors on the device, batches by index.
    (a0)          the CNN only: the same `fit` on the CNN as it was before issue 14, each ReLU
                  before its max pool and the default (NCHW) layout on the CPU; now the CNN pools
                  first (same numbers, a quarter of the activations) and runs in channels_last.
    (b) DataLoader the pipeline of Optuna's PyTorch example: a torchvision-style Dataset of PIL
                   images, ToTensor + Normalize, DataLoader(batch_size=128, shuffle=True), and the
                   model as people write it: the same layers and initial weights, from torch.nn
                   alone (nn.Dropout, not hpsearch's faster-mask Dropout), with torch.optim.Adam's
                   defaults. The autoencoder's noise is added per batch in the loop.
    (b'')          the same DataLoader loop training hpsearch's own model: what the data path
                   alone is worth, apart from the model and optimizer.
    (c) floor      the epoch's FLOPs (forward and backward, counted by torch's FlopCounterMode)
                   divided by the machine's measured peak float32 matmul throughput.

On a GPU (--device cuda) both pipelines train there: (a) keeps the data on the GPU, (b) copies
each batch from the DataLoader to it, as Optuna's example does; --precision bf16 adds a row for
hpsearch under bfloat16 autocast (channels_last for the CNN), whose floor would be lower still.
--dataset mnist-5k runs it where Fashion-MNIST is not installed (4,500 + 500 images).

Usage: python benchmarks/epoch_speed.py [--models mlp,cnn,autoencoder] [--epochs 3] [--train-limit N]
                                        [--threads 2] [--batch-size 128] [--data-dir DIR]
                                        [--device cpu|cuda] [--precision fp32|bf16] [--dataset NAME]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
import hpsearch  # noqa: E402,F401  before torch: its OpenMP wait policy holds for both pipelines

import torch  # noqa: E402
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from hpsearch.data import SearchData, Split, load_search_data  # noqa: E402
from hpsearch.knobs import defaults  # noqa: E402
from hpsearch.models import Dropout as HpsearchDropout  # noqa: E402
from hpsearch.models import _cnn, build_model, read_arch  # noqa: E402
from hpsearch.tasks import make_task  # noqa: E402
from hpsearch.train import TrainConfig, fit  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
LR = 1e-3
NOISE_STD = 0.3  # the denoising autoencoder's gaussian noise, as in studies/bottleneck.yaml


@dataclass(frozen=True)
class Case:
    """One model of the comparison: its family, its task and its params."""

    family: str
    task: str
    params: dict[str, Any]
    label: str


CASES: dict[str, Case] = {
    "mlp": Case("mlp", "classify", {**defaults(), "n_layers": 2, "width_0": 128, "width_1": 64, "dropout": 0.2},
                "MLP 784-128-64-10, dropout 0.2"),
    # Channels 16 -> 32: LeNet-sized, so that an epoch stays a few seconds on 2 cores.
    "cnn": Case("cnn", "classify", {**defaults(), "conv_blocks": 2, "conv_channels": 16, "kernel_size": 3,
                                    "n_layers": 1, "width": 128},
                "CNN conv16-conv32-128-10"),
    "autoencoder": Case("autoencoder", "denoise", {**defaults(), "encoder": "dense", "n_layers": 1, "width": 256,
                                                  "bottleneck_dim": 32, "noise_std": NOISE_STD},
                        "denoising AE 784-256-32-256-784"),
}


@dataclass(frozen=True)
class EpochResult:
    """Seconds per epoch of each pipeline for one model, and the FLOP floor."""

    case: Case
    hpsearch: list[float]
    hpsearch_bf16: list[float]  # empty unless asked for
    hpsearch_before: list[float]  # the CNN's path before issue 14 (empty for the other models)
    dataloader: list[float]
    dataloader_our_model: list[float]
    loader_only: list[float]
    gflop: float
    floor: float  # seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn,autoencoder", help="comma-separated, from " + ",".join(CASES))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per pipeline (best and median shown)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--data-dir", default=FASHION_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--train-limit", type=int, default=None, help="cap on train+validation images")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of both pipelines")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both pipelines train")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: also time hpsearch under bfloat16 autocast")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or mnist-5k")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_data(args.data_dir, args.train_limit, dataset=args.dataset)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.dataset}: {len(data.train)} train + {len(data.val)} validation images; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; {where}; batch size {args.batch_size}; "
          f"{args.epochs} epochs each\n", flush=True)
    peak = peak_matmul_flops(device=device)
    print("| model | pipeline | best s/epoch | median s/epoch | best, relative to hpsearch |")
    print("|---|---|---:|---:|---:|")
    for name in args.models.split(","):
        r = measure_case(CASES[name], data, epochs=args.epochs, batch_size=args.batch_size, peak=peak,
                         device=device, bf16=args.precision == "bf16")
        ours = min(r.hpsearch)
        rows = [("(a) hpsearch `fit`", r.hpsearch)]
        if r.hpsearch_before:
            rows.append(("(a0) hpsearch `fit`, the CNN before issue 14 (ReLU before pool, NCHW)", r.hpsearch_before))
        if r.hpsearch_bf16:
            layout = ", channels_last" if name == "cnn" and device.type == "cuda" else ""
            rows.append((f"(a') hpsearch `fit`, bf16 autocast{layout}", r.hpsearch_bf16))
        rows += [("(b) DataLoader + PIL + ToTensor/Normalize, torch.nn model", r.dataloader),
                 ("(b'') the same DataLoader, hpsearch's model", r.dataloader_our_model),
                 ("(b') the same DataLoader, no model", r.loader_only)]
        for label, times in rows:
            print(f"| {r.case.label} | {label} | {min(times):.3f} | {statistics.median(times):.3f} | "
                  f"{min(times) / ours:.2f}x |")
        print(f"| {r.case.label} | (c) FLOP floor: {r.gflop:.1f} GFLOP at {peak / 1e9:.0f} GFLOP/s (fp32) | "
              f"{r.floor:.3f} | | {r.floor / ours:.2f}x |", flush=True)


def load_data(data_dir: str = FASHION_DIR, train_limit: int | None = None, *,
              dataset: str = "fashion-mnist") -> SearchData:
    """Return the dataset's training images split 90/10 (capped at ``train_limit`` images)."""
    return load_search_data(dataset, data_dir=data_dir, val_fraction=0.1, seed=0, download=False,
                            train_limit=train_limit)


def measure_case(case: Case, data: SearchData, *, epochs: int, batch_size: int = 128,
                 peak: float | None = None, device: torch.device = torch.device("cpu"),
                 bf16: bool = False) -> EpochResult:
    """Return the seconds per epoch of both pipelines for ``case``, their epochs interleaved."""
    # The pipelines take turns, an epoch each: a busy neighbour slows them alike, not one of them.
    ours = HpsearchLoop(case, data, batch_size, device=str(device))
    ours_bf16 = HpsearchLoop(case, data, batch_size, device=str(device), precision="bf16") if bf16 else None
    before = HpsearchLoop(case, data, batch_size, device=str(device), before=True) if case.family == "cnn" else None
    loader = DataLoaderLoop(case, data, batch_size, device=device)
    loader_our_model = DataLoaderLoop(case, data, batch_size, device=device, stock=False)
    # Warm-up: first-touch allocations, thread pools.
    ours.epoch(), loader.epoch(with_model=True), loader_our_model.epoch(with_model=True)
    for extra in (ours_bf16, before):
        if extra:
            extra.epoch()
    # Not `hpsearch`: that name is the package, imported first for its OpenMP policy.
    ours_times, hpsearch_bf16, hpsearch_before, dataloader, dataloader_our_model, loader_only = [], [], [], [], [], []
    for _ in range(epochs):
        ours_times.append(ours.epoch())
        if ours_bf16:
            hpsearch_bf16.append(ours_bf16.epoch())
        if before:
            hpsearch_before.append(before.epoch())
        dataloader.append(loader.epoch(with_model=True))
        dataloader_our_model.append(loader_our_model.epoch(with_model=True))
        loader_only.append(loader.epoch(with_model=False))
    flops = epoch_flops(case, data, batch_size)
    peak = peak or peak_matmul_flops(device=device)
    return EpochResult(case=case, hpsearch=ours_times, hpsearch_bf16=hpsearch_bf16, hpsearch_before=hpsearch_before,
                       dataloader=dataloader,
                       dataloader_our_model=dataloader_our_model, loader_only=loader_only, gflop=flops / 1e9,
                       floor=flops / peak)


def fresh_model(case: Case, data: SearchData, *, before: bool = False) -> nn.Module:
    """Return the case's model, seeded; ``before``: the CNN in its order before issue 14 (same weights)."""
    torch.manual_seed(0)
    if before:
        return _cnn(data.image_shape, read_arch(case.family, case.params), data.n_classes, pool_first=False)
    return build_model(case.family, case.params, image_shape=data.image_shape, n_classes=data.n_classes)


def stock_model(model: nn.Module) -> nn.Module:
    """Return ``model`` as people write it: a copy with torch.nn's own Dropout in place of hpsearch's."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, HpsearchDropout):
                setattr(parent, name, nn.Dropout(child.p))
    return model


class HpsearchLoop:
    """(a): one `fit` call per epoch, on one model that keeps training."""

    def __init__(self, case: Case, data: SearchData, batch_size: int, *, device: str = "cpu",
                 precision: str = "fp32", before: bool = False) -> None:
        self.data, self.batch_size, self.model, self.seed = data, batch_size, fresh_model(case, data, before=before), 0
        self.task = make_task(case.task, case.params)
        self.device, self.precision = device, precision
        # Before issue 14 the CPU kept the default layout (channels_last was auto: CUDA only).
        self.channels_last = False if before and torch.device(device).type == "cpu" else None

    def epoch(self) -> float:
        self.seed += 1  # a new shuffle each epoch, as one long fit would draw
        config = TrainConfig(epochs=1, batch_size=self.batch_size, optimizer="adam", lr=LR, seed=self.seed,
                             device=self.device, precision=self.precision, channels_last=self.channels_last)
        result = fit(self.model, self.data, self.task, config, lambda step, metrics: None)
        return result.history[0]["epoch_seconds"]


class PILDataset(Dataset):
    """What torchvision.datasets.FashionMNIST does per sample: uint8 tensor → PIL image → transform."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], Tensor]) -> None:
        self.data, self.targets, self.transform = split.images[:, 0].cpu(), split.labels.cpu(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, target = self.data[index], int(self.targets[index])
        return self.transform(Image.fromarray(img.numpy(), mode="L")), target


class DataLoaderLoop:
    """(b): the loop of Optuna's PyTorch example, over torchvision-style PIL datasets."""

    def __init__(self, case: Case, data: SearchData, batch_size: int, *,
                 device: torch.device = torch.device("cpu"), stock: bool = True) -> None:
        self.classify, self.device = case.task == "classify", device
        self.mean, self.std = data.mean, data.std
        # A classifier normalises in the transform; a denoiser needs the clean [0, 1] pixels as its
        # target, so it adds noise and normalises in the loop.
        steps = [transforms.ToTensor()] + ([transforms.Normalize((data.mean,), (data.std,))] if self.classify else [])
        transform = transforms.Compose(steps)
        self.train = DataLoader(PILDataset(data.train, transform), batch_size=batch_size, shuffle=True)
        self.val = DataLoader(PILDataset(data.val, transform), batch_size=batch_size)
        model = fresh_model(case, data)
        self.model = (stock_model(model) if stock else model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        if self.classify:
            return F.cross_entropy(self.model(images), labels)
        noisy = (images + NOISE_STD * torch.randn_like(images)).clamp(0.0, 1.0)
        return F.mse_loss(self.model((noisy - self.mean) / self.std), images)

    def epoch(self, *, with_model: bool) -> float:
        """Return the seconds of one epoch: train, then the validation metric (or only the batches)."""
        started = time.perf_counter()
        self.model.train()
        for images, labels in self.train:
            if with_model:
                images, labels = images.to(self.device), labels.to(self.device)
                self.optimizer.zero_grad()
                self.loss(images, labels).backward()
                self.optimizer.step()
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for images, labels in self.val:
                if with_model:
                    images, labels = images.to(self.device), labels.to(self.device)
                    total += float(self.loss(images, labels)) * len(labels)
        return time.perf_counter() - started


def epoch_flops(case: Case, data: SearchData, batch_size: int) -> float:
    """Return the FLOPs of one epoch: a training step per training batch, a forward per validation batch."""
    model = fresh_model(case, data)
    images = torch.randn(batch_size, *data.image_shape)
    with FlopCounterMode(display=False) as train_step:
        model(images).square().mean().backward()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(images)
    return (train_step.get_total_flops() * len(data.train) + forward.get_total_flops() * len(data.val)) / batch_size


def peak_matmul_flops(size: int = 2048, repeats: int = 5, *, device: torch.device = torch.device("cpu")) -> float:
    """Return the best float32 FLOP/s of a big square matmul on ``device`` (the CPU by default)."""
    if device.type == "cuda":
        size, repeats = 8192, 10
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm up the BLAS threads
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
