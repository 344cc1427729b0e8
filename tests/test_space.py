"""The search space: suggest calls, conditional and per-layer parameters, grids, round-trips."""

from __future__ import annotations

import optuna
import pytest

from hpsearch import space
from hpsearch.knobs import KNOBS
from hpsearch.spec import parse_spec, spec_from_dict

BASE = {
    "study": {"name": "t"},
    "task": {"type": "classify", "dataset": "digits", "batch_size": 32, "epochs": 3},
    "model": {"family": "mlp"},
}


def _spec(space_raw: dict, **study: object):
    return parse_spec({**BASE, "study": {"name": "t", **study}, "space": space_raw})


def test_base_params_cover_every_knob_and_task_settings() -> None:
    params = space.base_params(_spec({"dropout": 0.2}))
    assert set(KNOBS) <= set(params)
    assert params["dropout"] == 0.2 and params["batch_size"] == 32 and params["epochs"] == 3


def test_conditional_params_only_when_parent_chosen(tmp_path) -> None:
    spec = _spec({
        "optimizer": ["sgd", "adam", "rmsprop"],
        "momentum": {"type": "float", "low": 0.5, "high": 0.99},
        "beta1": {"type": "float", "low": 0.8, "high": 0.95},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    })
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = space.suggest(trial, spec)
        opt = params["optimizer"]
        seen.add(opt)
        # momentum is sampled for sgd and rmsprop only; beta1 for adam only (its knob says adam/adamw).
        assert ("momentum" in trial.params) == (opt in ("sgd", "rmsprop"))
        assert ("beta1" in trial.params) == (opt == "adam")
        study.tell(trial, 0.5)
    assert seen == {"sgd", "adam", "rmsprop"}


def test_explicit_when_and_per_layer_widths() -> None:
    spec = _spec({
        "n_layers": {"type": "int", "low": 1, "high": 3},
        "width": {"type": "int", "low": 8, "high": 64, "log": True, "per_layer": True},
        "batchnorm": [False, True],
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "when": {"batchnorm": [False]}},
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = space.suggest(trial, spec)
        widths = [k for k in trial.params if k.startswith("width_")]
        assert len(widths) == params["n_layers"]  # one width per layer, named width_0..
        assert ("dropout" in trial.params) == (params["batchnorm"] is False)
        study.tell(trial, 0.0)


@pytest.mark.parametrize("raw,expected", [
    ({"dropout": [0.0, 0.2], "batchnorm": [False, True]}, {"dropout": [0.0, 0.2], "batchnorm": [False, True]}),
    ({"n_layers": {"type": "int", "low": 1, "high": 5, "step": 2}}, {"n_layers": [1, 3, 5]}),
])
def test_grid(raw: dict, expected: dict) -> None:
    spec = _spec(raw, sampler="grid")
    assert space.grid(spec) == expected


def test_space_round_trips_through_plain_dicts() -> None:
    raw = {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
        "momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": ["sgd"]}},
        "n_layers": 2,
        "width": {"type": "int", "low": 8, "high": 64, "step": 8, "per_layer": True},
    }
    spec = _spec(raw)
    assert spec_from_dict(spec.to_dict()).space == spec.space
