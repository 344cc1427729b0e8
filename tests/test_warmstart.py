"""Warm starts: an earlier study's best configurations first, its history where the search is the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from hpsearch.cli import cli
from hpsearch.record import ORIGIN_ATTR
from hpsearch.warmstart import WARM_ATTR

SPEC: dict[str, Any] = {
    "study": {"name": "first", "metric": "val_accuracy", "n_trials": 5, "sampler": {"type": "random"},
              "pruner": "none"},
    "task": {"type": "classify", "dataset": "digits", "epochs": 2, "batch_size": 64},
    "model": {"family": "mlp"},
    "space": {"width": {"type": "int", "low": 8, "high": 64}, "lr": {"type": "float", "low": 1e-3, "high": 3e-2,
                                                                     "log": True}},
    "tracking": {"enabled": False},
}


def _write(tmp_path: Path, name: str, *, warm: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    data = {**SPEC, **sections}
    data["study"] = {**SPEC["study"], **sections.get("study", {}), "name": name}
    if warm is not None:
        data["study"]["warm_start"] = warm
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(path: Path) -> Any:
    return CliRunner().invoke(cli, ["run", str(path), "--no-finish"], catch_exceptions=False)


def _study(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")


def _best_params(study: optuna.Study, k: int) -> list[dict[str, Any]]:
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    return [t.params for t in sorted(done, key=lambda t: (-t.values[0], t.number))[:k]]


@pytest.mark.slow
def test_the_same_search_starts_from_the_earlier_history_and_best(tmp_path: Path) -> None:
    assert _run(_write(tmp_path, "first")).exit_code == 0
    first = _study(tmp_path, "first")
    result = _run(_write(tmp_path, "second", warm={"study": "first", "top_k": 2}))
    assert result.exit_code == 0, result.output
    second = _study(tmp_path, "second")
    copies = [t for t in second.get_trials() if ORIGIN_ATTR in t.user_attrs]
    own = [t for t in second.get_trials() if ORIGIN_ATTR not in t.user_attrs]
    # The earlier trials are in the history, learning curves included, marked with their origin...
    assert sorted(t.user_attrs[ORIGIN_ATTR] for t in copies) == sorted(f"first#{t.number}" for t in first.get_trials())
    by_origin = {t.user_attrs[ORIGIN_ATTR]: t for t in copies}
    for t in first.get_trials():
        assert by_origin[f"first#{t.number}"].intermediate_values == t.intermediate_values
    # ...but the study still runs its own 5 trials, and the first two are the earlier study's best.
    assert len(own) == 5 and all(t.state == TrialState.COMPLETE for t in own)
    own.sort(key=lambda t: t.number)
    assert [t.params for t in own[:2]] == _best_params(first, 2)
    assert second.user_attrs[WARM_ATTR]["same_search"] is True
    assert "5 of 5 trials finished" in result.output
    # Copies are never the best: the summary names one of this study's own trials.
    best_line = next(line for line in result.output.splitlines() if line.startswith("Best trial so far"))
    assert int(best_line.split("#")[1].split(" ")[0]) in {t.number for t in own}
    # A rerun (resume) is not warm-started again.
    again = _run(_write(tmp_path, "second", warm={"study": "first", "top_k": 2}, study={"n_trials": 6}))
    assert again.exit_code == 0, again.output
    assert len([t for t in _study(tmp_path, "second").get_trials() if ORIGIN_ATTR in t.user_attrs]) == len(copies)


@pytest.mark.slow
def test_another_space_takes_only_the_best_configurations_that_fit(tmp_path: Path) -> None:
    assert _run(_write(tmp_path, "first")).exit_code == 0
    space = {**SPEC["space"], "dropout": {"type": "float", "low": 0.0, "high": 0.3}}
    result = _run(_write(tmp_path, "wider", warm={"study": "first", "top_k": 3}, space=space,
                         study={"n_trials": 3}))
    assert result.exit_code == 0, result.output
    wider = _study(tmp_path, "wider")
    assert not [t for t in wider.get_trials() if ORIGIN_ATTR in t.user_attrs]  # no history: another search
    firsts = sorted(wider.get_trials(), key=lambda t: t.number)
    for trial, params in zip(firsts, _best_params(_study(tmp_path, "first"), 3)):
        assert {k: trial.params[k] for k in params} == params  # dropout is the sampler's choice
    assert wider.user_attrs[WARM_ATTR]["same_search"] is False


@pytest.mark.slow
@pytest.mark.parametrize(("sections", "differs"), [
    ({"study": {"metric": "val_loss"}}, "first metric maximize val_accuracy here minimize val_loss"),
    ({"task": {**SPEC["task"], "dataset": "mnist-5k", "train_limit": 500}}, "data digits"),
])
def test_a_study_of_another_task_or_data_is_refused_with_what_differs(tmp_path: Path, sections: dict[str, Any],
                                                                      differs: str) -> None:
    assert _run(_write(tmp_path, "first", study={"n_trials": 1})).exit_code == 0
    result = CliRunner().invoke(cli, ["run", str(_write(tmp_path, "other", warm={"study": "first"}, **sections))])
    assert result.exit_code == 1
    assert "study.warm_start: study 'first' does not match this one" in result.output and differs in result.output
    assert "Traceback" not in result.output
    assert not _study(tmp_path, "other").get_trials()  # nothing ran


def test_a_missing_earlier_study_is_named(tmp_path: Path) -> None:
    assert CliRunner().invoke(cli, ["run", str(_write(tmp_path, "seed", study={"n_trials": 1}))]).exit_code == 0
    result = CliRunner().invoke(cli, ["run", str(_write(tmp_path, "late", warm={"study": "nowhere"}))])
    assert result.exit_code == 1
    assert "study 'nowhere' does not exist" in result.output and "'seed'" in result.output


@pytest.mark.parametrize(("warm", "message"), [
    ({"study": "first", "top_k": -1}, "study.warm_start.top_k"),
    ({"study": "first", "budget": 3}, "budget"),
    ({"top_k": 3}, "study.warm_start"),
    ({"study": "me"}, "must name another study than this one"),
    ({"study": "first", "storage": "redis://x"}, "study.warm_start.storage"),
])
def test_bad_warm_starts_are_refused_by_validate(tmp_path: Path, warm: dict[str, Any], message: str) -> None:
    result = CliRunner().invoke(cli, ["validate", str(_write(tmp_path, "me", warm=warm))])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
