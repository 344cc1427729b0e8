"""The background tracking writer, end to end through the CLI against real stores: training never waits for
MLflow, a trial's records reach MLflow before Optuna is told its state, a stopped or killed worker leaves
each run whole or marked killed, and an unreachable server only warns.

The MLflow store is held up the way a busy database holds it up: another connection keeps an exclusive
lock on its SQLite file, so the writer's calls wait (MLflow waits up to 20 s for a lock) while Optuna's
storage, another file, stays free.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpsearch.cli import cli

from .servers import free_port

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 30
SPEC = {
    "study": {"name": "writer", "metric": "val_accuracy", "n_trials": 2, "sampler": {"type": "random"},
              "pruner": "none", "heartbeat_interval": 1, "grace_period": 2},
    "task": {"type": "classify", "dataset": "digits", "epochs": EPOCHS, "batch_size": 64},
    "model": {"family": "mlp"},
    "space": {"width": {"type": "int", "low": 8, "high": 32}, "lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
    "tracking": {"enabled": True},
}


def _write(tmp_path: Path, epochs: int = EPOCHS, **study: object) -> Path:
    path = tmp_path / "spec.yaml"
    task = {**SPEC["task"], "epochs": epochs}
    path.write_text(yaml.safe_dump({**SPEC, "study": {**SPEC["study"], **study}, "task": task}))
    return path


# Every test here tracks to <runs>/mlflow.db (or to a server), none is about making that store: it is there.
pytestmark = pytest.mark.usefixtures("made_mlflow_store")

LONG = 120  # epochs: a trial of seconds, so a poll of the stores (slow on a loaded machine) sees it mid-training


def _popen(args: list[str], tmp_path: Path, log_name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HPSEARCH_RUNS_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "hpsearch", *args], cwd=REPO, env=env,
                            stdout=(tmp_path / log_name).open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen[bytes], what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the study may not exist yet
            if found := condition():
                return found
        if proc.poll() is not None:
            raise AssertionError(f"the process exited (rc {proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="writer", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}").get_trials()


def _tracked_mid_training(tmp_path: Path, before: int) -> optuna.trial.FrozenTrial | None:
    """Return a RUNNING trial that has its MLflow run and has reported at least one epoch, fewer than `before`."""
    return next((t for t in _trials(tmp_path) if t.state == TrialState.RUNNING
                 and 0 < len(t.intermediate_values) < before
                 and "mlflow_run_id" in t.user_attrs), None)


@contextlib.contextmanager
def _store_held(tmp_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the MLflow store's SQLite file while inside: every write to it waits."""
    conn = sqlite3.connect(tmp_path / "runs" / "mlflow.db", timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _runs(tmp_path: Path) -> dict[int, object]:
    """Return the study's trial runs in MLflow by trial number."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("writer")
    return {int(r.data.tags["hpsearch.trial"]): r for r in client.search_runs([exp.experiment_id], max_results=100)
            if "hpsearch.trial" in r.data.tags}


def _whole(tmp_path: Path, run: object, trial: optuna.trial.FrozenTrial) -> None:
    """Assert the run holds every epoch the trial reported to Optuna, and its end."""
    history = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_metric_history(
        run.info.run_id, "val_accuracy")
    assert {m.step: m.value for m in history} == pytest.approx(trial.intermediate_values)
    assert run.data.tags["hpsearch.state"] == ("FAIL" if trial.state == TrialState.FAIL else trial.state.name)


@pytest.mark.slow
def test_training_goes_on_while_mlflow_waits_and_the_trial_is_told_once_its_run_is_whole(tmp_path: Path) -> None:
    run = _popen(["run", str(_write(tmp_path, epochs=LONG)), "--no-finish"], tmp_path, "run.log")
    try:
        # Early in its training (a trial of 30 epochs lasted 0.6 s: on a loaded machine it ended, records and
        # all, between the poll that saw it and the lock, and the test failed on a correct writer).
        first = _wait_for(lambda: _tracked_mid_training(tmp_path, before=LONG // 2), run,
                          "a tracked trial early in its training")
        with _store_held(tmp_path):
            reported = len(_trials(tmp_path)[first.number].intermediate_values)
            assert reported < LONG, f"trial {first.number} had ended ({reported} epochs) before the store was locked"
            # Training does not wait for the store: the trial reports its last epoch while MLflow is held up
            # (written at once, a batch of epochs every 5 s would stall it until the lock goes)...
            _wait_for(lambda: len(_trials(tmp_path)[first.number].intermediate_values) == LONG, run,
                      "the trial to train to its end while the MLflow store is locked", timeout=15)
            time.sleep(1.0)
            # ...but it is not told before its records are in MLflow.
            assert _trials(tmp_path)[first.number].state == TrialState.RUNNING
        assert run.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = (tmp_path / "run.log").read_text()
    assert "could not" not in output and "Traceback" not in output, output
    trials, runs = _trials(tmp_path), _runs(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        assert runs[t.number].info.status == "FINISHED" and "untracked" not in t.user_attrs
        _whole(tmp_path, runs[t.number], t)


@pytest.mark.slow
def test_sigterm_while_records_are_queued_leaves_them_in_mlflow(tmp_path: Path) -> None:
    run = _popen(["run", str(_write(tmp_path, epochs=LONG, n_trials=5)), "--no-finish"], tmp_path, "run.log")
    try:
        doomed = _wait_for(lambda: _tracked_mid_training(tmp_path, before=LONG // 2), run,
                           "a tracked trial early in its training")
        with _store_held(tmp_path):
            _wait_for(lambda: len(_trials(tmp_path)[doomed.number].intermediate_values) >= 3, run,
                      "epochs reported while the MLflow store is locked", timeout=15)
            os.killpg(run.pid, signal.SIGTERM)
            time.sleep(1.0)  # the worker stops with its records still queued behind the lock
        assert run.wait(timeout=60) == 130, (tmp_path / "run.log").read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    trial, mlflow_run = _trials(tmp_path)[doomed.number], _runs(tmp_path)[doomed.number]
    assert trial.state == TrialState.FAIL and "interrupted" in trial.user_attrs and "untracked" not in trial.user_attrs
    assert mlflow_run.info.status == "KILLED"
    _whole(tmp_path, mlflow_run, trial)


def test_a_stop_signal_after_training_ends_the_trial_as_interrupted(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A Ctrl-C that lands once the trial has trained to its end (drawing its final picture, saving
    # its model, waiting for the writer) left a plain FAIL: neither complete nor marked interrupted,
    # its run not KILLED (seen in the suite: SIGTERM while the store was locked).
    import hpsearch.objective

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as StopSignals raises it where the signal lands

    monkeypatch.setenv("HPSEARCH_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(hpsearch.objective.pictures, "confusion_matrix", interrupted)
    result = CliRunner().invoke(cli, ["run", str(_write(tmp_path, n_trials=1)), "--no-finish"])
    assert result.exit_code == 130, result.output
    [trial], runs = _trials(tmp_path), _runs(tmp_path)
    assert trial.state == TrialState.FAIL and "interrupted" in trial.user_attrs, trial.user_attrs
    assert len(trial.intermediate_values) == EPOCHS  # it had trained to its end
    assert runs[0].info.status == "KILLED"
    _whole(tmp_path, runs[0], trial)


@pytest.mark.slow
def test_sigkill_while_records_are_queued_leaves_the_run_killed_never_half_written(tmp_path: Path) -> None:
    path = _write(tmp_path, epochs=LONG, n_trials=2)
    worker = _popen(["worker", str(path), "--threads", "1"], tmp_path, "worker.log")
    try:
        doomed = _wait_for(lambda: _tracked_mid_training(tmp_path, before=LONG // 2), worker,
                           "a tracked trial early in its training")
        with _store_held(tmp_path):
            _wait_for(lambda: len(_trials(tmp_path)[doomed.number].intermediate_values) >= 3, worker,
                      "epochs reported while the MLflow store is locked", timeout=15)
            os.killpg(worker.pid, signal.SIGKILL)  # what is queued dies with it
            worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    # The next worker finds the trial stale (no heartbeat for 2 s), fails and retries it, and marks its run killed.
    time.sleep(2.5)
    rerun = _popen(["run", str(path), "--no-finish"], tmp_path, "rerun.log")
    assert rerun.wait(timeout=180) == 0, (tmp_path / "rerun.log").read_text()
    trials, runs = _trials(tmp_path), _runs(tmp_path)
    assert trials[doomed.number].state == TrialState.FAIL
    assert runs[doomed.number].info.status == "KILLED"
    for t in trials:  # every run is whole or marked killed
        if t.number != doomed.number:
            assert t.state == TrialState.COMPLETE and runs[t.number].info.status == "FINISHED"
            _whole(tmp_path, runs[t.number], t)


@pytest.mark.slow
def test_an_unreachable_tracking_server_only_warns_and_marks_the_trials_untracked(tmp_path: Path,
                                                                                 messages: list[str]) -> None:
    path = tmp_path / "spec.yaml"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    path.write_text(yaml.safe_dump({**SPEC, "task": {**SPEC["task"], "epochs": 2},
                                    "tracking": {"enabled": True, "uri": url}}))
    result = CliRunner().invoke(cli, ["run", str(path), "--no-finish"])
    assert result.exit_code == 0, result.output
    assert any(url in m and "could not" in m for m in messages), list(messages)
    trials = optuna.load_study(study_name="writer", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    # Counted before each trial was told: the study knows which trials MLflow lacks.
    assert all("untracked" in t.user_attrs for t in trials)
