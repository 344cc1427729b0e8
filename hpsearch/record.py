"""What a study stores, in one place: the names of its attrs and MLflow tags, typed readers of what
they hold, and the one way to open an existing study and its artifact store (no torch, no MLflow).

Optuna keeps a study's facts as user attrs (JSON values) on the study and its trials, and system
attrs (claims, notes) on the study; MLflow keeps tags on runs and registered versions. Every name
hpsearch writes there is a constant below; every module that reads or writes one imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, TrialState

from hpsearch.errors import SpecError, StorageError
from hpsearch.provenance import Provenance
from hpsearch.spec import Spec, hide_secrets, mask_password, spec_from_dict
from hpsearch.tracking import STUDY_TAG, TRIAL_TAG  # noqa: F401 - MLflow tags the tracker sets itself, named here too

# --------------------------------------------------------------------------- study user attrs

SPEC_ATTR = "hpsearch.spec"  # the resolved spec (Spec.to_dict), as the study was created or last allowed to change
FINGERPRINT_ATTR = "hpsearch.fingerprint"  # Spec.fingerprint(): what defines the search (also an MLflow tag)
DATA_ATTR = "hpsearch.data"  # the data provenance (see StoredData)
TEST_ATTR = "hpsearch.test"  # the final test's record (see FinalTest)
# Keys of that record while it is not in MLflow yet (the store was unreachable at the test): why, and
# the refit's per-epoch history, for its run once MLflow is back.
UNRECORDED = "unrecorded"
REFIT_HISTORY = "refit_history"
# Validation reports per epoch, decided once per study (a study stored without it reported once per
# epoch). A trial's report number `step` is epoch `step / reports_per_epoch`.
REPORTS_ATTR = "hpsearch.reports_per_epoch"
STOPPED_ATTR = "hpsearch.stopped"  # {"rule", "reason", "at"} of the stop rule that ended the study
WARM_ATTR = "hpsearch.warm_start"  # what the warm start took from where
FIGURES_ATTR = "hpsearch.figures"  # how many trials had finished when the figures were drawn
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # the study's MLflow parent run
EXPERIMENT_ATTR = "mlflow_experiment_id"
VIEW_ATTR = "mlflow_runs_view"  # the id of the study's saved view in the MLflow UI

# --------------------------------------------------------------------------- study system attrs (+ a suffix)

SAMPLER_STREAM_KEY = "hpsearch.sampler_stream:"  # + stream number: who claimed it, its seed
FINISH_KEY = "hpsearch.finish:"  # + the best trial's number: held while one process tests it
# + trial number: the MLflow run an untracked trial got once the server was back.
TRACKED_LATE_KEY = "hpsearch.tracked_late:"
PARENT_RUN_KEY = "hpsearch.parent_run"  # no suffix: the MLflow parent run racing workers agreed on
RECORDED_LATE_KEY = "hpsearch.recorded_late:"  # + the tested trial's number: its test recorded in MLflow late
# A late record's claim (TRACKED_LATE_KEY's, RECORDED_LATE_KEY's; not renewed: writing one takes seconds) whose
# holder is not known dead is taken over after this long.
LATE_STALE_S = 600.0
NOTE_SHA_KEY = "hpsearch:note_sha:"  # + "study" or a trial id: hash of the dashboard note hpsearch last wrote

# --------------------------------------------------------------------------- trial user attrs

SEED_ATTR = "seed"  # the trial's training seed
DEVICE_ATTR = "device"
N_PARAMS_ATTR = "n_params"
TRAIN_SECONDS_ATTR = "train_seconds"
RUN_ID_ATTR = "mlflow_run_id"  # the trial's MLflow run
RUN_URL_ATTR = "mlflow_run_url"  # its page, where the tracking server is an HTTP one
MODEL_ATTR = "model_artifact_id"  # the trained weights, an Optuna artifact: the trial's model was kept
# Why a trial failed through a fault of its own: it counts towards n_trials (also an MLflow tag, below).
FAIL_REASON_ATTR = "fail_reason"
INTERRUPTED_ATTR = "interrupted"  # why a trial stopped through no fault of its own (Ctrl-C, a killed worker)
WORKER_ATTR = "worker"  # host:pid of the worker that ran a trial (see worker_id)
SAMPLER_STREAM_ATTR = "sampler_stream"  # the sampler stream a trial was drawn from
# A trial started after the study's total was reached (racing workers); FAIL, counted as lost.
SURPLUS_ATTR = "surplus"
# A trial whose MLflow records did not all land (the tracking server was unreachable): why.
UNTRACKED_ATTR = "untracked"
ENQUEUED_ATTR = "enqueued"  # a configuration the spec (or a warm start) asked to try first
# A trial copied from an earlier study by a warm start (hpsearch/warmstart.py): "<study>#<number>".
# The sampler and pruner learn from it; it has no model and is not one of this study's trials.
ORIGIN_ATTR = "warm_start_from"
WARM_OF_ATTR = "warm_start_of"  # an enqueued configuration: the earlier study's trial it repeats
ARTIFACT_PREFIX = "artifact:"  # + file name: the id of a trial's picture, an Optuna artifact
RECONSTRUCTION_ATTR = f"{ARTIFACT_PREFIX}reconstruction.png"
CONFUSION_ATTR = f"{ARTIFACT_PREFIX}confusion_matrix.png"
IMAGE_ATTRS = (RECONSTRUCTION_ATTR, CONFUSION_ATTR)

# --------------------------------------------------------------------------- MLflow tags

STATE_TAG = "hpsearch.state"  # a trial run: its Optuna state
FAIL_REASON_TAG = "hpsearch.fail_reason"  # a trial run, or the parent run of a worker that failed
RETRIED_FROM_TAG = "hpsearch.retried_from"  # a trial run: the trial it retries (its worker died)
TRACKED_LATE_TAG = "hpsearch.tracked_late"  # a trial run recorded after the trial, once MLflow was back
TRIAL_NUMBER_TAG = "optuna.trial_number"
STORAGE_TAG = "optuna.storage"  # the parent run: where the study is (password masked)
FINGERPRINT_TAG = FINGERPRINT_ATTR  # the parent run
BEST_TRIAL_TAG = "hpsearch.best_trial"  # the parent run, once tested: the best trial...
BEST_RUN_TAG = "hpsearch.best_run_id"  # ...and its run (also on the refit's run)
DATA_NAME_TAG = DATA_ATTR  # a registered version: the dataset it was searched on...
DATA_SHA_TAG = "hpsearch.data_sha256"  # ...and its content hash


def test_metric(name: str) -> str:
    """Return the name the test split's measure of validation metric ``name`` is logged under."""
    return "test_" + name[4:] if name.startswith("val_") else "test_" + name


def worker_id() -> str:
    """Return this worker's name in trial attributes: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------- typed readers


@dataclass(frozen=True)
class StoredData(Provenance):
    """The data a study searched on (DATA_ATTR), written by its first worker: its provenance, and what
    its inputs are standardised with; a field an older study lacks reads None."""

    mean: float  # of the training pixels in [0, 1]
    std: float
    n_classes: int
    image_shape: tuple[int, ...]

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoredData | None:
        """Return the data recorded in a study's user attrs, or None before the first worker recorded it."""
        data = attrs.get(DATA_ATTR)
        if not data:
            return None
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        if values["image_shape"] is not None:
            values["image_shape"] = tuple(values["image_shape"])
        return cls(**values)

    @classmethod
    def from_study(cls, study: optuna.Study) -> StoredData | None:
        """Return the data the study searched on, or None before its first worker recorded it."""
        return cls.from_attrs(study.user_attrs)

    def as_attr(self) -> dict[str, Any]:
        """Return the record as the study stores it (plain JSON)."""
        return {**dataclasses.asdict(self), "image_shape": list(self.image_shape)}

    def provenance(self) -> Provenance:
        """Return the provenance alone: name, source, sizes, hash, fallback."""
        return Provenance(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Provenance)})

    def describe(self, *, mark: Callable[[str], str] = str, brief: bool = False) -> str:
        """Return the data in a line: name, source, split sizes, hash (and the image shape unless ``brief``).

        ``mark`` sets off names and hashes (markdown's backticks); ``brief`` is the run summary's form.
        """
        sizes = f"{self.n_train} train / {self.n_val} validation / {self.n_test} test"
        if brief:
            return f"{self.name} from {self.source} ({sizes}, sha256 {self.sha256})"
        shape = None if self.image_shape is None else list(self.image_shape)
        return (f"{mark(str(self.name))} from {mark(str(self.source))}: {sizes} images of shape {shape}, "
                f"sha256 {mark(str(self.sha256))}.")

    def fallback_warning(self, requested: str, *, mark: Callable[[str], str] = str) -> str | None:
        """Return the warning that the study ran on a fallback dataset (None when it did not).

        ``requested`` is the spec's dataset, said when the record does not name it.
        """
        if not self.fallback:
            return None
        asked = mark(str(self.requested or requested))
        return (f"the spec asked for {asked}, which could not be loaded; every trial ran on {mark(str(self.name))} "
                f"instead. These are not results on {asked}.")


@dataclass(frozen=True)
class FinalTest:
    """The final test of a study's best configuration (TEST_ATTR, and what `finish` returns)."""

    trial: int
    metrics: dict[str, float]  # test_<metric>: value
    params: dict[str, Any]
    values: list[float]  # the trial's validation value(s)
    n_test: int
    refit: dict[str, Any] | None = None  # Refit.as_record() when the model was refit, else None
    model_version: str | None = None
    registered_model: str | None = None
    champion: str | None = None  # what became of the champion alias
    experiment_id: str | None = None
    parent_run_id: str | None = None
    refit_run_id: str | None = None
    model_artifact: str | None = None  # the tested model's weights, an Optuna artifact (of the study if refit)
    unrecorded: str | None = None  # why the test is not in MLflow yet (see finish._record_late), else None

    @classmethod
    def from_dict(cls, record: Mapping[str, Any] | None) -> FinalTest | None:
        """Return the test record ``record`` (as stored, or as `finish` returned it), or None without one."""
        if not record or not record.get("metrics"):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    @classmethod
    def from_study(cls, study: optuna.Study) -> FinalTest | None:
        """Return the study's final test, or None before it was tested."""
        return cls.from_dict(study.user_attrs.get(TEST_ATTR))

    def model_text(self) -> str:
        """Return which model was tested, in words: the refit, or the trial's own."""
        r = self.refit
        if not r:
            return f"Trial #{self.trial}'s own model"
        when = ("where its validation curve peaked" if r.get("epochs_rule") == "best"
                else "as study.refit.epochs says")
        return (f"Trial #{r['trial']}'s configuration refit on {r['n_train']} training + validation images for "
                f"{r['epochs']} epoch(s) ({when})")


def stored_spec(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the spec a study stores (plain data, as Spec.to_dict gave it), or None if hpsearch did not create it."""
    stored = attrs.get(SPEC_ATTR)
    return dict(stored) if stored is not None else None


def read_spec(attrs: Mapping[str, Any], **top: Any) -> Spec | None:
    """Return the spec a study stores as a Spec, top-level keys (``runs_dir``) replaced by ``top``; None without one."""
    stored = stored_spec(attrs)
    return None if stored is None else spec_from_dict({**stored, **top})


def reports_per_epoch(attrs: Mapping[str, Any]) -> int:
    """Return the study's reports per epoch from its user attrs (1 for studies from before they existed)."""
    return int(attrs.get(REPORTS_ATTR, 1))


AUTO_REPORT_SAMPLES = 10_000  # task.reports_per_epoch: auto reports about every this many training images


def auto_reports_per_epoch(n_train: int) -> int:
    """Return how many reports per epoch ``auto`` means for a training split of ``n_train`` images."""
    return max(1, round(n_train / AUTO_REPORT_SAMPLES))


def epoch_text(step: int, per_epoch: int) -> str:
    """Return report ``step`` as an epoch for people: "3", or "2.25" within an epoch."""
    return f"{step / per_epoch:.4g}"


# --------------------------------------------------------------------------- opening


def open_existing(url: str, name: str, *, spec_path: str | None = None,
                  storage: Callable[[], optuna.storages.BaseStorage] | None = None) -> optuna.Study:
    """Return the existing study ``name`` in the Optuna storage ``url``; never create it (nor an empty database).

    ``storage`` builds the storage to load it on (default: a plain one, for looking); ``spec_path``
    is the spec the study is named in, for the messages. Raises SpecError for a study that is not
    there (naming the ones that are), StorageError for a storage that cannot be read.
    """
    from hpsearch.storage import checked_driver_url

    where = f"{spec_path}: " if spec_path else ""
    start = f"Start it with `hpsearch run {spec_path or 'SPEC'}`."
    url = checked_driver_url(url, what="the Optuna storage")
    if url.startswith("sqlite:///") and not Path(url.split(":///", 1)[1]).is_file():
        raise SpecError(f"{where}study {name!r} has not run yet: {url} does not exist. {start}")
    opened = storage() if storage is not None else plain_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage=opened))
        raise SpecError(f"{where}study {name!r} does not exist in {mask_password(url)} (studies there: {names}). "
                        f"{start}") from None
    except Exception as exc:  # noqa: BLE001 - any driver error means: cannot read this storage
        raise _unreadable(url, exc) from None


def plain_storage(url: str) -> optuna.storages.RDBStorage:
    """Return a plain Optuna storage on ``url`` (no heartbeats, no retries), for looking; or raise StorageError."""
    from hpsearch.storage import checked_driver_url, engine_kwargs, opening

    url = checked_driver_url(url, what="the Optuna storage")
    try:
        with opening(url):
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(url, exc) from None


def _unreadable(url: str, exc: BaseException) -> StorageError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StorageError(f"cannot open the Optuna storage {mask_password(url)}: {hide_secrets(first, url)}.")


class TidyArtifactStore(FileSystemArtifactStore):
    """Optuna's file store, minus the half-written file a failed write (a full disk) would leave behind.

    Removing it gives back the space the study needs to close the trial as failed.
    """

    def write(self, artifact_id: str, content_body: Any) -> None:
        try:
            super().write(artifact_id, content_body)
        except BaseException:
            with contextlib.suppress(Exception):  # nothing was written, or it is gone already
                self.remove(artifact_id)
            raise


def artifact_store(spec: Spec) -> TidyArtifactStore:
    """Return the Optuna artifact store of the spec's study (trial images and models, study plots), created if new."""
    path = Path(spec.artifacts_dir)
    path.mkdir(parents=True, exist_ok=True)
    return TidyArtifactStore(str(path))


def read_artifact(store: FileSystemArtifactStore, artifact_id: str) -> bytes | None:
    """Return an artifact's bytes, or None when it is gone (deleted, another machine's folder)."""
    try:
        with store.open_reader(artifact_id) as reader:
            return reader.read()
    except Exception:  # noqa: BLE001 - ArtifactNotFound, or an unreadable file: show the rest anyway
        return None


# --------------------------------------------------------------------------- counting and ranking


@dataclass(frozen=True)
class Counts:
    """Trials per state; `lost` failed through no fault of their own (a worker died, Ctrl-C); `inherited`
    were copied from an earlier study by a warm start (neither counts towards n_trials)."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    lost: int = 0
    running: int = 0
    waiting: int = 0
    inherited: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def count(trials: Sequence[FrozenTrial]) -> Counts:
    """Return the trials per state, a trial that failed for a reason of its own counts; one lost to a dead worker or Ctrl-C does not."""
    c = {"complete": 0, "pruned": 0, "failed": 0, "lost": 0, "running": 0, "waiting": 0, "inherited": 0}
    for t in trials:
        if ORIGIN_ATTR in t.user_attrs:
            c["inherited"] += 1
        elif t.state == TrialState.COMPLETE:
            c["complete"] += 1
        elif t.state == TrialState.PRUNED:
            c["pruned"] += 1
        elif t.state == TrialState.FAIL:
            c["failed" if FAIL_REASON_ATTR in t.user_attrs else "lost"] += 1
        elif t.state == TrialState.RUNNING:
            c["running"] += 1
        else:
            c["waiting"] += 1
    return Counts(**c)


def count_trials(study: optuna.Study) -> Counts:
    """Return the study's trials per state (see :func:`count`)."""
    return count(study.get_trials(deepcopy=False))


def best_trial(spec: Spec, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """Return this study's best complete trial by the first metric (among the Pareto front if several)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values and ORIGIN_ATTR not in t.user_attrs
                and all(math.isfinite(v) for v in t.values)]
    if not complete:
        return None
    if spec.study.multi_objective:
        complete = _pareto(complete, spec.study.directions) or complete
    sign = 1.0 if spec.study.metrics[0].direction == "minimize" else -1.0
    return min(complete, key=lambda t: (sign * t.values[0], t.number))


def _pareto(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]

    def key(t: FrozenTrial) -> list[float]:
        return [s * v for s, v in zip(signs, t.values)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and a != b

    keys = {t.number: key(t) for t in trials}
    return [t for t in trials if not any(dominates(keys[o.number], keys[t.number]) for o in trials)]


def untracked(trials: Sequence[FrozenTrial], study_system_attrs: Mapping[str, object]) -> list[int]:
    """Return the numbers of finished trials missing from MLflow: marked untracked, and no run recorded there since
    (a claim to record one that names no run yet is a record under way, or left by a process that died)."""
    def recorded(number: int) -> bool:
        held = study_system_attrs.get(f"{TRACKED_LATE_KEY}{number}")
        return isinstance(held, Mapping) and held.get("run_id") is not None

    return [t.number for t in trials if UNTRACKED_ATTR in t.user_attrs and t.state.is_finished()
            and not recorded(t.number)]


def untracked_note(numbers: Sequence[int]) -> str:
    """Return what `status` and the report say about trials missing from MLflow."""
    return (", ".join(map(str, numbers)) + " (the MLflow server was unreachable while they ran; a worker or the "
            "final test records their runs once it is back)")
