"""A spec's frozen objects, and their round trip to plain (JSON-safe) data."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpsearch.spec.urls import mask_password


@dataclass(frozen=True)
class MetricSpec:
    name: str
    direction: str


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"  # TPE: the best general default for mixed, conditional spaces
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "median"  # median: robust, no tuning, prunes from the 2nd epoch of later trials
    options: Mapping[str, Any] = field(default_factory=dict)
    wrapped: PrunerSpec | None = None  # for `patient`


@dataclass(frozen=True)
class RefitSpec:
    """How the final model is made (hpsearch/refit.py): the best configuration retrained on train + val."""

    enabled: bool = True  # the validation split has done its job once the search has chosen: train on it too
    epochs: str | int = "best"  # "best": where the best trial's validation curve peaked; or a fixed count
    data: str = "train+val"  # the one choice today; named so that the record says what the model saw


@dataclass(frozen=True)
class StopSpec:
    """Study-wide stop rules (hpsearch/stopping.py); each None is a rule not in force."""

    target: float | None = None  # stop once a complete trial's first metric reaches this value
    patience: int | None = None  # stop after this many finished trials in a row without improvement
    min_delta: float = 0.0  # an improvement smaller than this does not count (for `patience`)
    max_minutes: float | None = None  # stop this long after the study's first trial started

    @property
    def active(self) -> bool:
        return self.target is not None or self.patience is not None or self.max_minutes is not None


@dataclass(frozen=True)
class WarmStartSpec:
    """An earlier study to start from (hpsearch/warmstart.py)."""

    study: str
    storage: str  # resolved; this study's storage unless given
    top_k: int = 3  # its best configurations, evaluated first here: a few, not a copy of the old search


@dataclass(frozen=True)
class StudySpec:
    name: str
    metrics: tuple[MetricSpec, ...]
    n_trials: int  # the study's total, however many workers share it
    storage: str  # an Optuna storage URL, resolved (never printed with its password)
    timeout: float | None = None  # seconds per worker; None: run until n_trials
    seed: int = 0  # sampler seed; each trial's training seed derives from it and the trial number
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    enqueue: tuple[Mapping[str, Any], ...] = ()  # known-good configurations, evaluated first
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 60  # a trial silent this long is failed (its worker died) and retried
    max_retries: int = 2  # how often a trial whose worker died is retried with the same params
    pack: int | None = None  # trials a worker trains together (packs); None: auto, chosen per device
    refit: RefitSpec = field(default_factory=RefitSpec)  # off by default for multi-objective studies (see parse)
    stop: StopSpec = field(default_factory=StopSpec)  # no rule by default: the study runs to n_trials
    warm_start: WarmStartSpec | None = None  # start from nothing unless asked

    @property
    def directions(self) -> list[str]:
        return [m.direction for m in self.metrics]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


@dataclass(frozen=True)
class NoiseSpec:
    kind: str = "gaussian"
    std: float = 0.3  # gaussian std in [0, 1] pixel units: visibly noisy, still legible
    amount: float = 0.1  # salt-and-pepper: share of pixels flipped to 0 or 1


@dataclass(frozen=True)
class MaskSpec:
    size: int = 14  # a quarter of a 28x28 digit: enough to hide a stroke
    placement: str = "center"


@dataclass(frozen=True)
class TaskSpec:
    type: str
    dataset: str
    fallback: str | None = None  # a dataset to use, loudly, when `dataset` cannot be loaded
    data_dir: str | None = None
    val_fraction: float = 0.1  # carved from the training split with the study seed
    train_limit: int | None = None  # cap on train+val samples, for quick studies
    epochs: int = 10
    batch_size: int = 128
    device: str = "auto"
    normalize: bool = True  # standardise inputs with the training split's mean and std
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    mask: MaskSpec = field(default_factory=MaskSpec)
    threads: int | None = None  # CPU threads per trial; None: the machine's cores / workers
    precision: str = "fp32"  # "bf16": bfloat16 autocast for the forward passes (fast on GPUs)
    channels_last: bool | None = None  # conv memory layout; None: NHWC on CUDA, and for the CNN on the CPU
    # Validation reports (and pruning decisions) per epoch; None ("auto"): one per ~10,000 training
    # images, at least one, so a hopeless trial on a large dataset is judged before its first epoch ends.
    reports_per_epoch: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    family: str


@dataclass(frozen=True)
class ParamSpec:
    """One entry of the search space."""

    name: str
    type: str  # "int" | "float" | "categorical" | "fixed"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    per_layer: bool = False
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def possible(self, value: Any) -> bool:
        """Return whether this parameter can take ``value``."""
        if self.type == "fixed":
            return value == self.value
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high  # type: ignore[operator]

    def smallest(self) -> Any:
        """Return the smallest value this parameter can take."""
        return self.value if self.type == "fixed" else min(self.choices) if self.type == "categorical" else self.low

    def largest(self) -> Any:
        """Return the largest value this parameter can take."""
        return self.value if self.type == "fixed" else max(self.choices) if self.type == "categorical" else self.high


@dataclass(frozen=True)
class TrackingSpec:
    enabled: bool = True
    uri: str = ""  # resolved MLflow tracking URI
    artifact_root: str | None = None  # where a local store keeps artifacts
    experiment: str = ""
    log_images_every: int = 1  # epochs between reconstruction grids (and always at the end)
    register_model: bool = True
    system_metrics: bool = False  # MLflow's CPU/memory/GPU sampling on each trial run: a thread per worker


@dataclass(frozen=True)
class Spec:
    path: str
    study: StudySpec
    task: TaskSpec
    model: ModelSpec
    space: tuple[ParamSpec, ...]
    tracking: TrackingSpec
    runs_dir: str  # embedded stores, artifacts and caches live here

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved spec as plain data (JSON-safe), the storage password masked."""
        data = asdict(self)
        data["study"]["storage"] = mask_password(self.study.storage)
        if self.study.warm_start is not None:
            data["study"]["warm_start"]["storage"] = mask_password(self.study.warm_start.storage)
        data["tracking"]["uri"] = mask_password(self.tracking.uri)
        return json.loads(json.dumps(data, default=str))

    def space_dict(self) -> dict[str, Any]:
        """Return what defines the search: task, model and space (used to refuse silent changes)."""
        data = self.to_dict()
        task = dict(data["task"])
        for key in ("data_dir", "device", "threads", "channels_last"):  # where and how fast, not what is searched
            task.pop(key)
        if task["precision"] == "fp32":  # the default then leaves the fingerprints of older studies as they were
            task.pop("precision")
        if task["reports_per_epoch"] is None:  # auto: decided once per study and stored (see trials.REPORTS_ATTR)
            task.pop("reports_per_epoch")
        return {"task": task, "model": data["model"], "space": data["space"],
                "metrics": data["study"]["metrics"]}

    def fingerprint(self) -> str:
        """Return a short hash of :meth:`space_dict`."""
        text = json.dumps(self.space_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def artifacts_dir(self) -> str:
        return os.environ.get("HPSEARCH_ARTIFACTS") or str(Path(self.runs_dir) / "artifacts")

    @property
    def cache_dir(self) -> str:
        return str(Path(self.runs_dir) / "cache")
