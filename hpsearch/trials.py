"""Reading a study's trials: counts per state and the best trial (no torch, no MLflow)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from hpsearch.spec import Spec

# What hpsearch stores in a study's user attrs.
SPEC_ATTR = "hpsearch.spec"
FINGERPRINT_ATTR = "hpsearch.fingerprint"
DATA_ATTR = "hpsearch.data"

# A trial copied from an earlier study by a warm start (hpsearch/warmstart.py): "<study>#<number>".
# The sampler and pruner learn from it; it has no model and is not one of this study's trials.
ORIGIN_ATTR = "warm_start_from"


@dataclass(frozen=True)
class Counts:
    """Trials per state; `lost` failed through no fault of their own (a worker died, Ctrl-C); `inherited`
    were copied from an earlier study by a warm start (neither counts towards n_trials)."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    lost: int = 0
    running: int = 0
    waiting: int = 0
    inherited: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def count(trials: Sequence[FrozenTrial]) -> Counts:
    """Return the trials per state, a trial that failed for a reason of its own counts; one lost to a dead worker or Ctrl-C does not."""
    c = {"complete": 0, "pruned": 0, "failed": 0, "lost": 0, "running": 0, "waiting": 0, "inherited": 0}
    for t in trials:
        if ORIGIN_ATTR in t.user_attrs:
            c["inherited"] += 1
        elif t.state == TrialState.COMPLETE:
            c["complete"] += 1
        elif t.state == TrialState.PRUNED:
            c["pruned"] += 1
        elif t.state == TrialState.FAIL:
            c["failed" if "fail_reason" in t.user_attrs else "lost"] += 1
        elif t.state == TrialState.RUNNING:
            c["running"] += 1
        else:
            c["waiting"] += 1
    return Counts(**c)


def best_trial(spec: Spec, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """Return this study's best complete trial by the first metric (among the Pareto front if several)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values and ORIGIN_ATTR not in t.user_attrs
                and all(math.isfinite(v) for v in t.values)]
    if not complete:
        return None
    if spec.study.multi_objective:
        complete = _pareto(complete, spec.study.directions) or complete
    sign = 1.0 if spec.study.metrics[0].direction == "minimize" else -1.0
    return min(complete, key=lambda t: (sign * t.values[0], t.number))


def _pareto(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]

    def key(t: FrozenTrial) -> list[float]:
        return [s * v for s, v in zip(signs, t.values)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and a != b

    keys = {t.number: key(t) for t in trials}
    return [t for t in trials if not any(dominates(keys[o.number], keys[t.number]) for o in trials)]
