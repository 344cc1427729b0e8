"""How soon each searcher finds a good model, over several sampler seeds, under the same wall-time budget.

Three searchers run the study of benchmarks/search_seeds.yaml (studies/fashion_mlp.yaml's MLP
space on all of Fashion-MNIST, 6 epochs a trial), each with the same sampler seed, split and budget:

    plain       the objective Optuna's PyTorch example teaches: the same params suggested by hand,
                a torchvision-style Dataset of PIL images with ToTensor + Normalize in a DataLoader,
                the network from torch.nn alone, a report and a pruning decision per epoch, the
                spec's median pruner, an in-memory study, the TPE sampler hpsearch builds for the spec.
    hpsearch-1  hpsearch's library (`hpsearch.study`: open_study, setup_worker, work) as a worker runs
                it, SQLite Optuna storage and MLflow tracking on (SQLite) in a temp runs dir, as users
                get them, with `task.reports_per_epoch: 1`: a report per epoch, like plain.
    hpsearch    the same with hpsearch's defaults: reports within an epoch (auto: one per ~10,000
                training images, 5 an epoch here), so the pruner can stop a hopeless trial early.

    hpsearch-packK  the same with trial packs of K members (`study.pack: K`, hpsearch/pack_loop.py):
                K trials of the study trained together in one stacked pass, each refilled when it
                ends (any K: hpsearch-pack4, hpsearch-pack16, ...). On the CPU packs are not
                expected to pay (`pack: auto` is 1 there); on a GPU they are the point.

Another study (--spec: e.g. studies/quickstart.yaml or studies/bottleneck.yaml) can be searched
instead, by the hpsearch searchers (plain knows only the MLP classifier of search_seeds.yaml):
its name, seed and n_trials are set by the benchmark, its enqueued trials dropped (they would make
every seed's first trial the same), its metric and direction kept.

Order: per seed the searchers run one after another, the order rotated by one each seed (seed 0:
plain, hpsearch-1, hpsearch; seed 1: hpsearch-1, hpsearch, plain; ...), so slow drift in the
machine's load hits all alike. Before any clock, a warm-up runs a one-epoch trial of hpsearch
and of plain: the stores' tables, MLflow's imports, the data files read (cached for the process
from then on, for every searcher), first touches of memory (as for a user who has run a study before).

Clock: a searcher's starts before it opens its study and loads its data (a user waits for that
too). No trial starts after the budget (the largest of --budgets); one that ends after it is
kept in the JSON but not counted. What counts is a trial's value when it completes (validation
accuracy after its last epoch, on the full validation split), at the second it completes:
best-so-far against seconds is the anytime curve. Pruned trials give no value (their reports are
in the JSON). Reported over the seeds: the median and range (min-max) of the seconds until a
trial first reaches --target ("not reached" counts as more than the budget), and of the best
value after each budget.

Usage: python benchmarks/search_seeds.py [--seeds 0,1,2,3,4] [--budgets 60,120,300] [--target 0.88]
           [--train-limit N] [--threads N] [--plot docs/img/search_seeds.png] [--json runs.json]
           [--searchers plain,hpsearch-1,hpsearch,hpsearch-pack4] [--spec studies/quickstart.yaml]
       python benchmarks/search_seeds.py --from-json runs.json [--plot ...]   # the table (and plot) again
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
import hpsearch  # noqa: E402,F401  before torch: its OpenMP wait policy holds for every searcher

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import optuna  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_speed import PILDataset  # noqa: E402

from hpsearch.data import SearchData, load_search_data  # noqa: E402
from hpsearch.objective import trial_seed  # noqa: E402
from hpsearch.spec import Spec, parse_spec, read_yaml  # noqa: E402
from hpsearch.study import make_sampler, open_study, setup_worker, work  # noqa: E402

SPEC_FILE = Path(__file__).with_name("search_seeds.yaml")
SEARCHERS = ("plain", "hpsearch-1", "hpsearch")
LABELS = {
    "plain": "plain Optuna (DataLoader + ToTensor, median pruner per epoch, in-memory)",
    "hpsearch-1": "hpsearch, reports_per_epoch: 1 (SQLite, MLflow)",
    "hpsearch": "hpsearch defaults, reports within an epoch (SQLite, MLflow)",
}
COLORS = {"plain": "tab:gray", "hpsearch-1": "tab:blue", "hpsearch": "tab:orange"}
_PACKED = re.compile(r"hpsearch-pack([1-9][0-9]*)")


def pack_size(searcher: str) -> int | None:
    """Return K of a packed searcher ("hpsearch-packK"), else None."""
    match = _PACKED.fullmatch(searcher)
    return int(match.group(1)) if match else None


def label(searcher: str) -> str:
    """Return what the tables and the plot call ``searcher``."""
    k = pack_size(searcher)
    return f"hpsearch defaults, packs of {k} trials (study.pack: {k})" if k else LABELS[searcher]


def check_searchers(searchers: Sequence[str], spec_file: Path) -> None:
    """Raise ValueError unless each of ``searchers`` is one this benchmark runs on ``spec_file``."""
    unknown = [s for s in searchers if s not in SEARCHERS and pack_size(s) is None]
    if unknown:
        raise ValueError(f"{unknown} are not searchers; expected some of {list(SEARCHERS)} or hpsearch-packK "
                         "(K a positive integer)")
    if "plain" in searchers and spec_file.resolve() != SPEC_FILE.resolve():
        raise ValueError(f"the plain searcher knows only {SPEC_FILE.name}'s MLP classifier, not {spec_file}")


@dataclass
class Run:
    """One searcher's search with one seed: its setup, and every trial's state, value and finishing second."""

    searcher: str
    seed: int
    setup_seconds: float  # from the clock's start to the first trial: study, data, stores
    seconds: float  # the whole search, overrun of the last trial included
    reports_per_epoch: int
    trials: list[dict[str, Any]]  # number, state, value (complete only), seconds (at its end), epochs, best_report
    space: dict[str, str]  # every param its trials suggested, and its distribution (as Optuna writes it in JSON)
    maximize: bool = True  # the study's direction (val_accuracy: up; val_mse: down)

    def curve(self, horizon: float) -> list[tuple[float, float]]:
        """Return (seconds, best value so far) at each complete trial that bettered the best within ``horizon``."""
        sign = 1.0 if self.maximize else -1.0
        points: list[tuple[float, float]] = []
        for t in sorted((t for t in self.trials if t["value"] is not None and t["seconds"] <= horizon),
                        key=lambda t: t["seconds"]):
            if not points or sign * t["value"] > sign * points[-1][1]:
                points.append((t["seconds"], t["value"]))
        return points

    def best_at(self, seconds: float) -> float:
        """Return the best value of the trials complete by ``seconds`` (the worst infinity: none yet)."""
        points = self.curve(seconds)
        return points[-1][1] if points else (-math.inf if self.maximize else math.inf)

    def time_to(self, target: float, horizon: float) -> float:
        """Return the seconds until a complete trial first reached ``target`` (inf: not within ``horizon``)."""
        reached = (lambda v: v >= target) if self.maximize else (lambda v: v <= target)
        return next((s for s, v in self.curve(horizon) if reached(v)), math.inf)


# --------------------------------------------------------------------------- the searchers


def bench_spec(searcher: str, seed: int, *, runs_dir: Path, train_limit: int | None,
               spec_file: Path = SPEC_FILE) -> Spec:
    """Return ``spec_file`` (benchmarks/search_seeds.yaml) for ``searcher`` and ``seed``, its stores in ``runs_dir``."""
    raw = read_yaml(spec_file)
    raw["study"].update(name=f"{raw['study']['name']}-{searcher}-seed{seed}", seed=seed, n_trials=100000)
    raw["study"].pop("enqueue", None)
    if searcher in ("plain", "hpsearch-1"):
        raw["task"]["reports_per_epoch"] = 1
    if (k := pack_size(searcher)) is not None:
        raw["study"]["pack"] = k
    if train_limit:
        raw["task"]["train_limit"] = train_limit
    return parse_spec(raw, source=str(spec_file), runs_dir=runs_dir)


def run_hpsearch(searcher: str, spec: Spec, *, budget: float, threads: int) -> Run:
    """Return the search of an hpsearch worker on ``spec``, through the library, for ``budget`` seconds."""
    started_at, started = datetime.datetime.now(), time.perf_counter()
    logging.getLogger("hpsearch").setLevel(logging.ERROR)  # the benchmark prints its own lines
    study = open_study(spec)
    setup = setup_worker(spec, study, threads=threads)
    setup_seconds = time.perf_counter() - started
    if budget > setup_seconds:
        work(spec, study, setup, timeout=budget - setup_seconds)
    trials = study.get_trials(deepcopy=False)
    return Run(searcher, spec.study.seed, setup_seconds, time.perf_counter() - started, setup.reports_per_epoch,
               trial_records(trials, started_at, setup.reports_per_epoch), searched_space(trials),
               maximize=spec.study.directions[0] == "maximize")


def run_plain(spec: Spec, *, budget: float, threads: int) -> Run:
    """Return the search of the plain Optuna objective on ``spec``'s space and split, for ``budget`` seconds."""
    started_at, started = datetime.datetime.now(), time.perf_counter()
    search = PlainSearch(spec, threads=threads)
    setup_seconds = time.perf_counter() - started
    if budget > setup_seconds:
        search.study.optimize(search.objective, timeout=budget - setup_seconds)
    trials = search.study.trials
    return Run("plain", spec.study.seed, setup_seconds, time.perf_counter() - started, 1,
               trial_records(trials, started_at, 1), searched_space(trials))


class PlainSearch:
    """The plain searcher: an in-memory Optuna study over a hand-written objective, the usual way."""

    def __init__(self, spec: Spec, *, threads: int) -> None:
        torch.set_num_threads(threads)
        # The split hpsearch searches (its loader, the study seed), read as PIL images.
        task = spec.task
        data = load_search_data(task.dataset, data_dir=task.data_dir, val_fraction=task.val_fraction,
                                seed=spec.study.seed, train_limit=task.train_limit, download=False)
        self.data, self.epochs, self.seed = data, task.epochs, spec.study.seed
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((data.mean,), (data.std,))])
        self.train = DataLoader(PILDataset(data.train, transform), batch_size=task.batch_size, shuffle=True)
        self.val = DataLoader(PILDataset(data.val, transform), batch_size=task.batch_size)
        pruner = optuna.pruners.MedianPruner(**spec.study.pruner.options)  # the spec's, in epochs
        # The sampler hpsearch builds for the spec: TPE, the study seed, multivariate and grouped.
        self.study = optuna.create_study(direction="maximize", sampler=make_sampler(spec), pruner=pruner)

    def objective(self, trial: optuna.Trial) -> float:
        # benchmarks/search_seeds.yaml's space, in hpsearch's order, so the sampler's random start
        # draws the same first trials for every searcher.
        n_layers = trial.suggest_int("n_layers", 1, 3)
        width = trial.suggest_int("width", 256, 1024, log=True)
        dropout = trial.suggest_float("dropout", 0.1, 0.5)
        batchnorm = trial.suggest_categorical("batchnorm", [False, True])
        optimizer_name = trial.suggest_categorical("optimizer", ["adam", "adamw"])
        lr = trial.suggest_float("lr", 3e-4, 3e-3, log=True)
        weight_decay = trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
        torch.manual_seed(trial_seed(self.seed, trial.number))
        model = mlp(self.data, n_layers=n_layers, width=width, dropout=dropout, batchnorm=batchnorm)
        optimizer_class = torch.optim.Adam if optimizer_name == "adam" else torch.optim.AdamW
        optimizer = optimizer_class(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        accuracy = 0.0
        for epoch in range(1, self.epochs + 1):
            model.train()
            for images, labels in self.train:
                optimizer.zero_grad()
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
            scheduler.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for images, labels in self.val:
                    correct += int((model(images).argmax(dim=1) == labels).sum())
            accuracy = correct / len(self.val.dataset)
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
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


def trial_records(trials: Sequence[FrozenTrial], started_at: datetime.datetime,
                  per_epoch: int) -> list[dict[str, Any]]:
    """Return what the benchmark keeps of each finished trial, its seconds counted from ``started_at``."""
    return [{"number": t.number, "state": t.state.name,
             "value": t.value if t.state == TrialState.COMPLETE else None,
             "seconds": (t.datetime_complete - started_at).total_seconds(),
             "epochs": len(t.intermediate_values) / per_epoch,
             "best_report": max(t.intermediate_values.values(), default=None)}
            for t in trials if t.datetime_complete is not None]


def searched_space(trials: Sequence[FrozenTrial]) -> dict[str, str]:
    """Return every param the trials suggested, and its distribution in Optuna's JSON."""
    return {name: optuna.distributions.distribution_to_json(d)
            for t in trials for name, d in sorted(t.distributions.items())}


def check_same_space(runs: Sequence[Run]) -> None:
    """Raise unless the searchers of each seed suggested each param from the same distribution.

    A conditional param (``momentum`` only with ``optimizer: sgd``) may be missing from a searcher
    whose trials never met its condition; one suggested from two distributions is a broken benchmark.
    """
    for seed in sorted({r.seed for r in runs}):
        spaces = {r.searcher: r.space for r in runs if r.seed == seed and r.space}
        for name in {n for space in spaces.values() for n in space}:
            if len({space[name] for space in spaces.values() if name in space}) > 1:
                raise RuntimeError(f"the searchers suggested {name!r} from different distributions with seed "
                                   f"{seed}: {spaces}; make PlainSearch.objective suggest what {SPEC_FILE.name} says.")


def warm_up(runs_dir: Path, *, threads: int, train_limit: int | None, spec_file: Path = SPEC_FILE,
            with_plain: bool = True) -> None:
    """Run a one-epoch trial of hpsearch and of plain outside every clock: stores' tables, imports, first touches."""
    spec = bench_spec("hpsearch", 0, runs_dir=runs_dir, train_limit=train_limit, spec_file=spec_file)
    spec = dataclasses.replace(spec, study=dataclasses.replace(spec.study, name="warm-up", n_trials=1),
                               task=dataclasses.replace(spec.task, epochs=1))
    logging.getLogger("hpsearch").setLevel(logging.ERROR)  # the benchmark prints its own lines
    study = open_study(spec)
    work(spec, study, setup_worker(spec, study, threads=threads))
    if not with_plain:
        return
    plain = PlainSearch(spec, threads=threads)
    plain.study.optimize(plain.objective, n_trials=1)


def measure(*, seeds: Sequence[int], budget: float, threads: int | None = None, train_limit: int | None = None,
            searchers: Sequence[str] = SEARCHERS, progress: bool = False, spec_file: Path = SPEC_FILE,
            on_run: Callable[[list[Run]], None] | None = None) -> list[Run]:
    """Return every searcher's run for every seed, the searchers' order rotated by one each seed.

    ``on_run`` is called with the runs so far after each one (``--json`` keeps them as they come, so a
    long measurement that stops on its way keeps what it measured).
    """
    check_searchers(searchers, spec_file)
    threads = threads or os.cpu_count() or 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="hpsearch-search-seeds-") as tmp:
        runs_dir = Path(tmp)
        warm_up(runs_dir, threads=threads, train_limit=train_limit, spec_file=spec_file,
                with_plain="plain" in searchers)
        for i, seed in enumerate(seeds):
            for searcher in searchers[i % len(searchers):] + searchers[:i % len(searchers)]:
                spec = bench_spec(searcher, seed, runs_dir=runs_dir, train_limit=train_limit, spec_file=spec_file)
                if searcher == "plain":
                    run = run_plain(spec, budget=budget, threads=threads)
                else:
                    run = run_hpsearch(searcher, spec, budget=budget, threads=threads)
                runs.append(run)
                if on_run is not None:
                    on_run(runs)
                if progress:
                    done = sum(t["value"] is not None for t in run.trials)
                    print(f"seed {seed} {searcher}: {len(run.trials)} trials ({done} complete) in "
                          f"{run.seconds:.0f} s, best {run.best_at(budget):.4f}; load {_load()}", flush=True)
    check_same_space(runs)
    return runs


# --------------------------------------------------------------------------- reading the runs


@dataclass(frozen=True)
class Spread:
    """The median and range (min-max) of one figure over the seeds; infinities stand for "never"."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def text(self, fmt: str, never: str) -> str:
        show = lambda x: never if math.isinf(x) else format(x, fmt)  # noqa: E731
        return f"{show(self.median)} [{show(self.low)}, {show(self.high)}]"


def summarize(runs: Sequence[Run], *, target: float, budgets: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Return per searcher: seconds to ``target``, best value at each budget, trials and setup seconds, over seeds."""
    horizon = max(budgets)
    out: dict[str, dict[str, Any]] = {}
    for searcher in dict.fromkeys(r.searcher for r in runs):
        mine = [r for r in runs if r.searcher == searcher]
        out[searcher] = {
            "time_to_target": Spread.of([r.time_to(target, horizon) for r in mine]),
            "reached": sum(not math.isinf(r.time_to(target, horizon)) for r in mine),
            "best_at": {b: Spread.of([r.best_at(b) for r in mine]) for b in budgets},
            "trials": Spread.of([sum(t["seconds"] <= horizon for t in r.trials) for r in mine]),
            "complete": Spread.of([sum(t["seconds"] <= horizon and t["value"] is not None for t in r.trials)
                                   for r in mine]),
            "setup": Spread.of([r.setup_seconds for r in mine]),
            "seeds": len(mine),
        }
    return out


def print_table(runs: Sequence[Run], *, target: float, budgets: Sequence[float], metric: str = "val_accuracy") -> None:
    """Print the markdown table of the runs: median [min, max] over the seeds."""
    summary = summarize(runs, target=target, budgets=budgets)
    horizon = max(budgets)
    seeds = sorted({r.seed for r in runs})
    reach = ">=" if all(r.maximize for r in runs) else "<="
    print(f"seeds {','.join(map(str, seeds))}; budget {horizon:g} s per searcher and seed; "
          f"median [min, max] over the seeds\n")
    best_heads = "".join(f" best {metric} at {b:g} s |" for b in budgets)
    print(f"| searcher | s to {metric} {reach} {target:g} | reached |{best_heads} trials (complete) | trials/min "
          "| setup s |")
    print("|---|---:|---:|" + "---:|" * len(budgets) + "---:|---:|---:|")
    for searcher, s in summary.items():
        best = "".join(f" {s['best_at'][b].text('.4f', 'none')} |" for b in budgets)
        print(f"| {label(searcher)} | {s['time_to_target'].text('.0f', f'> {horizon:g}')} | "
              f"{s['reached']}/{s['seeds']} |{best} {s['trials'].median:g} ({s['complete'].median:g}) | "
              f"{s['trials'].median * 60 / horizon:.1f} | {s['setup'].median:.1f} |")


def plot(runs: Sequence[Run], *, target: float, budgets: Sequence[float], path: Path,
         title: str = "Fashion-MNIST MLP search", metric: str = "val_accuracy") -> None:
    """Write the anytime curves: per searcher, the median best-so-far over the seeds and its min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    horizon = max(budgets)
    grid = np.linspace(0.0, horizon, 600)
    curves = {searcher: np.array([[r.best_at(float(x)) for x in grid] for r in runs if r.searcher == searcher])
              for searcher in dict.fromkeys(r.searcher for r in runs)}
    # Show the target and the curves' median beyond it, down to 5 points short of it at most.
    maximize = all(r.maximize for r in runs)
    finals = [np.median(best[:, -1]) for best in curves.values()]
    if maximize:
        floor, ceiling = min(target - 0.005, max(target - 0.05, min(finals) - 0.01)), None
    else:
        floor, ceiling = None, max(target * 1.1, min(target * 1.5, max(finals) * 1.1))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for searcher, best in curves.items():
        median = np.median(best, axis=0)
        median = np.where(np.isinf(median), np.nan, median)  # no complete trial yet in half the seeds
        if maximize:  # a seed with no complete trial yet: the band reaches to the edge
            low, high = np.maximum(best.min(axis=0), floor), np.where(np.isinf(best.max(axis=0)), np.nan, best.max(axis=0))
        else:
            low, high = np.where(np.isinf(best.min(axis=0)), np.nan, best.min(axis=0)), np.minimum(best.max(axis=0), ceiling)
        color = COLORS.get(searcher)
        ax.step(grid, median, where="post", color=color, label=label(searcher))
        ax.fill_between(grid, low, high, step="post", color=color, alpha=0.2, linewidth=0)
    ax.axhline(target, color="black", linestyle=":", linewidth=1)
    for b in budgets:
        ax.axvline(b, color="black", linestyle="--", linewidth=0.5, alpha=0.5)
    ax.set_ylim(floor, ceiling)
    ax.set_xlim(0, horizon)
    ax.set_xlabel("seconds since the study started (setup included)")
    ax.set_ylabel(f"best {metric} so far")
    seeds = sorted({r.seed for r in runs})
    ax.set_title(f"{title}: median and range over {len(seeds)} sampler seeds", fontsize=10)
    ax.legend(fontsize=8, loc="lower right" if maximize else "upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated sampler (study) seeds")
    parser.add_argument("--budgets", default="60,120,300", help="comma-separated wall seconds; the largest is "
                        "each search's budget")
    parser.add_argument("--target", type=float, default=0.88, help="validation accuracy to reach")
    parser.add_argument("--train-limit", type=int, default=None, help="cap on train+validation images (tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--searchers", default=",".join(SEARCHERS), help="comma-separated, of "
                        + ", ".join(SEARCHERS) + " and hpsearch-packK (K trials a pack)")
    parser.add_argument("--spec", type=Path, default=SPEC_FILE, help="the study to search (default: "
                        f"{SPEC_FILE.name}; e.g. studies/quickstart.yaml, hpsearch searchers only)")
    parser.add_argument("--json", type=Path, default=None, help="write the runs (every trial) to this file")
    parser.add_argument("--from-json", type=Path, default=None, help="read the runs from this file instead of "
                        "running them")
    parser.add_argument("--plot", type=Path, default=None, help="write the anytime curves to this PNG")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Optuna's ExperimentalWarnings and MLflow's would bury the progress lines
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        runs = [Run(**r) for r in saved["runs"]]
        print(saved["about"] + "\n")
    else:
        searchers = tuple(args.searchers.split(","))
        try:
            check_searchers(searchers, args.spec)
        except ValueError as exc:
            parser.error(f"--searchers: {exc}")
        about = (f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; {platform.machine()}, "
                 f"{os.cpu_count()} cores, torch {torch.__version__}, optuna {optuna.__version__}; "
                 f"train limit {args.train_limit or 'none'}; load average at start {_load()}")
        print(about, flush=True)
        started = time.perf_counter()

        def save(runs: list[Run], about: str = about + " (not finished)") -> None:
            if args.json:
                args.json.write_text(json.dumps({"about": about, "spec": read_yaml(args.spec),
                                                 "runs": [dataclasses.asdict(r) for r in runs]}, indent=1))

        runs = measure(seeds=[int(s) for s in args.seeds.split(",")], budget=max(budgets), threads=args.threads,
                       train_limit=args.train_limit, searchers=searchers, progress=True, spec_file=args.spec,
                       on_run=save)
        about += f", at end {_load()}; {time.perf_counter() - started:.0f} s in all"
        print(f"load average at end {_load()}; {time.perf_counter() - started:.0f} s in all\n")
        save(runs, about)
    raw = saved["spec"] if args.from_json else read_yaml(args.spec)
    metric = raw["study"].get("metric", "value")
    print_table(runs, target=args.target, budgets=budgets, metric=metric)
    if args.plot:
        plot(runs, target=args.target, budgets=budgets, path=args.plot, metric=metric,
             title=f"{raw['task']['dataset']} {raw['model']['family']} search ({raw['study']['name']})")
        print(f"\nanytime curves: {args.plot}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
