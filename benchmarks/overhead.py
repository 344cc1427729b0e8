"""The price of tracking and storage: a real trial against the bare training loop it wraps.

(a) a trial   `hpsearch.study.work` runs one trial of a small spec: SQLite Optuna storage and
              SQLite MLflow store in a temp dir, per-epoch metrics to both, the final confusion
              matrix and the model as artifacts, the dashboard notes, and every 5 trials the
              study's plots (so the mean over a multiple of 5 trials carries their share).
(b) bare      `hpsearch.train.fit` with the same params, seed and data, the same input
              standardisation and validation passes (the study's reports per epoch),
              reporting to nobody.

The two alternate (a, b, b, a, ...) after one warm-up trial (imports, first writes to new
stores). Goal: a trial costs at most 3 % more than its bare loop.

Usage: python benchmarks/overhead.py [--trials 10] [--epochs 8] [--train-limit 20000] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpsearch import space  # noqa: E402
from hpsearch.models import build_model  # noqa: E402
from hpsearch.spec import Spec, parse_spec  # noqa: E402
from hpsearch.study import open_study, setup_worker, work  # noqa: E402
from hpsearch.tasks import make_task  # noqa: E402
from hpsearch.train import TrainConfig, fit  # noqa: E402

GOAL = 0.03  # a trial may cost at most 3 % more than its bare training loop


def spec_raw(*, epochs: int, train_limit: int) -> dict[str, Any]:
    """Return a small classify spec: an MLP on capped Fashion-MNIST; only the learning rate varies."""
    return {
        "study": {"name": "overhead", "metric": "val_accuracy", "n_trials": 1, "seed": 0,
                  "sampler": {"type": "random"}, "pruner": "none"},
        "task": {"type": "classify", "dataset": "fashion-mnist", "val_fraction": 0.1, "train_limit": train_limit,
                 "epochs": epochs, "batch_size": 128, "device": "cpu"},
        "model": {"family": "mlp"},
        # A narrow range: every trial trains the same network for as long; only the numbers differ.
        "space": {"n_layers": 2, "width": 256, "dropout": 0.1, "optimizer": "adam",
                  "lr": {"type": "float", "low": 1.0e-3, "high": 2.0e-3}},
        "tracking": {"enabled": True},
    }


def measure(*, trials: int = 10, epochs: int = 8, train_limit: int = 20000,
            threads: int | None = None) -> dict[str, Any]:
    """Return per-trial seconds with tracking and storage, and of the same bare fits, interleaved."""
    threads = threads or os.cpu_count() or 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."
    logging.getLogger("hpsearch").setLevel(logging.ERROR)  # the benchmark prints its own lines
    with tempfile.TemporaryDirectory(prefix="hpsearch-overhead-") as tmp:
        spec = parse_spec(spec_raw(epochs=epochs, train_limit=train_limit), source="benchmarks/overhead.py",
                          runs_dir=Path(tmp))
        started = time.perf_counter()
        study = open_study(spec)
        setup = setup_worker(spec, study, threads=threads)
        setup_seconds = time.perf_counter() - started
        work(_with_total(spec, 1), study, setup)  # warm-up: imports, first writes, the stores' tables
        tracked: list[float] = []
        bare: list[float] = []
        for i in range(trials):
            # Alternate which goes first, so neither always follows the other's clean-up.
            order = (_tracked_trial, _bare_fit) if i % 2 == 0 else (_bare_fit, _tracked_trial)
            for run in order:
                seconds = run(spec, study, setup, total=i + 2)
                (tracked if run is _tracked_trial else bare).append(seconds)
    return {"tracked": tracked, "bare": bare, "setup_seconds": setup_seconds, "epochs": epochs,
            "n_train": len(setup.data.train), "threads": threads}


def _with_total(spec: Spec, n_trials: int) -> Spec:
    return dataclasses.replace(spec, study=dataclasses.replace(spec.study, n_trials=n_trials))


def _tracked_trial(spec: Spec, study: Any, setup: Any, *, total: int) -> float:
    """Return the wall seconds of one trial run the way a worker runs it."""
    started = time.perf_counter()
    ran = work(_with_total(spec, total), study, setup)
    seconds = time.perf_counter() - started
    if ran != 1:
        raise RuntimeError(f"expected the worker to run 1 trial, but it ran {ran}.")
    return seconds


def _bare_fit(spec: Spec, study: Any, setup: Any, *, total: int) -> float:
    """Return the wall seconds of `fit` alone, with the params and seed of trial ``total - 1``."""
    # Before its tracked twin runs, trial total-1 does not exist yet: use the latest finished one
    # (the same network, a learning rate in the same narrow range).
    trial = study.get_trials(deepcopy=False)[-1]
    params = {**space.base_params(spec), **trial.params}
    seed = int(trial.user_attrs["seed"])
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(spec.model.family, params, image_shape=setup.data.image_shape,
                        n_classes=setup.data.n_classes)
    task = make_task(spec.task.type, params)
    # The same training as the trial's: its input standardisation, and as many validation passes
    # (the study's reports per epoch), so that what differs is tracking and storage alone.
    mean, std = setup.input_stats
    config = TrainConfig.from_params(params, seed=seed, device="cpu", precision=spec.task.precision,
                                     channels_last=spec.task.channels_last)
    fit(model, setup.data, task, config, lambda step, m: None, mean=mean, std=std,
        reports_per_epoch=setup.reports_per_epoch)
    return time.perf_counter() - started


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Return the overhead as a fraction (means: the plots' share included) and per-trial ms."""
    tracked, bare = result["tracked"], result["bare"]
    mean_ratio = statistics.fmean(tracked) / statistics.fmean(bare)
    median_ratio = statistics.median(tracked) / statistics.median(bare)
    per_trial_ms = 1000 * statistics.median(t - b for t, b in zip(tracked, bare))
    mean_ms = 1000 * (statistics.fmean(tracked) - statistics.fmean(bare))
    return {"mean_ratio": mean_ratio, "median_ratio": median_ratio, "per_trial_ms": per_trial_ms,
            "mean_ms": mean_ms, "bare_s": statistics.median(bare), "tracked_s": statistics.median(tracked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="measured trials (after one warm-up)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial")
    parser.add_argument("--train-limit", type=int, default=20000, help="Fashion-MNIST train+validation images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    result = measure(trials=args.trials, epochs=args.epochs, train_limit=args.train_limit, threads=args.threads)
    s = summarize(result)
    print(f"{args.trials} trials x {result['epochs']} epochs on {result['n_train']} images, "
          f"{result['threads']} threads; worker setup (data, stores, parent run) {result['setup_seconds']:.1f} s")
    print("tracked:", " ".join(f"{t:.2f}" for t in result["tracked"]))
    print("bare:   ", " ".join(f"{t:.2f}" for t in result["bare"]))
    print(f"median trial {s['tracked_s']:.2f} s vs bare fit {s['bare_s']:.2f} s: "
          f"overhead {100 * (s['median_ratio'] - 1):+.1f} % (medians), {100 * (s['mean_ratio'] - 1):+.1f} % "
          f"(means, plots included); {s['per_trial_ms']:.0f} ms per trial (median of pairs), "
          f"{s['mean_ms']:.0f} ms (means); goal <= {100 * GOAL:.0f} %")


if __name__ == "__main__":
    main()
