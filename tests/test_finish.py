"""hpsearch.finish: one process tests; a stop leaves no claim; a test made without MLflow is recorded later."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow.pytorch
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from hpsearch.cli import cli
from hpsearch.data import load_test_split
from hpsearch.finish import _finish_claim
from hpsearch.record import FINISH_KEY, RECORDED_LATE_KEY, TEST_ATTR, TRACKED_LATE_KEY, StoredData
from hpsearch.signals import interrupt, on_stop_signals
from hpsearch.storage import claim, claims
from hpsearch.tasks import input_stats

from .servers import free_port, mlflow_server


def _ctrl_c_once_claimed(where: str) -> Any:
    """Return a profile hook that sends SIGINT to the main thread once the claim is stored: as ``claim``
    returns True (``where="claim"``), or as the finish next looks for a record (``where="_recorded"``)."""
    stored = False

    def hook(frame: Any, event: str, value: Any) -> None:
        nonlocal stored
        name = frame.f_code.co_name
        stored = stored or (event == "return" and name == "claim" and value is True)
        if stored and (where == "claim" or (event == "call" and name == where)):
            sys.setprofile(None)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
    return hook


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")


# CI saw this: a Ctrl-C just after the claim was stored (while the finish looked once more for a
# record another process might have written) left the claim behind, and the next finish waited
# a minute for it to go stale.
@pytest.mark.parametrize("where", ["claim", "_recorded"])
def test_a_stop_signal_right_after_the_claim_leaves_no_claim(study: optuna.Study, where: str) -> None:
    with pytest.raises(KeyboardInterrupt), on_stop_signals(interrupt):
        sys.setprofile(_ctrl_c_once_claimed(where))
        try:
            with _finish_claim(study, 0):
                pytest.fail("the signal should have stopped the finish before its test began")
        finally:
            sys.setprofile(None)
    assert not claims(study, FINISH_KEY)


def test_the_claim_is_held_during_the_test_and_released_after(study: optuna.Study) -> None:
    with _finish_claim(study, 0) as done:
        assert done is None and list(claims(study, FINISH_KEY)) == [f"{FINISH_KEY}0"]
    assert not claims(study, FINISH_KEY)


# --------------------------------------------------------------------------- MLflow down at the finish


@pytest.mark.slow
@pytest.mark.parametrize("claim_before", ["none", "of a dead process"])
def test_a_final_model_tested_while_mlflow_was_down_is_recorded_and_registered_once_it_is_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claim_before: str) -> None:
    # Nothing that finished is lost: the refit model, tested while the MLflow server was unreachable,
    # used to live only in that process's memory, and no later run registered it (the study's test
    # record said the test was done). Now it is kept in the study's artifacts and recorded once MLflow
    # is back, by the next `hpsearch run`, without testing it again.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = {"study": {"name": "late", "metric": "val_accuracy", "n_trials": 3, "sampler": {"type": "random"},
                      "pruner": "none"},
            "task": {"type": "classify", "dataset": "digits", "epochs": 3, "batch_size": 64},
            "model": {"family": "mlp"}, "space": {"width": {"type": "int", "low": 8, "high": 32}},
            "tracking": {"uri": url}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs_dir = str(tmp_path / "runs")
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"

    down = CliRunner().invoke(cli, ["run", str(path), "--runs-dir", runs_dir])
    assert down.exit_code == 0, down.output
    first = optuna.load_study(study_name="late", storage=storage).user_attrs[TEST_ATTR]
    assert first.get("model_version") is None and first["unrecorded"] and first["model_artifact"]
    assert "Not in MLflow yet" in down.output and "3 trial(s)" in down.output, down.output
    status = CliRunner().invoke(cli, ["status", str(path), "--runs-dir", runs_dir])
    assert f"untracked the final test of trial {first['trial']}" in status.output, status.output
    if claim_before != "none":  # a process that died while recording them late: its claims are taken over
        gone = subprocess.Popen(["true"])
        gone.wait()
        study = optuna.load_study(study_name="late", storage=storage)
        dead = {"worker": f"{socket.gethostname()}:{gone.pid}", "at": time.time()}
        assert claim(study, f"{RECORDED_LATE_KEY}{first['trial']}", {**dead, "token": "x"})  # the final test's
        assert claim(study, f"{TRACKED_LATE_KEY}1", {**dead, "token": "y", "run_id": None})  # trial 1's run
        status = CliRunner().invoke(cli, ["status", str(path), "--runs-dir", runs_dir])
        line = next((x for x in status.output.splitlines() if "trial(s) not in MLflow" in x), "")
        assert "3 trial(s) not in MLflow: 0, 1, 2" in line, status.output  # a claim with no run is not a run

    with mlflow_server(tmp_path / "mlflow", port=port):
        back = CliRunner().invoke(cli, ["run", str(path), "--runs-dir", runs_dir])
        again = CliRunner().invoke(cli, ["run", str(path), "--runs-dir", runs_dir])  # nothing more to record
        client = MlflowClient(url)
        versions = client.search_model_versions("name='late'")
        runs = client.search_runs([client.get_experiment_by_name("late").experiment_id], max_results=100)
        model_run = client.get_run(versions[0].run_id) if versions else None
        losses = client.get_metric_history(model_run.info.run_id, "train_loss") if model_run else []
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        registered = mlflow.pytorch.load_model("models:/late/1", map_location="cpu")
    assert back.exit_code == 0 and again.exit_code == 0, back.output + again.output
    assert "Registered model: late version 1" in back.output and "Not in MLflow" not in back.output, back.output
    assert len(versions) == 1  # registered once, though two runs found MLflow back
    status = CliRunner().invoke(cli, ["status", str(path), "--runs-dir", runs_dir])
    assert status.exit_code == 0 and "untracked" not in status.output, status.output
    study = optuna.load_study(study_name="late", storage=storage)
    record = study.user_attrs[TEST_ATTR]
    assert record["model_version"] == "1" and "unrecorded" not in record
    # Not tested again: the same test metrics, and the same refit (its seconds are those of the first run).
    assert record["metrics"] == first["metrics"] and record["refit"] == first["refit"]
    assert model_run is not None and model_run.data.tags["hpsearch.role"] == "refit"
    assert model_run.data.metrics["test_accuracy"] == pytest.approx(first["metrics"]["test_accuracy"])
    assert model_run.data.metrics["refit_seconds"] == pytest.approx(first["refit"]["seconds"])
    assert model_run.data.params["refit.n_train"] == str(first["refit"]["n_train"])
    assert len(losses) == first["refit"]["epochs"]  # the refit's curve, kept in the study for its late run
    # The registered model is the one tested: on the test split it scores what the record says.
    stored = StoredData.from_study(study)
    mean, std = input_stats(stored.mean, stored.std, standardise=True)
    test = load_test_split(stored.provenance())
    with torch.no_grad():
        predicted = registered((test.images.float() / 255.0 - mean) / std).argmax(dim=1)
    assert (predicted == test.labels).float().mean().item() == pytest.approx(first["metrics"]["test_accuracy"])
    trial_runs = Counter(r.data.tags.get("hpsearch.trial") for r in runs if r.data.tags.get("hpsearch.role") == "trial")
    assert trial_runs == {str(t.number): 1 for t in study.trials}  # every trial's run, once
