"""Refit: the best configuration retrained on training + validation data is what gets tested and registered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution

from hpsearch.cli import cli
from hpsearch.data import load_search_data
from hpsearch.refit import merged, refit_epochs
from hpsearch.spec import parse_spec

SPEC: dict[str, Any] = {
    "study": {"name": "rf", "metric": "val_accuracy", "n_trials": 3, "sampler": {"type": "random"},
              "pruner": "none"},
    "task": {"type": "classify", "dataset": "digits", "epochs": 3, "batch_size": 64},
    "model": {"family": "mlp"},
    "space": {"width": {"type": "int", "low": 16, "high": 48}, "lr": {"type": "float", "low": 3e-3, "high": 3e-2}},
}


def _spec(**study: Any) -> Any:
    return parse_spec({**SPEC, "study": {**SPEC["study"], **study}})


def _trial(curve: dict[int, float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(value=max(curve.values()), params={"x": 0.5},
                                     distributions={"x": FloatDistribution(0, 1)}, intermediate_values=curve)


@pytest.mark.parametrize(("study", "curve", "expected"), [
    ({}, {1: 0.8, 2: 0.9, 3: 0.85}, (2, "best")),  # where validation peaked, not the last epoch
    ({}, {1: 0.8, 2: 0.9, 3: 0.9}, (2, "best")),  # the earliest of equal bests
    ({"metric": "val_loss"}, {1: 0.5, 2: 0.3, 3: 0.4, 4: 0.35}, (2, "best")),  # minimised
    ({"refit": {"epochs": 7}}, {1: 0.8, 2: 0.9}, (7, "fixed")),
])
def test_refit_epochs_follow_the_best_trials_curve_or_the_spec(study: dict[str, Any], curve: dict[int, float],
                                                               expected: tuple[int, str]) -> None:
    assert refit_epochs(_spec(**study), _trial(curve)) == expected


def test_merged_data_trains_on_train_and_validation_and_validates_on_nothing() -> None:
    data = load_search_data("digits", download=False)
    full = merged(data)
    assert len(full.train) == len(data.train) + len(data.val) and len(full.val) == 0
    assert torch.equal(full.train.images[len(data.train):], data.val.images)
    assert (full.mean, full.std) == (data.mean, data.std)  # inputs standardised as the trials' were


@pytest.mark.parametrize(("refit", "enabled"), [(None, True), (False, False), ({"epochs": "best"}, True)])
def test_refit_is_on_by_default_for_single_objective_studies(refit: Any, enabled: bool) -> None:
    study = {} if refit is None else {"refit": refit}
    assert _spec(**study).study.refit.enabled is enabled


def test_refit_is_off_by_default_for_multi_objective_studies() -> None:
    spec = parse_spec({**SPEC, "study": {**{k: v for k, v in SPEC["study"].items() if k != "metric"},
                                         "metrics": ["val_accuracy", "n_params"]}})
    assert spec.study.refit.enabled is False


@pytest.mark.parametrize(("refit", "message"), [
    ({"epochs": "many"}, "study.refit.epochs"),
    ({"epochs": 0}, "study.refit.epochs"),
    ({"data": "train"}, "study.refit.data"),
    ({"enabled": "yes"}, "study.refit.enabled"),
    ({"when": "now"}, "when"),
])
def test_bad_refit_settings_are_refused(tmp_path: Path, refit: Any, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "study": {**SPEC["study"], "refit": refit}}))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def _run(tmp_path: Path, *args: str) -> tuple[Any, optuna.Study, MlflowClient]:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(cli, ["run", str(path), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = tmp_path / "runs"
    study = optuna.load_study(study_name="rf", storage=f"sqlite:///{runs / 'optuna.db'}")
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    return result, study, MlflowClient(tracking_uri=uri, registry_uri=uri)


def _use_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point MLflow's fluent API (``models:/`` URIs) at the study's store, for this test only."""
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def _trial_model(study: optuna.Study, tmp_path: Path) -> torch.Tensor:
    path = tmp_path / "trial-model.pt"
    optuna.artifacts.download_artifact(
        artifact_store=optuna.artifacts.FileSystemArtifactStore(str(tmp_path / "runs" / "artifacts")),
        file_path=str(path), artifact_id=study.best_trial.user_attrs["model_artifact_id"])
    state = torch.load(path)
    return torch.cat([v.flatten() for v in state.values() if v.is_floating_point()])


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
def test_the_refit_model_trains_on_train_and_val_and_is_the_one_registered(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    result, study, client = _run(tmp_path)
    test = study.user_attrs["hpsearch.test"]
    data = study.user_attrs["hpsearch.data"]
    best = study.best_trial
    # Trained on every training image: the search's training and validation splits together.
    assert test["refit"]["n_train"] == data["n_train"] + data["n_val"] and test["refit"]["trial"] == best.number
    assert test["refit"]["epochs"] == refit_epochs(_spec(), best)[0]
    assert "Final model: Trial #%d's configuration refit on %d" % (best.number, test["refit"]["n_train"]) \
        in result.output
    # Its own MLflow run, nested under the study's run, tagged with the trial it refits; the model is there.
    (version,) = client.search_model_versions("name = 'rf'")
    run = client.get_run(version.run_id)
    assert run.data.tags["hpsearch.role"] == "refit" and run.data.tags["hpsearch.refit_of"] == str(best.number)
    assert run.data.tags["mlflow.parentRunId"] == study.user_attrs["mlflow_parent_run_id"]
    assert run.data.params["refit.n_train"] == str(test["refit"]["n_train"])
    # Its MLflow dataset inputs: what it trained on (training + validation, as one training split) and the test.
    inputs = {(d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
              : json.loads(d.dataset.profile) for d in run.inputs.dataset_inputs}
    assert set(inputs) == {("digits", "training"), ("digits", "test")}
    assert inputs[("digits", "training")]["rows"] == test["refit"]["n_train"]
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == test["refit"]["epochs"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["metrics"]["test_accuracy"])
    # The registered model is the refit, not the trial's own model.
    _use_store(monkeypatch, tmp_path)
    registered = mlflow.pytorch.load_model(f"models:/rf/{version.version}", map_location="cpu")
    assert not torch.allclose(_weights(registered), _trial_model(study, tmp_path))


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
def test_no_refit_registers_the_best_trials_own_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, study, client = _run(tmp_path, "--no-refit")
    test = study.user_attrs["hpsearch.test"]
    assert "refit" not in test and "Final model: Trial #%d's own model" % study.best_trial.number in result.output
    (version,) = client.search_model_versions("name = 'rf'")
    assert version.run_id == study.user_attrs["mlflow_parent_run_id"]
    _use_store(monkeypatch, tmp_path)
    registered = mlflow.pytorch.load_model(f"models:/rf/{version.version}", map_location="cpu")
    assert torch.equal(_weights(registered), _trial_model(study, tmp_path))
    exp = client.get_experiment_by_name("rf")
    assert not [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("hpsearch.role") == "refit"]


# Refit once with several workers: tests/test_workers.py's two `run`s of one spec started together.
