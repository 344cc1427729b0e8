"""Reading a study's trials: counts per state and the best trial (no torch, no MLflow)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from hpsearch.spec import Spec

# A trial whose MLflow records did not all land (the tracking server was unreachable): user attr, why.
UNTRACKED_ATTR = "untracked"
# + trial number: study system attr, the MLflow run an untracked trial got once the server was back.
TRACKED_LATE_KEY = "hpsearch.tracked_late:"

# Study user attr: validation reports per epoch, decided once per study (a study stored without it
# reported once per epoch). A trial's report number `step` is epoch `step / reports_per_epoch`.
REPORTS_ATTR = "hpsearch.reports_per_epoch"
AUTO_REPORT_SAMPLES = 10_000  # task.reports_per_epoch: auto reports about every this many training images


def auto_reports_per_epoch(n_train: int) -> int:
    """Return how many reports per epoch ``auto`` means for a training split of ``n_train`` images."""
    return max(1, round(n_train / AUTO_REPORT_SAMPLES))


def reports_per_epoch(attrs: Mapping[str, Any]) -> int:
    """Return the study's reports per epoch from its user attrs (1 for studies from before they existed)."""
    return int(attrs.get(REPORTS_ATTR, 1))


def epoch_text(step: int, per_epoch: int) -> str:
    """Return report ``step`` as an epoch for people: "3", or "2.25" within an epoch."""
    return f"{step / per_epoch:.4g}"

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


def untracked(trials: Sequence[FrozenTrial], study_system_attrs: Mapping[str, object]) -> list[int]:
    """Return the numbers of finished trials missing from MLflow: marked untracked, and not recorded there since."""
    return [t.number for t in trials if UNTRACKED_ATTR in t.user_attrs and t.state.is_finished()
            and f"{TRACKED_LATE_KEY}{t.number}" not in study_system_attrs]


def untracked_note(numbers: Sequence[int]) -> str:
    """Return what `status` and the report say about trials missing from MLflow."""
    return (", ".join(map(str, numbers)) + " (the MLflow server was unreachable while they ran; a worker or the "
            "final test records their runs once it is back)")
