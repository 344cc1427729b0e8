"""Shared fixtures: every test runs with its own runs dir, so stores never leak between tests."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

# The shared servers, one of each per test process (each xdist worker): a fixture imported into
# several test modules would be a fixture of each, and start a server per module. Tests name
# their studies and experiments uniquely, so they can share them.
from .servers import mlflow_url, postgres_url  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"


@pytest.fixture(autouse=True)
def _isolated_runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the embedded stores at tmp_path and drop env overrides from the caller's shell."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("HPSEARCH_RUNS_DIR", str(runs))
    for var in ("HPSEARCH_STORAGE", "HPSEARCH_TRACKING_URI", "HPSEARCH_ARTIFACTS", "HPSEARCH_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    return runs


@pytest.fixture(scope="session")
def mlflow_schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store with MLflow's tables, made once per test process: MLflow makes a new
    store's tables by running its schema migrations, seconds of CPU; copying the file takes milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("schema") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}")
    return path


@pytest.fixture
def made_mlflow_store(mlflow_schema: Path, _isolated_runs_dir: Path) -> Path:
    """Return <runs>/mlflow.db, an empty MLflow store with its tables made (a copy of ``mlflow_schema``).

    For tests that track to the default store but are not about making one. Making one stays tested where
    it is the point: tests/test_tracking.py's workers racing on a new store, test_workers' killed worker
    and two runs started together, test_cli's run of a small study.
    """
    _isolated_runs_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(mlflow_schema, _isolated_runs_dir / "mlflow.db"))


def _one_cpu_per_xdist_worker() -> None:
    """Under pytest-xdist, keep each test process (and what it starts) on a CPU of its own.

    Two test processes that each run 2-thread torch (hpsearch takes every CPU the process may
    use) on 2 cores stall each other: OpenMP threads spin while they wait for a core. Measured
    on the 2-core machine, a training that took 8 s on one thread took over 180 s that way.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})


_one_cpu_per_xdist_worker()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the slow tests first (each file's order kept), the quick ones last.

    pytest-xdist's worksteal hands an idle test process the tail of another's queue; with the
    slow tests (whole studies, servers, killed workers: 10-100 s each) at the end, the run ended
    with one process on a long test and the other idle for minutes.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


class LogLines:
    """hpsearch's messages of a test, each as the command line prints it (``warning: ...``)."""

    def __init__(self, caplog: pytest.LogCaptureFixture, *, level: int = logging.INFO) -> None:
        self._caplog, self._level = caplog, level

    def _lines(self) -> list[str]:
        from hpsearch.log import ROOT, Formatter

        formatter = Formatter()
        return [formatter.format(r) for r in self._caplog.records
                if r.name.split(".", 1)[0] == ROOT and r.levelno >= self._level]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._lines())

    def __len__(self) -> int:
        return len(self._lines())

    def __getitem__(self, index: int) -> str:
        return self._lines()[index]

    def __eq__(self, other: object) -> bool:
        return self._lines() == other

    def __repr__(self) -> str:
        return repr(self._lines())


@pytest.fixture
def messages(caplog: pytest.LogCaptureFixture) -> LogLines:
    """Return hpsearch's messages (INFO and above) logged during the test, as the CLI prints them."""
    caplog.set_level(logging.INFO, logger="hpsearch")
    return LogLines(caplog)
