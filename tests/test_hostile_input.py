"""Hostile input, through the CLI: every class of issue 10's items 5 ("one bad trial never kills the
study; a bad spec never starts one") and 6 ("input is what it says"), each with the issue's example
and cases of our own. A refused input exits non-zero with one `Error: ...` that names the problem and
no traceback, before any store is made; a warned one runs; a trial that fails at run time fails alone,
and the study ends with nothing left RUNNING in Optuna or MLflow."""

from __future__ import annotations

import copy
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpsearch.cli import cli
from hpsearch.errors import DataError, StorageError
from hpsearch.objective import worker_fault

from .test_data import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, _write_idx

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "study": {"name": "hostile", "n_trials": 2},
    "task": {"type": "classify", "dataset": "digits", "epochs": 1, "batch_size": 64},
    "model": {"family": "mlp"},
    "space": {
        "n_layers": {"type": "int", "low": 1, "high": 3},
        "width": {"type": "int", "low": 8, "high": 64, "step": 8, "per_layer": True},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "optimizer": ["adam", "sgd"],
        "momentum": {"type": "float", "low": 0.5, "high": 0.99},
    },
}


def _with(changes: dict[str, object], base: dict | None = None) -> dict:
    """Return a copy of BASE with each dotted key in ``changes`` set to its value."""
    data = copy.deepcopy(base or BASE)
    for path, value in changes.items():
        node = data
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return data


def _refused(result: object, fragments: list[str]) -> None:
    """Assert a clean refusal: exit 1, one `Error: ...` naming every fragment, no traceback."""
    output = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 1, output  # type: ignore[attr-defined]
    assert output.startswith("Error: ") and "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, (fragment, output)


# --------------------------------------------------------------------------- specs refused by `validate` and `run`

# (id, spec, fragments the message must name). Those marked "issue" are the examples.
BAD_SPECS = [
    # Item 5: sampler and pruner options checked by name, type (the class's signature) and value (built once).
    ("issue: sampler option of the wrong type", _with({"study.sampler": {"type": "tpe", "n_startup_trials": "ten"}}),
     ["study.sampler.n_startup_trials", "must be an integer", "'ten'"]),
    ("pruner option of the wrong type", _with({"study.pruner": {"type": "median", "n_warmup_steps": "2"}}),
     ["study.pruner.n_warmup_steps", "must be a number of epochs >= 0", "'2'"]),
    ("pruner warm-up of negative epochs", _with({"study.pruner": {"type": "median", "n_warmup_steps": -0.5}}),
     ["study.pruner.n_warmup_steps", "must be a number of epochs >= 0", "-0.5"]),
    ("pruner patience of NaN epochs", _with({"study.pruner": {"type": "patient", "patience": float("nan")}}),
     ["study.pruner.patience", "must be a number of epochs >= 0", "nan"]),
    ("option that takes a Python object", _with({"study.sampler": {"type": "tpe", "gamma": "fast"}}),
     ["study.sampler.gamma", "Python object", "'fast'"]),
    ("option value Optuna refuses", _with({"study.pruner": {"type": "percentile", "percentile": 150}}),
     ["study.pruner", "PercentilePruner", "percentile=150"]),
    ("pruner that cannot be built without options", _with({"study.pruner": "threshold"}),
     ["study.pruner", "ThresholdPruner", "lower or upper"]),
    ("wrapped pruner's option", _with({"study.pruner": {"type": "patient", "patience": 1,
                                                        "wrapped": {"type": "median", "n_startup_trials": -1}}}),
     ["study.pruner.wrapped", "MedianPruner", "negative"]),
    ("sampler option value Optuna refuses", _with({"study.sampler": {"type": "nsga2", "population_size": 1}}),
     ["study.sampler", "NSGAIISampler", "population_size"]),
    # Item 5: batchnorm with a batch of one sample.
    ("issue: batchnorm searched with a batch size of 1", _with({"space.batchnorm": [False, True],
                                                                "task.batch_size": 1}),
     ["task.batch_size", "batchnorm", "at least 2", "got 1"]),
    ("batchnorm with a searched batch size from 1", _with({"space.batchnorm": True,
                                                           "space.batch_size": {"type": "int", "low": 1, "high": 64}}),
     ["space.batch_size", "batchnorm", "at least 2"]),
    ("batchnorm with a batch size of 1 among the choices", _with({"space.batchnorm": [True],
                                                                  "space.batch_size": [1, 32]}),
     ["space.batch_size", "batchnorm"]),
    # Item 5: a model too large for the device (the largest the space allows; sizes no machine holds).
    ("issue: model too large for memory", _with({"task.device": "cpu", "space.n_layers": 16,
                                                 "space.width": {"type": "int", "low": 8, "high": 16384},
                                                 "space.batch_size": 65536}),
     ["largest model", "n_layers=16", "width=16384", "does not fit", "available on cpu"]),
    ("conv model too large for memory", _with({"task.device": "cpu", "model.family": "cnn", "space": {
        "conv_blocks": {"type": "int", "low": 0, "high": 6}, "conv_channels": [8, 1024], "batch_size": 65536}}),
     ["largest model", "cnn", "conv_channels=1024", "does not fit"]),
    # Item 6: enqueued configurations outside the declared space.
    ("issue: enqueued value outside the range", _with({"study.enqueue": [{"lr": 0.5}]}),
     ["study.enqueue[0].lr", "searched range [0.0001, 0.1]", "0.5"]),
    ("enqueued value not among the choices", _with({"study.enqueue": [{"optimizer": "rmsprop"}]}),
     ["study.enqueue[0].optimizer", "searched choices ['adam', 'sgd']", "'rmsprop'"]),
    ("enqueued name not in the space (refused before too)", _with({"study.enqueue": [{"lr": 0.01, "widht": 16}]}),
     ["study.enqueue[0].widht", "not a searched parameter"]),
    ("enqueued value off the step grid", _with({"study.enqueue": [{"width_0": 12}]}),
     ["study.enqueue[0].width_0", "grid 8 + k * 8", "12"]),
    ("enqueued layer beyond n_layers", _with({"study.enqueue": [{"n_layers": 2, "width_2": 16}]}),
     ["study.enqueue[0].width_2", "layer 2", "n_layers: 2"]),
    ("enqueued value its own condition excludes", _with({"study.enqueue": [{"optimizer": "adam", "momentum": 0.9}]}),
     ["study.enqueue[0].momentum", "only when optimizer", "'adam'"]),
    # A value too long to print whole is cut short (the refusal stays one paragraph).
    ("a 10,000-character name", _with({"study.name": "x" * 10_000}),
     ["study.name", "'xxxxxxxxxx", "... (10,002 characters)"]),
    ("a huge list", _with({"space.optimizer": ["adam"] * 5_000}), ["space.optimizer", "characters)"]),
    ("a 5,000-character unknown key", _with({"space." + "y" * 5_000: 1}), ["unknown key 'yyyy", "characters)"]),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("data,fragments", [(d, f) for _, d, f in BAD_SPECS], ids=[n for n, _, _ in BAD_SPECS])
def test_a_bad_spec_is_refused_before_anything_starts(tmp_path: Path, command: str, data: dict,
                                                      fragments: list[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, [command, str(path)])
    _refused(result, [str(path), *fragments])
    assert len(result.output) < 1_000 + len(str(path)), result.output
    assert not (tmp_path / "runs").exists()  # refused before any store was made


# --------------------------------------------------------------------------- files and YAML that are not what they say

SPEC_TEXT = "study: {name: y, n_trials: 3}\ntask: {type: classify, dataset: digits}\nmodel: {family: mlp}\n"


def _laughs(levels: int, fan: int) -> str:
    """Return a "billion laughs" document: `levels` anchors, each aliasing the previous one `fan` times."""
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
    return SPEC_TEXT + "\n".join(lines) + "\n"


BAD_TEXTS = [
    ("issue: duplicate key (n_trials 3, then 500)", "study: {name: y, n_trials: 3, n_trials: 500}\n"
     "task: {type: classify, dataset: digits}\nmodel: {family: mlp}\n", ["'n_trials' is given twice", "line 1"]),
    ("duplicate section", SPEC_TEXT + "study: {name: z, n_trials: 500}\n", ["'study' is given twice", "line 4"]),
    ("duplicate knob in the space", SPEC_TEXT + "space:\n  lr: 0.01\n  width: 32\n  lr: 0.1\n",
     ["'lr' is given twice", "first at line 5"]),
    ("duplicate key in an enqueued configuration", SPEC_TEXT.replace("n_trials: 3}", "n_trials: 3, enqueue: "
     "[{lr: 0.01, lr: 0.02}]}") + "space: {lr: {type: float, low: 0.001, high: 0.1}}\n", ["'lr' is given twice"]),
    ("issue: billion laughs", _laughs(9, 10), ["expands to more than 100,000 values", "aliases"]),
    ("laughs of another shape (2**40 through mappings)", SPEC_TEXT + "b0: &b0 {x: 1, y: 2}\n" + "".join(
        f"b{i}: &b{i} {{x: *b{i - 1}, y: *b{i - 1}}}\n" for i in range(1, 41)), ["expands to more than"]),
    ("an alias inside its own anchor", SPEC_TEXT + "tracking: &t {experiment: x, again: *t}\n",
     ["refers to a node that contains it"]),
    ("nesting deeper than can be read", SPEC_TEXT + "space: " + "[" * 3000 + "]" * 3000 + "\n",
     ["nests deeper than can be read"]),
    ("not UTF-8", None, ["UTF-8"]),
    ("larger than any spec", SPEC_TEXT + "# " + "x" * 1_100_000 + "\n", ["larger than 1,000,000 bytes"]),
]


@pytest.mark.parametrize("text,fragments", [(t, f) for _, t, f in BAD_TEXTS], ids=[n for n, _, _ in BAD_TEXTS])
def test_yaml_that_is_not_what_it_says_is_refused(tmp_path: Path, text: str | None, fragments: list[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(text.encode() if text is not None else SPEC_TEXT.encode("utf-16"))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    _refused(result, [str(path), *fragments])


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "spec.yaml")
    return tmp_path / "spec.yaml"


def _socket(tmp_path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "spec.yaml"))  # the file stays after the socket is closed
    sock.close()
    return tmp_path / "spec.yaml"


@pytest.mark.parametrize("make,fragments", [
    (_fifo, ["is a named pipe (FIFO), not a regular file"]),  # the example; opening it must not block
    (lambda tmp_path: Path("/dev/null"), ["/dev/null: is a character device", "not a regular file"]),
    (lambda tmp_path: Path("/dev/zero"), ["/dev/zero: is a character device"]),  # never ends
    (_socket, ["is a socket, not a regular file"]),
    (lambda tmp_path: tmp_path, ["is a directory"]),  # click's own check, already before
], ids=["issue: fifo", "issue: /dev/null", "/dev/zero", "socket", "directory"])
def test_a_spec_that_is_not_a_regular_file_gets_its_own_message(tmp_path: Path, make: object,
                                                               fragments: list[str]) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    # A subprocess with a time limit: a FIFO that blocked would hang an in-process test for ever.
    result = subprocess.run([sys.executable, "-m", "hpsearch", "validate", str(path)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and result.stdout == "", result.stdout
    assert result.stderr.count("Error: ") == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# --------------------------------------------------------------------------- settings that run, with a warning

WARNED = [
    ("issue: val_fraction 0.001 leaves a handful", _with({"task.dataset": "mnist", "task.val_fraction": 0.001}),
     ["task.val_fraction 0.001 leaves 60 validation image(s)"]),
    ("issue: val_fraction 0.99", _with({"task.val_fraction": 0.99}), ["keeps 14 of the 1438", "validates on 1424"]),
    ("issue: batch larger than the training split", _with({"task.batch_size": 4096}),
     ["batch size of 4096 is larger than the 1294 training images"]),
    ("train_limit leaves a handful", _with({"task.train_limit": 50}), ["leaves 5 validation image(s) of the 50"]),
    ("a searched batch size larger than the split", _with({"task.train_limit": 500, "space.batch_size": [32, 1024]}),
     ["batch size of 1024 is larger than the 450 training images"]),
]


@pytest.mark.parametrize("data,fragments", [(d, f) for _, d, f in WARNED], ids=[n for n, _, _ in WARNED])
def test_odd_splits_are_warned(tmp_path: Path, data: dict, fragments: list[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["validate", str(path)])  # click >= 8.2 keeps stdout and stderr apart too
    assert result.exit_code == 0, result.output
    assert "valid." in result.stdout and "warning: " + str(path) in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_ordinary_splits_are_not_warned(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0 and "warning" not in result.output, result.output


# --------------------------------------------------------------------------- data refused with the file and the rule


def _idx_dataset(folder: Path, **damage: np.ndarray) -> Path:
    """Write a valid small KMNIST-named dataset in ``folder``, with any file replaced by ``damage``."""
    rng = np.random.default_rng(0)
    arrays = {TRAIN_IMAGES: rng.integers(0, 256, (200, 28, 28)), TRAIN_LABELS: rng.integers(0, 10, 200),
              TEST_IMAGES: rng.integers(0, 256, (50, 28, 28)), TEST_LABELS: rng.integers(0, 10, 50)}
    for name, array in arrays.items():
        _write_idx(folder / name, damage.get(name.split("-idx")[0].replace("-", "_"), array), gz=False)
    return folder


BAD_DATA = [
    ("issue: constant images", {"train_images": np.full((200, 28, 28), 7)},
     [TRAIN_IMAGES, "pixels must vary", "are 7"]),
    ("issue: one class", {"train_labels": np.full(200, 3)}, [TRAIN_LABELS, "at least 2 classes", "are 3"]),
    ("issue: test images of another shape", {"t10k_images": np.zeros((50, 32, 32)) + np.arange(32)},
     [TEST_IMAGES, "training images' size (28x28", "32x32"]),
    ("issue: labels outside the classes", {"train_labels": np.arange(200) % 12},
     [TRAIN_LABELS, "classes 0 to 9", "label 10 is 10"]),
    ("blank test images", {"t10k_images": np.zeros((50, 28, 28))}, [TEST_IMAGES, "pixels must vary", "are 0"]),
    ("test labels of another alphabet", {"t10k_labels": np.full(50, 255)}, [TEST_LABELS, "classes 0 to 9", "255"]),
]


@pytest.mark.parametrize("damage,fragments", [(d, f) for _, d, f in BAD_DATA], ids=[n for n, _, _ in BAD_DATA])
def test_degenerate_data_is_refused_before_any_trial(tmp_path: Path, damage: dict, fragments: list[str]) -> None:
    data_dir = _idx_dataset(tmp_path / "data", **damage)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_with({"task.dataset": "kmnist", "task.val_fraction": 0.5})))
    result = CliRunner().invoke(cli, ["run", str(path), "--data-dir", str(data_dir)])
    _refused(result, fragments)
    runs = tmp_path / "runs"
    study = optuna.load_study(study_name="hostile", storage=f"sqlite:///{runs / 'optuna.db'}")
    assert study.trials == []  # no trial started...
    assert not (runs / "mlflow.db").exists()  # ...and no MLflow run was opened to be left RUNNING


# --------------------------------------------------------------------------- faults at run time


def _run_process(args: list[str], tmp_path: Path, *, data_limit: int | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if data_limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))

    env = {**os.environ, "PYTHONPATH": str(REPO), "HPSEARCH_RUNS_DIR": str(tmp_path / "runs"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "hpsearch", *args], capture_output=True, text=True, timeout=500,
                          env=env, preexec_fn=limit)


def _nothing_running(runs: Path, name: str) -> tuple[optuna.Study, MlflowClient, list]:
    """Return the study, the MLflow client and the study's runs, asserting none is left RUNNING."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'optuna.db'}")
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    mlflow_runs = client.search_runs([experiment.experiment_id])
    assert mlflow_runs and all(r.info.status != "RUNNING" for r in mlflow_runs), \
        [(r.info.run_name, r.info.status) for r in mlflow_runs]
    return study, client, mlflow_runs


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
def test_a_trial_whose_model_does_not_fit_fails_alone(tmp_path: Path) -> None:
    # The "model too large for memory" that validation cannot see: the machine has the memory,
    # but this process may not take it (a ulimit, as a container's limit would). Trial 0's model needs
    # 2 GB of weights over a 2.5 GB data limit; trial 1's fits. The first must not stop the second.
    spec = _with({"study.enqueue": [{"width": 16000}, {"width": 16}], "space": {"n_layers": 3, "width": [16, 16000]}})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = _run_process(["run", str(path)], tmp_path, data_limit=int(2.5 * 2**30))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    failures = [line for line in result.stderr.splitlines() if "Trial 0 failed" in line]
    assert len(failures) == 1 and "allocate" in failures[0], failures  # one line, with the reason
    study, client, runs = _nothing_running(tmp_path / "runs", "hostile")
    first, second = study.trials
    assert first.state == TrialState.FAIL and "allocate memory" in first.user_attrs["fail_reason"]
    assert second.state == TrialState.COMPLETE and second.params == {"width": 16}  # the study went on
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and "test_accuracy" in parent.data.metrics  # and finished


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
def test_a_fault_of_the_worker_ends_the_study_with_one_line_and_closes_its_parent_run(tmp_path: Path) -> None:
    # The artifacts folder cannot be made (a file is in the way): every trial would fail on it, so it
    # ends the worker, with one line, and the study's MLflow parent run ends FAILED, not RUNNING.
    (tmp_path / "in-the-way").write_text("")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE))
    env_artifacts = tmp_path / "in-the-way" / "artifacts"
    result = _run_process(["run", str(path)], tmp_path, env={"HPSEARCH_ARTIFACTS": str(env_artifacts)})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: this worker cannot go on: Not a directory: {env_artifacts}. Finished trials are "
                      "kept; fix it and run again."], result.stderr[-3000:]
    _, client, runs = _nothing_running(tmp_path / "runs", "hostile")
    (parent,) = runs
    assert parent.info.status == "FAILED" and "Not a directory" in parent.data.tags["hpsearch.fail_reason"]


@pytest.mark.parametrize("exc,fault", [
    (StorageError("lost the Optuna storage"), True),
    (DataError("cannot read this IDX file"), True),
    (OSError(28, "No space left on device"), True),
    (__import__("sqlalchemy").exc.OperationalError("SELECT 1", {}, Exception("database is locked")), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), False),  # this trial's model
    (MemoryError(), False),
    (ValueError("Expected more than 1 value per channel when training"), False),  # batchnorm on one sample
    (TypeError("'<' not supported between instances of 'int' and 'str'"), False),
])
def test_worker_faults_are_told_from_trial_faults(exc: BaseException, fault: bool) -> None:
    assert worker_fault(exc) is fault
