"""What on-device augmentation costs: a `fit` epoch with and without it, side by side.

For each model of benchmarks/epoch_speed.py (the MLP, the CNN) and each setting (shift only; shift,
rotation and zoom), the same model trains one epoch at a time with augmentation off and on, the
epochs interleaved so that a busy neighbour slows both alike; the table gives the best epoch of
each and the cost in per cent. The goal (issue #14) is <= 15 % on the CPU.

Usage: python benchmarks/augment_cost.py [--models mlp,cnn] [--epochs 3] [--train-limit N] [--threads 2]
                                         [--device cpu|cuda] [--dataset fashion-mnist|mnist-5k]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hpsearch  # noqa: E402,F401  before torch: its OpenMP wait policy holds for both sides

import torch  # noqa: E402

import epoch_speed  # noqa: E402
from hpsearch.data import SearchData  # noqa: E402
from hpsearch.tasks import make_task  # noqa: E402
from hpsearch.train import TrainConfig, fit  # noqa: E402

GOAL = 0.15  # at most 15 % slower than the same epoch without augmentation
SETTINGS: dict[str, dict[str, float]] = {
    "shift 2": {"augment_shift": 2},
    "shift 2, flip": {"augment_shift": 2, "augment_flip": True},
    "shift 2, rotate 10, zoom 0.1": {"augment_shift": 2, "augment_rotate": 10.0, "augment_scale": 0.1},
}


@dataclass(frozen=True)
class Cost:
    """Best seconds per epoch without and with one augmentation setting."""

    model: str
    setting: str
    plain: float
    augmented: float

    @property
    def extra(self) -> float:
        return self.augmented / self.plain - 1.0


def epoch_seconds(case: epoch_speed.Case, data: SearchData, model: torch.nn.Module, *, seed: int, device: str,
                  augment: dict[str, float]) -> float:
    """Return the seconds of one `fit` epoch of ``model`` (trained in place) with ``augment``'s knobs."""
    config = TrainConfig(epochs=1, batch_size=128, optimizer="adam", lr=epoch_speed.LR, seed=seed, device=device,
                         **augment)
    result = fit(model, data, make_task(case.task, case.params), config, lambda step, metrics: None)
    return result.history[0]["epoch_seconds"]


def measure(models: list[str], data: SearchData, *, epochs: int, device: str = "cpu") -> list[Cost]:
    """Return the cost of each setting for each model, epochs off and on interleaved."""
    costs = []
    for name in models:
        case = epoch_speed.CASES[name]
        for label, augment in SETTINGS.items():
            plain_model, augmented_model = (epoch_speed.fresh_model(case, data) for _ in range(2))
            times: dict[bool, list[float]] = {False: [], True: []}
            for seed in range(epochs + 1):  # the first epoch of each is a warm-up
                for on in (False, True):
                    seconds = epoch_seconds(case, data, augmented_model if on else plain_model, seed=seed,
                                            device=device, augment=augment if on else {})
                    if seed > 0:
                        times[on].append(seconds)
            costs.append(Cost(case.label, label, min(times[False]), min(times[True])))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated, from " + ",".join(epoch_speed.CASES))
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per side (best shown)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--train-limit", type=int, default=20000, help="cap on train+validation images")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or mnist-5k")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = epoch_speed.load_data(train_limit=args.train_limit, dataset=args.dataset)
    print(f"{args.dataset}: {len(data.train)} train + {len(data.val)} validation images; {torch.get_num_threads()} "
          f"threads; {args.device}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| model | augmentation | s/epoch off | s/epoch on | cost | goal <= 15 % |")
    print("|---|---|---:|---:|---:|---|")
    for c in measure(args.models.split(","), data, epochs=args.epochs, device=args.device):
        print(f"| {c.model} | {c.setting} | {c.plain:.3f} | {c.augmented:.3f} | {100 * c.extra:+.1f} % | "
              f"{'met' if c.extra <= GOAL else '**not met**'} |", flush=True)


if __name__ == "__main__":
    main()
