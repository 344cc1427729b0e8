"""The test servers in tests/servers.py start, answer, and leave nothing running."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest

from .servers import (
    POSTGRES_URL_ENV,
    dashboard_server,
    mlflow_server,
    port_is_open,
    postgres_server,
    wait_http,
    with_database,
)

pytestmark = pytest.mark.slow


def _unique(prefix: str) -> str:
    # Session-wide servers (and an external HPSEARCH_TEST_POSTGRES_URL) outlive one test.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10.0) as response:
        return json.load(response)


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def test_postgres_server_keeps_an_optuna_study_and_stops(tmp_path: Path) -> None:
    study_name = _unique("servers-postgres")
    with postgres_server(tmp_path) as url:
        # The role is no superuser: creating Optuna's tables checks that it owns the database.
        storage = optuna.storages.RDBStorage(url)
        study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize")
        study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=3)
        storage.remove_session()
        storage.engine.dispose()  # let the server stop without ending live sessions

        # A second, independent storage object reads what the first one wrote.
        reread = optuna.load_study(study_name=study_name, storage=optuna.storages.RDBStorage(url))
        assert len(reread.trials) == 3
        assert reread.best_value == pytest.approx(study.best_value)
        port = _port(url)
        assert port_is_open(port)
    if POSTGRES_URL_ENV not in os.environ:  # an external server is not ours to stop
        assert not port_is_open(port)


def test_dashboard_server_lists_a_postgres_study(postgres_url: str, tmp_path: Path) -> None:
    study_name = _unique("servers-dashboard")
    optuna.create_study(study_name=study_name, storage=postgres_url).optimize(
        lambda trial: trial.suggest_int("n", 0, 9), n_trials=2
    )
    artifact_dir = tmp_path / "artifacts"
    artifact_dir.mkdir()
    with dashboard_server(postgres_url, artifact_dir, log_dir=tmp_path) as url:
        studies = _get_json(f"{url}/api/studies")
        assert isinstance(studies, dict), studies
        assert study_name in {entry["study_name"] for entry in studies["study_summaries"]}
        port = _port(url)
    assert not port_is_open(port)
    assert (tmp_path / "optuna-dashboard.log").exists()  # its output went to the log, not the test's


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_mlflow_server_keeps_a_run_and_its_artifact(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no internet here, and none wanted
    # MLflow gets its own database: it and Optuna would both claim the table `alembic_version`.
    backend_uri = with_database(request.getfixturevalue("postgres_url"), "mlflow") if backend == "postgresql" else None
    with mlflow_server(tmp_path, backend_uri) as url:
        wait_http(f"{url}/health", timeout=5.0)

        client = MlflowClient(tracking_uri=url)
        experiment_id = client.create_experiment(_unique("servers-mlflow"))
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "val_loss", 0.25, step=1)
        client.log_param(run.info.run_id, "lr", "0.001")
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")  # through the --serve-artifacts proxy
        client.set_terminated(run.info.run_id)

        fetched = client.get_run(run.info.run_id)
        assert fetched.data.metrics["val_loss"] == pytest.approx(0.25)
        assert fetched.data.params["lr"] == "0.001"
        assert fetched.info.status == "FINISHED"
        assert [entry.path for entry in client.list_artifacts(run.info.run_id, "notes")] == ["notes/hello.txt"]
        port = _port(url)
    assert not port_is_open(port)
    # The artifact was stored by the server, under --artifacts-destination.
    assert [path.read_text() for path in (tmp_path / "mlartifacts").rglob("hello.txt")] == ["hello"]
