"""Trial packs against today's one-trial `fit`: trials' epochs per minute, on the quickstart's MLP space.

Members are drawn from studies/quickstart.yaml's space by Optuna's random sampler, with the
structure key fixed (2 hidden layers, ReLU, no batchnorm, Adam, batch 64: what a pack shares), so
they differ in widths (32-256, padded to the widest), learning rate, dropout and seed, as a study's
trials of one key do. Pack 1 is `hpsearch.train.fit`, one trial after another; pack K trains K such
trials at once with `hpsearch.pack.Pack`. Every trial runs `--epochs` epochs with a validation
pass per epoch on both sides; the figure is trial-epochs per minute of wall time.

Usage: python benchmarks/packs.py [--ks 4,16,64] [--epochs 1] [--fits 4] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
import hpsearch  # noqa: E402,F401  before torch: its OpenMP wait policy holds for both sides

import optuna  # noqa: E402
import torch  # noqa: E402

from hpsearch import space  # noqa: E402
from hpsearch.data import SearchData, load_search_data  # noqa: E402
from hpsearch.models import build_model  # noqa: E402
from hpsearch.pack import Pack, structure_key  # noqa: E402
from hpsearch.spec import load_spec  # noqa: E402
from hpsearch.tasks import make_task  # noqa: E402
from hpsearch.train import TrainConfig, fit, resolve_device  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml"
KEY = {"n_layers": 2, "batchnorm": False, "optimizer": "adam"}  # the commonest key of the space; relu, batch 64


def draw_members(n: int, *, epochs: int, seed: int = 0) -> list[dict]:
    """Return ``n`` params sets from the quickstart space with the structure ``KEY`` fixed."""
    spec = load_spec(QUICKSTART)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    members = []
    for _ in range(n):
        study.enqueue_trial(KEY)
        trial = study.ask()
        members.append({**space.suggest(trial, spec), "epochs": epochs})
        study.tell(trial, 0.0)
    return members


def fits_per_minute(data: SearchData, members: list[dict], *, device: str) -> float:
    """Return trial-epochs per minute of one `fit` after another (pack 1)."""
    started = time.perf_counter()
    for seed, params in enumerate(members):
        torch.manual_seed(seed)
        model = build_model("mlp", params, image_shape=data.image_shape, n_classes=data.n_classes)
        fit(model, data, make_task("classify", params), TrainConfig.from_params(params, seed=seed, device=device),
            lambda step, metrics: None)
    return sum(p["epochs"] for p in members) / (time.perf_counter() - started) * 60


def pack_per_minute(data: SearchData, members: list[dict], *, device: str) -> float:
    """Return trial-epochs per minute of one pack of all ``members``."""
    started = time.perf_counter()
    pack = Pack(data, make_task("classify", members[0]), structure_key(members[0]), capacity=len(members),
                device=device)
    for seed, params in enumerate(members):
        pack.add(params, seed=seed, report=lambda step, metrics: None)
    pack.drain()
    return sum(p["epochs"] for p in members) / (time.perf_counter() - started) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="4,16,64", help="pack sizes to compare with pack 1")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial")
    parser.add_argument("--fits", type=int, default=4, help="trials timed for pack 1 (one fit after another)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    data = load_search_data("mnist-5k", val_fraction=0.2, download=False)  # the quickstart's split
    ks = [int(k) for k in args.ks.split(",")]
    members = draw_members(max([args.fits, *ks]), epochs=args.epochs)
    # Warm-up (first calls load kernels and grow thread pools), then fit timed before and after the
    # packs: on a shared machine the load changes under a run, and the better of the two is shown.
    fits_per_minute(data, members[:1], device=device)
    pack_per_minute(data, members[:2], device=device)
    single_before = fits_per_minute(data, members[: args.fits], device=device)
    packs = [(k, pack_per_minute(data, members[:k], device=device)) for k in ks]
    single = max(single_before, fits_per_minute(data, members[: args.fits], device=device))
    rows = [("1 (fit)", single, 1.0), *[(str(k), rate, rate / single) for k, rate in packs]]
    print(f"quickstart MLP space on {device} ({args.threads} threads), {args.epochs} epoch(s) per trial, "
          f"{len(data.train)} training images")
    print(f"{'pack':>8} {'trial-epochs/min':>17} {'vs fit':>7}")
    for label, rate, ratio in rows:
        print(f"{label:>8} {rate:17.1f} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
