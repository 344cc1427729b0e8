"""The study spec: good specs resolve, every kind of bad spec is refused with where/rule/value."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hpsearch.cli import cli
from hpsearch.errors import SpecError
from hpsearch.spec import load_spec, parse_spec, spec_from_dict

from .conftest import STUDIES

BASE = {
    "study": {"name": "t", "n_trials": 3},
    "task": {"type": "classify", "dataset": "digits", "epochs": 2},
    "model": {"family": "mlp"},
    "space": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "optimizer": ["adam", "sgd"],
        "momentum": {"type": "float", "low": 0.5, "high": 0.99},
    },
}


def _with(path: str, value: object, base: dict | None = None) -> dict:
    """Return a copy of BASE with the dotted key `path` set to `value` (or removed if value is ...)."""
    import copy

    data = copy.deepcopy(base or BASE)
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is ...:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return data


def _write(tmp_path: Path, data: object, text: str | None = None) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_is_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.study.n_trials >= 1
    # The resolved spec round-trips through plain data (it is stored in the study that way).
    assert spec_from_dict(spec.to_dict()).to_dict() == spec.to_dict()


def test_defaults_and_implicit_condition() -> None:
    spec = parse_spec(BASE)
    assert spec.study.storage.startswith("sqlite:///") and spec.study.storage.endswith("optuna.db")
    assert spec.tracking.uri.endswith("mlflow.db")
    assert [(m.name, m.direction) for m in spec.study.metrics] == [("val_accuracy", "maximize")]
    momentum = next(p for p in spec.space if p.name == "momentum")
    # momentum only matters for sgd/rmsprop; rmsprop is not among the choices, so only sgd.
    assert dict(momentum.when) == {"optimizer": ("sgd",)}


def test_env_interpolation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPS_TEST_PW", "s3cret")
    spec = parse_spec(_with("study.storage", "postgresql://u:${HPS_TEST_PW}@127.0.0.1:5432/db"))
    assert "s3cret" in spec.study.storage
    # ...but the password is never shown in the stored or printed spec.
    assert "s3cret" not in str(spec.to_dict())
    spec = parse_spec(_with("tracking", {"experiment": "${HPS_UNSET_VAR:-fallback-name}"}))
    assert spec.tracking.experiment == "fallback-name"


def test_overrides_win_over_spec(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    spec = load_spec(path, storage=f"sqlite:///{tmp_path}/other.db", tracking_uri="http://127.0.0.1:5999")
    assert spec.study.storage == f"sqlite:///{tmp_path}/other.db"
    assert spec.tracking.uri == "http://127.0.0.1:5999" and spec.tracking.artifact_root is None


def test_gpu_settings_default_to_fp32_and_auto_layout_and_stay_out_of_the_fingerprint() -> None:
    base = parse_spec(BASE)
    assert base.task.precision == "fp32" and base.task.channels_last is None
    assert "precision" not in base.space_dict()["task"]  # older studies keep their fingerprint
    nhwc = parse_spec(_with("task.channels_last", True))
    assert nhwc.task.channels_last is True and nhwc.fingerprint() == base.fingerprint()  # layout: how, not what
    bf16 = parse_spec(_with("task.precision", "bf16"))
    assert bf16.task.precision == "bf16" and bf16.fingerprint() != base.fingerprint()  # changes the numbers


def test_multi_objective_forces_no_pruning() -> None:
    spec = parse_spec(_with("study.metrics", ["val_error", "n_params"]))
    assert spec.study.directions == ["minimize", "minimize"] and spec.study.pruner.type == "none"


# Every bad spec of the issue: (what is changed, the message must name these).
BAD = [
    ("unknown top key", _with("extra", 1), ["extra", "unknown key"]),
    ("unknown study key", _with("study.n_trails", 3), ["study.n_trails", "unknown key"]),
    ("wrong type n_trials", _with("study.n_trials", "many"), ["study.n_trials", "integer", "'many'"]),
    ("zero trials", _with("study.n_trials", 0), ["study.n_trials", ">= 1", "0"]),
    ("low > high", _with("space.lr", {"type": "float", "low": 0.1, "high": 0.01}), ["space.lr", "low <= high"]),
    ("log from 0", _with("space.lr", {"type": "float", "low": 0.0, "high": 0.1, "log": True}),
     ["space.lr.low", "log range must start above 0"]),
    ("unknown model", _with("model.family", "transformer"), ["model.family", "transformer", "mlp"]),
    ("unknown dataset", _with("task.dataset", "cifar10"), ["task.dataset", "cifar10", "mnist"]),
    ("unknown optimizer", _with("space.optimizer", ["adam", "lion"]), ["space.optimizer.choices[1]", "lion"]),
    ("unknown sampler", _with("study.sampler", "bayes"), ["study.sampler.type", "bayes", "tpe"]),
    ("unknown pruner", _with("study.pruner", "early"), ["study.pruner.type", "early", "median"]),
    ("unknown sampler option", _with("study.sampler", {"type": "tpe", "n_startup": 3}),
     ["study.sampler.n_startup", "n_startup_trials"]),
    ("condition on nothing", _with("space.momentum", {"type": "float", "low": 0.5, "high": 0.9,
                                                      "when": {"optimiser": ["sgd"]}}),
     ["space.momentum.when.optimiser", "not a parameter"]),
    ("condition on impossible value", _with("space.momentum", {"type": "float", "low": 0.5, "high": 0.9,
                                                                "when": {"optimizer": ["rmsprop"]}}),
     ["space.momentum.when.optimizer", "rmsprop"]),
    ("unknown knob", _with("space.n_units", 3), ["space", "n_units", "unknown key"]),
    ("knob of another family", _with("space.bottleneck_dim", 16), ["space.bottleneck_dim", "mlp"]),
    ("family cannot do task", _with("model.family", "autoencoder"), ["model.family", "classify"]),
    ("missing task", _with("task", ...), ["task", "required"]),
    ("bad direction", _with("study.direction", "up"), ["study.direction", "'up'"]),
    ("metric of another task", _with("study.metric", "val_psnr"), ["study.metric", "val_psnr"]),
    ("bad storage", _with("study.storage", "redis://x"), ["study.storage", "redis://x", "sqlite:///"]),
    ("bad tracking", _with("tracking", {"uri": "ftp://x"}), ["tracking.uri", "ftp://x"]),
    ("unset env var", _with("study.storage", "postgresql://u:${HPS_SURELY_UNSET}@h/db"),
     ["study.storage", "HPS_SURELY_UNSET"]),
    ("val_fraction 1", _with("task.val_fraction", 1.0), ["task.val_fraction", "between 0 and 1"]),
    ("dropout 1", _with("space.dropout", 1.0), ["space.dropout", "< 1.0"]),
    ("even kernel", _with("space.kernel_size", 4, _with("model.family", "cnn")), ["space.kernel_size", "odd"]),
    ("float range on int knob", _with("space.width", {"type": "float", "low": 1, "high": 4}),
     ["space.width.type", "int"]),
    ("empty choices", _with("space.optimizer", []), ["space.optimizer.choices", "non-empty"]),
    ("enqueue unknown param", _with("study.enqueue", [{"lr": 0.01, "widht": 3}]), ["study.enqueue[0].widht"]),
    ("pruning multi-objective", _with("study.pruner", "median", _with("study.metrics", ["val_error", "n_params"])),
     ["study.pruner", "multi-objective"]),
    ("grid over a float range", _with("study.sampler", "grid"), ["space.lr", "grid"]),
    ("device", _with("task.device", "tpu"), ["task.device", "tpu"]),
    ("precision", _with("task.precision", "fp16"), ["task.precision", "'fp16'", "bf16"]),
    ("channels_last", _with("task.channels_last", "yes"), ["task.channels_last", "auto, true or false", "'yes'"]),
    ("space not a mapping", _with("space", [1, 2]), ["space", "mapping"]),
    ("per layer without n_layers", _with("space.width", {"type": "int", "low": 8, "high": 64, "per_layer": True}),
     ["space.width.per_layer", "n_layers"]),
]


@pytest.mark.parametrize("data,fragments", [(d, f) for _, d, f in BAD], ids=[n for n, _, _ in BAD])
def test_bad_spec_is_refused(tmp_path: Path, data: dict, fragments: list[str]) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # names the file
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message  # one paragraph


RAW_BAD = [
    ("empty file", "", ["empty"]),
    ("only a comment", "# nothing\n", ["empty"]),
    ("malformed yaml", "study: {name: x\ntask: [", ["not valid YAML", "line"]),
    ("top level list", "- a\n- b\n", ["mapping"]),
]


@pytest.mark.parametrize("text,fragments", [(t, f) for _, t, f in RAW_BAD], ids=[n for n, _, _ in RAW_BAD])
def test_bad_file_is_refused(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = _write(tmp_path, None, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("data,fragments", [(d, f) for _, d, f in BAD[:8]], ids=[n for n, _, _ in BAD[:8]])
def test_cli_refuses_bad_spec_without_traceback(tmp_path: Path, command: str, data: dict,
                                                fragments: list[str]) -> None:
    path = _write(tmp_path, data)
    result = CliRunner().invoke(cli, [command, str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert fragments[0] in result.output
    assert not (tmp_path / "runs").exists()  # refused before any store was made


def test_cli_missing_file() -> None:
    result = CliRunner().invoke(cli, ["validate", "no/such/spec.yaml"])
    assert result.exit_code == 1 and "no such spec file" in result.output


def test_validate_prints_resolved_settings() -> None:
    result = CliRunner().invoke(cli, ["validate", str(STUDIES / "quickstart.yaml")])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "momentum" in result.output and "when optimizer in ['sgd']" in result.output


def test_yaml_float_without_dot(tmp_path: Path) -> None:
    text = textwrap.dedent("""
        study: {name: t}
        task: {type: classify, dataset: digits}
        model: {family: mlp}
        space:
          lr: {type: float, low: 1e-4, high: 1e-1, log: true}
    """)
    spec = load_spec(_write(tmp_path, None, text))
    assert spec.space[0].low == pytest.approx(1e-4)


# --------------------------------------------------------------------------- one rule for a tracking URI

# URIs the spec (so `validate`) and the MLflow tracker judged differently before they shared one rule.
REFUSED_TRACKING_URIS = [
    " mlruns",  # stray blanks are a typo, not a directory name
    "mlruns\n",
    "file:relative",  # a scheme without the "//" of a URI
    "file:///",  # names no directory
    "postgresql://",  # names no database
    "postgresql://u:p@ss@db:5432/mlflow",  # a raw "@" in the password: the driver would take "ss@db" for the host
]
ACCEPTED_TRACKING_URIS = ["http://user:pw@host:5000", "https://mlflow.example.org/base", "sqlite:///runs/mlflow.db",
                          "file:///tmp/mlruns", "mlruns"]


@pytest.mark.parametrize("uri", REFUSED_TRACKING_URIS)
def test_validate_and_the_tracker_refuse_the_same_tracking_uris(tmp_path: Path, uri: str) -> None:
    from hpsearch.tracking import Tracker

    result = CliRunner().invoke(cli, ["validate", str(_write(tmp_path, BASE)), "--tracking-uri", uri])
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output, result.output
    assert "tracking.uri" in result.output and "p@ss" not in result.output  # where, and no password shown
    with pytest.raises(SpecError):  # the same rule, the same error class, wherever the URI comes from
        Tracker(uri, "e")


@pytest.mark.parametrize("uri", ACCEPTED_TRACKING_URIS)
def test_validate_and_the_tracker_accept_the_same_tracking_uris(tmp_path: Path, uri: str) -> None:
    from hpsearch.tracking import Tracker

    result = CliRunner().invoke(cli, ["validate", str(_write(tmp_path, BASE)), "--tracking-uri", uri,
                                      "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    Tracker(uri, "e")  # builds without touching the store
