"""What a worker decides once, before its first trial: device, threads, data (checked against the
study's), the study's MLflow parent run and reports per epoch, and inpainting's reference classifier.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hpsearch import warmstart
from hpsearch.data import Provenance, SearchData, Split, load_search_data
from hpsearch.errors import DataError, SpecError
from hpsearch.record import (DATA_ATTR, EXPERIMENT_ATTR, FINGERPRINT_TAG, PARENT_RUN_ATTR, PARENT_RUN_KEY,
                             REPORTS_ATTR, STORAGE_TAG, STUDY_TAG, VIEW_ATTR, StoredData, auto_reports_per_epoch,
                             open_existing, test_metric)
from hpsearch.spec import Spec, mask_password
from hpsearch.storage import Register
from hpsearch.tasks import input_stats
from hpsearch.tracking import DatasetRecord, Tracker
from hpsearch.vocab import STATIC_METRICS

logger = logging.getLogger(__name__)


@dataclass
class WorkerSetup:
    """What a worker process decides once: device, threads, data, tracking."""

    device: torch.device
    threads: int
    data: SearchData
    input_stats: tuple[float, float]  # (mean, std) every input of this study is standardised with
    tracker: Tracker | None
    parent_run_id: str | None
    reference: torch.nn.Module | None = None
    reports_per_epoch: int = 1  # the study's (record.REPORTS_ATTR); the loop's pruner counts in them
    notes: list[str] = field(default_factory=list)
    datasets: list[DatasetRecord] = field(default_factory=list)  # the training and validation splits, for MLflow


def available_cpus() -> int:
    """Return how many CPUs this process may run on (its affinity mask: taskset, cgroups' cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity call on this platform (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def setup_worker(spec: Spec, study: optuna.Study, *, device: str | None = None,
                 threads: int | None = None) -> WorkerSetup:
    """Return a worker's device, data (checked against the study's) and tracking, ready for trials.

    The first worker of a study records its data (and warm-starts it, if the spec asks); every
    later one checks that it found the same data.
    """
    from hpsearch.train import resolve_device

    dev = resolve_device(device or spec.task.device)
    n_threads = threads or spec.task.threads or available_cpus()
    torch.set_num_threads(n_threads)
    logger.debug("this worker trains on %s with %d CPU thread(s).", dev, n_threads)
    data = load_search_data(spec.task.dataset, data_dir=spec.task.data_dir, val_fraction=spec.task.val_fraction,
                            seed=spec.study.seed, fallback=spec.task.fallback, train_limit=spec.task.train_limit)
    _check_fits_images(spec, data)
    found = StoredData(**data.provenance.__dict__, mean=data.mean, std=data.std, n_classes=data.n_classes,
                       image_shape=tuple(data.image_shape))
    stored = StoredData.from_study(study)
    if stored is None:
        study.set_user_attr(DATA_ATTR, found.as_attr())
    elif stored.sha256 != found.sha256 or stored.n_train != found.n_train:
        raise DataError(
            f"this worker's data differs from the data study {spec.study.name!r} was searched on: the study used "
            f"{stored.name} (sha256 {stored.sha256}, {stored.n_train} training samples, from "
            f"{stored.source}), this worker found {found.name} (sha256 {found.sha256}, "
            f"{found.n_train} samples, from {found.source}). Give it the same data dir.")
    if warmstart.needed(spec, study):
        assert spec.study.warm_start is not None
        source = open_existing(spec.study.warm_start.storage, spec.study.warm_start.study)
        warmstart.warm_start(spec, study, source, found)
    per_epoch = _reports_per_epoch(spec, study, len(data.train))
    data = data.to(dev)
    tracker, parent, datasets = None, None, []
    if spec.tracking.enabled:
        tracker = Tracker(spec.tracking.uri, spec.tracking.experiment, artifact_root=spec.tracking.artifact_root)
        datasets = dataset_records(data.provenance, {"training": data.train, "validation": data.val})
        parent = tracker.study_run(spec.study.name, params=_flat_spec_params(spec, data),
                                   tags={STUDY_TAG: spec.study.name,
                                         STORAGE_TAG: mask_password(spec.study.storage),
                                         FINGERPRINT_TAG: spec.fingerprint()},
                                   agree=Register(study, PARENT_RUN_KEY))
        if parent:
            tracker.log_datasets(parent, datasets)  # logged once: MLflow keeps one input per dataset and run
            _link_experiment(spec, study, tracker, parent)
    reference = None
    if spec.task.type == "inpaint":
        from hpsearch.reference import load_or_train_reference

        reference = load_or_train_reference(data, Path(spec.cache_dir), device=dev)
    return WorkerSetup(device=dev, threads=n_threads, data=data, tracker=tracker, parent_run_id=parent,
                       input_stats=input_stats(data.mean, data.std, standardise=spec.task.normalize),
                       reference=reference, reports_per_epoch=per_epoch, datasets=datasets)


def _reports_per_epoch(spec: Spec, study: optuna.Study, n_train: int) -> int:
    """Return the study's reports per epoch: stored, else decided now (a study with trials from before: 1)."""
    stored = study.user_attrs.get(REPORTS_ATTR)
    if stored is not None:
        return int(stored)
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        per_epoch = 1  # its trials reported once per epoch: new ones must be comparable
    else:
        per_epoch = spec.task.reports_per_epoch or auto_reports_per_epoch(n_train)
    study.set_user_attr(REPORTS_ATTR, per_epoch)
    return per_epoch


def _link_experiment(spec: Spec, study: optuna.Study, tracker: Tracker, parent: str) -> None:
    """Store where the study is in MLflow (parent run, experiment, the saved view of its runs) on the study."""
    primary = spec.study.metrics[0]
    view = tracker.study_view(
        spec.study.name, order_by=primary.name, ascending=primary.direction == "minimize",
        metrics=[m.name for m in spec.study.metrics if m.name not in STATIC_METRICS] + [test_metric(primary.name)],
        params=[p.name for p in spec.space if p.type != "fixed" and not p.per_layer])
    attrs = {PARENT_RUN_ATTR: parent, EXPERIMENT_ATTR: tracker.experiment_id, VIEW_ATTR: view}
    for key, value in attrs.items():
        if value and study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def dataset_records(provenance: Provenance, splits: dict[str, Split]) -> list[DatasetRecord]:
    """Return the MLflow dataset inputs of ``splits`` ({context: split}): name, content digest, source, sizes.

    A fallback dataset says so in its name, so the UI's Dataset column shows it at a glance.
    """
    name = f"{provenance.name} (fallback for {provenance.requested})" if provenance.fallback else provenance.name
    sizes = {"train": provenance.n_train, "validation": provenance.n_val, "test": provenance.n_test}
    return [DatasetRecord(name=name, digest=split.digest(), source=provenance.source, context=context,
                          profile={"rows": len(split), **sizes, "dataset_sha256": provenance.sha256,
                                   "requested": provenance.requested, "fallback": provenance.fallback})
            for context, split in splits.items()]


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
