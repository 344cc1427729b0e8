"""MLflow at the edge: one parent run per study, one child run per trial, never a stopped study.

The only module that imports mlflow (lazily: commands that track nothing stay fast). Every call
goes through :class:`Tracker`, which talks to the store through an ``MlflowClient`` with explicit
run ids (no global active run, so several processes and threads are safe) and turns any MLflow
failure into a warning: an unreachable tracking server or a busy database costs a message,
never a trial.

Several workers, on one machine or several, may share one store, so every step that creates
something is race-safe: a new SQLite store's tables are created under a file lock, the experiment
is created or else fetched by name, and the study's parent run is agreed on (see
:meth:`Tracker.study_run`).

A SQLite store is switched to WAL with ``synchronous=NORMAL`` (see :func:`_tune_sqlite`): MLflow's
default waits for the disk on every commit, and a trial makes several.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from hpsearch.errors import StorageError
from hpsearch.spec import hide_secrets, mask_password, without_credentials
from hpsearch.storage import CONNECT_TIMEOUT_S, announced_wait, checked_driver_url

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a new SQLite store there must not be started by two at once
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run

__all__ = ["DatasetRecord", "Tracker", "check_uri", "experiment_url", "run_page_url"]

T = TypeVar("T")

STUDY_TAG = "hpsearch.study"  # the study's name, on its parent run (and, from the caller, on trial runs)
REFIT_TAG = "hpsearch.refit_of"  # on a refit's run: the number of the trial whose configuration it retrains
ROLE_TAG = "hpsearch.role"  # "study" or "trial": tells the parent run apart from trial runs with the same study tag
TRIAL_TAG = "hpsearch.trial"  # the Optuna trial number of a child run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows trial runs under the study's run
NONFINITE_TAG = "hpsearch.nonfinite_"  # + metric name: the last NaN/inf value that was not logged, and its step
# MLflow 3's UI says what an experiment is for with this tag; "custom_model_development" is its
# "Machine learning" kind (the GenAI kinds open on traces). The 3.17 UI decides the view from the
# page address instead (TRAINING_VIEW), but reads the tag where its workflow switch is off.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# The MLflow UI's own query: open the model-training view (the runs table), not the GenAI one.
TRAINING_VIEW = "workflowType=machine_learning"
# Saved views of the runs table live in experiment tags with this prefix (the UI's "Views" menu);
# `viewStateShareKey=<id>` in the address opens one.
VIEW_TAG = "mlflow.sharedViewState."
CHAMPION = "champion"  # the registered model alias of the best tested version (see Tracker.crown)
VERSION_METRIC_TAG = "hpsearch."  # + metric name (val_..., test_...): a registered version's measures
RANKED_TAG = "hpsearch.ranked_by"  # the test metric versions are compared on for the alias...
DIRECTION_TAG = "hpsearch.direction"  # ...which way is better...
DATA_TAG = "hpsearch.test_data"  # ...and the content hash of the test split it was measured on

_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql")
_URI_RULE = ("an MLflow tracking URI must be sqlite:///path/mlflow.db, file:///dir, http(s)://host[:port], "
             "postgresql://..., mysql://... or a directory path")
_TRIES = 5  # attempts at a call that finds a SQLite store busy ("database is locked")...
_BUSY_BUDGET_S = 30.0  # ...within this long: MLflow already waits up to 20 s for a lock inside each attempt
_BUSY = ("database is locked", "database table is locked")
_SETTLE_S = 1.0  # how long racing creators of a parent run wait, at least, for each other's inserts
_WARN_EVERY_S = 60.0  # the same warning at most once a minute: a dead server must not flood the log
_PAGE = 1000  # runs per search page
_HTTP_LIMITS = {
    # MLflow retries an HTTP call 7 times with a backoff factor of 2 and waits 120 s for an answer:
    # minutes per call against a dead server. One immediate retry (urllib3 waits only before the
    # second) and a 15 s timeout make it milliseconds when refused, 30 s at most when silent.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    # MLflow prints "View run ... at: <tracking URI>" as each run ends: noise under the progress line,
    # and the URI as given, with any password in it.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def check_uri(uri: str) -> None:
    """Raise StorageError unless ``uri`` is a tracking URI hpsearch can record to."""
    shown = mask_password(uri) if isinstance(uri, str) else uri
    bad = StorageError(f"MLflow tracking URI: {_URI_RULE}, but got {shown!r}.")
    if not isinstance(uri, str) or not uri.strip() or uri != uri.strip() or any(ord(c) < 32 for c in uri):
        raise bad
    if "://" not in uri:
        if ":" in uri:  # "localhost:5000", "sqlite:x.db": a scheme or a host without the "//" of a URI
            raise bad
        return  # a directory path: MLflow's file store
    scheme, rest = uri.split("://", 1)
    scheme = scheme.split("+", 1)[0].lower()  # postgresql+psycopg2 -> postgresql
    if scheme not in _SCHEMES or not rest.strip("/"):
        raise bad
    if scheme == "sqlite" and not rest.startswith("/"):  # sqlite://x is an in-memory database or a typo
        raise bad
    if scheme in ("http", "https") and not re.match(r"^([^/@\s]+@)?[^/:@\s]+(:\d+)?(/\S*)?$", rest):
        raise bad


def check_store(uri: str) -> str:
    """Return the URI to give MLflow for ``uri``: checked, and a database URL with an installed driver.

    Raises StorageError for a malformed URI, or one whose database driver is not installed (MLflow
    would otherwise fail on every call, and a study would record nothing but warnings).
    """
    check_uri(uri)
    return checked_driver_url(uri, what="the MLflow tracking URI")


def experiment_url(ui_url: str, experiment_id: str, view: str | None = None) -> str:
    """Return the MLflow UI page of an experiment's runs table, in the model-training view.

    With ``view``, the page opens that saved view of the table (see :meth:`Tracker.study_view`).
    """
    query = TRAINING_VIEW + (f"&viewStateShareKey={quote(view, safe='')}" if view else "")
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def study_view_id(study_name: str) -> str:
    """Return the id of a study's saved view of the runs table (see :meth:`Tracker.study_view`)."""
    return f"hpsearch-{study_name}"


def run_page_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """Return the MLflow UI page of one run, in the model-training view."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


@dataclass(frozen=True)
class DatasetRecord:
    """One split of the data as an MLflow dataset input: what a run trained, validated or tested on."""

    name: str  # the dataset's name; a fallback says so in it
    digest: str  # content hash of the split's images and labels
    source: str  # where it was read: a folder, a URL, or a package
    context: str  # "training", "validation" or "test" (MLflow's mlflow.data.context)
    profile: Mapping[str, Any] = field(default_factory=dict)  # sizes and provenance, shown on the run page


class Tracker:
    """Records a study and its trials in MLflow; store failures become warnings, never exceptions.

    Every public method catches what MLflow raises, warns (the same message at most once a
    minute) with the store and the failure, and returns None ([] from child_runs). Later calls
    try again: a tracking server may come back. Only a malformed URI is refused, when the
    Tracker is built; the store itself is first opened by the first call that needs it.
    """

    def __init__(self, uri: str, experiment: str, *, artifact_root: str | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
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
        self._warn = warn or _stderr
        self._warned: dict[str, float] = {}
        self._warn_lock = threading.Lock()
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self.failures = 0  # calls that failed so far: a caller tells whether its records reached the store
        self._monitors: dict[str, Any] = {}  # run id -> its running system metrics monitor

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
                    with (announced_wait(f"the MLflow store {self._shown} (to {what})", self._warn)
                          if self._network and not local_work else contextlib.nullcontext()):
                        return fn(client)
                except Exception as exc:  # noqa: BLE001 - tracking must never stop a study
                    if attempt < _TRIES and time.monotonic() < deadline and any(b in str(exc) for b in _BUSY):
                        # Jittered, so processes that collided do not collide again.
                        time.sleep(0.1 * 2**attempt * (1 + random.random()))
                        continue
                    self.failures += 1
                    self._warn_once(f"warning: MLflow store {self._shown} could not {what}: "
                                    f"{_reason(exc, self.uri)}. "
                                    "The study goes on without it.")
                    return None
        return None

    def _mlflow(self) -> MlflowClient:
        """Return the client, built on first use (which creates a new SQLite store's tables)."""
        if self._client is None:
            from mlflow import MlflowClient

            with _schema_lock(self._store_uri):
                client = MlflowClient(tracking_uri=self._store_uri, registry_uri=self._store_uri)
                _tune_sqlite(self._store_uri, client)
                self._client = client
        return self._client

    def _warn_once(self, message: str) -> None:
        now = time.monotonic()
        with self._warn_lock:
            last = self._warned.get(message)
            if last is not None and now - last < _WARN_EVERY_S:
                return
            self._warned[message] = now
        self._warn(message)

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
            self._warn_once(f"warning: the MLflow experiment {self.experiment_name!r} in {self._shown} had been "
                            "deleted; restored it to record this study.")
        if KIND_TAG not in found.tags:  # made before hpsearch set it, or by someone else: say what it holds
            client.set_experiment_tag(found.experiment_id, KIND_TAG, MODEL_TRAINING)
        return str(found.experiment_id)

    def _search(self, client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
        """Return every active run of the experiment that matches, oldest first (start time, then id)."""
        runs: list[Run] = []
        token = None
        while True:
            page = client.search_runs([experiment_id], filter_string, max_results=_PAGE, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    # ------------------------------------------------------------------ runs

    def study_run(self, study_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        """Return the id of the study's one parent run: found again on resume, created once under races.

        Workers that start together may each create one. After creating, each waits for the
        others' inserts to land (1 s, or twice its own look-and-create on a slow store), then
        all choose the earliest (start time, then run id); the others delete their own, so every
        caller returns the same id. MLflow has no atomic create-if-absent for runs, so two could
        survive only if one worker's look-and-create took longer than another's wait; all later
        calls still agree on the earliest.
        """
        exp = self.experiment_id
        if exp is None:
            return None

        def find_or_create(client: MlflowClient) -> str:
            started = time.monotonic()
            runs = self._study_runs(client, exp, study_name)
            if not runs:
                mine = client.create_run(exp, run_name=study_name, tags={
                    **_strings(tags), STUDY_TAG: study_name, ROLE_TAG: "study"}).info.run_id
                # A slow store is slow for the others too: wait longer there.
                time.sleep(max(_SETTLE_S, 2 * (time.monotonic() - started)))
                runs = self._study_runs(client, exp, study_name)
                if runs and runs[0].info.run_id != mine:
                    client.delete_run(mine)
                    return runs[0].info.run_id  # its creator logs its params
            winner = runs[0]
            _log_missing_params(client, winner, params)  # all of them if new; on resume, only new keys
            if winner.info.status != "RUNNING":  # resumed after it ended (done, or failed): it runs again
                client.update_run(winner.info.run_id, status="RUNNING")
            return winner.info.run_id

        return self._call(f"find or create the parent run of study {study_name!r}", find_or_create)

    def _study_runs(self, client: MlflowClient, experiment_id: str, study_name: str) -> list[Run]:
        return self._search(client, experiment_id,
                            f"tags.`{STUDY_TAG}` = {_quote(study_name)} and tags.`{ROLE_TAG}` = 'study'")

    def start_trial(self, parent_run_id: str, trial_number: int, *, params: Mapping[str, Any],
                    tags: Mapping[str, str]) -> str | None:
        """Return the id of a new child run for the trial, nested under the study's parent run.

        If the trial already has a RUNNING run under that parent (the call is repeated in the
        same process), that run is returned, with any params it still lacks. A retried trial has
        a new trial number, so it gets a new run; the caller tags it ``hpsearch.retried_from``.
        """
        exp = self.experiment_id
        if exp is None:
            return None

        def start(client: MlflowClient) -> str:
            running = [r for r in self._trial_runs(client, exp, parent_run_id, trial_number)
                       if r.info.status == "RUNNING"]
            run = running[-1] if running else client.create_run(exp, run_name=f"trial-{trial_number}", tags={
                **_strings(tags), PARENT_TAG: parent_run_id, TRIAL_TAG: str(trial_number), ROLE_TAG: "trial"})
            _log_missing_params(client, run, {"trial_number": trial_number, **params})
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
                **_strings(tags), PARENT_TAG: parent_run_id, REFIT_TAG: str(trial_number), ROLE_TAG: "refit"})
            _log_missing_params(client, run, params)
            return run.info.run_id

        return self._call(f"start the refit run of trial {trial_number}", start)

    def _trial_runs(self, client: MlflowClient, experiment_id: str, parent_run_id: str,
                    trial_number: int | None = None) -> list[Run]:
        where = f"tags.`{PARENT_TAG}` = {_quote(parent_run_id)}"
        if trial_number is not None:
            where += f" and tags.`{TRIAL_TAG}` = '{int(trial_number)}'"
        return self._search(client, experiment_id, where)

    def find_trial_run(self, parent_run_id: str, trial_number: int) -> str | None:
        """Return the id of the trial's latest run under the parent, or None if it has none."""
        exp = self.experiment_id
        if exp is None:
            return None

        def find(client: MlflowClient) -> str | None:
            runs = self._trial_runs(client, exp, parent_run_id, trial_number)
            return runs[-1].info.run_id if runs else None

        return self._call(f"find the run of trial {trial_number}", find)

    def child_runs(self, parent_run_id: str) -> list[dict[str, Any]]:
        """Return the parent's trial runs as dicts of run_id, trial (number), status and tags, by trial."""
        exp = self.experiment_id
        if exp is None:
            return []

        def search(client: MlflowClient) -> list[dict[str, Any]]:
            runs = [{"run_id": r.info.run_id, "trial": _int(r.data.tags.get(TRIAL_TAG)), "status": r.info.status,
                     "tags": dict(r.data.tags)} for r in self._trial_runs(client, exp, parent_run_id)
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
                       lambda client: _log_epochs(client, run_id, epochs, tags=tags or {}))
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
        view_id = study_view_id(study_name)
        columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in params]
        state = {"searchFilter": f"tags.`{STUDY_TAG}` = {_quote(study_name)}",
                 "orderByKey": f"metrics.`{order_by}`", "orderByAsc": ascending,
                 "selectedColumns": [*columns, "attributes.`Dataset`", "attributes.`Models`"],
                 "columnOrder": columns}

        def save(client: MlflowClient) -> str:
            key = VIEW_TAG + view_id
            saved = client.get_experiment(exp).tags.get(key)
            with contextlib.suppress(Exception):
                if saved and json.loads(json.loads(saved)["state"]) == state:
                    return view_id  # every worker asks; the first one wrote it
            now = int(time.time() * 1000)
            client.set_experiment_tag(exp, key, json.dumps({
                "name": f"hpsearch: study {study_name}, best {order_by} first", "createdAt": now, "updatedAt": now,
                "state": json.dumps(state)}))
            return view_id

        return self._call("save the study's view of the runs table", save)

    # ------------------------------------------------------------------ values

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log the metrics at ``step`` in one batch (see :meth:`log_epochs`)."""
        self.log_epochs(run_id, [(step, int(time.time() * 1000), metrics)])

    def log_epochs(self, run_id: str, epochs: Sequence[tuple[int, int, Mapping[str, float]]]) -> None:
        """Log the metrics of several steps, each given as (step, time in ms, metrics), in one batch.

        MLflow's charts break on NaN and inf, so a non-finite value is not logged as a metric
        point; the tag ``hpsearch.nonfinite_<name>`` records it and its step instead (the last one).
        """
        self._call("log metrics", lambda client: _log_epochs(client, run_id, epochs))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params as strings, each cut to MLflow's length limit, 100 to a batch."""
        from mlflow.entities import Param

        self._call("log params", lambda client: _log_batch(
            client, run_id, params=[Param(str(k), _param_value(v)) for k, v in params.items()]))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags (values as strings, cut to MLflow's length limit), replacing earlier values."""
        from mlflow.entities import RunTag

        self._call("set tags", lambda client: _log_batch(
            client, run_id, tags=[RunTag(k, v) for k, v in _strings(tags).items()]))

    def log_datasets(self, run_id: str, datasets: Sequence[DatasetRecord]) -> None:
        """Log the data a run used as MLflow dataset inputs, each with its context (training, validation, test).

        Only a description is stored (name, digest, source, sizes), never the data: the UI's Dataset
        column and the run page show it, and runs can be searched by it.
        """
        def log(client: MlflowClient) -> None:
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            client.log_inputs(run_id, datasets=[
                DatasetInput(_dataset_entity(d), tags=[InputTag(MLFLOW_DATASET_CONTEXT, d.context)])
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

        def decide(client: MlflowClient) -> str:
            for key, text in {**tags, RANKED_TAG: metric, DIRECTION_TAG: "maximize" if maximize else "minimize",
                              DATA_TAG: data}.items():
                client.set_model_version_tag(name, version, key, text)
            aliases = client.get_registered_model(name).aliases  # {alias: version}
            holder = client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None
            kept = f"{CHAMPION} stays on version {holder.version}" if holder else f"no version is {CHAMPION}"
            if holder is not None and str(holder.version) != str(version) \
                    and not _comparable(holder.tags, metric, maximize, data):
                return (f"{kept}: it was not tested on the same data by {metric}, so this version cannot be "
                        "compared with it (move the alias with MlflowClient.set_registered_model_alias)")
            new = float(tags[f"{VERSION_METRIC_TAG}{metric}"])
            rivals = [(float(v.tags[f"{VERSION_METRIC_TAG}{metric}"]), str(v.version))
                      for v in client.search_model_versions(f"name = {_quote(name)}")
                      if str(v.version) != str(version) and _comparable(v.tags, metric, maximize, data)]
            best = (max if maximize else min)(rivals, default=None)
            if best is not None and not _beats(new, best[0], maximize):
                return f"{kept}: version {best[1]} has {metric} {best[0]:.5g}, this one {new:.5g}"
            client.set_registered_model_alias(name, CHAMPION, version)
            return f"{CHAMPION} (models:/{name}@{CHAMPION}): the best {metric} of its versions, {new:.5g}"

        return self._call(f"tag version {version} of the registered model {name!r}", decide)

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
        on failure, the answer is None. The model is logged from the CPU (it loads anywhere) and
        put back on its device and in its train/eval mode afterwards. MLflow saves it with
        ``torch.export``, traced on the example: an example of one row is doubled, since a batch
        of one would fix the saved model's batch size to 1.
        """
        return self._call("log and register the model" if registered_name else "log the model",
                          lambda client: self._log_model(client, run_id, model, input_example, registered_name),
                          local_work=True)  # torch.export first: seconds of work that are no wait

    def _log_model(self, client: MlflowClient, run_id: str, model: torch.nn.Module, input_example: np.ndarray,
                   registered_name: str | None) -> str | None:
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        example = np.asarray(input_example)
        if example.ndim > 0 and example.shape[0] == 1:
            example = np.concatenate([example, example])
        device = next(iter(model.parameters()), torch.empty(0)).device
        training = model.training
        model.to("cpu").eval()
        try:
            with torch.no_grad():
                output = model(torch.as_tensor(example)).numpy()
            signature = infer_signature(example, output)
            # mlflow.pytorch.log_model takes no client: it finds the run's experiment, the store and
            # the registry through process-wide state. Creating the logged model here names the
            # experiment; the URIs are set for the call only (see _process_uris).
            experiment_id = client.get_run(run_id).info.experiment_id
            logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
            with _process_uris(self._store_uri):
                info = mlflow.pytorch.log_model(
                    model, name="model", model_id=logged.model_id, run_id=run_id, signature=signature,
                    input_example=example, registered_model_name=registered_name,
                    # Stated, not inferred: inferring them imports the model in a subprocess (seconds).
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        finally:
            model.to(device).train(training)
        version = info.registered_model_version
        return None if version is None else str(version)


# ---------------------------------------------------------------------- helpers


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _reason(exc: BaseException, uri: str) -> str:
    """Return a one-line, stable account of a failure (object addresses would defeat the rate limit),
    without the secrets of ``uri``."""
    text = re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", " ".join(str(exc).split())) or type(exc).__name__
    # A failed HTTP call buries its cause deep in urllib3's text: lift it out, without the query.
    request = re.match(r"API request to ([^?\s]+)\S* failed", text)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out|Connection aborted|Remote end closed", text)
    if request and cause:
        text = f"API request to {request.group(1)} failed: {cause.group(0).strip()}"
    return hide_secrets(text, uri)[:300]  # masked first: a cut must not leave half a password


def _comparable(tags: Mapping[str, str], metric: str, maximize: bool, data: str) -> bool:
    """Return whether a version's tags hold ``metric``, measured the same way on the same test data."""
    try:
        float(tags[f"{VERSION_METRIC_TAG}{metric}"])
    except (KeyError, ValueError):
        return False
    return tags.get(RANKED_TAG) == metric and tags.get(DATA_TAG) == data \
        and tags.get(DIRECTION_TAG) == ("maximize" if maximize else "minimize")


def _beats(value: float, other: float, maximize: bool) -> bool:
    return value > other if maximize else value < other


def _dataset_entity(record: DatasetRecord) -> Any:
    """Return the MLflow Dataset entity describing ``record`` (its source typed as MLflow's data sources are)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.entities import Dataset

    source: Any = CodeDatasetSource({"source": record.source})  # a package that ships the data
    if record.source.startswith(("http://", "https://")):
        source = HTTPDatasetSource(record.source)
    elif record.source.startswith("/"):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with contextlib.suppress(Exception):  # no local source registered: the code source above
            source = resolve_dataset_source(Path(record.source).as_uri())
    return Dataset(name=record.name, digest=record.digest, source_type=source._get_source_type(),
                   source=source.to_json(), profile=json.dumps(dict(record.profile)))


def _quote(value: str) -> str:
    """Return ``value`` quoted for an MLflow search filter."""
    return f"'{value}'" if "'" not in value else f'"{value}"'


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _strings(tags: Mapping[str, Any]) -> dict[str, str]:
    """Return tag values as strings cut to MLflow's limit (8,000 characters)."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return {str(k): _cut(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


def _param_value(value: Any) -> str:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return _cut(str(value), MAX_PARAM_VAL_LENGTH)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _log_epochs(client: MlflowClient, run_id: str, epochs: Sequence[tuple[int, int, Mapping[str, float]]], *,
                tags: Mapping[str, str] | None = None) -> None:
    """Log (step, time in ms, metrics) triples and ``tags`` in one batch; NaN and inf become tags."""
    from mlflow.entities import Metric, RunTag

    points, flags = [], {}
    for step, timestamp, metrics in epochs:
        for name, value in metrics.items():
            number = float(value)
            if math.isfinite(number):
                points.append(Metric(str(name), number, int(timestamp), int(step)))
            else:  # the latest one per name: a batch may not set one tag twice
                flags[f"{NONFINITE_TAG}{name}"] = f"{number} at step {step}"
    flags.update(_strings(tags or {}))
    _log_batch(client, run_id, metrics=points, tags=[RunTag(k, v) for k, v in flags.items()])


def _log_missing_params(client: MlflowClient, run: Run, params: Mapping[str, Any]) -> None:
    """Log the params the run lacks: params cannot change once logged, and the others are there."""
    from mlflow.entities import Param

    have = run.data.params
    _log_batch(client, run.info.run_id,
               params=[Param(str(k), _param_value(v)) for k, v in params.items() if str(k) not in have])


def _log_batch(client: MlflowClient, run_id: str, *, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
               tags: Sequence[Any] = ()) -> None:
    """Log in as few log_batch calls as MLflow's limits allow (1,000 metrics, 100 params, 100 tags)."""
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    m, p, t = list(metrics), list(params), list(tags)
    while m or p or t:
        client.log_batch(run_id, metrics=m[:MAX_METRICS_PER_BATCH], params=p[:MAX_PARAMS_TAGS_PER_BATCH],
                         tags=t[:MAX_PARAMS_TAGS_PER_BATCH])
        m, p, t = m[MAX_METRICS_PER_BATCH:], p[MAX_PARAMS_TAGS_PER_BATCH:], t[MAX_PARAMS_TAGS_PER_BATCH:]


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a new SQLite store's file while MLflow opens it.

    Opening a new store creates its tables and runs its migrations, and MLflow's tracking store
    does that unguarded: workers opening one new store together break it ("table already
    exists", a half-migrated schema). A file beside the database serializes them, also across
    machines that share the file system. A store already at MLflow's schema needs no lock.
    """
    match = re.match(r"^sqlite(\+\w+)?:///([^?]+)", uri)
    if match is None or fcntl is None or _schema_ready(Path(match.group(2))):
        yield
        return
    try:
        Path(match.group(2)).parent.mkdir(parents=True, exist_ok=True)
        handle = open(match.group(2) + ".lock", "a")  # noqa: SIM115 - closed below, which unlocks it
    except OSError:  # a read-only directory: no store will be created there either
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _tune_sqlite(uri: str, client: MlflowClient) -> None:
    """Make commits to a SQLite store cheap: WAL, and no disk sync per commit (``synchronous=NORMAL``).

    MLflow opens SQLite with a rollback journal and full syncs: every write (a run, a batch of
    metrics, tags, the end) waits for the disk, 3-20 ms on a busy machine. With WAL and NORMAL a
    commit is a write to the log, synced at checkpoints: nothing is lost when the process dies,
    and an OS crash or a power cut may lose the last commits but never corrupts the file. Readers
    (the MLflow UI) never block the writer, as with Optuna's storage. Only speed is at stake, so
    any failure (another process holds the file, an MLflow without ``store.engine``) leaves the
    store as MLflow opened it.
    """
    if not uri.startswith("sqlite"):
        return
    try:
        from hpsearch.storage import prepare_sqlite, sync_on_checkpoint

        engine = client._tracking_client.store.engine  # MLflow has no knob for its SQLite connections
        if prepare_sqlite(uri, timeout=1.0):  # NORMAL is safe with WAL only; one engine per URI, tuned once
            sync_on_checkpoint(engine)
    except Exception:  # noqa: BLE001, S110 - see the docstring
        pass


def _schema_ready(db: Path) -> bool:
    """Return whether the SQLite file ``db`` holds MLflow's latest schema."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row is not None and row[0] == _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - no file, no table, another layout: take the lock
        return False


class _ScopedEnv:
    """Environment variables set while any caller is inside, removed when the last one leaves.

    MLflow reads some settings (HTTP retries, whether a directory store may be used) from the
    environment when it needs them and has no per-client knob, so they are set around the
    tracker's own calls only, never left behind. Variables the user has set are left alone.
    (Other threads' MLflow calls made meanwhile see them too.)
    """

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self._lock = threading.Lock()
        self._depth = 0
        self._added: list[str] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._added = [k for k in self._values if k not in os.environ]
                os.environ.update({k: self._values[k] for k in self._added})
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for key in self._added:
                        os.environ.pop(key, None)


_http_limits = _ScopedEnv(_HTTP_LIMITS)
# MLflow 3 refuses a directory store unless this is set, to steer people off an accidental
# ./mlruns; a user who names a directory store has chosen it.
_file_store = _ScopedEnv({"MLFLOW_ALLOW_FILE_STORE": "true"})
# MLflow opens its own PostgreSQL connections: libpq reads this, so a host that never answers is given up on.
_pg_limits = _ScopedEnv({"PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT_S)})
_URIS_LOCK = threading.Lock()


@contextlib.contextmanager
def _process_uris(uri: str) -> Iterator[None]:
    """Point mlflow's process-wide tracking and registry URIs at ``uri``; put back what was there."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _URIS_LOCK:
        # mlflow.set_*_uri(None) would also delete the variables a user set, so restore by hand.
        saved = tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in _URI_VARS}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
            for key, value in saved[2].items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
