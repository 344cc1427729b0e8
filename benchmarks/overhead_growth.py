"""Per-trial overhead as a study grows, on SQLite and PostgreSQL: where a trial's time outside training goes.

A window of trials (``--window``, 100) is run at study sizes 0, ``--every`` (1,000), 2,000, ... up to
``--size`` (10,000), each trial as a worker runs it, without the training:

- ask      stale trials failed (as ``Study.optimize`` does before each trial), ``study.ask`` and the spec's
           suggestions (hpsearch's sampler: TPE multivariate, 6 params);
- report   ``--reports`` (10) x ``trial.report`` + ``trial.should_prune`` (median pruner);
- attrs    the trial's user attrs, written as a worker writes them (3 writes: worker, start, end);
- tracking what the trial waits for in MLflow (same store kind): the run's creation, queueing its params,
           metrics, a 20 kB image artifact and its end to the background writer, and the flush before tell;
- tell     ``study.tell`` with the value (or PRUNED).

Every other trial makes its MLflow calls at once instead, as hpsearch did before its background
writer: its tracking time is the last column (``waited``), beside the queued trials' ``tracking``.
The reports stand in for the training the queued writes overlap with.

Between windows the study is filled up to the next window's start with finished trials of the same
space and ten reports each (``add_trials``, random params, synthetic values): the sampler and the
pruner see a study of that size, at a fraction of the time. The MLflow store holds only the windows'
runs. PostgreSQL runs as a throwaway server on 127.0.0.1 (tests/servers.py), stopped afterwards.

Usage: python benchmarks/overhead_growth.py [--size 10000] [--every 1000] [--window 100] [--stores sqlite,postgresql]
       python benchmarks/overhead_growth.py --quick      # sizes 0 and 1,000 only (a few minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpsearch import space  # noqa: E402
from hpsearch.storage import set_user_attrs  # noqa: E402
from hpsearch.spec import parse_spec  # noqa: E402
from hpsearch.study import make_pruner, make_sampler, open_study  # noqa: E402
from hpsearch.tracking import Tracker  # noqa: E402

PARTS = ("ask", "report", "attrs", "tracking", "tell")
COLUMNS = (*PARTS, "waited")  # waited: the tracking of the same trials' other half, every MLflow call waited for


def spec_raw(storage: str, tracking: str) -> dict[str, Any]:
    return {
        "study": {"name": "growth", "metric": "val_accuracy", "n_trials": 1_000_000, "seed": 0, "storage": storage,
                  "sampler": {"type": "tpe"}, "pruner": {"type": "median", "n_startup_trials": 5}},
        "task": {"type": "classify", "dataset": "digits", "epochs": 10, "device": "cpu"},
        "model": {"family": "mlp"},
        "space": {"n_layers": {"type": "int", "low": 1, "high": 3},
                  "width": {"type": "int", "low": 64, "high": 1024, "log": True},
                  "dropout": {"type": "float", "low": 0.0, "high": 0.5},
                  "optimizer": ["adam", "adamw", "sgd"],
                  "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
                  "weight_decay": {"type": "float", "low": 1.0e-6, "high": 1.0e-3, "log": True}},
        "tracking": {"enabled": True, "uri": tracking},
    }


def _score(params: dict[str, Any], rng: random.Random) -> float:
    """A made-up final accuracy with an optimum, so TPE and the pruner have something to work on."""
    return (0.95 - 0.04 * (math.log10(params["lr"]) + 2.5) ** 2 - 0.1 * params["dropout"]
            - 0.02 * abs(params["n_layers"] - 2) + rng.gauss(0, 0.01))


def _curve(final: float, reports: int) -> list[float]:
    return [final * (1 - 0.5 ** (k + 1)) for k in range(reports)]


def _random_params(distributions: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = {}
    for name, d in distributions.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out[name] = rng.choice(d.choices)
        elif d.log:
            value = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
            out[name] = round(value) if isinstance(d, optuna.distributions.IntDistribution) else value
        else:
            out[name] = rng.randint(d.low, d.high) if isinstance(d, optuna.distributions.IntDistribution) \
                else rng.uniform(d.low, d.high)
    return out


def _fill(study: optuna.Study, upto: int, distributions: dict[str, Any], reports: int, rng: random.Random) -> None:
    """Add finished trials until the study holds ``upto``."""
    missing = upto - len(study.get_trials(deepcopy=False))
    trials = []
    for _ in range(max(0, missing)):
        params = _random_params(distributions, rng)
        curve = _curve(_score(params, rng), reports)
        trials.append(optuna.trial.create_trial(
            params=params, distributions=distributions, value=curve[-1], state=TrialState.COMPLETE,
            intermediate_values=dict(enumerate(curve)), user_attrs={"seed": 0, "worker": "filler"}))
    study.add_trials(trials)


def _one_trial(study: optuna.Study, spec: Any, tracker: Tracker, parent: str | None, reports: int,
               rng: random.Random, image: Path, *, waited: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one trial without training; return seconds per part, and its distributions.

    ``waited``: every MLflow call made at once, as before the background writer (its time under
    ``waited`` instead of ``tracking``).
    """
    t: dict[str, float] = {}
    clock = time.perf_counter()
    optuna.storages.fail_stale_trials(study)  # as Study.optimize does before each trial, with heartbeats on
    trial = study.ask()
    params = space.suggest(trial, spec)
    t["ask"] = time.perf_counter() - clock

    clock = time.perf_counter()
    set_user_attrs(trial, {"worker": "bench:1", "sampler_stream": 0})
    set_user_attrs(trial, {"seed": trial.number, "device": "cpu", "n_params": 1000})
    t["attrs"] = time.perf_counter() - clock

    clock = time.perf_counter()
    run_id = tracker.start_trial(parent, trial.number, params=params, tags={"hpsearch.study": "growth"},
                                 params_later=not waited) if parent else None
    writes = (_AtOnce(tracker, run_id) if waited else tracker.later(run_id)) if run_id else None
    if writes:
        writes.log_datasets([])
    t["tracking"] = time.perf_counter() - clock

    curve = _curve(_score({**space.base_params(spec), **params}, rng), reports)
    pruned = False
    clock = time.perf_counter()
    for step, value in enumerate(curve):
        trial.report(value, step)
        if trial.should_prune():
            pruned = True
            curve = curve[:step + 1]
            break
    t["report"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if writes:
        writes.log_epochs([(s, 0, {"val_accuracy": v}) for s, v in enumerate(curve)])
        writes.log_artifact(image, "images")
        writes.end_run("FINISHED", tags={"hpsearch.state": "PRUNED" if pruned else "COMPLETE"})
    t["tracking"] += time.perf_counter() - clock
    clock = time.perf_counter()
    set_user_attrs(trial, {"train_seconds": 1.0, "val_accuracy": curve[-1], "model": "x"})  # while the writer works
    t["attrs"] += time.perf_counter() - clock
    clock = time.perf_counter()
    if writes:
        writes.flush()  # what is left of the run's writes when the trial is about to be told
    t["tracking"] += time.perf_counter() - clock
    if waited:
        t["waited"] = t.pop("tracking")

    clock = time.perf_counter()
    study.tell(trial, None if pruned else curve[-1], state=TrialState.PRUNED if pruned else None)
    t["tell"] = time.perf_counter() - clock
    return t, trial.distributions


class _AtOnce:
    """A run's writes made at once, as hpsearch made them before its background writer."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker, self.run_id = tracker, run_id

    def log_datasets(self, datasets: list[Any]) -> None:
        self.tracker.log_datasets(self.run_id, datasets)

    def log_epochs(self, epochs: list[Any]) -> None:
        self.tracker.log_epochs(self.run_id, epochs)

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        self.tracker.log_artifact(self.run_id, path, artifact_path)

    def end_run(self, status: str, *, tags: dict[str, str]) -> None:
        self.tracker.end_run(self.run_id, status, tags=tags)

    def flush(self) -> None:
        pass


def grow(storage: str, tracking: str, *, size: int, every: int, window: int, reports: int,
         runs_dir: str, verbose: bool = False) -> list[dict[str, Any]]:
    """Return one row per window: its start, and the mean ms per trial of each part."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("hpsearch").setLevel(logging.ERROR)
    spec = parse_spec(spec_raw(storage, tracking), source="benchmarks/overhead_growth.py",
                      runs_dir=Path(runs_dir))
    study = open_study(spec)
    study.sampler, study.pruner = make_sampler(spec), make_pruner(spec.study.pruner)
    tracker = Tracker(tracking, "growth", artifact_root=str(Path(runs_dir) / "mlartifacts"))
    parent = tracker.study_run("growth", params={}, tags={})
    image = Path(runs_dir) / "image.png"
    image.write_bytes(os.urandom(20_000))
    rng = random.Random(0)
    rows, distributions = [], None
    for start in range(0, size, every):
        if distributions is not None:
            _fill(study, start, distributions, reports, rng)
        times = []
        for i in range(window):
            t, distributions = _one_trial(study, spec, tracker, parent, reports, rng, image, waited=i % 2 == 1)
            times.append(t)
        row = {"start": start, **{p: 1000 * statistics.fmean(t[p] for t in times if p in t) for p in COLUMNS}}
        row["total"] = sum(row[p] for p in PARTS)
        rows.append(row)
        if verbose:
            print(f"  {start:>6,}-{start + window:,}: " + "  ".join(f"{p} {row[p]:.1f}" for p in (*COLUMNS, "total"))
                  + " ms", flush=True)
    return rows


@contextlib.contextmanager
def _stores(kind: str, tmp: Path) -> Iterator[tuple[str, str]]:
    """Yield (Optuna storage URL, MLflow tracking URI) of one kind, started for the run."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'optuna.db'}", f"sqlite:///{tmp / 'mlflow.db'}"
        return
    from tests.servers import postgres_server, with_database

    with postgres_server(tmp / "pg") as url:
        yield url, with_database(url, "mlflow")


def table(rows: list[dict[str, Any]], window: int) -> str:
    """Return the rows as a markdown table (ms per trial)."""
    lines = ["| trials | " + " | ".join(PARTS) + " | total | tracking, every call waited for |",
             "|---" * (len(PARTS) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['start']:,}-{r['start'] + window:,} | "
                     + " | ".join(f"{r[p]:.1f}" for p in (*PARTS, "total", "waited")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10_000, help="the study's size at the last window's start + every")
    parser.add_argument("--every", type=int, default=1_000, help="trials between windows' starts")
    parser.add_argument("--window", type=int, default=100, help="trials measured per window")
    parser.add_argument("--reports", type=int, default=10, help="reports per trial")
    parser.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--quick", action="store_true", help="sizes 0 and 1,000 only (--size 2000)")
    args = parser.parse_args()
    size = 2 * args.every if args.quick else args.size
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for kind in args.stores.split(","):
        print(f"{kind}: windows of {args.window} trials every {args.every:,} up to {size:,}, "
              f"{args.reports} reports a trial (ms per trial, means)", flush=True)
        rows = measure(kind, size=size, every=args.every, window=args.window, reports=args.reports, verbose=True)
        print(table(rows, args.window), flush=True)


def measure(kind: str, *, size: int, every: int, window: int, reports: int = 10,
            verbose: bool = False) -> list[dict[str, Any]]:
    """Return :func:`grow`'s rows on fresh stores of ``kind`` (sqlite or postgresql), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="hpsearch-growth-") as tmp, _stores(kind, Path(tmp)) as (storage, uri):
        return grow(storage, uri, size=size, every=every, window=window, reports=reports, runs_dir=tmp,
                    verbose=verbose)


if __name__ == "__main__":
    main()
