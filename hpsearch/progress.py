"""A live progress line for a study, read from its storage, and the end-of-study summary."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

import optuna

from hpsearch.insights import experiment_link, ui_url_for
from hpsearch.record import STOPPED_ATTR, Counts, FinalTest, StoredData, best_trial, count_trials, untracked
from hpsearch.spec import Spec, mask_password


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(spec: Spec, study: optuna.Study, counts: Counts, elapsed: float, done_at_start: int) -> str:
    """Return one line: a bar, trials done / pruned / failed, the best value, elapsed and ETA."""
    total = spec.study.n_trials
    done = min(counts.finished, total)
    width = 24
    filled = int(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    best = "-"
    top = best_trial(spec, study.get_trials(deepcopy=False)) if counts.complete else None
    if top is not None:
        best = (f"{top.values[0]:.4g}" if not spec.study.multi_objective
                else f"{len(study.best_trials)} on the Pareto front")
    new = done - done_at_start
    eta = "-" if new <= 0 else _clock(elapsed / new * (total - done))
    return (f"[{bar}] {done}/{total} trials | complete {counts.complete} pruned {counts.pruned} "
            f"failed {counts.failed} running {counts.running} | best {spec.study.metrics[0].name} {best} | "
            f"{_clock(elapsed)} elapsed, ETA {eta}")


class Progress:
    """Redraws the progress line every ``interval`` seconds from a thread, until stopped."""

    def __init__(self, spec: Spec, study: optuna.Study, *, stream: TextIO = sys.stderr, interval: float = 1.0):
        self.spec, self.study, self.stream, self.interval = spec, study, stream, interval
        self.tty = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.monotonic()
        self._done_at_start = count_trials(study).finished
        self._last = ""

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._draw(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def _draw(self, final: bool = False) -> None:
        try:
            line = progress_line(self.spec, self.study, count_trials(self.study), time.monotonic() - self._start,
                                 self._done_at_start)
        except Exception:  # noqa: BLE001 - a busy storage must not kill the display, nor the study
            return
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self._last)) + ("\n" if final else ""))
        elif line != self._last or final:
            # Not a terminal (CI, a log file): one line per change, without carriage returns.
            if line.split(" | ")[0] != self._last.split(" | ")[0] or final:
                self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line


def summary(spec: Spec, study: optuna.Study, result: dict[str, Any]) -> str:
    """Return the end-of-study summary: best params and values, test metrics, where to look next."""
    counts = count_trials(study)
    lines = [f"Study {spec.study.name!r}: {counts.finished} of {spec.study.n_trials} trials finished "
             f"({counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed)."]
    if stopped := study.user_attrs.get(STOPPED_ATTR):
        lines.append(f"Stopped early by study.stop.{stopped['rule']}: {stopped['reason']}.")
    if data := StoredData.from_study(study):
        lines.append(f"Data: {data.describe(brief=True)}"
                     + (f"  [FALLBACK: not the requested dataset {data.requested!r}]" if data.fallback else ""))
    if test := FinalTest.from_dict(result):
        names = [m.name for m in spec.study.metrics]
        values = ", ".join(f"{n}={v:.5g}" for n, v in zip(names, test.values))
        lines.append(f"Best trial: #{test.trial} ({values})")
        lines.append("Best params: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(test.params.items())))
        lines.append(f"Final model: {test.model_text()}.")
        lines.append(f"Test split ({test.n_test} samples, touched once, by this model): "
                     + ", ".join(f"{k}={v:.5g}" for k, v in sorted(test.metrics.items())))
        if test.model_version:
            lines.append(f"Registered model: {test.registered_model} version {test.model_version}"
                         + (f"; {test.champion}" if test.champion else ""))
    elif (best := best_trial(spec, study.get_trials(deepcopy=False))) is not None:
        names = [m.name for m in spec.study.metrics]
        values = ", ".join(f"{n}={v:.5g}" for n, v in zip(names, best.values))
        lines.append(f"Best trial so far: #{best.number} ({values})")
        lines.append("Best params: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(best.params.items())))
        lines.append(f"Test split not touched (--no-finish); `hpsearch run {spec.path}` again tests and registers "
                     "the best model once the study has all its trials.")
    else:
        lines.append("No trial completed, so there is no best model yet.")
    if spec.tracking.enabled:
        lines.append(f"MLflow experiment: {spec.tracking.experiment} at {mask_password(spec.tracking.uri)}")
        missing = untracked(study.get_trials(deepcopy=False), study._storage.get_study_system_attrs(study._study_id))
        if (test and test.unrecorded) or missing:
            what = [f"the runs of {len(missing)} trial(s)"] if missing else []
            what += ["the final test and model (kept in the study's artifacts)"] if test and test.unrecorded else []
            lines.append(f"Not in MLflow yet: {' and '.join(what)}, as the store was unreachable. `hpsearch run "
                         f"{spec.path}` records them once it is back, without testing again.")
    lines.append("Look at it:")
    lines.append(f"  hpsearch dashboard {spec.path}    # optuna-dashboard on {mask_password(spec.study.storage)}")
    if spec.tracking.enabled:
        link = experiment_link(study.user_attrs, ui_url_for(spec))
        lines.append(f"  hpsearch ui {spec.path}           # the MLflow UI" + (f", then open {link}" if link else ""))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
