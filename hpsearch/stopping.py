"""Study-wide stop rules (`study.stop`): target, patience and a time budget, decided from the storage.

Every worker reads the same trials from the same storage before it asks for its next trial, so
the workers of a study (on one machine or many, joined early or late) agree on when it ends:
none starts a new trial once a rule holds. Trials already running finish as usual. The first
worker to see a rule hold records which one in the study (`STOPPED_ATTR`), for the summary, the
report and `hpsearch status`.

- ``target``: a complete trial's first metric reached the value (>= when maximised, <= when minimised).
- ``patience`` (with ``min_delta``): the last N finished trials, in the order they finished, did not
  improve the best value by ``min_delta`` or more (as in Keras's EarlyStopping: a smaller gain
  neither counts nor moves the best). Pruned and failed trials count as not improving: they are
  the study's effort too. Trials lost to a dead worker or Ctrl-C, and trials copied from an
  earlier study by a warm start, do not count.
- ``max_minutes``: that long since the study's first trial started (the study's own time, across
  resumes: a study resumed the next day has run out).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from hpsearch.record import FAIL_REASON_ATTR, ORIGIN_ATTR, STOPPED_ATTR  # noqa: F401 - STOPPED_ATTR: its home was here
from hpsearch.spec import MetricSpec, StopSpec


@dataclass(frozen=True)
class Verdict:
    """A rule that holds: its name (target, patience, max_minutes) and why, in words."""

    rule: str
    reason: str

    def as_attr(self) -> dict[str, str]:
        return {"rule": self.rule, "reason": self.reason, "at": datetime.datetime.now().isoformat(timespec="seconds")}


@dataclass(frozen=True)
class _State:
    """What the rules read from the trials."""

    best: float | None  # the best first-metric value so far (complete trials)
    best_trial: int | None
    since_improvement: int  # finished trials since the best last improved by min_delta or more
    started: datetime.datetime | None  # the first trial's start


def _state(rules: StopSpec, metric: MetricSpec, trials: Sequence[FrozenTrial]) -> _State:
    sign = 1.0 if metric.direction == "maximize" else -1.0
    finished = [t for t in trials if t.datetime_complete is not None and _counts(t)]
    best: float | None = None
    best_trial: int | None = None
    since = 0
    for t in sorted(finished, key=lambda t: (t.datetime_complete, t.number)):
        value = t.values[0] if t.state == TrialState.COMPLETE and t.values else None
        if value is not None and math.isfinite(value) and (
                best is None or sign * (value - best) >= max(rules.min_delta, 1e-300)):
            best, best_trial, since = value, t.number, 0
        else:
            since += 1
    starts = [t.datetime_start for t in trials if t.datetime_start is not None and ORIGIN_ATTR not in t.user_attrs]
    return _State(best=best, best_trial=best_trial, since_improvement=since, started=min(starts, default=None))


def _counts(t: FrozenTrial) -> bool:
    """Return whether a finished trial of this study counts: complete, pruned, or failed through its own fault."""
    if ORIGIN_ATTR in t.user_attrs:  # copied by a warm start: the earlier study's effort, not this one's
        return False
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and FAIL_REASON_ATTR in t.user_attrs)


def _minutes_since(started: datetime.datetime | None, now: datetime.datetime) -> float:
    # Optuna stamps trials with naive local datetimes; so is ``now``.
    return 0.0 if started is None else (now - started).total_seconds() / 60.0


def verdict(rules: StopSpec, metric: MetricSpec, trials: Sequence[FrozenTrial],
            now: datetime.datetime | None = None) -> Verdict | None:
    """Return the first stop rule that holds for these trials (target, patience, max_minutes), or None."""
    if not rules.active:
        return None
    now = now or datetime.datetime.now()
    s = _state(rules, metric, trials)
    if rules.target is not None and s.best is not None:
        reached = s.best >= rules.target if metric.direction == "maximize" else s.best <= rules.target
        if reached:
            return Verdict("target", f"trial {s.best_trial} reached {metric.name} {s.best:.6g} (target "
                                     f"{rules.target:g})")
    if rules.patience is not None and s.best is not None and s.since_improvement >= rules.patience:
        gain = f" by {rules.min_delta:g} or more" if rules.min_delta else ""
        return Verdict("patience", f"{s.since_improvement} finished trials in a row did not improve the best "
                                   f"{metric.name} ({s.best:.6g}, trial {s.best_trial}){gain} (patience "
                                   f"{rules.patience})")
    if rules.max_minutes is not None and _minutes_since(s.started, now) >= rules.max_minutes:
        return Verdict("max_minutes", f"the study has run {_minutes_since(s.started, now):.1f} minutes since its "
                                      f"first trial started (max_minutes {rules.max_minutes:g})")
    return None


def closeness(rules: StopSpec, metric: MetricSpec, trials: Sequence[FrozenTrial],
              now: datetime.datetime | None = None) -> list[str]:
    """Return one line per rule in force saying how close the study is to it (for `hpsearch status`)."""
    now = now or datetime.datetime.now()
    s = _state(rules, metric, trials)
    best = "no complete trial yet" if s.best is None else f"best {s.best:.6g} (trial {s.best_trial})"
    lines = []
    if rules.target is not None:
        lines.append(f"target {metric.name} {rules.target:g}: {best}")
    if rules.patience is not None:
        gain = f" by >= {rules.min_delta:g}" if rules.min_delta else ""
        lines.append(f"patience {rules.patience}: {s.since_improvement} finished trial(s) since the best last "
                     f"improved{gain}")
    if rules.max_minutes is not None:
        lines.append(f"max_minutes {rules.max_minutes:g}: {_minutes_since(s.started, now):.1f} minutes since the "
                     "first trial started")
    return lines
