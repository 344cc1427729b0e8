"""The spec's search space (``space``) and its enqueued configurations (``study.enqueue``), checked by the knobs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hpsearch.knobs import KNOBS, PER_LAYER
from hpsearch.spec.check import Checker
from hpsearch.spec.objects import ModelSpec, ParamSpec, TaskSpec


def parse_space(check: Checker, raw: Any, model: ModelSpec, task: TaskSpec) -> tuple[ParamSpec, ...]:
    m = check.mapping(raw, "space", optional=tuple(KNOBS))
    params: dict[str, ParamSpec] = {}
    for name, value in m.items():
        knob = KNOBS[name]
        where = f"space.{name}"
        if model.family not in knob.families:
            check.fail(where, f"{name!r} has no effect on model family {model.family!r} "
                       f"(it applies to {list(knob.families)})", value)
        if task.type not in knob.tasks:
            check.fail(where, f"{name!r} has no effect on task {task.type!r} (it applies to {list(knob.tasks)})",
                       value)
        params[name] = _parse_param(check, name, value)
    # Conditions: explicit `when`, else the knob's implicit one when its parent is searched.
    resolved: list[ParamSpec] = []
    for name, p in params.items():
        when = dict(p.when)
        if not when and p.type != "fixed":
            for parent, values in KNOBS[name].only_when:
                parent_spec = params.get(parent)
                if parent_spec is not None and parent_spec.type != "fixed":
                    when[parent] = tuple(v for v in values if parent_spec.possible(v))
        for parent, values in when.items():
            where = f"space.{name}.when.{parent}"
            if parent == name:
                check.fail(where, "a parameter cannot be conditional on itself", parent)
            parent_spec = params.get(parent)
            if parent_spec is None:
                check.fail(where, f"the condition refers to {parent!r}, which is not a parameter of the space "
                           f"(parameters: {sorted(params)})", parent)
            if parent_spec.when:
                check.fail(where, f"conditions may not be nested: {parent!r} is itself conditional", parent)
            impossible = [v for v in values if not parent_spec.possible(v)]
            if impossible or not values:
                check.fail(where, f"the condition's values must be values that {parent!r} can take", list(values))
        if p.per_layer and "n_layers" not in params:
            check.fail(f"space.{name}.per_layer", "per-layer values need `n_layers` in the space "
                       "(fixed or searched)", True)
        resolved.append(ParamSpec(**{**p.__dict__, "when": when}))
    _check_batchnorm_batches(check, task, {p.name: p for p in resolved})
    return tuple(resolved)


def _check_batchnorm_batches(check: Checker, task: TaskSpec, params: Mapping[str, ParamSpec]) -> None:
    """Refuse a space in which batchnorm may meet batches of one sample: batch statistics need two."""
    batchnorm = params.get("batchnorm")
    if batchnorm is None or not batchnorm.possible(True):
        return
    searched = params.get("batch_size")
    # A conditional batch size leaves the task's where its condition does not hold.
    smallest = task.batch_size if searched is None else searched.smallest()
    if searched is not None and searched.when:
        smallest = min(smallest, task.batch_size)
    if smallest < 2:
        where = "space.batch_size" if searched is not None and searched.smallest() < 2 else "task.batch_size"
        check.fail(where, "batchnorm (which the space allows) needs batches of at least 2 samples; raise the "
                   "smallest batch size to 2 or fix `batchnorm: false`", smallest)


def _parse_param(check: Checker, name: str, raw: Any) -> ParamSpec:
    knob = KNOBS[name]
    where = f"space.{name}"
    if isinstance(raw, list):  # shorthand: a list is a categorical choice
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, Mapping):
        value = check.knob_value(knob, raw, where)
        return ParamSpec(name=name, type="fixed", value=value)
    kind = raw.get("type")
    if kind is None:
        kind = "categorical" if "choices" in raw else ("fixed" if "value" in raw else knob.kind)
        kind = {"bool": "categorical", "choice": "categorical"}.get(kind, kind)
    kind = check.choice(kind, f"{where}.type", ("int", "float", "categorical", "fixed"))
    common = ("type", "when", "per_layer")
    when = _parse_when(check, raw.get("when"), f"{where}.when")
    per_layer = check.boolean(raw.get("per_layer", False), f"{where}.per_layer")
    if per_layer and name not in PER_LAYER:
        check.fail(f"{where}.per_layer", f"only {list(PER_LAYER)} can be searched per layer", True)
    if kind == "fixed":
        m = check.mapping(raw, where, required=("value",), optional=common + ("value",))
        return ParamSpec(name=name, type="fixed", value=check.knob_value(knob, m["value"], f"{where}.value"),
                         when=when, per_layer=per_layer)
    if kind == "categorical":
        m = check.mapping(raw, where, required=("choices",), optional=common + ("choices",))
        choices = m["choices"]
        if not isinstance(choices, list) or not choices:
            check.fail(f"{where}.choices", "must be a non-empty list", choices)
        values = tuple(check.knob_value(knob, c, f"{where}.choices[{i}]") for i, c in enumerate(choices))
        if len(set(map(repr, values))) != len(values):
            check.fail(f"{where}.choices", "must not repeat a value", list(values))
        return ParamSpec(name=name, type="categorical", choices=values, when=when, per_layer=per_layer)
    # int / float ranges
    if kind != knob.kind:
        check.fail(f"{where}.type", f"{name!r} is a {knob.kind} knob; use "
                   + ("`int` or `categorical`" if knob.kind == "int" else "`categorical` or a fixed value"), kind)
    m = check.mapping(raw, where, required=("low", "high"), optional=common + ("low", "high", "log", "step"))
    convert = check.integer if kind == "int" else check.number
    low, high = convert(m["low"], f"{where}.low"), convert(m["high"], f"{where}.high")
    log = check.boolean(m.get("log", False), f"{where}.log")
    step = m.get("step")
    if step is not None:
        step = convert(step, f"{where}.step")
        if step <= 0:
            check.fail(f"{where}.step", "must be > 0", step)
    if low > high:
        check.fail(where, f"`low <= high` must hold, but got low={low!r}, high={high!r}", {"low": low, "high": high})
    if log and low <= 0:
        check.fail(f"{where}.low", "a log range must start above 0", low)
    if log and step is not None and (kind == "float" or step != 1):
        check.fail(where, "`log` and `step` cannot be combined", {"log": log, "step": step})
    for bound, value in (("low", low), ("high", high)):
        problem = knob.problem(value, bounds_only=True)
        if problem:
            check.fail(f"{where}.{bound}", f"{name} {problem}", value)
    return ParamSpec(name=name, type=kind, low=low, high=high, log=log, step=step, when=when, per_layer=per_layer)


def _parse_when(check: Checker, raw: Any, where: str) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        check.fail(where, "must map a parameter name to the value(s) under which this one is searched, "
                   "e.g. {optimizer: [sgd]}", raw)
    return {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in raw.items()}


def parse_enqueue(check: Checker, raw: Any, where: str, space: tuple[ParamSpec, ...]) -> dict[str, Any]:
    """Return one enqueued configuration; refuse a name or value the declared space cannot produce."""
    params = {p.name: p for p in space}
    searched = {name: p for name, p in params.items() if p.type != "fixed"}
    m = check.mapping(raw, where, optional=None)
    for key, value in m.items():
        base, _, index = key.rpartition("_")
        p = searched.get(key)
        if p is None and index.isdigit() and base in searched and searched[base].per_layer:
            p = searched[base]
            _check_enqueued_layer(check, f"{where}.{key}", int(index), m, params)
        if p is None:
            check.fail(f"{where}.{key}", f"is not a searched parameter (searched: {sorted(searched)})", value)
        problem = KNOBS[p.name].problem(value) or _outside_space(p, value)
        if problem:
            check.fail(f"{where}.{key}", f"{p.name} {problem}", value)
        for parent, values in p.when.items():
            if parent in m and m[parent] not in values:
                check.fail(f"{where}.{key}", f"{p.name} is searched only when {parent} is one of {list(values)}, "
                           f"but this configuration sets {parent}: {m[parent]!r}, so its value would be ignored",
                           value)
    return dict(m)


def _outside_space(p: ParamSpec, value: Any) -> str | None:
    """Return why the searched parameter ``p`` can never take ``value`` (None if it can)."""
    if p.type == "categorical":
        return None if value in p.choices else f"must be one of the searched choices {list(p.choices)}"
    if not p.low <= value <= p.high:  # type: ignore[operator]
        return f"must lie in the searched range [{p.low}, {p.high}]"
    if p.step is not None and not math.isclose((value - p.low) / p.step, round((value - p.low) / p.step),
                                               abs_tol=1e-9):
        return f"must lie on the searched grid {p.low} + k * {p.step}"
    return None


def _check_enqueued_layer(check: Checker, where: str, index: int, m: Mapping[str, Any],
                          params: Mapping[str, ParamSpec]) -> None:
    """Refuse a per-layer value (``width_3``) for a layer the enqueued configuration cannot have."""
    n_layers = params["n_layers"]  # per-layer params need it: checked with the space
    most = m.get("n_layers", n_layers.largest())
    if isinstance(most, int) and index >= most:
        check.fail(where, f"sets layer {index}, but " + (f"this configuration sets n_layers: {most}"
                   if "n_layers" in m else f"the space allows at most {most} layers"), m[where.rsplit(".", 1)[1]])
