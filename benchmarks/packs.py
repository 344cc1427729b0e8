"""Trial packs against today's one-trial `fit`: trials' epochs per minute, on the quickstart's MLP space,
bottleneck.yaml's dense denoising autoencoder space and cnn.yaml's CNN space.

Members are drawn from each study's space by Optuna's random sampler, with the structure key fixed
(what a pack shares: the MLP 2 hidden layers, ReLU, no batchnorm, Adam, batch 64; the autoencoder
1 hidden layer each side, no batchnorm, Adam, batch 64, gaussian noise; the CNN 2 conv blocks of
3x3 kernels, 1 dense layer, ReLU, no batchnorm, Adam, batch 128), so they differ in widths
(padded to the widest; the autoencoder's code size and the CNN's conv channels too), learning
rate, schedule, dropout or momentum, and seed, as a study's trials of one key do. Pack 1 is
`hpsearch.train.fit`, one trial after another; pack K trains K such trials at once with
`hpsearch.pack.Pack`. Every trial runs `--epochs` epochs with a validation pass per epoch on both
sides; the figure is trial-epochs per minute of wall time.

Usage: python benchmarks/packs.py [--models mlp,autoencoder,cnn] [--ks 4,16,64] [--ae-ks 4,16]
                                  [--cnn-ks 2,4] [--epochs 1] [--fits 4] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
import hpsearch  # noqa: E402,F401  before torch: its OpenMP wait policy holds for both sides

import optuna  # noqa: E402
import torch  # noqa: E402

from hpsearch import space  # noqa: E402
from hpsearch.data import SearchData, load_search_data  # noqa: E402
from hpsearch.models import build_model  # noqa: E402
from hpsearch.pack import Pack, structure_key  # noqa: E402
from hpsearch.spec import Spec, load_spec  # noqa: E402
from hpsearch.tasks import Task, make_task  # noqa: E402
from hpsearch.train import TrainConfig, fit, resolve_device  # noqa: E402

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@dataclass(frozen=True)
class Model:
    """One model to time: the study whose space members are drawn from, and the structure key fixed in it."""

    label: str
    study: str  # a file in studies/
    key: dict  # the commonest key of the space (with the study's fixed params: activation, batch size)

    def spec(self) -> Spec:
        return load_spec(STUDIES / self.study)

    def task(self, spec: Spec, params: dict) -> Task:
        return make_task(spec.task.type, params, mask_placement=spec.task.mask.placement,
                         noise_kind=spec.task.noise.kind)


MODELS = {"mlp": Model("quickstart MLP space", "quickstart.yaml", {"n_layers": 2, "batchnorm": False,
                                                                     "optimizer": "adam"}),
          "autoencoder": Model("bottleneck.yaml denoising autoencoder space", "bottleneck.yaml",
                               {"n_layers": 1, "batchnorm": False, "optimizer": "adam"}),
          "cnn": Model("cnn.yaml CNN space", "cnn.yaml", {"conv_blocks": 2, "kernel_size": 3, "n_layers": 1,
                                                          "batchnorm": False, "optimizer": "adam"})}


def draw_members(model: Model, spec: Spec, n: int, *, epochs: int, seed: int = 0) -> list[dict]:
    """Return ``n`` params sets from ``model``'s study space with its structure key fixed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    members = []
    for _ in range(n):
        study.enqueue_trial(model.key)
        trial = study.ask()
        members.append({**space.suggest(trial, spec), "epochs": epochs})
        study.tell(trial, 0.0)
    return members


def fits_per_minute(model: Model, spec: Spec, data: SearchData, members: list[dict], *, device: str) -> float:
    """Return trial-epochs per minute of one `fit` after another (pack 1)."""
    started = time.perf_counter()
    for seed, params in enumerate(members):
        torch.manual_seed(seed)
        net = build_model(spec.model.family, params, image_shape=data.image_shape, n_classes=data.n_classes)
        fit(net, data, model.task(spec, params), TrainConfig.from_params(params, seed=seed, device=device),
            lambda step, metrics: None)
    return sum(p["epochs"] for p in members) / (time.perf_counter() - started) * 60


def pack_per_minute(model: Model, spec: Spec, data: SearchData, members: list[dict], *, device: str) -> float:
    """Return trial-epochs per minute of one pack of all ``members``."""
    started = time.perf_counter()
    family, task = spec.model.family, spec.task.type
    pack = Pack(data, model.task(spec, members[0]), structure_key(members[0], family=family, task=task),
                capacity=len(members), device=device)
    for seed, params in enumerate(members):
        pack.add(params, seed=seed, report=lambda step, metrics: None, task=model.task(spec, params))
    pack.drain()
    return sum(p["epochs"] for p in members) / (time.perf_counter() - started) * 60


def compare(model: Model, ks: list[int], *, epochs: int, fits: int, threads: int, device: str) -> None:
    """Print the pack-vs-fit table of ``model``."""
    spec = model.spec()
    data = load_search_data("mnist-5k", val_fraction=spec.task.val_fraction, download=False)  # the studies' fallback
    members = draw_members(model, spec, max([fits, *ks]), epochs=epochs)
    # Warm-up (first calls load kernels and grow thread pools), then fit timed before and after the
    # packs: on a shared machine the load changes under a run, and the better of the two is shown.
    fits_per_minute(model, spec, data, members[:1], device=device)
    pack_per_minute(model, spec, data, members[:2], device=device)
    single_before = fits_per_minute(model, spec, data, members[:fits], device=device)
    packs = [(k, pack_per_minute(model, spec, data, members[:k], device=device)) for k in ks]
    single = max(single_before, fits_per_minute(model, spec, data, members[:fits], device=device))
    rows = [("1 (fit)", single, 1.0), *[(str(k), rate, rate / single) for k, rate in packs]]
    print(f"{model.label} on {device} ({threads} threads), {epochs} epoch(s) per trial, "
          f"{len(data.train)} training images")
    print(f"{'pack':>8} {'trial-epochs/min':>17} {'vs fit':>7}")
    for label, rate, ratio in rows:
        print(f"{label:>8} {rate:17.1f} {ratio:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,autoencoder", help=f"which of {list(MODELS)} to time")
    parser.add_argument("--ks", default="4,16,64", help="MLP pack sizes to compare with pack 1")
    parser.add_argument("--ae-ks", default="4,16", help="autoencoder pack sizes to compare with pack 1")
    parser.add_argument("--cnn-ks", default="2,4", help="CNN pack sizes to compare with pack 1")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial")
    parser.add_argument("--fits", type=int, default=4, help="trials timed for pack 1 (one fit after another)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    for name in args.models.split(","):
        ks = {"mlp": args.ks, "autoencoder": args.ae_ks, "cnn": args.cnn_ks}[name]
        compare(MODELS[name], [int(k) for k in ks.split(",")], epochs=args.epochs, fits=args.fits,
                threads=args.threads, device=device)


if __name__ == "__main__":
    main()
