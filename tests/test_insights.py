"""Dashboard notes and published comparison plots, on a real SQLite study and a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna_dashboard import get_note
from optuna_dashboard._note import get_note_from_system_attrs, save_note_with_version

from hpsearch import figures, insights

from .conftest import LogLines
from .test_figures import Built, build_study

DENOISE_FIGURES = ["optimization_history", "learning_curves", "param_importances", "parallel_coordinates",
                   "val_mse_vs_bottleneck_dim", "reconstructions_by_bottleneck"]
CLASSIFY_FIGURES = ["optimization_history", "learning_curves", "param_importances", "parallel_coordinates"]


def _trial_note(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    system = study._storage.get_study_system_attrs(study._study_id)
    return get_note_from_system_attrs(system, trial._trial_id)["body"]


def _study_artifacts(study: optuna.Study) -> dict[str, str]:
    metas = optuna.artifacts.get_all_artifact_meta(study)
    return {m.filename: m.artifact_id for m in metas}


@pytest.fixture
def built(tmp_path: Path) -> Built:
    return build_study(tmp_path, "denoise", tracking=False)


@pytest.fixture
def tracked(tmp_path: Path, mlflow_schema: Path) -> Built:
    """The same study, its trials also recorded as MLflow runs."""
    return build_study(tmp_path, "denoise", mlflow_schema=mlflow_schema)


def test_annotate_writes_each_note_once(built: Built) -> None:
    study = built.study
    # The study's note plus one per finished trial (9: complete, pruned and failed).
    assert insights.annotate(built.spec, study) == 10
    assert insights.annotate(built.spec, study) == 0, "unchanged notes are not written again"
    note = get_note(study)
    assert "FALLBACK DATA" in note and "`mnist`" in note, "a fallback dataset is shouted, not whispered"
    assert "9 of 9 finished: 6 complete, 2 pruned, 1 failed" in note
    assert "**Best so far** trial #2: `val_mse` = 0.012" in note
    assert "`test_mse` = 0.01224" in note
    failed = study.trials[7]
    assert "diverged: train_loss is nan" in _trial_note(study, failed)
    pruned = study.trials[5]
    assert "Stopped by the pruner after epoch 2" in _trial_note(study, pruned)
    best = _trial_note(study, study.trials[2])
    assert "`val_mse` 0.012" in best and "`reconstruction.png`" in best


def test_trial_notes_link_to_mlflow_runs(tracked: Built) -> None:
    built, study = tracked, tracked.study
    insights.annotate(built.spec, study, ui_url="http://127.0.0.1:5999")
    trial = study.trials[2]
    run_id = trial.user_attrs["mlflow_run_id"]
    expected = f"http://127.0.0.1:5999/#/experiments/{built.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    assert f"[MLflow run]({expected})" in _trial_note(study, trial)
    experiment = f"http://127.0.0.1:5999/#/experiments/{built.experiment_id}/runs?workflowType=machine_learning"
    assert f"[open in the MLflow UI]({experiment})" in get_note(study)


@pytest.mark.parametrize("attrs, expected", [
    ({"mlflow_run_url": "http://mlflow:5000/#/experiments/3/runs/abc"}, "http://mlflow:5000/#/experiments/3/runs/abc"),
    ({"mlflow_run_id": "abc"}, "http://ui/#/experiments/7/runs/abc?workflowType=machine_learning"),
    ({}, None),
])
def test_run_link(attrs: dict[str, str], expected: str | None) -> None:
    trial = optuna.trial.create_trial(value=1.0, user_attrs=attrs)
    assert insights.run_link({"mlflow_experiment_id": "7"}, trial, "http://ui/") == expected


def test_annotate_leaves_a_note_a_person_edited(built: Built) -> None:
    study = built.study
    insights.annotate(built.spec, study)
    trial = study.trials[0]
    system = study._storage.get_study_system_attrs(study._study_id)
    version = get_note_from_system_attrs(system, trial._trial_id)["version"]
    # What the dashboard does when a person saves a note: the next version, their text.
    save_note_with_version(study._storage, study._study_id, trial._trial_id, version + 1, "my own words")
    insights.annotate(built.spec, study)
    assert _trial_note(study, trial) == "my own words"


def test_refresh_publishes_every_n_trials_and_replaces_in_place(tracked: Built, messages: LogLines) -> None:
    built, spec, study = tracked, tracked.spec, tracked.study
    warnings = messages
    tracker = _tracker(built)
    # 9 finished trials, none drawn yet: due with every=5.
    assert insights.refresh(spec, study, tracker, built.parent_run_id, every=5)
    assert warnings == []
    first = _study_artifacts(study)
    assert sorted(first) == sorted(f"{n}.png" for n in DENOISE_FIGURES)
    assert study.user_attrs[insights.FIGURES_ATTR]["finished"] == 9
    # Nothing new finished: nothing drawn.
    assert not insights.refresh(spec, study, tracker, built.parent_run_id, every=5)
    # At the end of a study: drawn anyway, into the same artifacts (nothing piles up).
    path = Path(spec.artifacts_dir) / first["learning_curves.png"]
    path.write_bytes(b"stale")
    assert insights.refresh(spec, study, tracker, built.parent_run_id, force=True)
    assert _study_artifacts(study) == first
    assert path.read_bytes().startswith(b"\x89PNG")
    assert len(optuna.artifacts.get_all_artifact_meta(study)) == len(DENOISE_FIGURES)
    from mlflow.tracking import MlflowClient

    # The parent run holds the same plots under study/, overwritten in place.
    client = MlflowClient(spec.tracking.uri)
    logged = sorted(Path(a.path).name for a in client.list_artifacts(built.parent_run_id, "study"))
    assert logged == sorted(f"{n}.png" for n in DENOISE_FIGURES)


def _tracker(built: Built):  # noqa: ANN202 - hpsearch.tracking.Tracker
    from .test_figures import _tracker

    return _tracker(built.spec)


def test_refresh_never_raises(built: Built, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                              messages: LogLines) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", str(blocker / "artifacts"))  # cannot be created
    warnings = messages
    assert not insights.refresh(built.spec, built.study, None, None, force=True)
    assert len(warnings) == 1 and warnings[0].startswith("warning: could not refresh")


@pytest.mark.parametrize("kind, expected", [("denoise", DENOISE_FIGURES), ("classify", CLASSIFY_FIGURES)])
def test_study_figures_per_task(tmp_path: Path, kind: str, expected: list[str]) -> None:
    built = build_study(tmp_path, kind, tracking=False)
    figs = insights.study_figures(built.spec, built.study)
    assert list(figs) == expected
    if kind == "denoise":
        labels = [ax.get_ylabel() for ax in figs["reconstructions_by_bottleneck"].axes]
        # Clean and noisy rows, then the best trial of each size, smallest first.
        assert labels[:2] == ["clean", "noisy input"]
        assert [label.split("\n")[0] for label in labels[2:]] == [f"bottleneck {d}" for d in (8, 16, 32, 64, 128)]
        assert labels[4] == "bottleneck 32\n#4: val_mse 0.017", "the better of the two 32-trials"
    for fig in figs.values():
        figures.close(fig)


def test_study_figures_of_a_multi_objective_study(tmp_path: Path) -> None:
    from hpsearch.spec import parse_spec

    raw = {"study": {"name": "mo", "storage": f"sqlite:///{tmp_path / 'o.db'}",
                     "metrics": [{"name": "val_error", "direction": "minimize"},
                                 {"name": "n_params", "direction": "minimize"}]},
           "task": {"type": "classify", "dataset": "digits"}, "model": {"family": "mlp"},
           "space": {"width": {"type": "int", "low": 8, "high": 256, "log": True},
                     "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}}
    spec = parse_spec(raw, runs_dir=tmp_path / "runs")
    study = optuna.create_study(study_name="mo", storage=spec.study.storage, directions=spec.study.directions)
    for i in range(6):
        trial = study.ask()
        width = trial.suggest_int("width", 8, 256, log=True)
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        study.tell(trial, [1.0 / width + 0.01 * i, 1000.0 * width])
    figs = insights.study_figures(spec, study)
    # No learning curves (multi-objective trials report no per-epoch values); a Pareto front instead.
    assert list(figs) == ["optimization_history", "param_importances", "parallel_coordinates", "pareto_front"]
    for fig in figs.values():
        figures.close(fig)
    assert "Best so far" in insights.study_note(spec, study.user_attrs, study.trials, ui_url="http://ui")
