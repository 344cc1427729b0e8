"""End to end through the CLI: `hpsearch run` on a small spec, then the Optuna storage and the
MLflow store are read back through their own APIs."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from hpsearch.cli import cli

SMALL = {
    "study": {
        "name": "e2e",
        "metric": "val_accuracy",
        "n_trials": 6,
        "sampler": {"type": "tpe", "n_startup_trials": 2},
        "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "enqueue": [{"lr": 0.01, "optimizer": "adam"}],
    },
    "task": {"type": "classify", "dataset": "digits", "epochs": 3, "batch_size": 64},
    "model": {"family": "mlp"},
    "space": {
        "width": {"type": "int", "low": 8, "high": 64, "log": True},
        "lr": {"type": "float", "low": 1e-4, "high": 5e-2, "log": True},
        "optimizer": ["adam", "sgd"],
        "momentum": {"type": "float", "low": 0.5, "high": 0.95},
    },
}


def _write(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_run_records_study_and_mlflow(tmp_path: Path, _isolated_runs_dir: Path) -> None:
    path = _write(tmp_path, SMALL)
    result = CliRunner().invoke(cli, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Best trial" in result.output and "Registered model: e2e version 1" in result.output
    assert "hpsearch dashboard" in result.output

    runs = _isolated_runs_dir
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{runs}/optuna.db")
    trials = study.get_trials()
    states = [t.state for t in trials]
    # n_trials is the study's total: exactly 6 finished trials.
    assert len(trials) == 6 and all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                     for s in states)
    assert trials[0].params["lr"] == 0.01  # the enqueued configuration ran first
    assert study.user_attrs["hpsearch.data"]["name"] == "digits"
    assert study.user_attrs["hpsearch.spec"]["study"]["name"] == "e2e"
    test = study.user_attrs["hpsearch.test"]
    assert test["trial"] == study.best_trial.number and 0.5 < test["metrics"]["test_accuracy"] <= 1.0
    for t in trials:
        assert {"seed", "device", "n_params", "mlflow_run_id"} <= set(t.user_attrs)  # stored as the trial starts
        assert len(t.intermediate_values) >= 1  # reported every epoch
        if t.state == optuna.trial.TrialState.COMPLETE:  # ...and as it ends: its final metrics, model and picture
            assert {"train_seconds", "val_accuracy", "train_loss", "model_artifact_id",
                    "artifact:confusion_matrix.png"} <= set(t.user_attrs)

    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    all_runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if r.data.tags.get("hpsearch.role") == "trial"]
    refits = [r for r in all_runs if r.data.tags.get("hpsearch.role") == "refit"]
    assert len(parents) == 1 and len(children) == 6 and len(refits) == 1
    assert len(all_runs) == 8
    parent = parents[0]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert "test_accuracy" in parent.data.metrics
    assert parent.data.params["data.name"] == "digits"
    by_id = {r.info.run_id: r for r in children}
    for t in trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]  # trial -> run link
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["trial_number"] == str(t.number)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == sorted(t.intermediate_values)  # one point per epoch
        expected = {"COMPLETE": ("FINISHED", "COMPLETE"), "PRUNED": ("FINISHED", "PRUNED")}[t.state.name]
        assert (run.info.status, run.data.tags["hpsearch.state"]) == expected
        for key in ("train_loss", "epoch_seconds", "lr"):
            assert key in run.data.metrics
    best_run = by_id[study.best_trial.user_attrs["mlflow_run_id"]]
    artifacts = [a.path for a in client.list_artifacts(best_run.info.run_id, "images")]
    assert "images/confusion_matrix.png" in artifacts
    versions = client.search_model_versions("name='e2e'")
    # The registered model is the refit of the best configuration, logged on its own run under the parent.
    assert len(versions) == 1 and versions[0].run_id == refits[0].info.run_id
    assert refits[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert refits[0].data.tags["hpsearch.refit_of"] == str(study.best_trial.number)

    # Running again resumes: nothing more to do, the total stays 6, no second parent run.
    again = CliRunner().invoke(cli, ["run", str(path)], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert len(optuna.load_study(study_name="e2e", storage=f"sqlite:///{runs}/optuna.db").trials) == 6
    assert len([r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]) == 1


@pytest.mark.slow
def test_changed_space_is_refused_unless_allowed(tmp_path: Path) -> None:
    small = {**SMALL, "study": {**SMALL["study"], "n_trials": 1, "enqueue": []}, "tracking": {"enabled": False}}
    path = _write(tmp_path, small)
    first = CliRunner().invoke(cli, ["run", str(path), "--no-finish"])
    assert first.exit_code == 0, first.output
    # The summary names the best trial so far and says the test split was left alone.
    assert "Best trial so far: #0" in first.output and "Test split not touched (--no-finish)" in first.output
    changed = {**small, "space": {**small["space"], "width": {"type": "int", "low": 8, "high": 128}}}
    path = _write(tmp_path, changed)
    result = CliRunner().invoke(cli, ["run", str(path), "--no-finish"])
    assert result.exit_code == 1 and "space.width" in result.output and "--allow-space-change" in result.output
    result = CliRunner().invoke(cli, ["run", str(path), "--no-finish", "--allow-space-change"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_normalize_false_tests_the_model_on_the_inputs_it_was_trained_on(tmp_path: Path,
                                                                         _isolated_runs_dir: Path) -> None:
    spec = {"study": {"name": "raw", "metric": "val_accuracy", "n_trials": 1, "sampler": {"type": "random"},
                      "pruner": "none", "seed": 3},
            "task": {"type": "classify", "dataset": "mnist-5k", "train_limit": 1500, "epochs": 3,
                     "batch_size": 64, "normalize": False},
            "model": {"family": "mlp"}, "space": {"width": 32, "lr": 0.003}, "tracking": {"enabled": False}}
    result = CliRunner().invoke(cli, ["run", str(_write(tmp_path, spec))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="raw", storage=f"sqlite:///{_isolated_runs_dir}/optuna.db")
    val = study.best_trial.user_attrs["val_accuracy"]
    test = study.user_attrs["hpsearch.test"]["metrics"]["test_accuracy"]
    # Trained on standardised pixels and tested on raw ones, the model lost ~0.12 (0.90 -> 0.78);
    # on the inputs it was trained on, test and validation agree to a few points.
    assert val > 0.8 and abs(test - val) < 0.06, (val, test)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg2"])
def test_every_command_takes_the_documented_postgresql_url_forms(scheme: str, postgres_url: str,
                                                                  tmp_path: Path) -> None:
    """The URL forms docs/spec.md documents work as the Optuna storage and as the MLflow tracking URI,
    for run, status, cleanup, worker, report and dashboard (psycopg (3), SQLAlchemy's default
    driver for postgresql://, is not installed: hpsearch uses psycopg2)."""
    import subprocess
    import sys
    import urllib.request
    import uuid

    from hpsearch import servers

    from .servers import free_port, with_database
    from .test_tracking import run_cli, tiny_spec

    storage = f"{scheme}://{postgres_url.split('://', 1)[1]}"
    tracking = with_database(storage, "mlflow")  # MLflow's own database: both keep `alembic_version`
    name = f"urls-{uuid.uuid4().hex[:8]}"
    spec = str(tiny_spec(tmp_path, name, tracking={"experiment": name}))
    stores = ["--storage", storage, "--tracking-uri", tracking, "--runs-dir", str(tmp_path / "runs")]

    result = run_cli("run", spec, *stores)
    assert result.exit_code == 0, result.output
    assert f"Registered model: {name} version 1" in result.output
    # The MLflow store holds the study: its parent run and both trial runs, and the model.
    client = MlflowClient(with_database(postgres_url, "mlflow"))
    experiment = client.get_experiment_by_name(name)
    roles = [r.data.tags.get("hpsearch.role") for r in client.search_runs([experiment.experiment_id])]
    assert (roles.count("study"), roles.count("trial")) == (1, 2), roles
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    status = run_cli("status", spec, *stores)
    assert status.exit_code == 0 and "2" in status.output, status.output
    cleanup = run_cli("cleanup", spec, *stores)
    assert cleanup.exit_code == 0 and "no stale trials" in cleanup.output, cleanup.output
    worker = run_cli("worker", "--storage", storage, "--study", name, "--tracking-uri", tracking,
                     "--runs-dir", str(tmp_path / "runs"), "--quiet")
    assert worker.exit_code == 0, worker.output
    report = run_cli("report", spec, *stores, "--out", str(tmp_path / "report"))
    assert report.exit_code == 0, report.output
    assert "Test split" in (tmp_path / "report" / "summary.md").read_text()

    port = free_port()
    dashboard = subprocess.Popen([sys.executable, "-m", "hpsearch", "dashboard", spec, "--storage", storage,
                                  "--runs-dir", str(tmp_path / "runs"), "--port", str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
    try:
        lines: list[str] = []  # "starting: ...", the server's own lines, then "open ..." once it answers
        while not (lines and lines[-1].startswith("open ")) and (not lines or lines[-1]):
            lines.append(dashboard.stdout.readline())
        assert lines[-1].startswith(f"open http://127.0.0.1:{port}"), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as response:
            assert name in {s["study_name"] for s in json.load(response)["study_summaries"]}
    finally:
        servers.stop(dashboard)
