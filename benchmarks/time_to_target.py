"""Time to a target validation accuracy: an hpsearch study against a plain Optuna objective.

(a) hpsearch  the quickstart-like study of benchmarks/pruning.py run by `hpsearch.study.work`:
              its tensor loop, the median pruner, SQLite storage and MLflow tracking on.
(b) plain     the objective people write from Optuna's PyTorch example: the same search space
              suggested in the same order, the same network, data split, batch size and epochs,
              a torchvision-style DataLoader of PIL images with ToTensor + Normalize, no pruning,
              an in-memory study with the same TPE sampler and seed.

Trials alternate, one each, and each side adds up only its own trials' wall seconds; a side
stops once one of its trials ends at or above the target. Reported: those seconds (and
trials) to the first trial that reached the target. Setting up (data, stores, MLflow's
parent run) is reported beside them, not counted: it is paid once per study, not per trial.

Usage: python benchmarks/time_to_target.py [--target 0.95] [--max-trials 30] [--epochs 10] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from epoch_speed import PILDataset  # noqa: E402
from pruning import BATCH_SIZE, MEDIAN, VAL_FRACTION, Search, spec_raw  # noqa: E402

from hpsearch.data import SearchData, load_search_data  # noqa: E402
from hpsearch.spec import parse_spec  # noqa: E402


class PlainSearch:
    """(b): an in-memory Optuna study over a hand-written objective, the usual way."""

    def __init__(self, *, epochs: int, threads: int) -> None:
        torch.set_num_threads(threads)
        # The same split as hpsearch's (its loader, the study seed), read as PIL images.
        data = load_search_data("mnist-5k", val_fraction=VAL_FRACTION, seed=0)
        self.data, self.epochs = data, epochs
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((data.mean,), (data.std,))])
        self.train = DataLoader(PILDataset(data.train, transform), batch_size=BATCH_SIZE, shuffle=True)
        self.val = DataLoader(PILDataset(data.val, transform), batch_size=BATCH_SIZE)
        # The sampler hpsearch builds for this spec (seed 0, multivariate, grouped, 8 random trials).
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=8, multivariate=True, group=True)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.seconds = 0.0

    def step(self) -> float:
        started = time.perf_counter()
        self.study.optimize(self.objective, n_trials=1)
        self.seconds += time.perf_counter() - started
        return float(self.study.trials[-1].value)

    def objective(self, trial: optuna.Trial) -> float:
        # The quickstart's space, in hpsearch's order (conditional params last), so the sampler's
        # random start draws the same trials for both.
        n_layers = trial.suggest_int("n_layers", 1, 3)
        width = trial.suggest_int("width", 32, 256, log=True)
        dropout = trial.suggest_float("dropout", 0.0, 0.4)
        batchnorm = trial.suggest_categorical("batchnorm", [False, True])
        lr = trial.suggest_float("lr", 1e-4, 3e-2, log=True)
        optimizer_name = trial.suggest_categorical("optimizer", ["adam", "sgd"])
        momentum = trial.suggest_float("momentum", 0.5, 0.99) if optimizer_name == "sgd" else 0.9
        model = mlp(self.data, n_layers=n_layers, width=width, dropout=dropout, batchnorm=batchnorm)
        if optimizer_name == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        accuracy = 0.0
        for _ in range(self.epochs):
            model.train()
            for images, labels in self.train:
                optimizer.zero_grad()
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for images, labels in self.val:
                    correct += int((model(images).argmax(dim=1) == labels).sum())
            accuracy = correct / len(self.val.dataset)
        return accuracy


def mlp(data: SearchData, *, n_layers: int, width: int, dropout: float, batchnorm: bool) -> nn.Module:
    """Return the network hpsearch builds for these knobs, written out with stock modules."""
    layers: list[nn.Module] = [nn.Flatten()]
    n_in = data.image_shape[1] * data.image_shape[2]
    for _ in range(n_layers):
        layers.append(nn.Linear(n_in, width, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = width
    layers.append(nn.Linear(n_in, data.n_classes))
    return nn.Sequential(*layers)


def measure(*, target: float = 0.95, max_trials: int = 30, epochs: int = 10,
            threads: int | None = None) -> dict[str, Any]:
    """Return, per side, the seconds and trials to the first trial at or above ``target``."""
    threads = threads or os.cpu_count() or 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."
    with tempfile.TemporaryDirectory(prefix="hpsearch-target-") as tmp:
        started = time.perf_counter()
        spec = parse_spec(spec_raw("time-to-target", pruner=MEDIAN, epochs=epochs, n_trials=max_trials,
                                   tracking=True),
                          source="benchmarks/time_to_target.py", runs_dir=Path(tmp))
        ours = Search(spec, threads=threads)
        setup = {"hpsearch": time.perf_counter() - started}
        started = time.perf_counter()
        plain = PlainSearch(epochs=epochs, threads=threads)
        setup["plain"] = time.perf_counter() - started
        ours.warm_up()
        sides = {"hpsearch": ours, "plain": plain}
        reached: dict[str, dict[str, float] | None] = {"hpsearch": None, "plain": None}
        best = {"hpsearch": 0.0, "plain": 0.0}
        for i in range(max_trials):
            for label in (("hpsearch", "plain") if i % 2 == 0 else ("plain", "hpsearch")):
                if reached[label] is not None:
                    continue
                value = sides[label].step()
                best[label] = max(best[label], value) if value == value else best[label]
                if value >= target:
                    reached[label] = {"seconds": sides[label].seconds, "trials": i + 1}
            if all(r is not None for r in reached.values()):
                break
        return {"target": target, "reached": reached, "best": best, "setup": setup, "max_trials": max_trials,
                "seconds": {label: s.seconds for label, s in sides.items()}, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.95, help="validation accuracy to reach")
    parser.add_argument("--max-trials", type=int, default=30, help="trials per side at most")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial (when not pruned)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    r = measure(target=args.target, max_trials=args.max_trials, epochs=args.epochs, threads=args.threads)
    print(f"target val_accuracy {r['target']} on mnist-5k, up to {r['max_trials']} trials x {r['epochs']} epochs\n")
    print("| side | seconds to target | trials to target | best val_accuracy | setup s (not counted) |")
    print("|---|---:|---:|---:|---:|")
    for label in ("hpsearch", "plain"):
        hit = r["reached"][label]
        seconds = f"{hit['seconds']:.1f}" if hit else f"not reached ({r['seconds'][label]:.1f} s spent)"
        trials = f"{hit['trials']:.0f}" if hit else "-"
        print(f"| {label} | {seconds} | {trials} | {r['best'][label]:.4f} | {r['setup'][label]:.1f} |")


if __name__ == "__main__":
    main()
