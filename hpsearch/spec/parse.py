"""A spec file or plain data → a validated :class:`Spec`: the entry points, and the task, model and tracking sections.

The spec is read once, validated completely, and refused with one message naming the file,
the key path, the rule and the value before any trial runs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpsearch.errors import SpecError
from hpsearch.knobs import KNOBS
from hpsearch.spec.check import Checker
from hpsearch.spec.file import read_yaml
from hpsearch.spec.objects import MaskSpec, ModelSpec, NoiseSpec, Spec, StudySpec, TaskSpec, TrackingSpec
from hpsearch.spec.parse_space import parse_space
from hpsearch.spec.parse_study import parse_study
from hpsearch.spec.urls import check_tracking_uri
from hpsearch.vocab import (DATASETS, DEVICE_RULE, FAMILIES, FAMILY_TASKS, MASK_PLACEMENTS, NOISE_KINDS, PRECISIONS,
                            TASKS, is_device)


def load_spec(
    path: str | os.PathLike[str],
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    runs_dir: str | os.PathLike[str] | None = None,
) -> Spec:
    """Return the validated spec in ``path``; keyword arguments override it (CLI flags, env).

    Raises SpecError naming the file, the key, the rule and the value for anything wrong.
    """
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raise SpecError(f"{path}: the spec is empty. Expected a mapping with keys study, task, model, space.")
    runs = Path(runs_dir or os.environ.get("HPSEARCH_RUNS_DIR") or "runs").resolve()
    return parse_spec(raw, source=str(path), storage=storage, tracking_uri=tracking_uri,
                      data_dir=data_dir, runs_dir=runs)


def parse_spec(
    raw: Any,
    *,
    source: str = "<spec>",
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    runs_dir: Path | None = None,
) -> Spec:
    """Return the validated spec built from plain data ``raw`` (as loaded from YAML)."""
    check = Checker(source)
    raw = check.interpolate(copy.deepcopy(raw), "")
    top = check.mapping(raw, "", required=("study", "task", "model"), optional=("space", "tracking"))
    runs = Path(runs_dir or "runs").resolve()

    task = _parse_task(check, top["task"], data_dir)
    model = _parse_model(check, top["model"], task)
    space = parse_space(check, top.get("space") or {}, model, task)
    study = parse_study(check, top["study"], task, space, storage, runs)
    tracking = _parse_tracking(check, top.get("tracking") or {}, study, tracking_uri, runs)
    return Spec(path=source, study=study, task=task, model=model, space=space, tracking=tracking,
                runs_dir=str(runs))


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Return a Spec from :meth:`Spec.to_dict` output (as stored in a study)."""
    raw = {
        "study": {k: v for k, v in data["study"].items() if k not in ("metrics",)},
        "task": data["task"],
        "model": data["model"],
        "space": {p["name"]: _param_to_raw(p) for p in data["space"]},
        "tracking": {k: v for k, v in data["tracking"].items() if k != "artifact_root"},
    }
    raw["study"]["metrics"] = data["study"]["metrics"]
    raw["study"]["sampler"] = {"type": data["study"]["sampler"]["type"], **data["study"]["sampler"]["options"]}
    raw["study"]["pruner"] = _pruner_to_raw(data["study"]["pruner"])
    return parse_spec(raw, source=data.get("path", "<stored spec>"), runs_dir=Path(data["runs_dir"]))


def _param_to_raw(p: Mapping[str, Any]) -> Any:
    if p["type"] == "fixed":
        return p["value"]
    out: dict[str, Any] = {"type": p["type"]}
    if p["type"] == "categorical":
        out["choices"] = list(p["choices"])
    else:
        out.update(low=p["low"], high=p["high"], log=p["log"])
        if p["step"] is not None:
            out["step"] = p["step"]
    if p["per_layer"]:
        out["per_layer"] = True
    if p["when"]:
        out["when"] = {k: list(v) for k, v in p["when"].items()}
    return out


def _pruner_to_raw(p: Mapping[str, Any]) -> dict[str, Any]:
    out = {"type": p["type"], **p["options"]}
    if p.get("wrapped"):
        out["wrapped"] = _pruner_to_raw(p["wrapped"])
    return out


# --------------------------------------------------------------------------- sections


def _parse_task(check: Checker, raw: Any, data_dir: str | None) -> TaskSpec:
    keys = ("type", "dataset", "fallback", "data_dir", "val_fraction", "train_limit", "epochs",
            "batch_size", "device", "normalize", "noise", "mask", "threads", "precision", "channels_last",
            "reports_per_epoch")
    m = check.mapping(raw, "task", required=("type", "dataset"), optional=keys)
    noise_raw = check.mapping(m.get("noise", {}), "task.noise", optional=("kind", "std", "amount"))
    mask_raw = check.mapping(m.get("mask", {}), "task.mask", optional=("size", "placement"))
    # The task's noise, mask and batch size are the defaults of knobs a space may search: the knobs' rules.
    noise = NoiseSpec(
        kind=check.choice(noise_raw.get("kind", "gaussian"), "task.noise.kind", NOISE_KINDS),
        std=check.knob_value(KNOBS["noise_std"], noise_raw.get("std", 0.3), "task.noise.std"),
        amount=check.knob_value(KNOBS["noise_amount"], noise_raw.get("amount", 0.1), "task.noise.amount"),
    )
    mask = MaskSpec(
        size=check.knob_value(KNOBS["mask_size"], mask_raw.get("size", 14), "task.mask.size"),
        placement=check.choice(mask_raw.get("placement", "center"), "task.mask.placement", MASK_PLACEMENTS),
    )
    fallback = m.get("fallback")
    if fallback is not None:
        fallback = check.choice(fallback, "task.fallback", DATASETS)
    val_fraction = check.number(m.get("val_fraction", 0.1), "task.val_fraction")
    if not 0.0 < val_fraction < 1.0:
        check.fail("task.val_fraction", "must be between 0 and 1 (exclusive)", val_fraction)
    limit = m.get("train_limit")
    threads = m.get("threads")
    chosen_dir = data_dir or m.get("data_dir")
    return TaskSpec(
        type=check.choice(m["type"], "task.type", TASKS),
        dataset=check.choice(m["dataset"], "task.dataset", DATASETS),
        fallback=fallback,
        data_dir=check.string(chosen_dir, "task.data_dir") if chosen_dir is not None else None,
        val_fraction=float(val_fraction),
        train_limit=None if limit is None else check.integer(limit, "task.train_limit", low=10),
        epochs=check.integer(m.get("epochs", 10), "task.epochs", low=1),
        batch_size=check.knob_value(KNOBS["batch_size"], m.get("batch_size", 128), "task.batch_size"),
        device=_device(check, m.get("device", "auto")),
        normalize=check.boolean(m.get("normalize", True), "task.normalize"),
        noise=noise,
        mask=mask,
        threads=None if threads is None else check.integer(threads, "task.threads", low=1),
        precision=check.choice(m.get("precision", "fp32"), "task.precision", PRECISIONS),
        channels_last=_channels_last(check, m.get("channels_last", "auto")),
        reports_per_epoch=_reports_per_epoch(check, m.get("reports_per_epoch", "auto")),
    )


def _device(check: Checker, value: Any) -> str:
    if not is_device(value):
        check.fail("task.device", DEVICE_RULE, value)
    return value


def _reports_per_epoch(check: Checker, value: Any) -> int | None:
    if value is None or value == "auto":  # None: the resolved spec's way of writing auto
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        check.fail("task.reports_per_epoch", "must be auto or a whole number of reports per epoch from 1 to 1000",
                   value)
    return value


def _channels_last(check: Checker, value: Any) -> bool | None:
    if value is None or value == "auto":  # None: the resolved spec's way of writing auto
        return None
    if isinstance(value, bool):
        return value
    return check.fail("task.channels_last", "must be auto, true or false", value)


def _parse_model(check: Checker, raw: Any, task: TaskSpec) -> ModelSpec:
    m = check.mapping(raw, "model", required=("family",), optional=("family",))
    family = check.choice(m["family"], "model.family", FAMILIES)
    if task.type not in FAMILY_TASKS[family]:
        check.fail("model.family", f"model family {family!r} cannot do task {task.type!r}; "
                   f"it does {list(FAMILY_TASKS[family])}", family)
    return ModelSpec(family=family)


def _parse_tracking(check: Checker, raw: Any, study: StudySpec, tracking_uri: str | None,
                    runs: Path) -> TrackingSpec:
    keys = ("enabled", "uri", "experiment", "log_images_every", "register_model", "system_metrics")
    m = check.mapping(raw, "tracking", optional=keys)
    uri = tracking_uri or m.get("uri") or f"sqlite:///{runs / 'mlflow.db'}"
    uri = check_tracking_uri(check.string(uri, "tracking.uri"), where=f"{check.source}: tracking.uri")
    local = uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
    return TrackingSpec(
        enabled=check.boolean(m.get("enabled", True), "tracking.enabled"),
        uri=uri,
        artifact_root=str(runs / "mlartifacts") if local else None,
        experiment=check.string(m.get("experiment") or study.name, "tracking.experiment"),
        log_images_every=check.integer(m.get("log_images_every", 1), "tracking.log_images_every", low=1),
        register_model=check.boolean(m.get("register_model", True), "tracking.register_model"),
        system_metrics=check.boolean(m.get("system_metrics", False), "tracking.system_metrics"),
    )
