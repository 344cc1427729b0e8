"""The spec's ``study`` section: name, metrics, sampler, pruner, storage, stop rules, refit and warm start."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpsearch.spec.check import Checker, check_options
from hpsearch.spec.objects import (MetricSpec, ParamSpec, PrunerSpec, RefitSpec, SamplerSpec, StopSpec, StudySpec,
                                   TaskSpec, WarmStartSpec)
from hpsearch.spec.parse_space import parse_enqueue
from hpsearch.spec.urls import check_storage_url
from hpsearch.vocab import (DEFAULT_METRIC, DIRECTIONS, EPOCH_OPTIONS, METRICS, PRUNERS, SAMPLERS, STATIC_METRICS,
                            pruner_class, sampler_class)

# Options hpsearch sets itself, so a spec may not.
_RESERVED_SAMPLER_OPTIONS = {"seed", "search_space"}
_RESERVED_PRUNER_OPTIONS = {"wrapped_pruner"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def parse_study(check: Checker, raw: Any, task: TaskSpec, space: tuple[ParamSpec, ...],
                 storage: str | None, runs: Path) -> StudySpec:
    keys = ("name", "metric", "direction", "metrics", "n_trials", "timeout", "seed", "sampler", "pruner",
            "storage", "enqueue", "heartbeat_interval", "grace_period", "max_retries", "refit", "stop",
            "warm_start", "pack")
    m = check.mapping(raw, "study", required=("name",), optional=keys)
    name = check.string(m["name"], "study.name")
    if not _NAME_RE.match(name):
        check.fail("study.name", "must be 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit",
                   name)
    metrics = _parse_metrics(check, m, task)
    n_trials = check.integer(m.get("n_trials", 20), "study.n_trials", low=1)
    timeout = m.get("timeout")
    if timeout is not None:
        timeout = check.number(timeout, "study.timeout")
        if timeout <= 0:
            check.fail("study.timeout", "must be a positive number of seconds", timeout)
    sampler = _parse_sampler(check, m.get("sampler", "tpe"), metrics, space)
    pruner = _parse_pruner(check, m.get("pruner", "median"), "study.pruner")
    if len(metrics) > 1 and pruner.type != "none" and "pruner" in m:
        check.fail("study.pruner", "Optuna cannot prune multi-objective studies; use `pruner: none`", pruner.type)
    if len(metrics) > 1:
        pruner = PrunerSpec(type="none")
    url = storage or m.get("storage") or f"sqlite:///{runs / 'optuna.db'}"
    url = check_storage_url(check.string(url, "study.storage"), where=f"{check.source}: study.storage")
    enqueue_raw = m.get("enqueue", [])
    if not isinstance(enqueue_raw, list):
        check.fail("study.enqueue", "must be a list of parameter mappings", enqueue_raw)
    enqueue = tuple(parse_enqueue(check, e, f"study.enqueue[{i}]", space) for i, e in enumerate(enqueue_raw))
    heartbeat = check.integer(m.get("heartbeat_interval", 10), "study.heartbeat_interval", low=1)
    grace = check.integer(m.get("grace_period", 60), "study.grace_period", low=1)
    if grace <= heartbeat:
        check.fail("study.grace_period", f"must be longer than study.heartbeat_interval ({heartbeat})", grace)
    return StudySpec(
        name=name, metrics=metrics, n_trials=n_trials, storage=url,
        timeout=None if timeout is None else float(timeout),
        seed=check.integer(m.get("seed", 0), "study.seed", low=0),
        sampler=sampler, pruner=pruner, enqueue=enqueue, heartbeat_interval=heartbeat, grace_period=grace,
        max_retries=check.integer(m.get("max_retries", 2), "study.max_retries", low=0),
        pack=_parse_pack(check, m.get("pack")),
        refit=_parse_refit(check, m.get("refit"), multi_objective=len(metrics) > 1),
        stop=_parse_stop(check, m.get("stop"), metrics),
        warm_start=_parse_warm_start(check, m.get("warm_start"), url, name),
    )


def _parse_pack(check: Checker, raw: Any) -> int | None:
    if raw is None or raw == "auto":  # None: the stored spec's auto
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        check.fail("study.pack", "must be a positive integer (trials a worker trains together) or `auto`", raw)
    return raw


def _parse_warm_start(check: Checker, raw: Any, storage: str, name: str) -> WarmStartSpec | None:
    if raw is None:
        return None
    m = check.mapping(raw, "study.warm_start", required=("study",), optional=("study", "storage", "top_k"))
    source = check.string(m["study"], "study.warm_start.study")
    url = m.get("storage") or storage
    url = check_storage_url(check.string(url, "study.warm_start.storage"),
                            where=f"{check.source}: study.warm_start.storage")
    if source == name and url == storage:
        check.fail("study.warm_start.study", "must name another study than this one", source)
    return WarmStartSpec(study=source, storage=url,
                         top_k=check.integer(m.get("top_k", 3), "study.warm_start.top_k", low=0))


def _parse_stop(check: Checker, raw: Any, metrics: tuple[MetricSpec, ...]) -> StopSpec:
    if raw is None:
        return StopSpec()
    m = check.mapping(raw, "study.stop", optional=("target", "patience", "min_delta", "max_minutes"))
    # A stored spec writes rules not in force as null.
    target, patience, max_minutes = m.get("target"), m.get("patience"), m.get("max_minutes")
    min_delta = check.number(m.get("min_delta", 0.0) or 0.0, "study.stop.min_delta", low=0.0)
    if len(metrics) > 1 and (target is not None or patience is not None):
        check.fail("study.stop", "`target` and `patience` need a single-objective study (a Pareto front has no "
                   "one best value); `max_minutes` works for any study", dict(m))
    if min_delta and patience is None:
        check.fail("study.stop.min_delta", "only matters with `patience`; add `patience: N`", min_delta)
    if max_minutes is not None:
        max_minutes = check.number(max_minutes, "study.stop.max_minutes")
        if max_minutes <= 0:
            check.fail("study.stop.max_minutes", "must be a positive number of minutes", max_minutes)
    return StopSpec(
        target=None if target is None else float(check.number(target, "study.stop.target")),
        patience=None if patience is None else check.integer(patience, "study.stop.patience", low=1),
        min_delta=float(min_delta),
        max_minutes=None if max_minutes is None else float(max_minutes),
    )


def _parse_refit(check: Checker, raw: Any, *, multi_objective: bool) -> RefitSpec:
    # A Pareto front has no one best configuration to refit: off unless asked (finish then refits
    # the trial it tests, the best by the first objective).
    if raw is None or isinstance(raw, bool):
        return RefitSpec(enabled=(not multi_objective) if raw is None else raw)
    m = check.mapping(raw, "study.refit", optional=("enabled", "epochs", "data"))
    epochs = m.get("epochs", "best")
    if epochs != "best" and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        check.fail("study.refit.epochs", "must be `best` (where the best trial's validation curve peaked) or a "
                   "number of epochs >= 1", epochs)
    return RefitSpec(enabled=check.boolean(m.get("enabled", not multi_objective), "study.refit.enabled"),
                     epochs=epochs, data=check.choice(m.get("data", "train+val"), "study.refit.data", ("train+val",)))


def _parse_metrics(check: Checker, m: Mapping[str, Any], task: TaskSpec) -> tuple[MetricSpec, ...]:
    known = {**METRICS[task.type], **STATIC_METRICS}
    if "metrics" in m and ("metric" in m or "direction" in m):
        check.fail("study.metrics", "give either `metric` (+ `direction`) or `metrics`, not both", m["metrics"])
    if "metrics" in m:
        items = m["metrics"]
        if not isinstance(items, list) or not items:
            check.fail("study.metrics", "must be a non-empty list of metric names or {name, direction}", items)
    else:
        items = [{"name": m.get("metric", DEFAULT_METRIC[task.type]), "direction": m.get("direction")}]
    out = []
    for i, item in enumerate(items):
        where = "study.metric" if "metrics" not in m else f"study.metrics[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        item = check.mapping(item, where, required=("name",), optional=("name", "direction"))
        name = check.choice(item["name"], f"{where}.name" if "metrics" in m else where, tuple(known))
        direction = item.get("direction") or known[name]
        direction = check.choice(direction, f"{where}.direction" if "metrics" in m else "study.direction",
                                 DIRECTIONS)
        out.append(MetricSpec(name=name, direction=direction))
    if len({x.name for x in out}) != len(out):
        check.fail("study.metrics", "must not name a metric twice", [x.name for x in out])
    if out[0].name in STATIC_METRICS:
        check.fail("study.metrics[0]", "the first objective must be a validation metric (it is reported "
                   "per epoch); put n_params second", out[0].name)
    return tuple(out)


def _parse_sampler(check: Checker, raw: Any, metrics: tuple[MetricSpec, ...],
                   space: tuple[ParamSpec, ...]) -> SamplerSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    m = check.mapping(raw, "study.sampler", required=("type",), optional=None)
    kind = check.choice(m["type"], "study.sampler.type", tuple(SAMPLERS))
    options = {k: v for k, v in m.items() if k != "type"}
    # A grid sampler cannot be built without its grid (hpsearch's): its options are checked by type only.
    options = check_options(check, sampler_class(kind), f"optuna.samplers.{SAMPLERS[kind]}", options, "study.sampler",
                            _RESERVED_SAMPLER_OPTIONS, build=kind != "grid")
    if kind == "grid":
        for p in space:
            if p.type in ("int", "float") and not (p.type == "int" and not p.log and (p.step or 1) >= 1
                                                 and (p.high - p.low) <= 1000):
                check.fail(f"space.{p.name}", "a grid sampler needs a finite grid: use `categorical` choices, "
                           "a fixed value, or an int range without log", p.type)
            if p.per_layer:
                check.fail(f"space.{p.name}.per_layer", "a grid sampler cannot search per-layer values", True)
    if kind == "cmaes" and len(metrics) > 1:
        check.fail("study.sampler.type", "CMA-ES is single-objective; use nsga2, tpe or random", kind)
    return SamplerSpec(type=kind, options=options)


def _parse_pruner(check: Checker, raw: Any, where: str) -> PrunerSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    if raw is None:
        raw = {"type": "none"}
    m = check.mapping(raw, where, required=("type",), optional=None)
    kind = check.choice(m["type"], f"{where}.type", tuple(PRUNERS))
    options = {k: v for k, v in m.items() if k not in ("type", "wrapped")}
    wrapped = None
    if kind == "patient":
        wrapped = _parse_pruner(check, m.get("wrapped", "median"), f"{where}.wrapped")
        if "patience" not in options:
            check.fail(f"{where}.patience", "the patient pruner needs `patience` (epochs without improvement)",
                       None)
    elif "wrapped" in m:
        check.fail(f"{where}.wrapped", "only the `patient` pruner wraps another pruner", m["wrapped"])
    # Epoch-counted options may be fractions of an epoch; Optuna, which counts reports, sees whole ones.
    fractions = {}
    for key in [k for k in EPOCH_OPTIONS if k in options and options[k] != "auto"]:  # hyperband's resources: auto
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            check.fail(f"{where}.{key}", "must be a number of epochs >= 0 (whole or not: 0.5 is half an epoch)",
                       value)
        if isinstance(value, float):
            fractions[key] = value
            options[key] = math.ceil(value)  # stands in for the check below; what it becomes: vocab.epoch_reports
    options = check_options(check, pruner_class(kind), f"optuna.pruners.{PRUNERS[kind]}", options, where,
                            _RESERVED_PRUNER_OPTIONS)
    return PrunerSpec(type=kind, options={**options, **fractions}, wrapped=wrapped)
