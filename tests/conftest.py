"""Shared fixtures: every test runs with its own runs dir, so stores never leak between tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
