"""Studies: storage, sampler, pruner, the worker loop that shares a study's total, and the finish.

`open_study` creates or resumes the study named in a spec; `work` runs trials until the study's
`n_trials` (a total, however many workers) is reached; `finish` evaluates the best model once on
the test split and registers it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from hpsearch import insights, space
from hpsearch.data import Provenance, SearchData, load_search_data, load_test_split
from hpsearch.errors import DataError, HPSearchError, SpecError, StorageError
from hpsearch.objective import MODEL_FILE, TrialContext, TrialFailed, run_trial
from hpsearch.spec import PrunerSpec, Spec, mask_password, spec_from_dict
from hpsearch.storage import fail_stale_trials, make_storage
from hpsearch.tracking import Tracker
from hpsearch.trials import Counts, count

SPEC_ATTR = "hpsearch.spec"
FINGERPRINT_ATTR = "hpsearch.fingerprint"
DATA_ATTR = "hpsearch.data"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
TEST_ATTR = "hpsearch.test"
WORKER_ATTR = "worker"  # host:pid of the worker that ran a trial
# A trial started after the study's total was reached (racing workers); FAIL, counted as lost.
SURPLUS_ATTR = "surplus"

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- building


def make_sampler(spec: Spec, *, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """Return the spec's sampler, seeded with ``seed`` (default: the study seed)."""
    s = spec.study.sampler
    seed = spec.study.seed if seed is None else seed
    options = dict(s.options)
    if s.type == "grid":
        return optuna.samplers.GridSampler(space.grid(spec), seed=seed, **options)
    cls = getattr(optuna.samplers, {
        "tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "gp": "GPSampler",
        "qmc": "QMCSampler", "nsga2": "NSGAIISampler"}[s.type])
    if s.type == "tpe" and "multivariate" not in options and not spec.study.multi_objective:
        # Conditional spaces (optimizer-specific params) are modelled jointly, not per parameter.
        options.update(multivariate=True, group=True)
    return cls(seed=seed, **options)


def make_pruner(p: PrunerSpec) -> optuna.pruners.BasePruner:
    """Return the pruner a spec names (the patient pruner wrapping its inner one)."""
    if p.type == "none":
        return optuna.pruners.NopPruner()
    cls = getattr(optuna.pruners, {
        "median": "MedianPruner", "percentile": "PercentilePruner",
        "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner",
        "wilcoxon": "WilcoxonPruner", "patient": "PatientPruner", "threshold": "ThresholdPruner"}[p.type])
    if p.type == "patient":
        assert p.wrapped is not None  # the spec checks this
        return cls(make_pruner(p.wrapped), **p.options)
    return cls(**p.options)


def stale_trial_callback(spec: Spec, warn: Warn) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Return what runs when a trial's worker died: mark its MLflow run killed, retry its params."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.study.max_retries)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        warn(f"trial {trial.number} of study {study.study_name!r} sent no heartbeat for "
             f"{spec.study.grace_period} s (its worker died): marked failed and retried with the same params.")
        retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and spec.tracking.enabled:
            tracker = Tracker(spec.tracking.uri, spec.tracking.experiment,
                              artifact_root=spec.tracking.artifact_root, warn=warn)
            tracker.end_run(run_id, "KILLED", tags={
                "hpsearch.state": "FAIL",
                "hpsearch.fail_reason": f"worker died: no heartbeat for {spec.study.grace_period} s"})

    return on_stale


def open_study(spec: Spec, *, allow_space_change: bool = False, warn: Warn = _stderr) -> optuna.Study:
    """Return the spec's study, created on first use and resumed after; refuse a changed search space."""
    storage = make_storage(spec.study, stale_trial_callback=stale_trial_callback(spec, warn), warn=warn)
    try:
        study = optuna.create_study(
            storage=storage, study_name=spec.study.name, sampler=make_sampler(spec),
            pruner=make_pruner(spec.study.pruner), directions=spec.study.directions, load_if_exists=True)
    except ValueError as exc:  # e.g. directions differ from the stored study's
        raise SpecError(f"{spec.path}: study {spec.study.name!r} already exists in "
                        f"{mask_password(spec.study.storage)} and does not match this spec: {exc}") from None
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
        study.set_metric_names([m.name for m in spec.study.metrics])
    elif stored != spec.fingerprint():
        if not allow_space_change:
            changes = _describe_change(study.user_attrs.get(SPEC_ATTR, {}), spec)
            raise SpecError(
                f"{spec.path}: study {spec.study.name!r} already exists in {mask_password(spec.study.storage)} with "
                f"a different search space, task, model or metric ({changes}). Its finished trials would not be "
                "comparable with new ones. Give the study a new name, or pass --allow-space-change to continue "
                "it with the new space on purpose.")
        warn(f"warning: study {spec.study.name!r} continues with a changed search space ({ _describe_change(study.user_attrs.get(SPEC_ATTR, {}), spec)}).")
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
    for params in spec.study.enqueue:
        study.enqueue_trial(dict(params), user_attrs={"enqueued": True}, skip_if_exists=True)
    return study


def _describe_change(stored: dict[str, Any], spec: Spec) -> str:
    if not stored:
        return "no spec stored"
    old = spec_from_dict(stored).space_dict()
    new = spec.space_dict()
    diffs = [k for k in new if old.get(k) != new.get(k)]
    if "space" in diffs:
        old_p = {p["name"]: p for p in old["space"]}
        new_p = {p["name"]: p for p in new["space"]}
        names = sorted(n for n in set(old_p) | set(new_p) if old_p.get(n) != new_p.get(n))
        return "changed: " + ", ".join(f"space.{n}" for n in names)
    return "changed: " + ", ".join(diffs)


def load_stored_spec(storage_url: str, study_name: str, *, runs_dir: str | None = None,
                     tracking_uri: str | None = None, data_dir: str | None = None) -> Spec:
    """Return the spec stored in an existing study (for workers that join from anywhere).

    ``tracking_uri`` and ``data_dir`` override the stored ones: another machine may reach the
    MLflow server by another name and keep its datasets elsewhere.
    """
    try:
        summaries = optuna.get_all_study_summaries(storage=_plain_storage(storage_url))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read studies from {mask_password(storage_url)}: {exc}") from None
    found = [s for s in summaries if s.study_name == study_name]
    if not found:
        names = sorted(s.study_name for s in summaries)
        raise SpecError(f"study {study_name!r} does not exist in {mask_password(storage_url)} (studies there: "
                        f"{names}). Start it with `hpsearch run SPEC` first.")
    stored = found[0].user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise SpecError(f"study {study_name!r} in {mask_password(storage_url)} was not created by hpsearch "
                        "(it has no stored spec).")
    data = dict(stored)
    data["study"] = {**data["study"], "storage": storage_url}
    if tracking_uri:
        data["tracking"] = {**data["tracking"], "uri": tracking_uri}
    elif data["tracking"].get("enabled") and "***" in data["tracking"].get("uri", ""):
        raise SpecError(f"study {study_name!r} records its MLflow tracking URI without the password "
                        f"({data['tracking']['uri']}); pass --tracking-uri (or HPSEARCH_TRACKING_URI) with it.")
    if data_dir:
        data["task"] = {**data["task"], "data_dir": data_dir}
    if runs_dir:
        data["runs_dir"] = str(Path(runs_dir).resolve())
    return spec_from_dict(data)


def _plain_storage(url: str) -> optuna.storages.RDBStorage:
    from hpsearch.storage import driver_url, engine_kwargs

    url = driver_url(url)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot open the Optuna storage {mask_password(url)}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.") from None


# --------------------------------------------------------------------------- counting


def count_trials(study: optuna.Study) -> Counts:
    """Return the study's trials per state (see :func:`hpsearch.trials.count`)."""
    return count(study.get_trials(deepcopy=False))


# --------------------------------------------------------------------------- working


@dataclass
class WorkerSetup:
    """What a worker process decides once: device, threads, data, tracking."""

    device: torch.device
    threads: int
    data: SearchData
    tracker: Tracker | None
    parent_run_id: str | None
    reference: torch.nn.Module | None = None
    notes: list[str] = field(default_factory=list)


def setup_worker(spec: Spec, study: optuna.Study, *, device: str | None = None, threads: int | None = None,
                 warn: Warn = _stderr) -> WorkerSetup:
    """Return a worker's device, data (checked against the study's) and tracking, ready for trials."""
    from hpsearch.train import resolve_device

    dev = resolve_device(device or spec.task.device)
    n_threads = threads or spec.task.threads or max(1, (os.cpu_count() or 1))
    torch.set_num_threads(n_threads)
    data = load_search_data(spec.task.dataset, data_dir=spec.task.data_dir, val_fraction=spec.task.val_fraction,
                            seed=spec.study.seed, fallback=spec.task.fallback, train_limit=spec.task.train_limit,
                            warn=warn)
    _check_fits_images(spec, data)
    provenance = {**data.provenance.__dict__, "mean": data.mean, "std": data.std, "n_classes": data.n_classes,
                  "image_shape": list(data.image_shape)}
    stored = study.user_attrs.get(DATA_ATTR)
    if stored is None:
        study.set_user_attr(DATA_ATTR, provenance)
    elif stored.get("sha256") != provenance["sha256"] or stored.get("n_train") != provenance["n_train"]:
        raise DataError(
            f"this worker's data differs from the data study {spec.study.name!r} was searched on: the study used "
            f"{stored.get('name')} (sha256 {stored.get('sha256')}, {stored.get('n_train')} training samples, from "
            f"{stored.get('source')}), this worker found {provenance['name']} (sha256 {provenance['sha256']}, "
            f"{provenance['n_train']} samples, from {provenance['source']}). Give it the same data dir.")
    data = data.to(dev)
    tracker, parent = None, None
    if spec.tracking.enabled:
        tracker = Tracker(spec.tracking.uri, spec.tracking.experiment, artifact_root=spec.tracking.artifact_root,
                          warn=warn)
        parent = tracker.study_run(spec.study.name, params=_flat_spec_params(spec, data),
                                   tags={"hpsearch.study": spec.study.name,
                                         "optuna.storage": mask_password(spec.study.storage),
                                         "hpsearch.fingerprint": spec.fingerprint()})
        if parent and study.user_attrs.get(PARENT_RUN_ATTR) != parent:
            study.set_user_attr(PARENT_RUN_ATTR, parent)
            if tracker.experiment_id:
                study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
    reference = None
    if spec.task.type == "inpaint":
        from hpsearch.tasks import load_or_train_reference

        reference = load_or_train_reference(data, Path(spec.cache_dir), device=dev)
    return WorkerSetup(device=dev, threads=n_threads, data=data, tracker=tracker, parent_run_id=parent,
                       reference=reference)


def _check_fits_images(spec: Spec, data: SearchData) -> None:
    """Refuse, once and up front, a hidden square that would not fit the dataset's images."""
    if spec.task.type != "inpaint":
        return
    sizes = [spec.task.mask.size]
    for p in spec.space:
        if p.name == "mask_size":
            sizes.append(p.value if p.type == "fixed" else max(p.choices) if p.choices else p.high)
    side = min(data.image_shape[1:])
    if max(sizes) >= side:
        raise SpecError(f"{spec.path}: the in-painting mask (size up to {max(sizes)}) must be smaller than the "
                        f"images of {data.provenance.name!r} ({side}x{side} pixels); set task.mask.size or "
                        "space.mask_size below that.")


def _flat_spec_params(spec: Spec, data: SearchData) -> dict[str, Any]:
    d = spec.to_dict()
    out: dict[str, Any] = {
        "study.metrics": ",".join(f"{m.name}:{m.direction}" for m in spec.study.metrics),
        "study.n_trials": spec.study.n_trials, "study.seed": spec.study.seed,
        "study.sampler": json.dumps(d["study"]["sampler"]), "study.pruner": json.dumps(d["study"]["pruner"]),
        "model.family": spec.model.family,
    }
    for key, value in d["task"].items():
        out[f"task.{key}"] = json.dumps(value) if isinstance(value, dict) else value
    for p in d["space"]:
        out[f"space.{p['name']}"] = json.dumps({k: v for k, v in p.items() if v not in (None, [], {}, False)
                                                and k != "name"})
    out.update(data.provenance.as_params())
    return out


def work(spec: Spec, study: optuna.Study, setup: WorkerSetup, *, timeout: float | None = None,
         shared: bool = True, warn: Warn = _stderr) -> int:
    """Run trials until the study's total is reached (or the timeout); return how many this worker ran.

    A trial that fails fails alone (see :func:`run_trial`); a fault of the whole worker ends the
    work, and the study's MLflow parent run with it (FAILED, the reason tagged), never left RUNNING.
    """
    try:
        return _work(spec, study, setup, timeout=timeout, shared=shared, warn=warn)
    except Exception as exc:
        if setup.tracker and setup.parent_run_id:
            setup.tracker.end_run(setup.parent_run_id, "FAILED",
                                  tags={"hpsearch.fail_reason": f"{type(exc).__name__}: {exc}"[:5000]})
        if isinstance(exc, OSError):  # a file the worker needs (artifacts, caches): one line, not a traceback
            raise StorageError(f"this worker cannot go on: {exc.strerror or exc}"
                               + (f": {exc.filename}" if exc.filename else "")
                               + ". Finished trials are kept; fix it and run again.") from None
        raise


def _work(spec: Spec, study: optuna.Study, setup: WorkerSetup, *, timeout: float | None = None,
          shared: bool = True, warn: Warn = _stderr) -> int:
    """Run trials until the study's total is reached (or the timeout); return how many this worker ran.

    ``shared``: other workers may run trials of the study at the same time. Each worker's sampler
    then draws from its own random stream (the study seed mixed with the worker's name): seeded
    alike, racing workers would propose the same parameters. Without it, the study seed as is.
    Ctrl-C (SIGINT) or SIGTERM ends the running trial as interrupted, never leaving it RUNNING,
    then raises KeyboardInterrupt.
    """
    ctx = TrialContext(spec=spec, data=setup.data, device=setup.device, tracker=setup.tracker,
                       parent_run_id=setup.parent_run_id,
                       artifact_store=optuna.artifacts.FileSystemArtifactStore(_artifacts_dir(spec)),
                       reference=setup.reference, warn=warn)
    deadline = None if timeout is None else time.monotonic() + timeout
    ran = 0
    n_trials = spec.study.n_trials
    signals = _StopSignals()
    surplus: set[int] = set()  # trials this worker created past the total (workers raced)
    if shared and spec.study.sampler.type != "qmc":  # QMC workers share one sequence through the storage
        study.sampler = make_sampler(spec, seed=worker_seed(spec.study.seed))

    def objective(trial: optuna.Trial) -> float | list[float]:
        with signals.trial(trial):
            trial.set_user_attr(WORKER_ATTR, worker_id())
            if _surplus(study, trial, n_trials):
                trial.set_user_attr(SURPLUS_ATTR, f"other workers had already started the study's {n_trials} "
                                                  "trials when this one was created")
                surplus.add(trial.number)
                raise _Surplus()
            if setup.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(setup.device)  # this trial's peak, not the worker's
            return run_trial(trial, ctx)

    def not_a_failure(record: logging.LogRecord) -> bool:
        # Optuna reports a surplus trial as failed, with a traceback; it is no failure.
        return not any(record.getMessage().startswith(f"Trial {n} failed") for n in surplus)

    optuna_log = logging.getLogger("optuna.study._optimize")
    with signals, _log_filters(optuna_log, signals.filter, not_a_failure, _one_line_failures):
        while deadline is None or time.monotonic() < deadline:
            signals.check()
            c = count_trials(study)
            if c.waiting > 0 or c.finished + c.running < n_trials:
                study.optimize(objective, n_trials=1, catch=(TrialFailed, _Surplus))
                ran += 1
                insights.refresh(spec, study, setup.tracker, setup.parent_run_id, min_interval_s=30.0, warn=warn)
            elif c.running > 0 and c.finished < n_trials:
                # Other workers hold the last trials. If one of them died, its trial goes stale and is
                # retried: stay to pick the retry up, so the study reaches its total.
                fail_stale_trials(study, grace_period=spec.study.grace_period)
                signals.sleep(min(0.5, spec.study.heartbeat_interval))  # the total may be reached any moment
            else:
                break
        signals.check()
    if count_trials(study).finished >= n_trials and setup.tracker and setup.parent_run_id:
        setup.tracker.end_run(setup.parent_run_id, "FINISHED")  # each worker may say so: idempotent
    return ran


def worker_id() -> str:
    """Return this worker's name in trial attributes: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_seed(study_seed: int) -> int:
    """Return this worker's sampler seed: the study seed mixed with the worker's name."""
    return (study_seed * 1_000_003 + zlib.crc32(worker_id().encode())) % (2**31 - 1)


@contextmanager
def _log_filters(logger: logging.Logger, *filters: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    for f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for f in filters:
            logger.removeFilter(f)


def _one_line_failures(record: logging.LogRecord) -> bool:
    """Keep one line of Optuna's per failed trial: its reason without a traceback when the reason says it all,
    and without the second line about a value it never had."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, (TrialFailed, HPSearchError)):
        record.exc_info, record.exc_text = None, None
    return not _NO_VALUE_LINE.match(record.getMessage())


_NO_VALUE_LINE = re.compile(r"Trial \d+ failed with value None\.$")


class _Surplus(Exception):
    """The study's total was reached by other workers while this trial was being created."""


def _surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Return whether ``n_trials`` trials that count were created before this one."""
    # Counting and creating a trial are two steps, so racing workers may create one too many;
    # trial numbers are assigned in order under a lock, so the later trial can tell.
    before = count([t for t in study.get_trials(deepcopy=False) if t.number < trial.number])
    return before.finished + before.running + before.waiting >= n_trials


# Code that must not be cut off in the middle: an interrupted commit can leave a SQLite lock held
# (stalling every worker on the file) or a half-written record.
_IO_MODULES = ("sqlalchemy", "sqlite3", "psycopg2", "psycopg", "pymysql", "alembic", "mlflow", "requests",
               "urllib3", "http.client", "optuna.storages", "optuna.artifacts", "hpsearch.storage",
               "hpsearch.tracking")
_IO_RECHECK_S = 0.05


def _in_io(frame: Any) -> bool:
    """Return whether the stack under ``frame`` is inside a database, tracking or HTTP call."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith(_IO_MODULES):
            return True
        frame = frame.f_back
    return False


class _StopSignals:
    """SIGINT and SIGTERM as one KeyboardInterrupt inside a trial's own code, a stop elsewhere.

    A signal that lands while Optuna creates or closes a trial would leave it RUNNING; so it
    interrupts only the trial's code (which closes the trial as interrupted), once, and
    otherwise stops the worker loop at its next check. Inside the trial, a database or tracking
    call is let finish first (the signal is looked at again every 50 ms). A third signal
    interrupts at once, wherever it lands: the user insists (the trial may then go stale).
    """

    def __init__(self) -> None:
        self.requested = False
        self._count = 0  # signals received (re-checks of a deferred one excluded)
        self._rechecks = 0
        self._in_trial = False
        self._raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread gets signals
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. `nohup ... &` ignores Ctrl-C
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop Optuna's failure report (a warning with a traceback) once stopping: Ctrl-C is no failure."""
        return not self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self._rechecks:
            self._rechecks -= 1
        else:
            self._count += 1
        if self._count >= 3:
            raise KeyboardInterrupt
        if not self._in_trial or self._raised:
            return
        if _in_io(frame) and hasattr(signal, "pthread_kill"):  # (not on Windows: interrupt at once there)
            threading.Timer(_IO_RECHECK_S, self._recheck, (signum,)).start()
            return
        self._raised = True  # a second Ctrl-C must not break the interrupted trial's clean-up
        raise KeyboardInterrupt

    def _recheck(self, signum: int) -> None:
        self._rechecks += 1
        signal.pthread_kill(threading.main_thread().ident or 0, signum)  # runs _handle in the main thread

    @contextmanager
    def trial(self, trial: optuna.Trial) -> Iterator[None]:
        if self.requested:
            trial.set_user_attr("interrupted", "stopped before the trial began")
            raise KeyboardInterrupt
        self._in_trial = True
        try:
            yield
        finally:
            self._in_trial = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            time.sleep(0.1)


def _artifacts_dir(spec: Spec) -> str:
    path = Path(spec.artifacts_dir)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# --------------------------------------------------------------------------- finishing


def best_trial(spec: Spec, study: optuna.Study) -> FrozenTrial | None:
    """Return the best complete trial whose model was kept (first objective decides on a Pareto front)."""
    from hpsearch.trials import best_trial as best

    return best(spec, [t for t in study.get_trials(deepcopy=False) if "model_artifact_id" in t.user_attrs])


def finish(spec: Spec, study: optuna.Study, *, device: str | None = None, warn: Warn = _stderr) -> dict[str, Any]:
    """Evaluate the best trial's model once on the test split, log and register it; return the result.

    Idempotent: a study whose best trial was already tested is not tested again.
    """
    from hpsearch import tasks
    from hpsearch.models import build_model
    from hpsearch.train import evaluate, resolve_device

    best = best_trial(spec, study)
    if best is None:
        return {}
    done = study.user_attrs.get(TEST_ATTR)
    if done and done.get("trial") == best.number:
        return done
    stored = study.user_attrs.get(DATA_ATTR)
    if stored is None:
        raise DataError(f"study {spec.study.name!r} records no data provenance; run a trial first.")
    provenance = Provenance(**{k: v for k, v in stored.items() if k in Provenance.__dataclass_fields__})
    dev = resolve_device(device or spec.task.device)
    test = load_test_split(provenance, data_dir=spec.task.data_dir).to(dev)
    params = _trial_params(spec, best)
    model = build_model(spec.model.family, params, image_shape=tuple(stored["image_shape"]),
                        n_classes=int(stored["n_classes"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        optuna.artifacts.download_artifact(
            artifact_store=optuna.artifacts.FileSystemArtifactStore(_artifacts_dir(spec)),
            file_path=str(path), artifact_id=best.user_attrs["model_artifact_id"])
        model.load_state_dict(torch.load(path, map_location="cpu"))
    model = model.to(dev).eval()
    mean, std = (stored["mean"], stored["std"]) if spec.task.normalize else (0.0, 1.0)
    reference = None
    if spec.task.type == "inpaint":
        reference = _cached_reference(spec, provenance, dev)
    task = tasks.make_task(spec.task.type, params, mask_placement=spec.task.mask.placement,
                           noise_kind=spec.task.noise.kind, reference=reference)
    metrics = evaluate(model, test, task, mean=mean, std=std, device=dev)
    test_metrics = {("test_" + k[4:] if k.startswith("val_") else "test_" + k): v for k, v in metrics.items()}
    result: dict[str, Any] = {"trial": best.number, "metrics": test_metrics, "params": best.params,
                              "values": best.values, "n_test": len(test)}
    if spec.tracking.enabled:
        tracker = Tracker(spec.tracking.uri, spec.tracking.experiment, artifact_root=spec.tracking.artifact_root,
                          warn=warn)
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
        if parent:
            tracker.log_metrics(parent, test_metrics, step=best.number)
            tracker.set_tags(parent, {"hpsearch.best_trial": str(best.number),
                                      "hpsearch.best_run_id": str(best.user_attrs.get("mlflow_run_id", ""))})
            example = ((test.images[:4].float() / 255.0 - mean) / std).cpu().numpy()
            version = tracker.log_model(parent, model.cpu(), input_example=example,
                                        registered_name=spec.study.name if spec.tracking.register_model else None)
            result["model_version"] = version
            result["registered_model"] = spec.study.name if version else None
            result["experiment_id"] = tracker.experiment_id
            result["parent_run_id"] = parent
    study.set_user_attr(TEST_ATTR, json.loads(json.dumps(result, default=str)))
    insights.refresh(spec, study, tracker if spec.tracking.enabled else None, study.user_attrs.get(PARENT_RUN_ATTR),
                     force=True, warn=warn)
    return result


def _cached_reference(spec: Spec, provenance: Provenance, device: torch.device) -> torch.nn.Module:
    from hpsearch.tasks import load_or_train_reference

    data = load_search_data(provenance.name, data_dir=spec.task.data_dir, val_fraction=spec.task.val_fraction,
                            seed=spec.study.seed, train_limit=spec.task.train_limit).to(device)
    return load_or_train_reference(data, Path(spec.cache_dir), device=device)


def _trial_params(spec: Spec, trial: FrozenTrial) -> dict[str, Any]:
    params = space.base_params(spec)
    params.update(trial.params)
    return params
