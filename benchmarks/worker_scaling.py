"""Worker scaling: one CPU study run by 1 worker (2 threads), then by 2 workers (1 thread each).

Both sides run the real command, `hpsearch run SPEC --workers N --no-finish`, as a subprocess on
fresh embedded stores (SQLite Optuna storage, SQLite MLflow) in a temporary folder, so the
figure includes what a user waits for: starting the worker processes, the shared storage, the
tracking. The study is the same on both sides: mnist-5k, an MLP of fixed size (2 x 512, so
every trial costs the same whatever the sampler proposes), N trials x E epochs, no pruning, a
random sampler with a fixed seed (only the learning rate and dropout are searched: they do not
change the work). Runs alternate 1, 2, 2, 1, ... so that a busy neighbour slows both sides alike.

    python benchmarks/worker_scaling.py                 # 16 trials x 20 epochs, 2 rounds (~4 min on 2 cores)
    python benchmarks/worker_scaling.py --quick         # 8 trials x 10 epochs, 1 round
    python benchmarks/worker_scaling.py --trials 32 --epochs 20 --rounds 3

Prints a markdown block: wall seconds per run, the trials' own span (first trial start to last
trial end, without process start-up), and the speed-up of 2 workers over 1 (target: >= 1.7x).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.7  # 2 workers on 2 cores should come close to twice the throughput of one


def spec(name: str, *, trials: int, epochs: int, threads: int) -> dict:
    """Return the benchmark study: every trial trains the same network for the same epochs."""
    return {
        "study": {"name": name, "metric": "val_accuracy", "n_trials": trials, "seed": 0,
                  "sampler": {"type": "random"}, "pruner": "none"},
        "task": {"type": "classify", "dataset": "mnist-5k", "epochs": epochs, "batch_size": 64,
                 "threads": threads},
        "model": {"family": "mlp"},
        "space": {"n_layers": 2, "width": 512,
                  "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                  "dropout": {"type": "float", "low": 0.0, "high": 0.3}},
    }


def run(workers: int, *, trials: int, epochs: int, cores: int, folder: Path) -> dict[str, float]:
    """Run the study with ``workers`` workers sharing ``cores`` threads; return wall and span seconds."""
    import optuna

    name = f"scale-{workers}w"
    folder.mkdir(parents=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(name, trials=trials, epochs=epochs, threads=cores // workers)))
    env = {**os.environ, "HPSEARCH_RUNS_DIR": str(folder / "runs"), "PYTHONPATH": str(REPO)}
    for var in ("HPSEARCH_STORAGE", "HPSEARCH_TRACKING_URI", "HPSEARCH_ARTIFACTS"):
        env.pop(var, None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hpsearch", "run", str(path), "--workers", str(workers),
                           "--no-finish"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"hpsearch run --workers {workers} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'runs' / 'optuna.db'}")
    finished = [t for t in study.trials if t.datetime_complete is not None and t.state.name == "COMPLETE"]
    if len(finished) != trials:
        raise SystemExit(f"expected {trials} complete trials with {workers} worker(s), found {len(finished)}.")
    span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {"wall": wall, "span": span}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (1, 2, 2, 1, ...)")
    parser.add_argument("--cores", type=int, default=2, help="threads shared by the workers")
    parser.add_argument("--quick", action="store_true", help="8 trials x 10 epochs, one round")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.rounds = 8, 10, 1

    load_before = os.getloadavg()[0]
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="hpsearch-scaling-") as tmp:
        for i in range(args.rounds):
            order = (1, 2) if i % 2 == 0 else (2, 1)
            for workers in order:
                results[workers].append(run(workers, trials=args.trials, epochs=args.epochs, cores=args.cores,
                                            folder=Path(tmp) / f"r{i}-{workers}w"))
    load_after = os.getloadavg()[0]

    def median(workers: int, key: str) -> float:
        return statistics.median(r[key] for r in results[workers])

    wall_ratio = median(1, "wall") / median(2, "wall")
    span_ratio = median(1, "span") / median(2, "span")
    import torch

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"load average {load_before:.2f} before, {load_after:.2f} after.")
    print(f"Study: mnist-5k MLP 2x512, {args.trials} trials x {args.epochs} epochs, no pruning, random sampler "
          f"(seed 0), SQLite Optuna + SQLite MLflow; {args.rounds} round(s), runs alternating.\n")
    print("| workers x threads | wall s (each run) | wall s (median) | trials' span s (median) |")
    print("|---|---|---|---|")
    for workers in (1, 2):
        each = ", ".join(f"{r['wall']:.1f}" for r in results[workers])
        print(f"| {workers} x {args.cores // workers} | {each} | {median(workers, 'wall'):.1f} | "
              f"{median(workers, 'span'):.1f} |")
    met = "met" if wall_ratio >= TARGET else "NOT met"
    print(f"\nSpeed-up of 2 workers over 1: {wall_ratio:.2f}x wall clock (target >= {TARGET}x: {met}), "
          f"{span_ratio:.2f}x over the trials' own span (without process start-up).")


if __name__ == "__main__":
    main()
