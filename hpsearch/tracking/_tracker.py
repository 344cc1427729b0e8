"""The Tracker: one parent run per study, one child run per trial, and every MLflow call guarded.

Every call goes through :class:`Tracker`, which talks to the store through an ``MlflowClient``
with explicit run ids (no global active run, so several processes and threads are safe) and turns
any MLflow failure into a warning: an unreachable tracking server or a busy database costs a
message, never a trial.

Several workers, on one machine or several, may share one store, so every step that creates
something is race-safe: the store is opened under a file lock (:mod:`._store`), the experiment
is created or else fetched by name, and the study's parent run is agreed on (see
:meth:`Tracker.study_run`).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hpsearch.spec import mask_password, without_credentials
from hpsearch.storage import Register, announced_wait
from hpsearch.tracking import _registry
from hpsearch.tracking._datasets import DatasetRecord, dataset_entity
from hpsearch.tracking._store import _file_store, _http_limits, _pg_limits, check_store, open_client
from hpsearch.tracking._runs import live_study_run, study_runs, trial_runs
from hpsearch.tracking._tags import PARENT_TAG, REFIT_TAG, ROLE_TAG, STUDY_TAG, TRIAL_TAG
from hpsearch.tracking._values import log_batch, log_epochs, log_missing_params, param_value, strings, to_int
from hpsearch.tracking._views import KIND_TAG, MODEL_TRAINING, run_page_url, save_study_view
from hpsearch.tracking._warnings import RateLimit, failure_reason
from hpsearch.tracking._writer import QueuedRun

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

T = TypeVar("T")
logger = logging.getLogger(__name__)
logger.addFilter(RateLimit())  # the same failure at most once a minute: a dead server must not flood the log

_TRIES = 5  # attempts at a call that finds a SQLite store busy ("database is locked")...
_BUSY_BUDGET_S = 30.0  # ...within this long: MLflow already waits up to 20 s for a lock inside each attempt
_BUSY = ("database is locked", "database table is locked")


class Tracker:
    """Records a study and its trials in MLflow; store failures become warnings, never exceptions.

    Every public method catches what MLflow raises, warns (the same message at most once a
    minute) with the store and the failure, and returns None ([] from child_runs). Later calls
    try again: a tracking server may come back. Only a malformed URI is refused, when the
    Tracker is built; the store itself is first opened by the first call that needs it.
    """

    def __init__(self, uri: str, experiment: str, *, artifact_root: str | None = None) -> None:
        self.uri = uri
        self._store_uri = check_store(uri)  # what MLflow is given: a database URL with an installed driver
        self.experiment_name = experiment
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
        self._remote = scheme in ("http", "https")
        self._network = self._remote or scheme.startswith(("postgres", "mysql"))  # a server that may not answer
        self._env = (_http_limits if self._remote else _file_store if scheme == "file"
                     else _pg_limits if scheme.startswith("postgres") else contextlib.nullcontext)
        # A tracking server decides where artifacts go; a local store puts them under the caller's root.
        self.artifact_root = None if self._remote else artifact_root
        self._shown = mask_password(uri)
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self.failures = 0  # calls that failed so far: a caller tells whether its records reached the store
        self._monitors: dict[str, Any] = {}  # run id -> its running system metrics monitor
        self._lock = threading.Lock()  # the background writer's thread calls too (see later)

    # ------------------------------------------------------------------ plumbing

    def _call(self, what: str, fn: Callable[[MlflowClient], T], *, local_work: bool = False) -> T | None:
        """Return fn(client), retrying a busy SQLite store; on any failure warn and return None.

        A call to a server that takes long says what it waits for, unless ``local_work`` (the call
        computes for seconds before it sends anything).
        """
        deadline = time.monotonic() + _BUSY_BUDGET_S
        with self._env():
            for attempt in range(1, _TRIES + 1):
                try:
                    client = self._mlflow()
                    # A local store's lock waits are no news; a server that may never answer is.
                    with (announced_wait(f"the MLflow store {self._shown} (to {what})")
                          if self._network and not local_work else contextlib.nullcontext()):
                        return fn(client)
                except Exception as exc:  # noqa: BLE001 - tracking must never stop a study
                    if attempt < _TRIES and time.monotonic() < deadline and any(b in str(exc) for b in _BUSY):
                        # Jittered, so processes that collided do not collide again.
                        time.sleep(0.1 * 2**attempt * (1 + random.random()))
                        continue
                    with self._lock:
                        self.failures += 1
                    logger.warning("MLflow store %s could not %s: %s. The study goes on without it.",
                                   self._shown, what, failure_reason(exc, self.uri))
                    return None
        return None

    def _mlflow(self) -> MlflowClient:
        """Return the client, built on first use (which creates a new SQLite store's tables)."""
        with self._lock:
            if self._client is None:
                self._client = open_client(self._store_uri)
            return self._client

    def later(self, run_id: str) -> QueuedRun:
        """Return the run's writes made in the background, in order, by this process's one writer thread.

        Each is this Tracker's own call, made later (a failure warns and counts in ``failures``
        then); ``flush()`` waits for them. See :mod:`hpsearch.tracking._writer`.
        """
        return QueuedRun(self, run_id)

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id, created on first use; processes racing to create it get the same one."""
        if self._experiment_id is None:
            self._experiment_id = self._call(f"create or find the experiment {self.experiment_name!r}",
                                             self._get_or_create_experiment)
        return self._experiment_id

    def _get_or_create_experiment(self, client: MlflowClient) -> str:
        found = client.get_experiment_by_name(self.experiment_name)
        if found is None:
            location = Path(self.artifact_root).resolve().as_uri() if self.artifact_root else None
            try:
                return str(client.create_experiment(self.experiment_name, artifact_location=location,
                                                    tags={KIND_TAG: MODEL_TRAINING}))
            except Exception:
                # Another process created it between our look and our create: use theirs.
                found = client.get_experiment_by_name(self.experiment_name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
            logger.warning("the MLflow experiment %r in %s had been deleted; restored it to record this study.",
                           self.experiment_name, self._shown)
        if KIND_TAG not in found.tags:  # made before hpsearch set it, or by someone else: say what it holds
            client.set_experiment_tag(found.experiment_id, KIND_TAG, MODEL_TRAINING)
        return str(found.experiment_id)

    # ------------------------------------------------------------------ runs

    def study_run(self, study_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str],
                  agree: Register | None = None) -> str | None:
        """Return the id of the study's one parent run: found again on resume, created once under races.

        MLflow has no atomic create-if-absent for runs, so racing workers agree through ``agree``,
        an atomic register in the study's database: the run it holds, if still in this experiment,
        is the parent. Otherwise each proposes the run it found (or made) and exactly one proposal
        is taken; the others delete the run they made and use the winner's. Without ``agree``
        (one caller at a time) the earliest run found is the parent, else a new one.
        """
        exp = self.experiment_id
        if exp is None:
            return None

        mine: str | None = None  # the run this call made, kept across retries of a busy store

        def find_or_create(client: MlflowClient) -> str:
            nonlocal mine
            for _ in range(_TRIES):
                held = agree.read() if agree else None
                winner = live_study_run(client, exp, study_name, held) if held else None
                if winner is None:
                    runs = study_runs(client, exp, study_name)
                    if runs:
                        winner = runs[0]
                    else:
                        mine = mine or client.create_run(exp, run_name=study_name, tags={
                            **strings(tags), STUDY_TAG: study_name, ROLE_TAG: "study"}).info.run_id
                        winner = client.get_run(mine)
                    # Lost: another process took it first, and its run exists by now. Look again.
                    if agree and not agree.take(winner.info.run_id, over=held):
                        continue
                if mine and mine != winner.info.run_id:
                    client.delete_run(mine)
                    return winner.info.run_id  # its creator logs its params
                log_missing_params(client, winner, params)  # all of them if new; on resume, only new keys
                if winner.info.status != "RUNNING":  # resumed after it ended (done, or failed): it runs again
                    client.update_run(winner.info.run_id, status="RUNNING")
                return winner.info.run_id
            raise RuntimeError(f"no parent run was agreed on after {_TRIES} tries")

        return self._call(f"find or create the parent run of study {study_name!r}", find_or_create)

    def start_trial(self, parent_run_id: str, trial_number: int, *, params: Mapping[str, Any],
                    tags: Mapping[str, str], params_later: bool = False) -> str | None:
        """Return the id of a new child run for the trial, nested under the study's parent run.

        If the trial already has a RUNNING run under that parent (the call is repeated in the
        same process), that run is returned, with any params it still lacks. A retried trial has
        a new trial number, so it gets a new run; the caller tags it ``hpsearch.retried_from``.
        With ``params_later`` the params are logged by the background writer (see :meth:`later`).
        """
        exp = self.experiment_id
        if exp is None:
            return None

        def start(client: MlflowClient) -> str:
            running = [r for r in trial_runs(client, exp, parent_run_id, trial_number)
                       if r.info.status == "RUNNING"]
            run = running[-1] if running else client.create_run(exp, run_name=f"trial-{trial_number}", tags={
                **strings(tags), PARENT_TAG: parent_run_id, TRIAL_TAG: str(trial_number), ROLE_TAG: "trial"})
            logged = {"trial_number": trial_number, **params}
            if params_later:
                self.later(run.info.run_id).log_params({k: v for k, v in logged.items()
                                                        if str(k) not in run.data.params})
            else:
                log_missing_params(client, run, logged)
            return run.info.run_id

        return self._call(f"start the run of trial {trial_number}", start)

    def start_refit(self, parent_run_id: str, trial_number: int, *, params: Mapping[str, Any],
                    tags: Mapping[str, str]) -> str | None:
        """Return the id of a new child run for the refit of a trial's configuration (see hpsearch.refit)."""
        exp = self.experiment_id
        if exp is None:
            return None

        def start(client: MlflowClient) -> str:
            run = client.create_run(exp, run_name=f"refit-of-trial-{trial_number}", tags={
                **strings(tags), PARENT_TAG: parent_run_id, REFIT_TAG: str(trial_number), ROLE_TAG: "refit"})
            log_missing_params(client, run, params)
            return run.info.run_id

        return self._call(f"start the refit run of trial {trial_number}", start)

    def find_trial_run(self, parent_run_id: str, trial_number: int) -> str | None:
        """Return the id of the trial's latest run under the parent, or None if it has none."""
        exp = self.experiment_id
        if exp is None:
            return None

        def find(client: MlflowClient) -> str | None:
            runs = trial_runs(client, exp, parent_run_id, trial_number)
            return runs[-1].info.run_id if runs else None

        return self._call(f"find the run of trial {trial_number}", find)

    def child_runs(self, parent_run_id: str) -> list[dict[str, Any]]:
        """Return the parent's trial runs as dicts of run_id, trial (number), status and tags, by trial."""
        exp = self.experiment_id
        if exp is None:
            return []

        def search(client: MlflowClient) -> list[dict[str, Any]]:
            runs = [{"run_id": r.info.run_id, "trial": to_int(r.data.tags.get(TRIAL_TAG)), "status": r.info.status,
                     "tags": dict(r.data.tags)} for r in trial_runs(client, exp, parent_run_id)
                    if r.data.tags.get(ROLE_TAG) != "refit"]
            return sorted(runs, key=lambda r: -1 if r["trial"] is None else r["trial"])  # stable: by start

        return self._call("list the trial runs", search) or []

    def run_status(self, run_id: str) -> str | None:
        """Return the run's status (RUNNING, FINISHED, FAILED, KILLED, ...), or None."""
        return self._call("read a run's status", lambda client: str(client.get_run(run_id).info.status))

    def run_url(self, run_id: str) -> str | None:
        """Return the run's page on the MLflow server for an http(s) URI, else None."""
        if not self._remote or self.experiment_id is None:
            return None
        return run_page_url(without_credentials(self.uri), self.experiment_id, run_id)

    def end_run(self, run_id: str, status: str, *, tags: Mapping[str, str] | None = None,
                epochs: Sequence[tuple[int, int, Mapping[str, float]]] = ()) -> None:
        """Close a run as FINISHED, FAILED or KILLED, first logging the ``epochs`` not logged yet (see
        :meth:`log_epochs`) and tags that say why (hpsearch.state=...), in one batch. A system metrics
        monitor on the run (:meth:`monitor_system`) is stopped first, with its last samples logged."""
        self._stop_monitor(run_id)
        if epochs or tags:
            self._call("log a run's last metrics and tags",
                       lambda client: log_epochs(client, run_id, epochs, tags=tags or {}))
        # Apart: a batch MLflow refuses must not leave the run RUNNING.
        self._call(f"end a run as {status}", lambda client: client.set_terminated(run_id, status))

    # ------------------------------------------------------------------ what a person opens first

    def study_view(self, study_name: str, *, order_by: str, ascending: bool, metrics: Sequence[str],
                   params: Sequence[str]) -> str | None:
        """Return the id of the study's saved view of the runs table, saved in the experiment if new or changed.

        The MLflow UI cannot open a parent run expanded, so the view lists the study's runs flat:
        its trials best first by the metric ``order_by`` (then the parent run, which has no such
        metric), with ``metrics`` and ``params`` as the first columns. It is written as the UI's own
        "Views" menu writes one (an experiment tag ``mlflow.sharedViewState.<id>``), so it is listed
        there too, and :func:`experiment_url` with ``view=`` opens it.
        """
        exp = self.experiment_id
        if exp is None:
            return None
        return self._call("save the study's view of the runs table", lambda client: save_study_view(
            client, exp, study_name, order_by=order_by, ascending=ascending, metrics=metrics, params=params))

    # ------------------------------------------------------------------ values

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log the metrics at ``step`` in one batch (see :meth:`log_epochs`)."""
        self.log_epochs(run_id, [(step, int(time.time() * 1000), metrics)])

    def log_epochs(self, run_id: str, epochs: Sequence[tuple[int, int, Mapping[str, float]]]) -> None:
        """Log the metrics of several steps, each given as (step, time in ms, metrics), in one batch.

        MLflow's charts break on NaN and inf, so a non-finite value is not logged as a metric
        point; the tag ``hpsearch.nonfinite_<name>`` records it and its step instead (the last one).
        """
        self._call("log metrics", lambda client: log_epochs(client, run_id, epochs))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params as strings, each cut to MLflow's length limit, 100 to a batch."""
        from mlflow.entities import Param

        self._call("log params", lambda client: log_batch(
            client, run_id, params=[Param(str(k), param_value(v)) for k, v in params.items()]))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags (values as strings, cut to MLflow's length limit), replacing earlier values."""
        from mlflow.entities import RunTag

        self._call("set tags", lambda client: log_batch(
            client, run_id, tags=[RunTag(k, v) for k, v in strings(tags).items()]))

    def log_datasets(self, run_id: str, datasets: Sequence[DatasetRecord]) -> None:
        """Log the data a run used as MLflow dataset inputs, each with its context (training, validation, test).

        Only a description is stored (name, digest, source, sizes), never the data: the UI's Dataset
        column and the run page show it, and runs can be searched by it.
        """
        def log(client: MlflowClient) -> None:
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            client.log_inputs(run_id, datasets=[
                DatasetInput(dataset_entity(d), tags=[InputTag(MLFLOW_DATASET_CONTEXT, d.context)])
                for d in datasets])

        self._call("log the datasets", log)

    def monitor_system(self, run_id: str, *, interval_s: float = 10.0) -> None:
        """Log MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml is installed) on the run.

        Sampled every ``interval_s`` seconds (MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins)
        until :meth:`end_run`, which logs the samples of a run shorter than one interval too.
        """
        def start(client: MlflowClient) -> None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=self._store_uri)
            monitor.start()
            self._monitors[run_id] = monitor

        self._call("start logging system metrics (they need psutil)", start)

    def _stop_monitor(self, run_id: str) -> None:
        monitor = self._monitors.pop(run_id, None)
        if monitor is None:
            return

        def stop(client: MlflowClient) -> None:
            monitor.finish()
            if monitor._logging_step == 0:  # shorter than one interval: one point from what was sampled
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()

        self._call("log the last system metrics", stop)

    # ------------------------------------------------------------------ the registry

    def crown(self, name: str, version: str, *, tags: Mapping[str, str], metric: str, maximize: bool,
              data: str) -> str | None:
        """Tag a registered model version and give it the alias ``champion`` if it beats the holder.

        The version is compared on ``metric`` (a test metric, higher is better when ``maximize``)
        with every version that recorded the same metric on the same ``data`` (the test split's
        hash), and takes the alias only when it is strictly better than all of them and than the
        version holding the alias. Test results on other data say nothing about each other, so a
        holder tested on other data (or without hpsearch's tags, e.g. set by hand) keeps the alias.
        Returns a one-line account of the decision, or None when the registry failed.
        """

        return self._call(f"tag version {version} of the registered model {name!r}", lambda client: _registry.crown(
            client, name, version, tags=tags, metric=metric, maximize=maximize, data=data))

    # ------------------------------------------------------------------ artifacts

    def log_image(self, run_id: str, image: np.ndarray, artifact_file: str) -> None:
        """Save an image array (HxW or HxWxC; uint8, or floats in [0, 1]) as a PNG artifact."""
        self._call("log an image", lambda client: client.log_image(run_id, image, artifact_file=artifact_file))

    def log_figure(self, run_id: str, figure: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact (its format from the file's extension)."""
        self._call("log a figure", lambda client: client.log_figure(run_id, figure, artifact_file))

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file, or a directory's files, into the run's artifacts under ``artifact_path``."""
        def log(client: MlflowClient) -> None:
            if Path(local_path).is_dir():
                client.log_artifacts(run_id, str(local_path), artifact_path)
            else:
                client.log_artifact(run_id, str(local_path), artifact_path)

        self._call(f"log the artifact {Path(local_path).name}", log)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Save ``text`` as the artifact ``artifact_file``."""
        self._call("log a text artifact", lambda client: client.log_text(run_id, text, artifact_file))

    def log_model(self, run_id: str, model: torch.nn.Module, *, input_example: np.ndarray,
                  registered_name: str | None) -> str | None:
        """Log a PyTorch model on ``run_id``; return its Model Registry version, or None.

        The signature comes from ``input_example`` and the model's output on it. With a
        ``registered_name`` each call registers a new version under that name; without one, or
        on failure, the answer is None. What is logged is a copy, on the CPU (it loads anywhere), in
        eval mode and the standard memory layout; ``model`` itself is left as it was. MLflow saves it with
        ``torch.export``, traced on the example: an example of one row is doubled, since a batch
        of one would fix the saved model's batch size to 1.
        """
        return self._call("log and register the model" if registered_name else "log the model",
                          lambda client: _registry.log_model(client, self._store_uri, run_id, model, input_example,
                                                                    registered_name),
                          local_work=True)  # torch.export first: seconds of work that are no wait
