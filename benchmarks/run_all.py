"""Every benchmark of hpsearch in one run, printed as one markdown table of side-by-side ratios.

    python benchmarks/run_all.py            # about 3-4 hours on 2 cores (the pruning part takes 2-3)
    python benchmarks/run_all.py --quick    # about 7 minutes: smaller data, fewer trials and seeds

Each figure compares two things measured in this run on this machine, their runs interleaved
(A, B, A, B, ...) so that a busy neighbour slows both alike; times are the best (epochs) or the
median / sum (trials) of the repeats. The load average is printed at the start and the end:
read the numbers with it.

OpenMP threads: hpsearch is imported before torch, so its choice of how idle threads wait
(hpsearch/__init__.py: brief spinning on a quiet machine, PASSIVE on a busy one, or what
OMP_WAIT_POLICY / GOMP_SPINCOUNT say when set) holds for both sides of every comparison.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
import hpsearch  # noqa: E402,F401  before torch: it sets the OpenMP wait policy (see the docstring)

import argparse  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # run from a checkout, no install needed

import torch  # noqa: E402
import yaml  # noqa: E402

import augment_cost  # noqa: E402
import batched_trials  # noqa: E402
import epoch_speed  # noqa: E402
import overhead  # noqa: E402
import overhead_growth  # noqa: E402
import pruning  # noqa: E402
import search_seeds  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark runs: --quick trades precision for time."""

    train_limit: int  # Fashion-MNIST images (train + validation) for the epoch comparison
    epoch_repeats: int  # measured epochs per pipeline and model (after one warm-up)
    overhead_trials: int  # tracked/bare pairs (a multiple of 5: the study's plots are drawn every 5 trials)
    overhead_epochs: int
    overhead_train_limit: int
    growth_sizes: int  # overhead_growth on SQLite: windows at study sizes 0, 1,000, ... below this
    growth_window: int  # trials measured per window
    pruning_spec: Path  # the study file whose study runs pruned and unpruned
    pruning_pruner: str  # of pruning.CANDIDATES ("own": the file's)
    pruning_seeds: tuple[int, ...]  # the pruned and unpruned study once per seed
    pruning_trials: int
    pruning_epochs: int
    search_seeds: tuple[int, ...]  # benchmarks/search_seeds.py, smaller: its full run takes over an hour
    search_budgets: tuple[float, ...]  # wall seconds; the largest is each search's budget
    search_train_limit: int  # Fashion-MNIST images (train + validation) of the searches
    search_target: float  # validation accuracy to reach, reachable with that much data in 6 epochs
    batched_train_limit: int  # Fashion-MNIST images for the batched-trials comparison
    batched_repeats: int  # measured epochs per side and K (after one warm-up)
    pack_seeds: tuple[int, ...]  # the quickstart search, one trial at a time and in packs, once per seed
    pack_budget: float  # wall seconds per search
    pack_ks: tuple[int, ...]  # trials a pack


PRUNER = "median-from1"  # on the Fashion-MNIST study: docs/benchmarks.md, "Pruning on Fashion-MNIST's MLP space"
FULL = Sizes(train_limit=20000, epoch_repeats=3, overhead_trials=10, overhead_epochs=8,
             overhead_train_limit=20000, growth_sizes=2000, growth_window=50,
             pruning_spec=HERE / "search_seeds.yaml", pruning_pruner=PRUNER,  # the Fashion-MNIST study
             pruning_seeds=(0, 1, 2, 3, 4), pruning_trials=30, pruning_epochs=6,
             search_seeds=(0, 1, 2, 3, 4), search_budgets=(20.0, 40.0), search_train_limit=20000, search_target=0.85,
             batched_train_limit=20000, batched_repeats=3, pack_seeds=(0, 1, 2), pack_budget=120.0,
             pack_ks=(4, 16))  # on 2 CPU cores a pack of 64 quickstart trials needs ~15 min for its first ends
QUICK = Sizes(train_limit=6000, epoch_repeats=2, overhead_trials=5, overhead_epochs=6,
              overhead_train_limit=10000, growth_sizes=1000, growth_window=20,
              pruning_spec=pruning.QUICKSTART_FILE, pruning_pruner="own",
              pruning_seeds=(0, 1), pruning_trials=10, pruning_epochs=6,
              search_seeds=(0, 1), search_budgets=(10.0, 20.0), search_train_limit=6000, search_target=0.80,
              batched_train_limit=6000, batched_repeats=2, pack_seeds=(0, 1), pack_budget=20.0, pack_ks=(4,))
BATCHED_KS = (2, 4, 8)  # trials trained together; benchmarks/batched_trials.py goes further
BATCHED_VARIANTS = ["bmm-own", "bmm-shared"]  # vmap was slower than bmm everywhere measured


@dataclass(frozen=True)
class Row:
    """One line of the table: what is compared, both sides, and how they relate."""

    what: str
    ours: str
    theirs: str
    ratio: str
    goal: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the ~2-minute version")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    parser.add_argument("--only", default="epoch,augment,overhead,workers,pruning,target,batched,packs",
                        help="comma-separated subset of: epoch, augment, overhead, workers, pruning, target, "
                             "batched, packs")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    only = set(args.only.split(","))
    warnings.filterwarnings("ignore")  # Optuna's ExperimentalWarnings would bury the table
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"# hpsearch benchmarks ({'quick' if args.quick else 'full'})\n")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores (nproc), {platform.system()} "
          f"{platform.release()}; Python {platform.python_version()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}")
    print(f"- load average at start: {_load()}", flush=True)

    rows: list[Row] = []
    extra: list[str] = []
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("epoch", lambda: epoch_rows(sizes, args.threads)),
        ("augment", lambda: augment_rows(sizes)),
        ("overhead", lambda: overhead_rows(sizes, args.threads)),
        ("workers", lambda: worker_rows(args.quick, extra)),
        ("pruning", lambda: pruning_rows(sizes, args.threads)),
        ("target", lambda: target_rows(sizes, args.threads)),
        ("batched", lambda: batched_rows(sizes, args.threads)),
        ("packs", lambda: pack_rows(sizes, args.threads)),
    ]
    for name, step in steps:
        if name not in only:
            continue
        t = time.perf_counter()
        print(f"- running {name} ...", end=" ", flush=True)
        rows += step()
        print(f"{time.perf_counter() - t:.0f} s; load {_load()}", flush=True)

    print("\n| benchmark | hpsearch | baseline | ratio | goal |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.what} | {r.ours} | {r.theirs} | {r.ratio} | {r.goal} |")
    for block in extra:
        print("\n" + block)
    print(f"\n- load average at end: {_load()}; total {time.perf_counter() - started:.0f} s")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- sections


def epoch_rows(sizes: Sizes, threads: int) -> list[Row]:
    """Rows: each model's epoch, hpsearch vs DataLoader pipeline and vs the FLOP floor."""
    data = epoch_speed.load_data(train_limit=sizes.train_limit)
    peak = epoch_speed.peak_matmul_flops()
    rows = []
    for case in epoch_speed.CASES.values():
        r = epoch_speed.measure_case(case, data, epochs=sizes.epoch_repeats, peak=peak)
        ours, theirs, theirs_our_model = min(r.hpsearch), min(r.dataloader), min(r.dataloader_our_model)
        where = f"{case.label}, {len(data.train)}+{len(data.val)} images, batch 128, Adam"
        goal = "" if case.family != "mlp" else f">= 10x: {'met' if theirs >= 10 * ours else '**not met**'}"
        rows.append(Row(f"epoch: {where}: hpsearch `fit` vs DataLoader + ToTensor, torch.nn model",
                        f"{ours:.3f} s", f"{theirs:.3f} s", _faster(ours, theirs), goal))
        rows.append(Row(f"epoch: {case.label}: hpsearch `fit` vs the same DataLoader training hpsearch's model",
                        f"{ours:.3f} s", f"{theirs_our_model:.3f} s", _faster(ours, theirs_our_model)))
        rows.append(Row(f"epoch: {case.label}: hpsearch vs FLOP floor ({r.gflop:.1f} GFLOP at "
                        f"{peak / 1e9:.0f} GFLOP/s)", f"{ours:.3f} s", f"{r.floor:.3f} s",
                        f"{ours / r.floor:.1f}x the floor"))
        if r.hpsearch_before:
            before = min(r.hpsearch_before)
            rows.append(Row(f"epoch: {case.label}: hpsearch `fit` now (pool before ReLU, channels_last) vs before "
                            f"issue 14 (ReLU before pool, NCHW), side by side", f"{ours:.3f} s", f"{before:.3f} s",
                            f"{_faster(ours, before)}; before: {before / r.floor:.1f}x the floor"))
    return rows


def augment_rows(sizes: Sizes) -> list[Row]:
    """Rows: a `fit` epoch with augmentation vs the same epoch without, per model and setting."""
    data = epoch_speed.load_data(train_limit=sizes.train_limit)
    rows = []
    for c in augment_cost.measure(["mlp", "cnn"], data, epochs=sizes.epoch_repeats):
        met = "met" if c.extra <= augment_cost.GOAL else "**not met**"
        rows.append(Row(f"augmentation: {c.model}, {c.setting}: `fit` epoch with vs without "
                        f"({len(data.train)}+{len(data.val)} images)", f"{c.augmented:.3f} s", f"{c.plain:.3f} s",
                        f"{100 * c.extra:+.1f} %", f"<= +15 %: {met}"))
    return rows


def _faster(ours: float, theirs: float) -> str:
    return f"**{theirs / ours:.1f}x faster**" if theirs > ours else f"**{ours / theirs:.1f}x slower**"


def overhead_rows(sizes: Sizes, threads: int) -> list[Row]:
    """Rows: a tracked, stored trial vs its bare fit; the per-trial cost in ms."""
    result = overhead.measure(trials=sizes.overhead_trials, epochs=sizes.overhead_epochs,
                              train_limit=sizes.overhead_train_limit, threads=threads)
    s = overhead.summarize(result)
    met = "met" if s["mean_ratio"] - 1 <= overhead.GOAL else "**not met**"
    what = (f"trial overhead: MLflow + Optuna SQLite (`study.work`) vs bare `train.fit`, MLP 2x256 on "
            f"{result['n_train']} images x {result['epochs']} epochs, {len(result['tracked'])} pairs")
    return [
        Row(what + " (mean, plots every 5 trials included)", f"{statistics.fmean(result['tracked']):.2f} s",
            f"{statistics.fmean(result['bare']):.2f} s", f"{100 * (s['mean_ratio'] - 1):+.1f} %",
            f"<= +3 %: {met}"),
        Row("trial overhead (median of trials)", f"{s['tracked_s']:.2f} s", f"{s['bare_s']:.2f} s",
            f"{100 * (s['median_ratio'] - 1):+.1f} %"),
        Row("trial overhead per trial, ms (median of pairs / difference of means)", "", "",
            f"{s['per_trial_ms']:.0f} ms / {s['mean_ms']:.0f} ms"),
        *growth_rows(sizes),
    ]


def growth_rows(sizes: Sizes) -> list[Row]:
    """Rows: where a trial's time outside training goes, at study sizes 0, 1,000, ...

    See benchmarks/overhead_growth.py."""
    rows = overhead_growth.measure("sqlite", size=sizes.growth_sizes, every=1000, window=sizes.growth_window)
    parts = overhead_growth.PARTS
    return [Row(f"per-trial overhead without training, SQLite, "
                f"trials {r['start']:,}-{r['start'] + sizes.growth_window:,} "
                f"of a growing study: tracking queued vs every MLflow call waited for (alternate trials); "
                f"split {' / '.join(parts)} ms (10 reports, TPE 6 params)",
                f"{r['total']:.0f} ms", f"{r['total'] - r['tracking'] + r['waited']:.0f} ms",
                " / ".join(f"{r[p]:.0f}" for p in parts)) for r in rows]


def worker_rows(quick: bool, extra: list[str]) -> list[Row]:
    """Run benchmarks/worker_scaling.py (another engineer's) as it is, and keep its output as a block."""
    script = HERE / "worker_scaling.py"
    if not script.is_file():
        return [Row("worker scaling: 1 vs 2 workers on 2 cores", "", "", "not run: benchmarks/worker_scaling.py "
                    "is missing")]
    command = [sys.executable, str(script)] + (["--quick"] if quick else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode == 2 and quick and "--quick" in done.stderr:  # it has no --quick: run it as it is
        done = subprocess.run(command[:-1], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return [Row("worker scaling: 1 vs 2 workers on 2 cores", "", "",
                    f"failed (exit {done.returncode}): {tail[0][:200]}")]
    extra.append(f"### Worker scaling (`{' '.join(['python', 'benchmarks/worker_scaling.py'] + command[2:])}`)\n\n"
                 + done.stdout.strip())
    return [Row("worker scaling: 1 vs 2 workers on 2 cores", "", "", "see the worker scaling block below")]


def pruning_rows(sizes: Sizes, threads: int) -> list[Row]:
    """Rows: a pruner vs none on the same study, over seeds: epochs, wall time, best value (benchmarks/pruning.py).

    The goals are the median's over the seeds: at most half the epochs, and a best value at most one standard
    error of a validation accuracy (binomial, at none's median best) below none's."""
    base = yaml.safe_load(sizes.pruning_spec.read_text())
    r = pruning.measure(seeds=sizes.pruning_seeds, trials=sizes.pruning_trials, epochs=sizes.pruning_epochs,
                        threads=threads, pruners=(sizes.pruning_pruner,), base=base)
    s = pruning.summarize(r, sizes.pruning_pruner)
    name = "pruner " + pruning.describe(sizes.pruning_pruner, r, base)
    where = (f"{base['task']['dataset']} ({r['runs']['none'][0]['n_val']:,} validation images) "
             f"{base['model']['family'].upper()}, {sizes.pruning_spec.name}'s space, TPE, {r['trials']} trials x "
             f"{r['epochs_per_trial']} epochs, seeds {','.join(map(str, r['seeds']))}; median [min, max]")
    ratio, gap, noise = s["epochs_ratio"][0], s["best_gap"][0], s["noise"]
    return [
        Row(f"pruning: epochs trained, {name}, vs none ({where}; {s['pruned'][0]:g} pruned)", "", "",
            pruning.spread_text(s["epochs_ratio"], ".2f") + "x",
            f"<= 0.5x: {'met' if ratio <= 0.5 else '**not met**'}"),
        Row("pruning: wall seconds of the study, pruner vs none", "", "",
            pruning.spread_text(s["seconds_ratio"], ".2f") + "x"),
        Row("pruning: best val_accuracy, pruner vs none (ratio column: pruner's minus none's)",
            pruning.spread_text(s["best_pruned"], ".4f"), pruning.spread_text(s["best_none"], ".4f"),
            pruning.spread_text(s["best_gap"], "+.4f"),
            f">= -1 standard error ({noise:.4f}): {'met' if gap >= -noise else '**not met**'}"),
    ]


def target_rows(sizes: Sizes, threads: int) -> list[Row]:
    """Rows: time to a target and best value after fixed budgets, hpsearch vs a plain Optuna objective, over seeds."""
    budgets = sizes.search_budgets
    runs = search_seeds.measure(seeds=sizes.search_seeds, budget=max(budgets), threads=threads,
                            train_limit=sizes.search_train_limit)
    summary = search_seeds.summarize(runs, target=sizes.search_target, budgets=budgets)
    plain = summary["plain"]
    where = (f"Fashion-MNIST MLP ({sizes.search_train_limit} images), seeds {','.join(map(str, sizes.search_seeds))}, "
             f"{max(budgets):g} s each; median [min, max]")
    never = f"> {max(budgets):g}"
    rows = []
    for searcher in ("hpsearch", "hpsearch-1"):
        ours = summary[searcher]
        label = search_seeds.LABELS[searcher]
        rows.append(Row(f"search: seconds to val_accuracy >= {sizes.search_target}, {label} vs plain Optuna ({where})",
                        ours["time_to_target"].text(".0f", never), plain["time_to_target"].text(".0f", never),
                        _median_speedup(ours["time_to_target"].median, plain["time_to_target"].median,
                                        max(budgets))))
        for b in budgets:
            gap = ours["best_at"][b].median - plain["best_at"][b].median
            rows.append(Row(f"search: best val_accuracy after {b:g} s, {label} vs plain Optuna",
                            ours["best_at"][b].text(".4f", "none"), plain["best_at"][b].text(".4f", "none"),
                            f"{100 * gap:+.2f} points" if math.isfinite(gap) else "-"))
    return rows


def _median_speedup(ours: float, theirs: float, budget: float) -> str:
    """Return how much sooner the median search of ours reached the target (infinities: not within ``budget``)."""
    if math.isinf(ours):
        return "hpsearch's median search did not get there"
    if math.isinf(theirs):
        return f"baseline's median search did not get there: > {budget / ours:.1f}x faster"
    return _faster(ours, theirs)


def batched_rows(sizes: Sizes, threads: int) -> list[Row]:
    """Rows: K same-shape MLP trials trained together (stacked, bmm) vs K sequential `fit`s; and the check."""
    data = epoch_speed.load_data(train_limit=sizes.batched_train_limit)
    _, passed = batched_trials.run_check(data, k=max(BATCHED_KS), variants=BATCHED_VARIANTS, device="cpu")
    rows = [Row(f"batched trials: {max(BATCHED_KS)} models trained together train as {max(BATCHED_KS)} `fit`s "
                "(dropout 0, one epoch; benchmarks/batched_trials.py prints the differences)", "", "",
                "ok" if passed else "**FAILED**")]
    for k in BATCHED_KS:
        r = batched_trials.measure_k(k, data, repeats=sizes.batched_repeats, variants=BATCHED_VARIANTS,
                                     device="cpu")
        ours = min(r.sequential)
        for variant in BATCHED_VARIANTS:
            theirs = min(r.batched[variant])
            rows.append(Row(f"batched trials: {k} MLPs 784-128-64-10 (own lr, dropout, seed) in one stacked pass "
                            f"({variant}) vs {k} sequential `fit`s, {len(data.train)}+{len(data.val)} images, "
                            "s per trial-epoch", f"{theirs:.4f} s", f"{ours:.4f} s", f"**{ours / theirs:.2f}x**"))
    return rows


def pack_rows(sizes: Sizes, threads: int) -> list[Row]:
    """Rows: a search in packs of K trials vs one trial at a time, on the quickstart's MLP space and on
    bottleneck.yaml's autoencoder space: trials a minute and best value after the same wall time, over
    sampler seeds (benchmarks/search_seeds.py --spec ...)."""
    rows = []
    for spec_file, what in PACK_SPACES:
        metric = yaml.safe_load(spec_file.read_text())["study"]["metric"]
        searchers = ("hpsearch", *(f"hpsearch-pack{k}" for k in sizes.pack_ks))
        runs = search_seeds.measure(seeds=sizes.pack_seeds, budget=sizes.pack_budget, threads=threads,
                                    searchers=searchers, spec_file=spec_file)
        maximize = runs[0].maximize
        summary = search_seeds.summarize(runs, target=math.inf if maximize else -math.inf,
                                         budgets=(sizes.pack_budget,))
        alone = summary["hpsearch"]
        per_min = 60 / sizes.pack_budget
        where = (f"{what}, seeds {','.join(map(str, sizes.pack_seeds))}, {sizes.pack_budget:g} s each, CPU; "
                 "median [min, max]")
        for k in sizes.pack_ks:
            packed = summary[f"hpsearch-pack{k}"]
            rate, rate_alone = packed["trials"].median * per_min, alone["trials"].median * per_min
            rows.append(Row(f"packs: trials finished a minute, packs of {k} vs one at a time ({where})",
                            f"{rate:.1f}", f"{rate_alone:.1f}",
                            f"{rate / rate_alone:.2f}x" if rate_alone else "-", "GPU: > 1x; CPU: auto keeps 1"))
            best, best_alone = packed["best_at"][sizes.pack_budget], alone["best_at"][sizes.pack_budget]
            gap = (best.median - best_alone.median) * (1 if maximize else -1)  # > 0: the pack did better
            rows.append(Row(f"packs: best {metric} after {sizes.pack_budget:g} s, packs of {k} vs one at a time "
                            f"({what})", best.text(".4f", "none"), best_alone.text(".4f", "none"),
                            f"{gap:+.4f} {'higher' if maximize else 'lower'} is better" if math.isfinite(gap)
                            else "-"))
    return rows


PACK_SPACES = ((HERE.parent / "studies" / "quickstart.yaml", "quickstart study (mnist-5k MLP)"),
               (HERE.parent / "studies" / "bottleneck.yaml", "bottleneck study (mnist-5k denoising autoencoder)"))


if __name__ == "__main__":
    main()
