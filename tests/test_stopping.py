"""Study-wide stop rules: target, patience, max_minutes; decided from the storage for every worker."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hpsearch.cli import cli
from hpsearch.spec import MetricSpec, StopSpec
from hpsearch.stopping import STOPPED_ATTR, closeness, verdict

ACCURACY = MetricSpec("val_accuracy", "maximize")
LOSS = MetricSpec("val_loss", "minimize")
NOW = datetime.datetime(2026, 11, 30, 12, 0, 0)


def trials(*values: float | str, start: datetime.datetime = NOW) -> list[optuna.trial.FrozenTrial]:
    """Return finished trials in the order given: a number is a complete trial, "pruned"/"failed" the others.

    They are stored in a real (in-memory) Optuna study, one minute apart.
    """
    study = optuna.create_study(direction="maximize")
    for i, value in enumerate(values):
        at = start + datetime.timedelta(minutes=i)
        kwargs: dict[str, Any] = {"params": {"x": 0.5}, "distributions": {"x": FloatDistribution(0, 1)}}
        if value == "pruned":
            trial = create_trial(state=TrialState.PRUNED, **kwargs)
        elif value == "failed":
            trial = create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "diverged"}, **kwargs)
        else:
            trial = create_trial(value=float(value), **kwargs)
        trial.datetime_start, trial.datetime_complete = at, at + datetime.timedelta(seconds=30)
        study.add_trial(trial)
    return study.get_trials()


@pytest.mark.parametrize(("rules", "metric", "values", "rule"), [
    (StopSpec(target=0.9), ACCURACY, (0.5, 0.8), None),
    (StopSpec(target=0.9), ACCURACY, (0.5, 0.91, 0.3), "target"),
    (StopSpec(target=0.2), LOSS, (0.5, 0.21), None),
    (StopSpec(target=0.2), LOSS, (0.5, 0.2), "target"),  # reaching is enough
    # Patience 3: the best (0.6) was last improved three finished trials ago.
    (StopSpec(patience=3), ACCURACY, (0.5, 0.6, 0.55, 0.6, 0.4), "patience"),
    (StopSpec(patience=4), ACCURACY, (0.5, 0.6, 0.55, 0.6, 0.4), None),
    # Gains under min_delta do not count (0.61 and 0.62 over 0.6), nor move the best.
    (StopSpec(patience=2, min_delta=0.05), ACCURACY, (0.5, 0.6, 0.61, 0.62), "patience"),
    (StopSpec(patience=2, min_delta=0.05), ACCURACY, (0.5, 0.6, 0.61, 0.66), None),
    # Pruned and failed trials are effort without improvement.
    (StopSpec(patience=2), ACCURACY, (0.5, "pruned", "failed"), "patience"),
    (StopSpec(patience=2), ACCURACY, (0.5, "pruned", 0.7), None),
    (StopSpec(max_minutes=5), ACCURACY, (0.5,), None),
    (StopSpec(), ACCURACY, (0.5,) * 50, None),  # no rule: never
])
def test_each_rule_holds_exactly_when_it_should(rules: StopSpec, metric: MetricSpec, values: tuple[Any, ...],
                                                rule: str | None) -> None:
    found = verdict(rules, metric, trials(*values), now=NOW + datetime.timedelta(minutes=len(values)))
    assert (found.rule if found else None) == rule


def test_max_minutes_counts_from_the_first_trial_across_resumes() -> None:
    done = trials(0.5, 0.6)  # started at NOW and NOW + 1 min
    rules = StopSpec(max_minutes=10)
    assert verdict(rules, ACCURACY, done, now=NOW + datetime.timedelta(minutes=9)) is None
    found = verdict(rules, ACCURACY, done, now=NOW + datetime.timedelta(days=1))  # resumed the next day
    assert found is not None and found.rule == "max_minutes"


def test_closeness_says_where_each_rule_stands() -> None:
    lines = closeness(StopSpec(target=0.9, patience=5, max_minutes=60), ACCURACY, trials(0.5, 0.7, 0.6),
                      now=NOW + datetime.timedelta(minutes=30))
    assert lines == ["target val_accuracy 0.9: best 0.7 (trial 1)",
                     "patience 5: 1 finished trial(s) since the best last improved",
                     "max_minutes 60: 30.0 minutes since the first trial started"]


# --------------------------------------------------------------------------- spec

SPEC: dict[str, Any] = {
    "study": {"name": "stops", "metric": "val_accuracy", "n_trials": 30, "sampler": {"type": "random"},
              "pruner": "none"},
    "task": {"type": "classify", "dataset": "digits", "epochs": 2, "batch_size": 64},
    "model": {"family": "mlp"},
    "space": {"width": {"type": "int", "low": 8, "high": 32}, "lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
    "tracking": {"enabled": False},
}


def _write(tmp_path: Path, stop: Any, **study: Any) -> Path:
    data = {**SPEC, "study": {**SPEC["study"], "stop": stop, **study}}
    data["study"] = {k: v for k, v in data["study"].items() if v is not None}  # None: leave the key out
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("stop", "study", "message"), [
    ({"patience": 0}, {}, "study.stop.patience"),
    ({"max_minutes": -1}, {}, "study.stop.max_minutes"),
    ({"target": "high"}, {}, "study.stop.target"),
    ({"min_delta": 0.01}, {}, "only matters with `patience`"),
    ({"budget": 3}, {}, "budget"),
    ({"target": 0.9}, {"metric": None, "metrics": ["val_accuracy", "n_params"]}, "single-objective"),
])
def test_bad_stop_rules_are_refused_before_anything_runs(tmp_path: Path, stop: Any, study: dict[str, Any],
                                                         message: str) -> None:
    path = _write(tmp_path, stop, **study)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code != 0
    assert "study.stop" in result.output and message in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_target_stops_a_two_worker_study_for_both_workers_and_later_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, {"target": 0.0})  # the first complete trial reaches it
    result = CliRunner().invoke(cli, ["run", str(path), "--workers", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    study = optuna.load_study(study_name="stops", storage=storage)
    done = study.get_trials()
    # Both workers stopped starting trials: the run returned long before 30 trials.
    assert 1 <= len(done) <= 4, [t.state for t in done]
    assert not [t for t in done if t.state == TrialState.RUNNING]
    assert study.user_attrs[STOPPED_ATTR]["rule"] == "target"
    assert "Stopped early by study.stop.target" in result.output
    assert "hpsearch.test" in study.user_attrs  # the best model was still tested once
    status = CliRunner().invoke(cli, ["status", str(path)])
    assert "stopped early by target" in status.output and "target val_accuracy 0" in status.output
    # A worker that joins afterwards agrees: it starts nothing.
    joined = CliRunner().invoke(cli, ["worker", str(path)], catch_exceptions=False)
    assert joined.exit_code == 0 and "ran 0 trial(s)" in joined.output
    assert len(optuna.load_study(study_name="stops", storage=storage).get_trials()) == len(done)


@pytest.mark.slow
def test_patience_ends_a_study_and_the_report_says_why(tmp_path: Path) -> None:
    # Models that learn nothing score near chance: none improves on the first by 0.5.
    path = _write(tmp_path, {"patience": 2, "min_delta": 0.5}, n_trials=12)
    data = yaml.safe_load(path.read_text())
    data["space"] = {"width": 8, "lr": 1e-8}
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="stops", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    assert len(study.get_trials()) == 3  # the best, then 2 without improvement
    assert study.user_attrs[STOPPED_ATTR]["rule"] == "patience"
    report = CliRunner().invoke(cli, ["report", str(path), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert "stopped early by study.stop.patience" in (tmp_path / "report" / "summary.md").read_text()
