"""MLflow at the edge: one parent run per study, one child run per trial, never a stopped study.

The only module that imports mlflow. Every call goes through :class:`Tracker`, which talks to
the store with explicit run ids (no global active run, so several processes and threads are
safe) and turns any MLflow failure into a warning: an unreachable tracking server or a locked
database costs a message, never a trial.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hpsearch.errors import StorageError

T = TypeVar("T")

_PARAM_LIMIT = 6000  # MLflow's longest param value (MLFLOW_PARAM_VALUE_MAX_LENGTH default)
_BATCH = 100  # log_batch takes at most 100 params per call
_RETRIES = 5  # tries for a busy SQLite store ("database is locked") before giving up with a warning
_WARN_EVERY_S = 60.0
_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "databricks")


def check_uri(uri: str) -> None:
    """Raise StorageError unless ``uri`` is a tracking URI MLflow can use."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"the MLflow tracking URI must be a non-empty string, but got {uri!r}.")
    if "://" not in uri:
        if uri.startswith("/") or uri.startswith("."):
            return  # a local directory path
        raise StorageError(f"{uri!r} is not an MLflow tracking URI; expected sqlite:///path/mlflow.db, "
                           "http(s)://host:port, file:///dir or a directory path.")
    scheme = uri.split("://", 1)[0].split("+", 1)[0]
    if scheme not in _SCHEMES:
        raise StorageError(f"{uri!r} has the scheme {scheme!r}; MLflow tracking URIs use one of {list(_SCHEMES)}.")


class Tracker:
    """Records a study and its trials in MLflow; failures become warnings, never exceptions."""

    def __init__(self, uri: str, experiment: str, *, artifact_root: str | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        check_uri(uri)
        self.uri = uri
        self.experiment_name = experiment
        self.artifact_root = artifact_root if not uri.startswith("http") else None
        self._warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
        self._warned: dict[str, float] = {}
        self._experiment_id: str | None = None
        if uri.startswith("http"):
            # An unreachable server must cost seconds, not MLflow's default minutes of retries.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # ------------------------------------------------------------------ plumbing

    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        """Return fn(), retrying a busy SQLite store; on failure warn (rate-limited) and return None."""
        for attempt in range(_RETRIES):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - MLflow must never stop a study
                text = str(exc)
                if "locked" in text.lower() and attempt < _RETRIES - 1:
                    time.sleep(0.2 * 2**attempt)
                    continue
                first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
                self._warn_once(f"warning: MLflow ({self.uri}) could not {what}: {first}. The study goes on.")
                return None
        return None

    def _warn_once(self, message: str) -> None:
        now = time.monotonic()
        key = message[:200]
        if now - self._warned.get(key, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned[key] = now
            self._warn(message)

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id, created once; a race with another process ends in the same one."""
        if self._experiment_id is None:
            self._experiment_id = self._call("create the experiment", self._get_or_create_experiment)
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = Path(self.artifact_root).resolve().as_uri() if self.artifact_root else None
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=location)
        except Exception:  # noqa: BLE001 - another process created it first
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    # ------------------------------------------------------------------ runs

    def study_run(self, study_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        """Return the study's one parent run: found again on resume, created once under races."""
        exp = self.experiment_id
        if exp is None:
            return None

        def find() -> list[Any]:
            runs = self.client.search_runs(
                [exp], filter_string=f"tags.`hpsearch.study` = '{study_name}' and tags.`hpsearch.role` = 'study'",
                max_results=50)
            return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

        def get_or_create() -> str:
            existing = find()
            if existing:
                return existing[0].info.run_id
            run = self.client.create_run(exp, run_name=study_name,
                                         tags={**tags, "hpsearch.study": study_name, "hpsearch.role": "study"})
            # Several processes may have created one at the same moment: the earliest wins, the
            # others delete their own, so exactly one parent run stays.
            time.sleep(0.2)
            winner = find()[0].info.run_id
            if winner != run.info.run_id:
                self.client.delete_run(run.info.run_id)
                return winner
            self._log_params_now(run.info.run_id, params)
            return run.info.run_id

        return self._call("find or create the study's parent run", get_or_create)

    def start_trial(self, parent_run_id: str, trial_number: int, *, params: Mapping[str, Any],
                    tags: Mapping[str, str]) -> str | None:
        """Return a new child run for the trial, nested under the study's parent run."""
        exp = self.experiment_id
        if exp is None:
            return None

        def create() -> str:
            run = self.client.create_run(exp, run_name=f"trial-{trial_number}", tags={
                **tags, "mlflow.parentRunId": parent_run_id, "hpsearch.trial": str(trial_number),
                "hpsearch.role": "trial"})
            self._log_params_now(run.info.run_id, {"trial_number": trial_number, **params})
            return run.info.run_id

        return self._call(f"start the run of trial {trial_number}", create)

    def _log_params_now(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i:i + _BATCH])

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self._call("log params", lambda: self._log_params_now(run_id, params))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log finite metrics at ``step`` in one call; non-finite ones become a tag saying so."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        finite = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        bad = [RunTag(f"hpsearch.nonfinite.{k}", f"{v} at step {step}") for k, v in metrics.items()
               if not math.isfinite(float(v))]
        self._call("log metrics", lambda: self.client.log_batch(run_id, metrics=finite, tags=bad))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        self._call("set tags", lambda: self.client.log_batch(run_id, tags=items))

    def log_image(self, run_id: str, image: Any, artifact_file: str) -> None:
        self._call(f"log the image {artifact_file}", lambda: self.client.log_image(run_id, image, artifact_file))

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self._call(f"log the figure {artifact_file}", lambda: self.client.log_figure(run_id, figure, artifact_file))

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._call(f"log the artifact {local_path}",
                   lambda: self.client.log_artifact(run_id, str(local_path), artifact_path))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call(f"log the text {artifact_file}", lambda: self.client.log_text(run_id, text, artifact_file))

    def end_run(self, run_id: str, status: str, *, tags: Mapping[str, str] | None = None) -> None:
        """Close a run as FINISHED, FAILED or KILLED, with tags saying why."""
        if tags:
            self.set_tags(run_id, tags)
        self._call(f"end run {run_id}", lambda: self.client.set_terminated(run_id, status))

    def run_status(self, run_id: str) -> str | None:
        return self._call("read a run", lambda: self.client.get_run(run_id).info.status)

    def run_url(self, run_id: str) -> str | None:
        """Return the run's page on an MLflow server (http URIs only)."""
        if not self.uri.startswith("http") or self.experiment_id is None:
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def child_runs(self, parent_run_id: str) -> list[dict[str, Any]]:
        """Return the parent's child runs: run id, trial number, status and tags."""
        exp = self.experiment_id
        if exp is None:
            return []

        def search() -> list[dict[str, Any]]:
            runs = self.client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                           max_results=5000)
            return [{"run_id": r.info.run_id, "trial": int(r.data.tags.get("hpsearch.trial", -1)),
                     "status": r.info.status, "tags": dict(r.data.tags)} for r in runs]

        return self._call("list the trial runs", search) or []

    # ------------------------------------------------------------------ models

    def log_model(self, run_id: str, model: Any, *, input_example: Any, registered_name: str | None) -> str | None:
        """Log a PyTorch model with its signature on ``run_id``; register it; return the version."""

        def log() -> str | None:
            import mlflow
            import mlflow.pytorch
            import torch
            from mlflow.models import infer_signature

            cpu = model.to("cpu").eval()
            with torch.inference_mode():
                output = cpu(torch.as_tensor(input_example)).numpy()
            signature = infer_signature(input_example, output)
            mlflow.set_tracking_uri(self.uri)  # mlflow.pytorch logs through the fluent API only
            mlflow.set_registry_uri(self.uri)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(
                    cpu, name="model", signature=signature, input_example=input_example,
                    registered_model_name=registered_name,
                    # Stated, not inferred: inference imports the model in a subprocess (slow).
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
            return None if info.registered_model_version is None else str(info.registered_model_version)

        return self._call("log and register the best model", log)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _PARAM_LIMIT else text[: _PARAM_LIMIT - 3] + "..."
