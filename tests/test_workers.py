"""Workers sharing a study: placement on CPUs and GPUs, joining a study, dead workers' trials
(status, clean-up, retry), Ctrl-C, and MLflow's one parent run under racing processes.

The slow tests run real `hpsearch` processes and send them real signals."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpsearch.cli import cli
from hpsearch.errors import SpecError
from hpsearch.spec import load_spec
from hpsearch.storage import claim, fail_stale_trials, read_claim, release_claim, swap_claim
from hpsearch.finish import FINISH_STALE_S, _finish_claim
from hpsearch.record import FINISH_KEY, SAMPLER_STREAM_KEY, SPEC_ATTR, TEST_ATTR, worker_id
from hpsearch.study import _surplus, load_stored_spec, open_study
from hpsearch.tracking import ROLE_TAG
from hpsearch.workers import Placement, parse_gpus, place_on_gpus, plan

from .conftest import LogLines
from .servers import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

SPEC = {
    "study": {"name": "shared", "metric": "val_accuracy", "n_trials": 4, "sampler": {"type": "random"},
              "pruner": "none", "heartbeat_interval": 1, "grace_period": 2},
    "task": {"type": "classify", "dataset": "digits", "epochs": 2, "batch_size": 64},
    "model": {"family": "mlp"},
    "space": {"width": {"type": "int", "low": 8, "high": 32}, "lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
    "tracking": {"enabled": False},
}


def _write(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _with(base: dict, **sections: dict) -> dict:
    """Return ``base`` with some keys of some sections replaced."""
    return {**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}}


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize(("workers", "cpus", "threads", "expected"), [
    (None, 8, None, [8]),  # one worker takes every core
    (2, 8, None, [4, 4]),  # threads divided among workers
    (3, 8, None, [2, 2, 2]),
    (4, 2, None, [1, 1, 1, 1]),  # never below one thread
    (2, 8, 3, [3, 3]),  # task.threads wins
])
def test_cpu_threads_are_divided_among_workers(workers: int | None, cpus: int, threads: int | None,
                                               expected: list[int]) -> None:
    placements = plan(workers, cpus=cpus, threads=threads)
    assert [p.threads for p in placements] == expected
    assert all(p.device is None and p.cuda_visible_devices is None for p in placements)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or os.cpu_count() == 1,
                    reason="needs an affinity call and a machine of two or more CPUs")
def test_threads_follow_the_cpus_this_process_may_use_not_the_machines() -> None:
    # A process limited to one CPU (taskset, a cgroup cpuset, a pytest-xdist worker) gets one
    # thread per worker, not os.cpu_count()'s: more threads than CPUs only stall each other.
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from hpsearch.workers import plan; print([p.threads for p in plan(None)], os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[1]" and int(out[1]) > 1


@pytest.mark.parametrize(("ids", "per_gpu", "visible", "expected"), [
    ([0], 1, None, ["0"]),
    ([0, 1], 2, None, ["0", "0", "1", "1"]),  # K workers per GPU, GPU-major
    ([1, 0], 1, None, ["1", "0"]),
    ([0, 1], 1, "4,6", ["4", "6"]),  # ids count within this process's CUDA_VISIBLE_DEVICES, as in PyTorch
])
def test_gpu_workers_each_see_one_gpu(ids: list[int], per_gpu: int, visible: str | None,
                                      expected: list[str]) -> None:
    placements = place_on_gpus(ids, workers=None, workers_per_gpu=per_gpu, cpus=8, visible=visible)
    assert [p.cuda_visible_devices for p in placements] == expected
    # Each worker's only visible GPU is its cuda:0; the CPU threads are shared by all of them.
    assert all(p == Placement(device="cuda:0", cuda_visible_devices=p.cuda_visible_devices,
                              threads=max(1, 8 // len(expected))) for p in placements)


def test_a_worker_count_that_contradicts_the_gpus_is_refused() -> None:
    with pytest.raises(SpecError, match=r"--workers 3 does not match --gpus \(2 GPU\(s\)\) x --workers-per-gpu 2"):
        place_on_gpus([0, 1], workers=3, workers_per_gpu=2, cpus=8)


@pytest.mark.parametrize("gpus", ["", "a", "0,,1", "0,0", "-1", "cuda:0"])
def test_malformed_gpu_lists_are_refused(gpus: str) -> None:
    with pytest.raises(SpecError, match="--gpus must list distinct CUDA device ids"):
        parse_gpus(gpus)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_gpus_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path, SPEC)
    result = CliRunner().invoke(cli, ["run", str(path), "--gpus", "0"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: --gpus 0 asks for CUDA GPUs, but PyTorch sees none")
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- joining


def test_a_worker_whose_spec_differs_from_the_study_is_refused(tmp_path: Path) -> None:
    open_study(load_spec(_write(tmp_path, SPEC)))
    changed = _with(SPEC, space={"width": {"type": "int", "low": 8, "high": 64}})
    result = CliRunner().invoke(cli, ["worker", str(_write(tmp_path, changed, "changed.yaml"))])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "different search space" in result.output and "space.width" in result.output


def test_a_joining_worker_takes_the_stored_spec_with_local_overrides(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _with(SPEC, tracking={"enabled": True})))
    open_study(spec)
    joined = load_stored_spec(spec.study.storage, "shared", tracking_uri="http://mlflow.example:5000",
                              data_dir=str(tmp_path / "data"), runs_dir=str(tmp_path / "elsewhere"))
    assert joined.fingerprint() == spec.fingerprint()  # the same search
    assert joined.tracking.uri == "http://mlflow.example:5000"
    assert joined.task.data_dir == str(tmp_path / "data")
    assert joined.runs_dir == str(tmp_path / "elsewhere")
    assert joined.study.storage == spec.study.storage


def test_a_worker_joining_a_finished_study_by_name_stops_at_once(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _with(SPEC, study={"n_trials": 1})))
    study = open_study(spec)
    study.add_trial(optuna.create_trial(value=0.9, params={"width": 8, "lr": 0.005}, distributions={
        "width": optuna.distributions.IntDistribution(8, 32),
        "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2)}))
    result = CliRunner().invoke(cli, ["worker", "--storage", spec.study.storage, "--study", "shared"])
    assert result.exit_code == 0, result.output
    assert "ran 0 trial(s)" in result.output
    assert study.user_attrs[SPEC_ATTR]["study"]["n_trials"] == 1


def test_a_worker_joining_by_name_records_to_the_tracking_uri_it_is_given(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _with(SPEC, study={"n_trials": 1}, tracking={"enabled": True})))
    study = open_study(spec)
    study.add_trial(optuna.create_trial(value=0.9, params={"width": 8, "lr": 0.005}, distributions={
        "width": optuna.distributions.IntDistribution(8, 32),
        "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2)}))
    here = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"  # this machine's name for the MLflow store
    result = CliRunner().invoke(cli, ["worker", "--storage", spec.study.storage, "--study", "shared",
                                      "--tracking-uri", here])
    assert result.exit_code == 0, result.output
    client = MlflowClient(here)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert [r.data.tags["hpsearch.role"] for r in runs] == ["study"]  # its parent run is there, not in the stored URI


# --------------------------------------------------------------------------- dead workers


def _leave_running(study: optuna.Study, *, heartbeat: bool) -> optuna.Trial:
    """Start a trial the way a worker does, then 'die': it stays RUNNING with a last heartbeat."""
    trial = study.ask()
    trial.suggest_int("width", 8, 32)
    trial.suggest_float("lr", 1e-3, 1e-2)
    trial.set_user_attr("worker", "gone-host:4242")
    if heartbeat:
        study._storage.record_heartbeat(trial._trial_id)
    return trial


def test_status_and_cleanup_find_and_retry_a_dead_workers_trials(tmp_path: Path) -> None:
    path = _write(tmp_path, SPEC)
    spec = load_spec(path)
    study = open_study(spec)
    beating = _leave_running(study, heartbeat=True)
    silent = _leave_running(study, heartbeat=False)  # died between creating the trial and its first beat

    result = CliRunner().invoke(cli, ["status", str(path)])
    assert result.exit_code == 0, result.output
    assert "0 of 4 finished" in result.output and "2 running" in result.output
    assert "1 live" in result.output and "gone-host:4242  trial 0" in result.output
    result = CliRunner().invoke(cli, ["cleanup", str(path)])
    assert "no stale trials" in result.output  # within the grace period nothing is touched

    time.sleep(spec.study.grace_period + 1.5)  # SQLite stamps heartbeats to the second
    result = CliRunner().invoke(cli, ["status", "--storage", spec.study.storage, "--study", "shared"])
    assert "0 live" in result.output and "stale    2 trial(s)" in result.output
    result = CliRunner().invoke(cli, ["cleanup", str(path)])
    assert result.exit_code == 0, result.output
    assert "failed 2 stale trial(s): 0, 1" in result.output

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    # Each retry repeats its dead trial's params, and says which trial it repeats.
    retries = {t.system_attrs["failed_trial"]: t for t in trials[2:]}
    assert retries[beating.number].params == trials[beating.number].params
    assert retries[silent.number].params == trials[silent.number].params
    result = CliRunner().invoke(cli, ["status", str(path)])
    assert "2 waiting" in result.output and "2 lost" in result.output and "stale" not in result.output


def test_a_trial_created_after_the_total_was_reached_is_surplus(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    study.add_trial(optuna.create_trial(value=1.0))  # 0: counts
    study.add_trial(optuna.create_trial(state=TrialState.FAIL))  # 1: lost to a dead worker, does not count
    study.enqueue_trial({})  # 2: waiting, counts
    assert study.ask().number == 2  # a worker pops the waiting trial
    late = study.ask()  # 3: created by another worker meanwhile
    assert not _surplus(study, late, n_trials=3)  # 0 and 2 count: room for a third
    assert _surplus(study, late, n_trials=2)  # the total was taken before trial 3 existed


# --------------------------------------------------------------------------- real processes


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HPSEARCH_RUNS_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(REPO), **extra}


def _popen(args: list[str], tmp_path: Path, log_name: str, **kwargs) -> subprocess.Popen[bytes]:
    log = (tmp_path / log_name).open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch", *args], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, **kwargs)
    proc.log_path = tmp_path / log_name  # type: ignore[attr-defined] # for _wait_for's failure message
    return proc


def _logs(procs: list[subprocess.Popen[bytes]]) -> str:
    """Return the end of each process's log (see _popen), to say what it was doing when a wait failed."""
    tails = []
    for p in procs:
        if (path := getattr(p, "log_path", None)) is not None:
            text = path.read_text(errors="replace")[-3000:]
            tails.append(f"--- {path.name} (exit code {p.poll()}) ---\n{text}")
    return "\n".join(tails)


def _wait_for(condition, procs: list[subprocess.Popen[bytes]], what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = condition()
        except Exception:  # noqa: BLE001 - the study may not exist yet
            found = None
        if found:
            return found
        if all(p.poll() is not None for p in procs):
            raise AssertionError(f"every process exited while waiting for {what}\n{_logs(procs)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{_logs(procs)}")


def _mid_training(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """Return the RUNNING trials past their first epoch."""
    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.intermediate_values]


LONG_TRIALS = _with(SPEC, study={"n_trials": 4, "grace_period": 3},
                    task={"epochs": 100},  # a second or more per trial on one thread: long enough to see one mid-trial
                    tracking={"enabled": True})


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
def test_a_worker_whose_trial_another_declared_stale_drops_it_and_goes_on(tmp_path: Path) -> None:
    # A worker stalled past the grace period (an overloaded machine, a paused VM) finds its trial
    # failed and retried by another worker: it drops its result with a warning, not a traceback.
    # 150 epochs: several seconds, so the poll below sees the trial mid-way even on a fast or loaded machine
    # (with 40, CI saw the whole study end between two polls).
    path = _write(tmp_path, _with(LONG_TRIALS, study={"n_trials": 1}, task={"epochs": 150}))
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    run = _popen(["run", str(path), "--no-finish"], tmp_path, "run.log", env=_env(tmp_path))
    try:
        _wait_for(lambda: _mid_training(storage, "shared"), [run], "trial 0 past its first epoch")
        assert stall_past_grace(run, path) == [0]
        code = run.wait(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    output = (tmp_path / "run.log").read_text()
    assert code == 0 and "Traceback" not in output, output
    assert "trial 0 was declared stale by another worker" in output, output
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # the retry ran, here
    assert trials[1].system_attrs.get("failed_trial") == 0


def stall_past_grace(proc: subprocess.Popen[bytes], path: Path) -> list[int]:
    """Pause the worker ``proc`` past LONG_TRIALS' grace period, fail its trials as another worker would (stale),
    resume it; return the numbers of the trials failed."""
    proc.send_signal(signal.SIGSTOP)
    grace = LONG_TRIALS["study"]["grace_period"]
    time.sleep(grace + 2)
    failed = fail_stale_trials(open_study(load_spec(path, runs_dir=path.parent / "runs")), grace_period=grace)
    proc.send_signal(signal.SIGCONT)
    return sorted(failed)


def retried(trials: list[optuna.trial.FrozenTrial], number: int, pid: int) -> optuna.trial.FrozenTrial:
    """Return the retry of trial ``number`` (its worker was killed), run by the worker ``pid``, checked."""
    dead = trials[number]
    assert dead.state == TrialState.FAIL and "fail_reason" not in dead.user_attrs
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == number)
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs["seed"] == dead.user_attrs["seed"]  # the same training run, repeated
    assert retry.user_attrs["worker"] == f"{HOST}:{pid}"
    return retry


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_retried_and_its_run_killed(tmp_path: Path) -> None:
    path = _write(tmp_path, LONG_TRIALS)
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    # Two workers start at once on fresh stores (the table-creation races are part of the test).
    victim, survivor = (_popen(["worker", str(path), "--quiet", "--threads", "1"], tmp_path, f"w{i}.log",
                               env=_env(tmp_path)) for i in range(2))
    try:
        doomed = _wait_for(lambda: [t for t in _mid_training(storage, "shared")
                                    if t.user_attrs.get("worker") == f"{HOST}:{victim.pid}"], [victim],
                           "the victim to be mid-trial")[0]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        assert survivor.wait(timeout=180) == 0, (tmp_path / "w1.log").read_text()
    finally:
        for p in (victim, survivor):
            if p.poll() is None:
                p.kill()

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 4 and not [t for t in trials if t.state == TrialState.RUNNING]
    retry = retried(trials, doomed.number, survivor.pid)
    # Detected within grace period + heartbeat + a loop turn of the survivor (it may be mid-trial).
    waited = retry.datetime_start.timestamp() - killed_at
    print(f"killed trial {doomed.number} retried as trial {retry.number} after {waited:.1f} s")

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = Counter((r.data.tags["hpsearch.trial"], r.info.status) for r in runs if r not in parents)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # (Once, on a loaded machine, the killed trial's run was not KILLED: the survivor's log says why.)
    assert children[(str(doomed.number), "KILLED")] == 1, (children, (tmp_path / "w1.log").read_text())
    assert all(children[(str(t.number), "FINISHED")] == 1 for t in finished)
    assert sum(children.values()) == len(finished) + 1  # exactly one run per trial


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
# SIGHUP (the terminal closed) with one worker: `run` passes any stop signal on to its workers alike,
# which SIGINT with two covers.
@pytest.mark.parametrize(("signum", "workers"), [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGHUP, 1)],
                         ids=["SIGINT-1", "SIGINT-2", "SIGHUP-1"])
def test_ctrl_c_leaves_no_trial_running(tmp_path: Path, signum: int, workers: int) -> None:
    path = _write(tmp_path, _with(LONG_TRIALS, study={"n_trials": 30}))
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    # As a terminal does: SIGINT (Ctrl-C) or SIGHUP (the terminal closed) to the command's whole process group.
    run = _popen(["run", str(path), "--workers", str(workers)], tmp_path, "run.log", env=_env(tmp_path),
                 start_new_session=True)
    try:
        running = _wait_for(lambda: len(found := _mid_training(storage, "shared")) == workers and found, [run],
                            "every worker to be mid-trial")
        os.killpg(run.pid, signum)
        interrupted_at = time.time()
        assert run.wait(timeout=60) == 130, (tmp_path / "run.log").read_text()
        print(f"{workers} worker(s) stopped {time.time() - interrupted_at:.1f} s after the signal")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = (tmp_path / "run.log").read_text()
    assert "Interrupted" in output and "Traceback" not in output
    # The workers `run` started (sessions of their own, which a terminal's signal does not reach) stopped too.
    pids = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in running}
    assert len(pids) == workers and not [pid for pid in pids if _alive(pid)]
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if "interrupted" in t.user_attrs]
    # Each worker's trial was interrupted, or had just finished (its last steps are tracking calls,
    # which a signal lets finish); no worker started another one after Ctrl-C.
    assert 1 <= len(interrupted) <= workers and all(t.state == TrialState.FAIL for t in interrupted)
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    late = [t for t in trials if t.datetime_start.timestamp() > interrupted_at]
    assert all("interrupted" in t.user_attrs for t in late)  # no trial ran after Ctrl-C
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for t in interrupted:
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "KILLED"


N_SHARED = 40


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
def test_four_workers_on_sqlite_never_hit_a_locked_database(tmp_path: Path) -> None:
    # A grace period long enough for 4 workers on a loaded 2-core machine: with SPEC's 2 s, a full
    # suite run saw heartbeats starved that long and live trials declared stale (other tests test that).
    # Trials of 12 epochs, none pruned before its 5th: the three worker processes take 15-40 s to start
    # (imports, data, MLflow) and with 2-epoch trials the first worker, in `run`'s own process, had
    # finished all 24 before the last of them asked for one (CI: all 24 by one worker; here: by three).
    # Here, with these: 14 trials done when the other three began, within 0.3 s of each other.
    spec = _with(SPEC, study={"n_trials": N_SHARED, "sampler": {"type": "tpe", "n_startup_trials": 5},
                              "pruner": {"type": "median", "n_startup_trials": 3, "n_warmup_steps": 4},
                              "grace_period": 30},
                 task={"epochs": 12}, tracking={"enabled": True})
    path = _write(tmp_path, spec)
    started = time.monotonic()
    run = _popen(["run", str(path), "--workers", "4", "--no-finish"], tmp_path, "run.log", env=_env(tmp_path))
    assert run.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()
    print(f"{N_SHARED} trials, 4 workers: {time.monotonic() - started:.1f} s")
    output = (tmp_path / "run.log").read_text()
    assert "locked" not in output.lower() and "warning" not in output.lower() and "Traceback" not in output
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    states = Counter(t.state for t in study.trials if "surplus" not in t.user_attrs)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == N_SHARED and sum(states.values()) == N_SHARED
    assert len({t.user_attrs["worker"] for t in study.trials}) == 4  # all four took part
    # Each worker samples from its own stream: seeded alike, they would propose the same params.
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id], max_results=1000)
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert Counter(r.data.tags.get("hpsearch.trial") for r in runs if "mlflow.parentRunId" in r.data.tags) == \
        {str(t.number): 1 for t in study.trials if "surplus" not in t.user_attrs}


# --------------------------------------------------------------------------- MLflow's parent run


def _elect(uri: str, experiment: str, storage: str, barrier: multiprocessing.synchronize.Barrier,
           results: multiprocessing.Queue) -> None:
    from hpsearch.record import PARENT_RUN_KEY
    from hpsearch.storage import Register
    from hpsearch.tracking import Tracker

    tracker = Tracker(uri, experiment, artifact_root=str(Path(uri.split(":///")[-1]).parent / "mlartifacts")
                      if uri.startswith("sqlite") else None)
    agree = Register(optuna.load_study(study_name="s", storage=storage), PARENT_RUN_KEY)
    barrier.wait()  # every process asks at the same moment
    results.put(tracker.study_run(experiment, params={"p": 1}, tags={}, agree=agree))


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "http"])
def test_racing_processes_agree_on_one_parent_run(tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_url")
    experiment = f"race-{store}-{os.getpid()}-{time.time_ns()}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # the study's database holds the agreement
    optuna.create_study(study_name="s", storage=storage)
    # Four fresh processes, forked from a server process that imported this module (MLflow, hpsearch)
    # once: spawned ones would import it four times over, on the one CPU this test process has.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_elect, args=(uri, experiment, storage, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    elected = [results.get(timeout=120) for _ in procs]  # before join: a process with queued data waits
    for p in procs:
        p.join(timeout=60)
    assert len(set(elected)) == 1 and elected[0] is not None
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == elected[:1]  # the losers deleted their own


# --------------------------------------------------------------------------- sampler streams and the finish


def _param_sets(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.trials if t.params]


def test_a_rerun_of_a_study_samples_new_configurations(tmp_path: Path) -> None:
    spec = _with(SPEC, study={"n_trials": 3, "sampler": {"type": "tpe", "n_startup_trials": 10}}, task={"epochs": 1})
    first = CliRunner().invoke(cli, ["run", str(_write(tmp_path, spec)), "--no-finish"])
    assert first.exit_code == 0, first.output
    # Raising n_trials resumes the study: the sampler must not start its stream over.
    more = _with(spec, study={"n_trials": 6})
    second = CliRunner().invoke(cli, ["run", str(_write(tmp_path, more)), "--no-finish"])
    assert second.exit_code == 0, second.output
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    params = _param_sets(study)
    assert len(params) == 6 and not set(params[:3]) & set(params[3:]), params
    # Each run's stream is recorded: on the study (who, with which seed) and on every trial.
    streams = {k: v for k, v in study._storage.get_study_system_attrs(study._study_id).items()
               if k.startswith(SAMPLER_STREAM_KEY)}
    assert sorted(streams) == [f"{SAMPLER_STREAM_KEY}0", f"{SAMPLER_STREAM_KEY}1"]
    assert streams[f"{SAMPLER_STREAM_KEY}0"]["seed"] == 0  # the first run samples with the study seed
    assert streams[f"{SAMPLER_STREAM_KEY}1"]["seed"] != 0
    assert [t.user_attrs["sampler_stream"] for t in study.trials] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_claim_has_one_winner_among_racing_claimants(tmp_path: Path, store: str,
                                                      request: pytest.FixtureRequest) -> None:
    import threading

    url = f"sqlite:///{tmp_path / 'o.db'}" if store == "sqlite" else request.getfixturevalue("postgres_url")
    name = f"claims-{os.getpid()}-{time.time_ns()}"
    spec = load_spec(_write(tmp_path, _with(SPEC, study={"name": name, "storage": url})))
    study = open_study(spec)
    barrier, won = threading.Barrier(6), []

    def race(i: int) -> None:
        mine = open_study(spec)  # a storage, connections and sessions of its own
        barrier.wait()
        if claim(mine, "hpsearch.test-claim", {"who": i}):
            won.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1 and read_claim(study, "hpsearch.test-claim") == {"who": won[0]}
    assert not swap_claim(study, "hpsearch.test-claim", {"who": -1}, {"who": 99})  # not the holder
    assert swap_claim(study, "hpsearch.test-claim", {"who": won[0]}, {"who": 99})
    release_claim(study, "hpsearch.test-claim", {"who": won[0]})  # no longer its value: left alone
    assert read_claim(study, "hpsearch.test-claim") == {"who": 99}
    release_claim(study, "hpsearch.test-claim", {"who": 99})
    assert read_claim(study, "hpsearch.test-claim") is None and claim(study, "hpsearch.test-claim", {"who": 7})


@pytest.mark.parametrize("holder", ["dead here", "silent elsewhere"])
def test_a_finish_claimed_by_a_process_that_died_is_taken_over(tmp_path: Path, holder: str,
                                                              messages: LogLines) -> None:
    study = open_study(load_spec(_write(tmp_path, SPEC)))
    if holder == "dead here":  # on this host: its pid is gone
        gone = subprocess.Popen(["true"])
        gone.wait()
        held = {"worker": f"{HOST}:{gone.pid}", "at": time.time(), "token": "a"}
    else:  # elsewhere: it stopped renewing its claim
        held = {"worker": "other-host:1", "at": time.time() - 2 * FINISH_STALE_S, "token": "a"}
    assert claim(study, f"{FINISH_KEY}0", held)
    said = messages
    with _finish_claim(study, 0) as done:
        assert done is None  # this process tests the model now
        assert read_claim(study, f"{FINISH_KEY}0")["worker"] == worker_id()
    assert len(said) == 1 and "takes it over" in said[0]
    assert read_claim(study, f"{FINISH_KEY}0") is None  # released


def test_a_finish_claimed_by_a_live_process_is_waited_for(tmp_path: Path, messages: LogLines) -> None:
    import threading

    study = open_study(load_spec(_write(tmp_path, SPEC)))
    assert claim(study, f"{FINISH_KEY}0", {"worker": "other-host:1", "at": time.time(), "token": "a"})
    record = {"trial": 0, "metrics": {"test_accuracy": 0.9}}
    threading.Timer(1.5, lambda: study.set_user_attr(TEST_ATTR, record)).start()  # the other process finishes
    said = messages
    with _finish_claim(study, 0) as done:
        assert done == record  # its record, not a second test
    assert said == ["waiting for other-host:1 to finish testing and registering trial 0's model."]
    assert read_claim(study, f"{FINISH_KEY}0")["worker"] == "other-host:1"  # not ours to release


def test_a_finish_recorded_just_before_this_process_claims_it_is_not_done_again(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The other process wrote its record and released its claim between this one's look and its claim."""
    import hpsearch.finish

    study = open_study(load_spec(_write(tmp_path, SPEC)))
    record = {"trial": 0, "metrics": {"test_accuracy": 0.9}}

    def claim_after_the_other_finished(*args: object) -> bool:
        study.set_user_attr(TEST_ATTR, record)  # the other process's record; its claim is gone again
        return claim(*args)

    monkeypatch.setattr(hpsearch.finish, "claim", claim_after_the_other_finished)
    with _finish_claim(study, 0) as done:
        assert done == record  # its record, not a second test (CI ran two finishes and registered version 2)
    assert read_claim(study, f"{FINISH_KEY}0") is None  # the claim this process won is released


@pytest.mark.slow
def test_two_runs_of_one_spec_started_together_share_the_study_and_finish_it_once(tmp_path: Path) -> None:
    spec = _with(SPEC, study={"n_trials": 6}, task={"epochs": 1}, tracking={"enabled": True})
    path = _write(tmp_path, spec)
    runs = [_popen(["run", str(path)], tmp_path, f"run{i}.log", env=_env(tmp_path)) for i in range(2)]
    try:
        for i, run in enumerate(runs):
            assert run.wait(timeout=300) == 0, (tmp_path / f"run{i}.log").read_text()
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    params = _param_sets(study)
    assert len(set(params)) == len(params), params  # continuous lr: a repeat means a repeated stream
    assert len({t.user_attrs["sampler_stream"] for t in study.trials}) == 2
    # One final test: one record, one registered version, one test metric on the parent run.
    record = study.user_attrs[TEST_ATTR]
    assert record["model_version"] == "1"
    outputs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert all(f"test_accuracy={record['metrics']['test_accuracy']:.5g}" in out for out in outputs), outputs
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert len(client.search_model_versions("name='shared'")) == 1
    assert len(client.get_metric_history(record["parent_run_id"], "test_accuracy")) == 1
    system = study._storage.get_study_system_attrs(study._study_id)
    assert not [k for k in system if k.startswith("hpsearch.finish:")]  # the claim was released
    # One refit (study.refit is on by default): one run of it, whose model is the one registered,
    # and both outputs report it.
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id], max_results=100)
    refits = [r for r in runs if r.data.tags.get(ROLE_TAG) == "refit"]
    versions = client.search_model_versions("name='shared'")
    assert len(refits) == 1 and versions[0].run_id == refits[0].info.run_id, (refits, versions)
    assert all("refit on" in out for out in outputs), outputs


@pytest.mark.slow
def test_diverged_trials_are_one_line_each(tmp_path: Path) -> None:
    spec = _with(SPEC, study={"n_trials": 3},
                 space={"n_layers": 3, "width": 256, "optimizer": "sgd", "momentum": 0.99,
                        "lr": {"type": "float", "low": 9.0, "high": 10.0}})  # blows up within an epoch
    run = _popen(["run", str(_write(tmp_path, spec)), "--no-finish"], tmp_path, "run.log", env=_env(tmp_path))
    assert run.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    output = (tmp_path / "run.log").read_text()
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    diverged = [t.number for t in study.trials if "diverged" in t.user_attrs.get("fail_reason", "")]
    assert diverged, output
    assert "Traceback" not in output
    for number in diverged:
        lines = [line for line in output.splitlines() if f"Trial {number} failed" in line]
        assert len(lines) == 1 and "training diverged" in lines[0], lines


@pytest.mark.slow
def test_trials_that_ran_while_mlflow_was_down_get_their_runs_once_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    server = tmp_path / "mlflow"
    url = f"http://127.0.0.1:{port}"
    # 3 trials: the one in flight as the server goes, one begun without it, and one more.
    path = _write(tmp_path, _with(LONG_TRIALS, study={"n_trials": 3}, task={"epochs": 60}, tracking={"uri": url}))
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"

    def finished_untracked() -> list[int]:
        study = optuna.load_study(study_name="shared", storage=storage)
        return [t.number for t in study.get_trials(deepcopy=False) if "untracked" in t.user_attrs]

    run = None
    try:
        with mlflow_server(server, port=port):
            run = _popen(["run", str(path), "--no-finish"], tmp_path, "run.log", env=_env(tmp_path))
            inflight = _wait_for(lambda: [t for t in _mid_training(storage, "shared")
                                          if "mlflow_run_id" in t.user_attrs], [run], "a tracked trial mid-training")[0]
        # 1. The server is gone: the in-flight trial ends without it, the next ones start without it.
        _wait_for(lambda: len(finished_untracked()) >= 2, [run], "two trials to end while MLflow is down")
        status = CliRunner().invoke(cli, ["status", str(path)])
        line = next((x for x in status.output.splitlines() if x.startswith("untracked")), "")
        assert str(inflight.number) in line and "not in MLflow" in line, status.output
        # 2. It is back: the worker records what it missed, or the final `run` does.
        with mlflow_server(server, port=port):
            assert run.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
            final = CliRunner().invoke(cli, ["run", str(path), "--no-finish"])  # finishing records them too
            assert final.exit_code == 0, final.output
            client = MlflowClient(url)
            runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id], max_results=100)
    finally:
        if run is not None and run.poll() is None:
            run.kill()
    study = optuna.load_study(study_name="shared", storage=storage)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the in-flight run was closed
    assert Counter(r.data.tags["hpsearch.trial"] for r in children) == {str(t.number): 1 for t in study.trials}
    late = {r.data.tags["hpsearch.trial"]: r for r in children if r.data.tags.get("hpsearch.tracked_late")}
    assert str(inflight.number) in late and len(late) >= 2
    for number, r in late.items():
        trial = study.trials[int(number)]
        assert r.info.status == "FINISHED" and r.data.tags["hpsearch.state"] == trial.state.name
        assert r.data.metrics["val_accuracy"] == pytest.approx(trial.user_attrs["val_accuracy"])
    status = CliRunner().invoke(cli, ["status", str(path)])
    assert "untracked" not in status.output, status.output


@pytest.mark.slow
@pytest.mark.usefixtures("made_mlflow_store")
@pytest.mark.parametrize("moment", ["testing", "recording"])
def test_ctrl_c_during_the_final_test_leaves_no_record_or_a_whole_one(tmp_path: Path, moment: str) -> None:
    path = _write(tmp_path, _with(SPEC, study={"n_trials": 2}, task={"epochs": 1}, tracking={"enabled": True}))
    first = CliRunner().invoke(cli, ["run", str(path), "--no-finish"])
    assert first.exit_code == 0, first.output
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    study = optuna.load_study(study_name="shared", storage=storage)
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")

    def claimed() -> bool:  # the finish has begun: the model is being tested
        s = optuna.load_study(study_name="shared", storage=storage)
        return any(k.startswith("hpsearch.finish:") for k in s._storage.get_study_system_attrs(s._study_id))

    def recording() -> bool:  # the test metrics are on the parent run: the model is being logged and registered
        return "test_accuracy" in client.get_run(parent).data.metrics

    run = _popen(["run", str(path)], tmp_path, "finish.log", env=_env(tmp_path))
    try:
        _wait_for(claimed if moment == "testing" else recording, [run], f"the final test's {moment}", timeout=180)
        run.send_signal(signal.SIGINT)
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    output = (tmp_path / "finish.log").read_text()
    assert "Traceback" not in output, output
    study = optuna.load_study(study_name="shared", storage=storage)
    record = study.user_attrs.get(TEST_ATTR)
    versions = client.search_model_versions("name='shared'")
    tested = client.get_metric_history(parent, "test_accuracy")
    if record is None:  # stopped while testing: nothing of it was kept
        assert code == 130 and "nothing of it was kept" in output, output
        assert not versions and not tested
    else:  # stopped while recording (or a moment later): the record was completed first
        assert code == 0 and record["model_version"] == "1" and len(versions) == 1 and len(tested) == 1, output
    if moment == "recording":
        assert record is not None and "finishing the test record first" in output, output
    assert not [k for k in study._storage.get_study_system_attrs(study._study_id) if k.startswith("hpsearch.finish:")]
    # A rerun tests once in all: a first time, or not again.
    again = CliRunner().invoke(cli, ["run", str(path)])
    assert again.exit_code == 0, again.output
    assert len(client.search_model_versions("name='shared'")) == 1
    assert len(client.get_metric_history(parent, "test_accuracy")) == 1
    assert optuna.load_study(study_name="shared", storage=storage).user_attrs[TEST_ATTR]["model_version"] == "1"
