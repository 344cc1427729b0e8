"""A spec's search space → ``trial.suggest_*`` calls, conditional parameters included.

Gives every trial one flat dict with a value for every knob: defaults, then the task's
settings, then the spec's fixed values, then what the sampler suggests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpsearch.knobs import defaults
from hpsearch.spec import ParamSpec, Spec

if TYPE_CHECKING:
    import optuna


def base_params(spec: Spec) -> dict[str, Any]:
    """Return the params every trial starts from: knob defaults, task settings and fixed values."""
    params = defaults()
    params.update(
        batch_size=spec.task.batch_size,
        noise_std=spec.task.noise.std,
        noise_amount=spec.task.noise.amount,
        mask_size=spec.task.mask.size,
        epochs=spec.task.epochs,
    )
    for p in spec.space:
        if p.type == "fixed":
            params[p.name] = p.value
    return params


def suggest(trial: optuna.Trial, spec: Spec) -> dict[str, Any]:
    """Return the trial's full params, asking the trial for every searched (and active) one."""
    params = base_params(spec)
    # Parents before children: conditions are one level deep, and per-layer values need n_layers.
    searched = [p for p in spec.space if p.type != "fixed"]
    for p in sorted(searched, key=lambda p: bool(p.when) or p.per_layer):
        if not active(p, params):
            continue  # e.g. momentum when the optimizer is adam: keep the default, suggest nothing
        if p.per_layer:
            for i in range(int(params["n_layers"])):
                params[f"{p.name}_{i}"] = _suggest_one(trial, f"{p.name}_{i}", p)
        else:
            params[p.name] = _suggest_one(trial, p.name, p)
    return params


def active(p: ParamSpec, params: dict[str, Any]) -> bool:
    """Return whether ``p``'s conditions hold for the values chosen so far."""
    return all(params.get(parent) in values for parent, values in p.when.items())


def _suggest_one(trial: optuna.Trial, name: str, p: ParamSpec) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(name, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, float(p.low), float(p.high), step=p.step, log=p.log)


def grid(spec: Spec) -> dict[str, list[Any]]:
    """Return the grid of every searched parameter, for Optuna's GridSampler."""
    out: dict[str, list[Any]] = {}
    for p in spec.space:
        if p.type == "categorical":
            out[p.name] = list(p.choices)
        elif p.type == "int":
            out[p.name] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        elif p.type == "float":
            step = p.step or (p.high - p.low)
            n = int(round((p.high - p.low) / step)) if step else 0
            out[p.name] = [p.low + i * step for i in range(n + 1)]
    return out


def space_to_dict(spec: Spec) -> dict[str, Any]:
    """Return the search space as plain data, in the spec's own YAML form (round-trips)."""
    from hpsearch.spec.parse import _param_to_raw

    return {p.name: _param_to_raw(p.__dict__ | {"when": {k: list(v) for k, v in p.when.items()}})
            for p in spec.space}
