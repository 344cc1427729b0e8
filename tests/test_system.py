"""The whole stack on one machine: PostgreSQL holds the study, an `mlflow server` records it,
optuna-dashboard shows it, and three `hpsearch worker` processes share it while one of them is
killed with SIGKILL in the middle of a trial.

What must hold afterwards: the study reached its total; the killed trial was failed and retried
with the same params by a surviving worker; MLflow has one parent run and exactly one child run
per trial (the killed one KILLED); the dashboard's API lists the study and its trials; and the
database password, given only through the environment, shows up nowhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from .servers import dashboard_server

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 4  # complete ones: the 3 workers start one each (one is killed, failed and retried), then one more
N_WORKERS = 3


def _spec(name: str, tracking_uri: str) -> dict:
    return {
        "study": {
            "name": name, "metric": "val_accuracy", "n_trials": N_TRIALS, "seed": 7,
            "storage": "${HPSEARCH_SYSTEM_STORAGE}",  # the password comes from the environment only
            "sampler": {"type": "random"}, "pruner": "none",
            "heartbeat_interval": 1, "grace_period": 5,  # a dead worker's trial is retried within seconds
        },
        "task": {"type": "classify", "dataset": "digits", "epochs": 100, "batch_size": 64},  # a few s a trial
        "model": {"family": "mlp"},
        "space": {"width": {"type": "int", "low": 8, "high": 48}, "lr": {"type": "float", "low": 1e-3,
                                                                          "high": 2e-2, "log": True}},
        "tracking": {"uri": tracking_uri, "log_images_every": 100},
    }


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _running_mid_training(study: optuna.Study, worker: str) -> optuna.trial.FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") == worker and t.intermediate_values:
            return t
    return None


@pytest.mark.slow
def test_workers_share_a_postgres_study_and_survive_a_killed_worker(
        postgres_url: str, mlflow_url: str, tmp_path: Path) -> None:
    name = f"system-{uuid.uuid4().hex[:8]}"
    password = postgres_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert len(password) >= 8  # the check below means something only for a real password
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(name, mlflow_url)))
    assert password not in spec_path.read_text()
    env = {**os.environ, "HPSEARCH_SYSTEM_STORAGE": postgres_url, "HPSEARCH_RUNS_DIR": str(tmp_path / "runs"),
           "HPSEARCH_ARTIFACTS": str(tmp_path / "artifacts"), "PYTHONPATH": str(REPO)}
    (tmp_path / "artifacts").mkdir()

    # 1. Three workers start at the same moment on a study that does not exist yet.
    logs = [tmp_path / f"worker-{i}.log" for i in range(N_WORKERS)]
    workers = [subprocess.Popen([sys.executable, "-m", "hpsearch", "worker", str(spec_path), "--threads", "1"],
                                cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
               for log in logs]
    victim = workers[0]
    try:
        # 2. SIGKILL one worker in the middle of a trial (past its first epoch).
        deadline = time.monotonic() + 120
        doomed = None
        while doomed is None:
            assert time.monotonic() < deadline, "no worker got into a trial: " + logs[0].read_text()[-2000:]
            assert victim.poll() is None, logs[0].read_text()
            try:
                study = optuna.load_study(study_name=name, storage=postgres_url)
                doomed = _running_mid_training(study, f"{socket.gethostname()}:{victim.pid}")
            except KeyError:
                pass  # not created yet
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        for worker, log in zip(workers[1:], logs[1:]):
            assert worker.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()

    # 3. The study reached its total; the killed trial was retried with the same params.
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS and not [t for t in trials if t.state == TrialState.RUNNING]
    dead = trials[doomed.number]
    assert dead.state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == doomed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs["worker"] != dead.user_attrs["worker"]  # a surviving worker took it
    # Two survivors that start a trial at once, one short of the total (or both going for the retry),
    # both create one: the later is past the total, marked surplus and failed at once (no run, no
    # params). Any other fail is a bug.
    surplus = [t for t in trials if t.state == TrialState.FAIL and t.number != dead.number]
    assert all("surplus" in t.user_attrs and not t.params for t in surplus), [t.user_attrs for t in surplus]
    print(f"\nkilled trial {doomed.number} retried as trial {retry.number}, "
          f"{retry.datetime_start.timestamp() - killed_at:.1f} s after the SIGKILL")

    # 4. MLflow: one parent run; one child run per trial, the killed trial's KILLED.
    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    by_trial = Counter(r.data.tags["hpsearch.trial"] for r in children)
    assert by_trial == Counter(str(t.number) for t in complete + [dead])  # exactly one each
    status = {r.data.tags["hpsearch.trial"]: r.info.status for r in children}
    assert status[str(dead.number)] == "KILLED"
    assert all(status[str(t.number)] == "FINISHED" for t in complete)
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == \
        {r.info.run_id for r in children if r.info.status == "FINISHED"}

    # 5. optuna-dashboard, on the same database, lists the study with every trial.
    with dashboard_server(postgres_url, tmp_path / "artifacts", log_dir=tmp_path) as dashboard:
        summaries = _get_json(f"{dashboard}/api/studies")["study_summaries"]
        summary = next(s for s in summaries if s["study_name"] == name)
        detail = _get_json(f"{dashboard}/api/studies/{summary['study_id']}")
    assert len(detail["trials"]) == len(trials)
    assert Counter(t["state"] for t in detail["trials"]) == Counter({"Complete": N_TRIALS, "Fail": 1 + len(surplus)})

    # 6. The password is nowhere: not in any output, MLflow param or tag, Optuna attribute or API answer.
    texts = {log.name: log.read_text() for log in logs}
    texts["dashboard api"] = json.dumps(detail)
    for run in runs:
        texts[f"run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags])
    system_attrs = study._storage.get_study_system_attrs(study._study_id)  # no public getter in Optuna 5
    texts["study attrs"] = json.dumps([study.user_attrs, system_attrs], default=str)
    for t in trials:
        texts[f"trial {t.number} attrs"] = json.dumps([t.user_attrs, t.system_attrs], default=str)
    leaks = [where for where, text in texts.items() if password in text]
    assert not leaks, f"the database password appears in: {leaks}"
    assert "hpsearch:***@" in json.dumps(study.user_attrs["hpsearch.spec"])  # stored, masked
