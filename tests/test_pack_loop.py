"""Trial packs in the study loop: `--pack K` trains K trials together, each with the records a trial trained
alone has; a packed worker stopped by a signal or SIGKILL leaves no trial RUNNING, its members retried."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpsearch import space
from hpsearch.cli import cli
from hpsearch.data import load_search_data
from hpsearch.models import build_model
from hpsearch.objective import MODEL_FILE
from hpsearch.record import MODEL_ATTR, artifact_store
from hpsearch.spec import load_spec
from hpsearch.storage import fail_stale_trials
from hpsearch.study import open_study
from hpsearch.pack_loop import Heartbeats
from hpsearch.record import STATE_TAG, TEST_ATTR, TRIAL_NUMBER_TAG
from hpsearch.tasks import input_stats, make_task
from hpsearch.train import TrainConfig, fit

from .test_workers import (HOST, LONG_TRIALS, SPEC, _env, _mid_training, _popen, _wait_for, _with, _write, retried,
                           stall_past_grace)

# Tiny, but with a structural choice (n_layers, optimizer) and a pruner that prunes from the first epoch.
PACKED = _with(SPEC, study={"name": "packed", "n_trials": 10, "sampler": {"type": "tpe", "n_startup_trials": 3},
                            "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0}},
               task={"epochs": 3},
               space={**SPEC["space"], "n_layers": {"type": "int", "low": 1, "high": 2}, "optimizer": ["adam", "sgd"]},
               tracking={"enabled": True})


# The dense denoising autoencoder: widths, code size and noise level searched (per member), some trials pruned.
PACKED_DENOISE = _with(PACKED, study={"name": "packed-ae", "metric": "val_mse", "n_trials": 5,
                                      "sampler": {"type": "tpe", "n_startup_trials": 2}},
                       task={"type": "denoise", "epochs": 2, "noise": {"kind": "gaussian", "std": 0.3}},
                       model={"family": "autoencoder"},
                       space={"width": {"type": "int", "low": 8, "high": 32},
                              "bottleneck_dim": {"type": "int", "low": 2, "high": 8},
                              "lr": {"type": "float", "low": 1e-3, "high": 1e-2},
                              "noise_std": {"type": "float", "low": 0.1, "high": 0.5}},
                       tracking={"enabled": True, "log_images_every": 1})


def _run(tmp_path: Path, schema: Path, pack: str, spec: dict = PACKED, *options: str
         ) -> tuple[optuna.Study, MlflowClient]:
    runs = tmp_path / f"runs-{pack}"
    runs.mkdir()
    shutil.copy(schema, runs / "mlflow.db")  # an empty MLflow store (conftest's mlflow_schema): made once
    path = _write(tmp_path, spec, f"spec-{pack}.yaml")
    result = CliRunner().invoke(cli, ["run", str(path), "--pack", pack, "--runs-dir", str(runs), *options])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=spec["study"]["name"], storage=f"sqlite:///{runs / 'optuna.db'}")
    return study, MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")


def _most_at_once(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Return the most trials that were running at one moment."""
    events = sorted([(t.datetime_start, 1) for t in trials] + [(t.datetime_complete, -1) for t in trials])
    at_once = most = 0
    for _, change in events:
        at_once += change
        most = max(most, at_once)
    return most


def _records(study: optuna.Study, client: MlflowClient, state: TrialState) -> tuple[set, set, set]:
    """Return the user attr keys, MLflow tag keys and MLflow param keys of one trial in ``state``."""
    trial = next(t for t in study.trials if t.state == state)
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    return set(trial.user_attrs), set(run.data.tags), set(run.data.params)


@pytest.mark.slow
def test_a_packed_run_finishes_its_trials_with_the_records_of_an_unpacked_one(tmp_path: Path,
                                                                           mlflow_schema: Path) -> None:
    packed, packed_client = _run(tmp_path, mlflow_schema, "4")
    # Trained alone for its trials' records: its final test, refit and registration would record nothing of them.
    single, single_client = _run(tmp_path, mlflow_schema, "1", PACKED, "--no-finish")
    trials = packed.trials
    # Its n_trials, every one finished; some pruned and their slots refilled (10 trials through 4 slots).
    assert len(trials) == 10 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert Counter(t.state for t in trials)[TrialState.PRUNED] >= 1
    assert 2 <= _most_at_once(trials) <= 4  # trained together, never more than the pack holds
    assert _most_at_once(single.trials) == 1
    # One MLflow child run per trial, under one parent, each closed with its trial's state.
    experiment = packed_client.get_experiment_by_name("packed")
    runs = packed_client.search_runs([experiment.experiment_id], max_results=100)
    children = [r for r in runs if TRIAL_NUMBER_TAG in r.data.tags]  # (the refit's run has none)
    assert sorted(int(r.data.tags[TRIAL_NUMBER_TAG]) for r in children) == [t.number for t in trials]
    assert all(r.data.tags[STATE_TAG] == trials[int(r.data.tags[TRIAL_NUMBER_TAG])].state.name for r in children)
    # The best model was tested and registered.
    assert TEST_ATTR in packed.user_attrs
    assert packed_client.get_registered_model("packed").latest_versions
    # The records of a packed trial are those of a trial trained alone: the same kinds, for each end.
    for state in (TrialState.COMPLETE, TrialState.PRUNED):
        assert _records(packed, packed_client, state) == _records(single, single_client, state), state
    # Refills were asked with the structure of their pack fixed, and got it (no param changed after the ask).
    refills = [t for t in trials if "fixed_params" in t.system_attrs]
    assert refills and all(t.params[k] == v for t in refills for k, v in t.system_attrs["fixed_params"].items())


@pytest.mark.slow
def test_a_packed_denoising_run_gives_every_trial_its_records(tmp_path: Path, mlflow_schema: Path) -> None:
    # Its trials' records: the final test of a packed run is the packed run test's (--no-finish here).
    packed, client = _run(tmp_path, mlflow_schema, "3", PACKED_DENOISE, "--no-finish")
    single, single_client = _run(tmp_path, mlflow_schema, "1", PACKED_DENOISE, "--no-finish")
    trials = packed.trials
    children = _every_trial_recorded(packed, client, n_trials=5, pack=3, metric="val_psnr")
    # Its reconstructions in MLflow (each epoch, and the last).
    for t in trials:
        run = children[t.number]
        images = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")}
        assert "reconstruction.png" in images and "reconstruction_epoch_001.png" in images, (t.number, images)
    for state in {t.state for t in trials}:  # the records of a trial trained alone, for each end
        assert _records(packed, client, state) == _records(single, single_client, state), state
    _assert_saved_model_is_its_own_fit(tmp_path / "spec-3.yaml", tmp_path / "runs-3", _completed(trials)[0])


def _completed(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def _every_trial_recorded(study: optuna.Study, client: MlflowClient, *, n_trials: int, pack: int, metric: str
                          ) -> dict[int, Any]:
    """Assert that a packed run finished its ``n_trials``, ``pack`` at most at once, each trial with its Optuna
    reports and one MLflow child run closed with its state and holding ``metric``; return {trial number: run}."""
    trials = study.trials
    assert len(trials) == n_trials and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert 2 <= _most_at_once(trials) <= pack
    # Optuna: every trial's reports; a completed one's value is its last report.
    assert all(t.intermediate_values for t in trials)
    done = _completed(trials)
    assert done and all(t.value == t.intermediate_values[max(t.intermediate_values)] for t in done)
    # MLflow: one child run per trial, closed with its state.
    experiment = client.get_experiment_by_name(study.study_name)
    children = {int(r.data.tags[TRIAL_NUMBER_TAG]): r for r in client.search_runs([experiment.experiment_id])
                if TRIAL_NUMBER_TAG in r.data.tags}
    assert sorted(children) == [t.number for t in trials]
    for t in trials:
        assert children[t.number].data.tags[STATE_TAG] == t.state.name and metric in children[t.number].data.metrics
    return children


def _assert_saved_model_is_its_own_fit(path: Path, runs: Path, trial: optuna.trial.FrozenTrial) -> None:
    """Assert that ``trial``'s saved model loads into the model build_model makes for it, and holds the weights
    (and gave the reports) of its own fit: the trial trained alone with its params and seed."""
    spec = load_spec(path, runs_dir=str(runs))
    data = load_search_data(spec.task.dataset, val_fraction=spec.task.val_fraction, seed=spec.study.seed)
    params = {**space.base_params(spec), **trial.params}
    family, task = spec.model.family, spec.task.type
    saved = build_model(family, params, image_shape=data.image_shape, n_classes=data.n_classes)
    path = runs / MODEL_FILE
    optuna.artifacts.download_artifact(artifact_store=artifact_store(spec), file_path=str(path),
                                       artifact_id=trial.user_attrs[MODEL_ATTR])
    saved.load_state_dict(torch.load(path))
    torch.manual_seed(trial.user_attrs["seed"])
    alone = build_model(family, params, image_shape=data.image_shape, n_classes=data.n_classes)
    mean, std = input_stats(data.mean, data.std, standardise=spec.task.normalize)
    reports: dict[int, float] = {}
    fit(alone, data, make_task(task, params), TrainConfig.from_params(params, seed=trial.user_attrs["seed"],
                                                                       device="cpu"),
        lambda step, metrics: reports.update({step: metrics[spec.study.metrics[0].name]}), mean=mean, std=std)
    torch.testing.assert_close(saved.state_dict(), alone.state_dict(), rtol=1e-3, atol=1e-4)
    assert trial.intermediate_values == pytest.approx(reports, rel=1e-4)


# The CNN: conv channels and dense widths searched (padded per member), the dense layers' count a structural
# choice; tiny (2 conv blocks of 2-6 channels on digits' 8x8 images).
PACKED_CNN = _with(PACKED, study={"name": "packed-cnn", "n_trials": 6, "sampler": {"type": "tpe", "n_startup_trials": 2}},
                   task={"epochs": 2}, model={"family": "cnn"},
                   space={"conv_channels": {"type": "int", "low": 2, "high": 6}, "n_layers": {"type": "int", "low": 1,
                                                                                             "high": 2},
                          "width": {"type": "int", "low": 8, "high": 32}, "lr": SPEC["space"]["lr"]})


@pytest.mark.slow
def test_a_packed_cnn_run_gives_every_trial_its_records(tmp_path: Path, mlflow_schema: Path) -> None:
    packed, client = _run(tmp_path, mlflow_schema, "3", PACKED_CNN, "--no-finish")  # its trials' records
    trials = packed.trials
    children = _every_trial_recorded(packed, client, n_trials=6, pack=3, metric="val_accuracy")
    assert len({t.params["conv_channels"] for t in trials}) > 1  # members of other channel counts, padded
    assert all(int(children[t.number].data.params["conv_channels"]) == t.params["conv_channels"] for t in trials)
    _assert_saved_model_is_its_own_fit(tmp_path / "spec-3.yaml", tmp_path / "runs-3", _completed(trials)[0])


def test_a_pack_size_that_is_no_positive_integer_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, _with(PACKED, study={"pack": 0}))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 1 and "study.pack" in result.output and "positive integer" in result.output
    result = CliRunner().invoke(cli, ["run", str(path), "--pack", "many"])
    assert result.exit_code == 2 and "--pack" in result.output and "'many'" in result.output


@pytest.mark.parametrize("model, why", [
    ({"model": {"family": "mlp"}, "task": {"precision": "bf16"}}, "task.precision 'bf16' cannot be packed"),
    # An autoencoder space that can give the conv encoder (as inpainting.yaml's): every trial trains alone.
    ({"model": {"family": "autoencoder"}, "task": {"type": "denoise"}, "study": {"metric": "val_mse"},
      "space": {"encoder": ["dense", "conv"]}}, "encoder 'conv' cannot be packed")], ids=["bf16", "conv-encoder"])
def test_a_model_that_cannot_be_packed_trains_alone_and_says_so_once(tmp_path: Path, model: dict, why: str) -> None:
    spec = _with(PACKED, study={"n_trials": 2, **model.get("study", {})}, task={"epochs": 1, **model.get("task", {})},
                 model=model["model"], tracking={"enabled": False})
    spec["space"] = {"lr": SPEC["space"]["lr"], **model.get("space", {})}
    result = CliRunner().invoke(cli, ["run", str(_write(tmp_path, spec)), "--pack", "4", "--no-finish",
                                      "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert result.output.count("cannot be packed") == 1 and why in result.output
    study = optuna.load_study(study_name="packed", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


PACKED_LONG = _with(LONG_TRIALS, study={"n_trials": 4})


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
def test_a_killed_packed_workers_members_are_failed_and_retried(tmp_path: Path) -> None:
    path = _write(tmp_path, PACKED_LONG)
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    victim = _popen(["worker", str(path), "--quiet", "--threads", "1", "--pack", "3"], tmp_path, "w0.log",
                    env=_env(tmp_path))
    survivor = None
    try:
        doomed = _wait_for(lambda: len(found := [t for t in _mid_training(storage, "shared")
                                                 if t.user_attrs.get("worker") == f"{HOST}:{victim.pid}"]) == 3
                           and found, [victim], "the victim's pack to be mid-training")
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        survivor = _popen(["worker", str(path), "--quiet", "--threads", "1", "--pack", "2"], tmp_path, "w1.log",
                          env=_env(tmp_path))
        assert survivor.wait(timeout=240) == 0, (tmp_path / "w1.log").read_text()
    finally:
        for p in (victim, survivor):
            if p is not None and p.poll() is None:
                p.kill()
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4
    for dead in doomed:  # every member of the killed pack: failed without a reason of its own, then retried
        retry = retried(trials, dead.number, survivor.pid)  # same params, same seed
        print(f"killed trial {dead.number} retried as trial {retry.number} after "
              f"{retry.datetime_start.timestamp() - killed_at:.1f} s")
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for dead in doomed:
        assert client.get_run(dead.user_attrs["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_every_member_of_a_pack_as_interrupted(tmp_path: Path, signum: int) -> None:
    path = _write(tmp_path, _with(PACKED_LONG, study={"n_trials": 30}))
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    worker = _popen(["worker", str(path), "--threads", "1", "--pack", "3"], tmp_path, "w.log", env=_env(tmp_path))
    try:
        _wait_for(lambda: len(_mid_training(storage, "shared")) == 3, [worker], "a full pack mid-training")
        os.kill(worker.pid, signum)
        assert worker.wait(timeout=60) == 130, (tmp_path / "w.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "Traceback" not in (tmp_path / "w.log").read_text()
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if "interrupted" in t.user_attrs]
    # Each member was interrupted (or had just finished): none counts towards n_trials, none is left open.
    assert 1 <= len(interrupted) <= 3 and all(t.state == TrialState.FAIL for t in interrupted)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for t in interrupted:
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_every_running_member_keeps_its_heartbeat(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _with(SPEC, study={"heartbeat_interval": 1, "grace_period": 2})),
                     runs_dir=str(tmp_path / "runs"))
    study = open_study(spec)
    members, silent = [study.ask() for _ in range(3)], study.ask()
    with Heartbeats(study._storage) as heartbeats:
        for trial in members:
            heartbeats.add(trial._trial_id)
        time.sleep(3.5)  # past the grace period: only a trial with no beat since is stale
        assert fail_stale_trials(study, grace_period=2) == [silent.number]
        heartbeats.remove(members[0]._trial_id)  # it left its pack: no more beats for it
        time.sleep(3.5)
        assert fail_stale_trials(study, grace_period=2) == [members[0].number]
    states = {t.number: t.state for t in study.get_trials()}
    assert [states[t.number] for t in members[1:]] == [TrialState.RUNNING] * 2


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
def test_a_packed_worker_whose_members_another_declared_stale_drops_them_and_goes_on(tmp_path: Path) -> None:
    # As a worker trained alone does (tests/test_workers.py): a stalled packed worker whose members
    # another worker failed and retried says so once per member, a warning, not Optuna's failure line.
    # 150 epochs, as there: with 40, CI saw the pack finish between two polls.
    path = _write(tmp_path, _with(LONG_TRIALS, study={"n_trials": 2}, task={"epochs": 150}))
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    worker = _popen(["worker", str(path), "--threads", "1", "--pack", "2"], tmp_path, "w.log", env=_env(tmp_path))
    try:
        _wait_for(lambda: len(_mid_training(storage, "shared")) == 2, [worker], "both members mid-training")
        assert stall_past_grace(worker, path) == [0, 1]
        code = worker.wait(timeout=180)
    finally:
        if worker.poll() is None:
            worker.kill()
    output = (tmp_path / "w.log").read_text()
    assert code == 0 and "Traceback" not in output and "failed with parameters" not in output, output
    for number in (0, 1):
        assert output.count(f"trial {number} was declared stale by another worker") == 1, output
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2  # the retries ran, here
    assert sorted(t.system_attrs.get("failed_trial") for t in trials[2:]) == [0, 1]
