"""One training epoch: hpsearch's `fit` loop against the usual DataLoader pipeline and the FLOP floor.

All three see the same data (Fashion-MNIST's 60,000 training images, split 54,000 train /
6,000 validation by hpsearch.data), the same model (MLP 784-128-64-10, dropout 0.2), the same
optimizer (Adam, lr 1e-3) and batch size (128). An "epoch" is one pass over the training
split plus one over the validation split, in both pipelines.

    (a) hpsearch  `hpsearch.train.fit`: uint8 tensors on the device, batches by index.
    (b) DataLoader the pipeline of Optuna's PyTorch example: a torchvision-style Dataset of PIL
                   images, ToTensor + Normalize, DataLoader(batch_size=128, shuffle=True).
    (c) floor      the model's FLOPs per epoch (forward + backward ~ 3x forward) divided by the
                   machine's measured peak float32 matmul throughput.

Usage: python benchmarks/epoch_speed.py [--epochs 5] [--threads 2] [--batch-size 128] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpsearch.data import SearchData, Split, load_search_data  # noqa: E402
from hpsearch.knobs import defaults  # noqa: E402
from hpsearch.models import build_model  # noqa: E402
from hpsearch.tasks import make_task  # noqa: E402
from hpsearch.train import TrainConfig, fit  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
LR = 1e-3
# MLP 784-128-64-10 with dropout 0.2, in hpsearch's flat params.
PARAMS = {**defaults(), "n_layers": 2, "width_0": 128, "width_1": 64, "dropout": 0.2, "activation": "relu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per pipeline (best and median shown)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--data-dir", default=FASHION_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of both pipelines")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_search_data("fashion-mnist", data_dir=args.data_dir, val_fraction=0.1, seed=0, download=False)
    print(f"Fashion-MNIST: {len(data.train)} train + {len(data.val)} validation images; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; CPU; batch size {args.batch_size}; "
          f"{args.epochs} epochs each\n",
          flush=True)

    # The pipelines take turns, an epoch each: a busy neighbour slows them alike, not one of them.
    hpsearch, loader = HpsearchLoop(data, args.batch_size), DataLoaderLoop(data, args.batch_size)
    seconds: dict[str, list[float]] = {"hpsearch": [], "dataloader": [], "loader_only": []}
    for _ in range(args.epochs):
        seconds["hpsearch"].append(hpsearch.epoch())
        seconds["dataloader"].append(loader.epoch(with_model=True))
        seconds["loader_only"].append(loader.epoch(with_model=False))
    # Best of the epochs: on a shared machine, the least disturbed one is the truest.
    best = {k: min(v) for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    flops, peak = epoch_flops(data), peak_matmul_flops()
    floor = flops / peak

    ours = best["hpsearch"]
    rows = [("(a) hpsearch `fit`", "hpsearch"),
            ("(b) DataLoader + PIL + ToTensor/Normalize", "dataloader"),
            ("(b') the same DataLoader, no model", "loader_only")]
    print("| pipeline | best s/epoch | median s/epoch | best, relative to hpsearch |")
    print("|---|---:|---:|---:|")
    for label, key in rows:
        print(f"| {label} | {best[key]:.3f} | {median[key]:.3f} | {best[key] / ours:.1f}x |")
    print(f"| (c) FLOP floor: {flops / 1e9:.1f} GFLOP at {peak / 1e9:.0f} GFLOP/s | {floor:.3f} | | "
          f"{floor / ours:.2f}x |")
    print(f"\nDataLoader / hpsearch = {best['dataloader'] / ours:.1f}x (medians: "
          f"{median['dataloader'] / median['hpsearch']:.1f}x); hpsearch / floor = {ours / floor:.1f}x")


def fresh_model(data: SearchData) -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", PARAMS, image_shape=data.image_shape, n_classes=data.n_classes)


class HpsearchLoop:
    """(a): one `fit` call per epoch, on one model that keeps training."""

    def __init__(self, data: SearchData, batch_size: int) -> None:
        self.data, self.batch_size, self.model, self.seed = data, batch_size, fresh_model(data), 0
        self.task = make_task("classify", PARAMS)

    def epoch(self) -> float:
        self.seed += 1  # a new shuffle each epoch, as one long fit would draw
        config = TrainConfig(epochs=1, batch_size=self.batch_size, optimizer="adam", lr=LR, seed=self.seed,
                             device="cpu")
        result = fit(self.model, self.data, self.task, config, lambda step, metrics: None)
        return result.history[0]["epoch_seconds"]


class PILDataset(Dataset):
    """What torchvision.datasets.FashionMNIST does per sample: uint8 tensor → PIL image → transform."""

    def __init__(self, split: Split, transform: transforms.Compose) -> None:
        self.data, self.targets, self.transform = split.images[:, 0].cpu(), split.labels.cpu(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = self.data[index], int(self.targets[index])
        return self.transform(Image.fromarray(img.numpy(), mode="L")), target


class DataLoaderLoop:
    """(b): the loop of Optuna's PyTorch example, over torchvision-style PIL datasets."""

    def __init__(self, data: SearchData, batch_size: int) -> None:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((data.mean,), (data.std,))])
        self.train = DataLoader(PILDataset(data.train, transform), batch_size=batch_size, shuffle=True)
        self.val = DataLoader(PILDataset(data.val, transform), batch_size=batch_size)
        self.model = fresh_model(data)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def epoch(self, *, with_model: bool) -> float:
        """Return the seconds of one epoch: train, then validation accuracy (or only the batches)."""
        started = time.perf_counter()
        self.model.train()
        for images, labels in self.train:
            if with_model:
                self.optimizer.zero_grad()
                loss = F.cross_entropy(self.model(images), labels)
                loss.backward()
                self.optimizer.step()
        self.model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in self.val:
                if with_model:
                    correct += int((self.model(images).argmax(dim=1) == labels).sum())
        return time.perf_counter() - started


def epoch_flops(data: SearchData) -> float:
    """Return the matmul FLOPs of one epoch: 3x forward on the training split, 1x on validation."""
    forward = sum(2 * m.in_features * m.out_features for m in fresh_model(data).modules()
                  if isinstance(m, nn.Linear))
    return forward * (3 * len(data.train) + len(data.val))


def peak_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """Return the best float32 FLOP/s of a big square matmul on this machine's CPU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up the BLAS threads
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


if __name__ == "__main__":
    main()
