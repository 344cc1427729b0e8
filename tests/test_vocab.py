"""The vocabulary (hpsearch/vocab.py) is the one list of each kind: the spec, the models, training,
tasks, data and studies accept exactly its values, and the knob table holds the only bounds."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch

from hpsearch import vocab
from hpsearch.data import IMAGE_SHAPES, TRAIN_SIZES
from hpsearch.errors import SpecError
from hpsearch.knobs import KNOBS, defaults
from hpsearch.models import ACTIVATION_LAYERS, build_model
from hpsearch.spec import parse_spec
from hpsearch.tasks import make_task
from hpsearch.train import OPTIMIZER_CLASSES, TrainConfig, make_optimizer, make_scheduler, resolve_device

BASE: dict[str, Any] = {
    "study": {"name": "v", "n_trials": 2},
    "task": {"type": "classify", "dataset": "digits", "epochs": 1},
    "model": {"family": "mlp"},
}
OUTSIDE = "not-in-the-vocabulary"
# The options a sampler or pruner cannot be built without (hpsearch sets the grid itself).
NEEDS = {"patient": {"patience": 2}, "percentile": {"percentile": 25.0}, "threshold": {"lower": 0.1}}


def spec(**sections: dict[str, Any]) -> Any:
    """Return the spec BASE with each given section updated (a key set to ... is removed)."""
    raw = copy.deepcopy(BASE)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_spec(raw, source="v.yaml")


def refused(where: str, **sections: dict[str, Any]) -> str:
    """Return the message of the SpecError the spec raises, checking it names ``where``."""
    with pytest.raises(SpecError) as caught:
        spec(**sections)
    assert where in str(caught.value) and OUTSIDE in str(caught.value)  # where, and the value refused
    return str(caught.value)


def family_for(task: str) -> str:
    return next(family for family, tasks in vocab.FAMILY_TASKS.items() if task in tasks)


def test_the_vocabulary_and_the_spec_load_without_torch_or_optuna() -> None:
    # The spec names activations and optimizers, samplers and pruners, but builds none of them.
    code = "import sys, hpsearch.vocab, hpsearch.spec; print(sorted({'torch', 'optuna'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("dataset", vocab.DATASETS)
def test_the_spec_accepts_every_dataset(dataset: str) -> None:
    assert spec(task={"dataset": dataset, "fallback": dataset}).task.dataset == dataset


def test_the_spec_refuses_a_dataset_outside_the_vocabulary() -> None:
    refused("task.dataset", task={"dataset": OUTSIDE})
    refused("task.fallback", task={"fallback": OUTSIDE})


@pytest.mark.parametrize(("family", "task"), [(f, t) for f, tasks in vocab.FAMILY_TASKS.items() for t in tasks])
def test_the_spec_accepts_every_family_with_its_tasks(family: str, task: str) -> None:
    s = spec(task={"type": task}, model={"family": family})
    assert (s.model.family, s.task.type) == (family, task)


@pytest.mark.parametrize("family", vocab.FAMILIES)
def test_the_spec_refuses_a_family_with_a_task_it_cannot_do(family: str) -> None:
    other = next(t for t in vocab.TASKS if t not in vocab.FAMILY_TASKS[family])
    with pytest.raises(SpecError, match="model.family"):
        spec(task={"type": other}, model={"family": family})


def test_every_family_and_task_is_paired_and_others_are_refused() -> None:
    assert set(vocab.FAMILY_TASKS) == set(vocab.FAMILIES)
    assert {t for tasks in vocab.FAMILY_TASKS.values() for t in tasks} == set(vocab.TASKS)
    refused("task.type", task={"type": OUTSIDE})
    refused("model.family", model={"family": OUTSIDE})


@pytest.mark.parametrize(("key", "values"), [("noise", vocab.NOISE_KINDS), ("mask", vocab.MASK_PLACEMENTS)])
def test_the_spec_accepts_every_noise_kind_and_mask_placement(key: str, values: tuple[str, ...]) -> None:
    field = {"noise": "kind", "mask": "placement"}[key]
    for value in values:
        s = spec(task={"type": "denoise" if key == "noise" else "inpaint", key: {field: value}},
                 model={"family": "autoencoder"})
        assert getattr(getattr(s.task, key), field) == value
    refused(f"task.{key}.{field}", task={key: {field: OUTSIDE}})


@pytest.mark.parametrize("device", [*vocab.DEVICES, "cuda:0", "cuda:12"])
def test_the_spec_and_training_accept_every_device(device: str) -> None:
    assert spec(task={"device": device}).task.device == device
    try:
        resolve_device(device)
    except SpecError as exc:  # a device this machine lacks: said so, not refused as a name
        assert "must be one of" not in str(exc) and device in str(exc)


@pytest.mark.parametrize("device", ["tpu", "cpu:0", "cuda:", "cuda:x", "mps:1", "CUDA", OUTSIDE])
def test_the_spec_and_training_refuse_the_same_other_devices(device: str) -> None:
    with pytest.raises(SpecError, match="task.device") as by_spec:
        spec(task={"device": device})
    with pytest.raises(SpecError, match="task.device") as by_training:
        resolve_device(device)
    assert vocab.DEVICE_RULE in str(by_spec.value) and vocab.DEVICE_RULE in str(by_training.value)


@pytest.mark.parametrize("precision", vocab.PRECISIONS)
def test_the_spec_and_training_accept_every_precision(precision: str) -> None:
    assert spec(task={"precision": precision}).task.precision == precision
    assert TrainConfig.from_params(small(epochs=1), seed=0, device="cpu", precision=precision).precision == precision
    refused("task.precision", task={"precision": OUTSIDE})
    with pytest.raises(SpecError, match="precision"):
        TrainConfig.from_params(small(epochs=1), seed=0, device="cpu", precision=OUTSIDE)


@pytest.mark.parametrize(("task", "metric"), [(t, m) for t in vocab.TASKS for m in vocab.METRICS[t]])
def test_the_spec_accepts_every_metric_of_a_task_with_its_direction(task: str, metric: str) -> None:
    s = spec(study={"metric": metric}, task={"type": task}, model={"family": family_for(task)})
    assert (s.study.metrics[0].name, s.study.metrics[0].direction) == (metric, vocab.METRICS[task][metric])
    assert metric in make_task(task, defaults()).metrics  # and the task reports it


@pytest.mark.parametrize("static", vocab.STATIC_METRICS)
def test_a_static_metric_is_accepted_second_and_refused_first(static: str) -> None:
    s = spec(study={"metrics": ["val_accuracy", static]})
    assert s.study.metrics[1].direction == vocab.STATIC_METRICS[static]
    with pytest.raises(SpecError, match="first objective"):
        spec(study={"metrics": [static, "val_accuracy"]})


@pytest.mark.parametrize("task", vocab.TASKS)
def test_each_task_has_a_default_metric_of_its_own_and_refuses_others(task: str) -> None:
    s = spec(task={"type": task}, model={"family": family_for(task)})
    assert s.study.metrics[0].name == vocab.DEFAULT_METRIC[task] and vocab.DEFAULT_METRIC[task] in vocab.METRICS[task]
    refused("study.metric", study={"metric": OUTSIDE}, task={"type": task}, model={"family": family_for(task)})
    assert set(vocab.METRICS) == set(vocab.TASKS)
    assert {d for m in vocab.METRICS.values() for d in m.values()} <= set(vocab.DIRECTIONS)


@pytest.mark.parametrize(("knob", "values"), [("optimizer", vocab.OPTIMIZERS), ("lr_schedule", vocab.LR_SCHEDULES),
                                              ("activation", vocab.ACTIVATIONS)])
def test_the_spec_searches_every_value_of_a_choice_knob(knob: str, values: tuple[str, ...]) -> None:
    assert KNOBS[knob].choices == values  # the knob table takes its choices from the vocabulary
    s = spec(space={knob: list(values)})
    assert s.space[0].choices == values
    refused(f"space.{knob}", space={knob: OUTSIDE})


def test_the_spec_searches_every_encoder() -> None:
    assert KNOBS["encoder"].choices == vocab.ENCODERS
    s = spec(task={"type": "denoise"}, model={"family": "autoencoder"}, space={"encoder": list(vocab.ENCODERS)})
    assert s.space[0].choices == vocab.ENCODERS
    refused("space.encoder", task={"type": "denoise"}, model={"family": "autoencoder"}, space={"encoder": OUTSIDE})


@pytest.mark.parametrize("sampler", vocab.SAMPLERS)
def test_the_spec_and_the_study_build_every_sampler(sampler: str) -> None:
    from hpsearch.study import make_sampler

    # A grid needs a finite space; the others get a range.
    space = {"optimizer": ["adam", "sgd"]} if sampler == "grid" else {"lr": {"type": "float", "low": 1e-3, "high": 0.1}}
    s = spec(study={"sampler": sampler}, space=space)
    assert s.study.sampler.type == sampler
    assert type(make_sampler(s)) is vocab.sampler_class(sampler)
    refused("study.sampler.type", study={"sampler": OUTSIDE})


@pytest.mark.parametrize("pruner", vocab.PRUNERS)
def test_the_spec_and_the_study_build_every_pruner(pruner: str) -> None:
    from hpsearch.study import make_pruner

    s = spec(study={"pruner": {"type": pruner, **NEEDS.get(pruner, {})}})
    assert s.study.pruner.type == pruner
    assert type(make_pruner(s.study.pruner)) is vocab.pruner_class(pruner)
    refused("study.pruner.type", study={"pruner": OUTSIDE})


# --------------------------------------------------------------------------- models, training, tasks, data


def small(**overrides: Any) -> dict[str, Any]:
    return {**defaults(), "width": 8, "conv_channels": 4, "bottleneck_dim": 4, **overrides}


@pytest.mark.parametrize("family", vocab.FAMILIES)
def test_every_family_builds_and_no_other(family: str) -> None:
    build_model(family, small(), image_shape=(1, 8, 8), n_classes=10)
    with pytest.raises(SpecError, match=OUTSIDE):
        build_model(OUTSIDE, small(), image_shape=(1, 8, 8), n_classes=10)


@pytest.mark.parametrize("activation", vocab.ACTIVATIONS)
def test_every_activation_builds_and_no_other(activation: str) -> None:
    assert set(ACTIVATION_LAYERS) == set(vocab.ACTIVATIONS)  # one torch layer per name, no more
    model = build_model("mlp", small(activation=activation), image_shape=(1, 8, 8), n_classes=10)
    assert any(isinstance(m, ACTIVATION_LAYERS[activation]) for m in model.modules())
    with pytest.raises(SpecError, match=f"activation.*{OUTSIDE}"):
        build_model("mlp", small(activation=OUTSIDE), image_shape=(1, 8, 8), n_classes=10)


@pytest.mark.parametrize("encoder", vocab.ENCODERS)
def test_every_encoder_builds_and_no_other(encoder: str) -> None:
    model = build_model("autoencoder", small(encoder=encoder), image_shape=(1, 8, 8), n_classes=10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(SpecError, match=f"encoder.*{OUTSIDE}"):
        build_model("autoencoder", small(encoder=OUTSIDE), image_shape=(1, 8, 8), n_classes=10)


@pytest.mark.parametrize("optimizer", vocab.OPTIMIZERS)
def test_every_optimizer_trains_and_no_other(optimizer: str) -> None:
    assert set(OPTIMIZER_CLASSES) == set(vocab.OPTIMIZERS)  # one torch class per name, no more
    config = TrainConfig.from_params(small(optimizer=optimizer, epochs=1), seed=0, device="cpu")
    built = make_optimizer(torch.nn.Linear(2, 2).parameters(), config, torch.device("cpu"))
    assert type(built) is OPTIMIZER_CLASSES[optimizer]
    with pytest.raises(SpecError, match=f"optimizer.*{OUTSIDE}"):
        TrainConfig.from_params(small(optimizer=OUTSIDE, epochs=1), seed=0, device="cpu")


@pytest.mark.parametrize("schedule", vocab.LR_SCHEDULES)
def test_every_lr_schedule_trains_and_no_other(schedule: str) -> None:
    config = TrainConfig.from_params(small(lr_schedule=schedule, epochs=3), seed=0, device="cpu")
    optimizer = make_optimizer(torch.nn.Linear(2, 2).parameters(), config, torch.device("cpu"))
    scheduler, _ = make_scheduler(optimizer, config, steps_per_epoch=4)
    assert (scheduler is None) == (schedule == "none")
    with pytest.raises(SpecError, match=f"lr_schedule.*{OUTSIDE}"):
        TrainConfig.from_params(small(lr_schedule=OUTSIDE, epochs=3), seed=0, device="cpu")


@pytest.mark.parametrize("task", vocab.TASKS)
def test_every_task_is_made_with_its_metrics_and_no_other(task: str) -> None:
    assert make_task(task, defaults()).metrics == vocab.METRICS[task]
    with pytest.raises(SpecError, match=OUTSIDE):
        make_task(OUTSIDE, defaults())


@pytest.mark.parametrize("kind", vocab.NOISE_KINDS)
def test_every_noise_kind_is_made_and_no_other(kind: str) -> None:
    assert make_task("denoise", defaults(), noise_kind=kind).kind == kind
    with pytest.raises(SpecError, match=OUTSIDE):
        make_task("denoise", defaults(), noise_kind=OUTSIDE)


@pytest.mark.parametrize("placement", vocab.MASK_PLACEMENTS)
def test_every_mask_placement_is_made_and_no_other(placement: str) -> None:
    assert make_task("inpaint", defaults(), mask_placement=placement).placement == placement
    with pytest.raises(SpecError, match=OUTSIDE):
        make_task("inpaint", defaults(), mask_placement=OUTSIDE)


def test_every_dataset_has_its_shape_and_size() -> None:
    assert set(IMAGE_SHAPES) == set(TRAIN_SIZES) == set(vocab.DATASETS)


# --------------------------------------------------------------------------- bounds: the knob table only

# Who reads each knob outside the spec, and how.
MODEL_KNOBS = ("n_layers", "width", "dropout", "conv_blocks", "conv_channels", "kernel_size", "bottleneck_dim")
TASK_KNOBS = {"noise_std": "denoise", "noise_amount": "denoise", "mask_size": "inpaint"}


def _beyond(name: str) -> list[Any]:
    """Return values just outside the knob's bounds (and NaN for a float knob)."""
    knob = KNOBS[name]
    out = [] if knob.low is None else [knob.low - (1 if knob.kind == "int" else 1e-9)]
    if knob.high is not None:
        out.append(knob.high if knob.high_exclusive else knob.high + (1 if knob.kind == "int" else 1e-9))
    return out + ([float("nan")] if knob.kind == "float" else [])


def _consume(name: str, value: Any) -> None:
    """Hand the knob ``name`` = ``value`` to the code that uses it (model, training or task)."""
    if name in TASK_KNOBS:
        kind = "salt_pepper" if name == "noise_amount" else "gaussian"
        make_task(TASK_KNOBS[name], {**defaults(), name: value}, noise_kind=kind)
    elif name in MODEL_KNOBS:
        family = "autoencoder" if name == "bottleneck_dim" else "cnn"
        build_model(family, small(**{name: value}, encoder="conv"), image_shape=(1, 8, 8), n_classes=10)
    else:
        TrainConfig.from_params(small(**{name: value}, epochs=1), seed=0, device="cpu")


@pytest.mark.parametrize("name", [n for n, k in KNOBS.items() if k.kind in ("int", "float")])
def test_models_training_and_tasks_refuse_what_the_knob_table_refuses(name: str) -> None:
    for value in _beyond(name):
        problem = KNOBS[name].problem(value)
        assert problem, (name, value)
        with pytest.raises(SpecError) as caught:
            _consume(name, value)
        # Where, the knob table's rule and the value, as the spec says it.
        assert f"`{name}` {problem}, but got {value!r}." in str(caught.value)
