"""Local worker processes sharing one study: placement on CPUs and GPUs, start, stop, and the
health of a shared study (live workers, stale trials, clean-up).

Besides the first CPU worker, which runs in the `hpsearch run` process, each worker is a separate
`hpsearch worker` process, the same command that joins a study from another machine, so a worker
that dies takes nothing with it but its own running trial, and that trial is failed and retried
once its heartbeat is older than the study's grace period.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from hpsearch import stopping
from hpsearch.checks import check_memory, warn_about_splits
from hpsearch.errors import HPSearchError, SpecError
from hpsearch.log import level_flag
from hpsearch.progress import Progress
from hpsearch.spec import Spec, mask_password
from hpsearch.storage import fail_stale_trials, make_storage, running_trials
from hpsearch.record import (DEVICE_ATTR, INTERRUPTED_ATTR, RUN_ID_ATTR, STATE_TAG, STOPPED_ATTR, WORKER_ATTR, Counts,
                             FinalTest, best_trial, count_trials, open_existing, untracked, untracked_note, worker_id)
from hpsearch.signals import interrupt, on_stop_signals
from hpsearch.study import open_study, setup_worker, stale_trial_callback, work
from hpsearch.worker_setup import available_cpus
from hpsearch.tracking import Tracker

STOP_TIMEOUT_S = 30.0  # after Ctrl-C, how long workers get to close their trials before SIGKILL
STATUS_OUTAGE_S = 10.0  # `status` and `cleanup` report an unreachable database quickly

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: its device, visible GPU and CPU threads."""

    device: str | None  # None: the spec's task.device
    cuda_visible_devices: str | None  # the one GPU this worker sees (as its cuda:0); None: unchanged
    threads: int


def plan(workers: int | None = None, *, gpus: str | None = None, workers_per_gpu: int = 1,
         cpus: int | None = None, threads: int | None = None) -> list[Placement]:
    """Return one placement per worker: CPU threads divided among workers, or K workers per GPU.

    Raises SpecError for GPU ids that are malformed or not on this machine, or without CUDA.
    """
    cpus = cpus or available_cpus()
    if workers is not None and workers < 1:
        raise SpecError(f"--workers must be at least 1, but got {workers}.")
    if workers_per_gpu < 1:
        raise SpecError(f"--workers-per-gpu must be at least 1, but got {workers_per_gpu}.")
    if gpus is None:
        n = workers or 1
        return [Placement(device=None, cuda_visible_devices=None, threads=threads or max(1, cpus // n))
                for _ in range(n)]
    ids = parse_gpus(gpus)
    count = cuda_device_count()
    if count == 0:
        raise SpecError(f"--gpus {gpus} asks for CUDA GPUs, but PyTorch sees none on this machine "
                        "(torch.cuda.is_available() is False). Leave out --gpus to run on the CPU.")
    missing = [g for g in ids if g >= count]
    if missing:
        raise SpecError(f"--gpus names CUDA device(s) {missing}, but this machine has {count} "
                        f"(ids 0 to {count - 1}).")
    return place_on_gpus(ids, workers=workers, workers_per_gpu=workers_per_gpu, cpus=cpus, threads=threads,
                         visible=os.environ.get("CUDA_VISIBLE_DEVICES"))


def parse_gpus(gpus: str) -> list[int]:
    """Return the GPU ids in ``gpus`` ("0,1"), or raise SpecError."""
    parts = [g.strip() for g in gpus.split(",")]
    if not parts or not all(g.isdigit() for g in parts) or len(set(parts)) != len(parts):
        raise SpecError(f"--gpus must list distinct CUDA device ids separated by commas, such as 0,1, "
                        f"but got {gpus!r}.")
    return [int(g) for g in parts]


def place_on_gpus(ids: list[int], *, workers: int | None, workers_per_gpu: int, cpus: int,
                  threads: int | None = None, visible: str | None = None) -> list[Placement]:
    """Return ``workers_per_gpu`` workers on each GPU in ``ids`` (GPU-major), each seeing only its GPU.

    ``visible`` is this process's CUDA_VISIBLE_DEVICES: ids count within it, as in PyTorch.
    """
    total = len(ids) * workers_per_gpu
    if workers is not None and workers != total:
        raise SpecError(f"--workers {workers} does not match --gpus ({len(ids)} GPU(s)) x --workers-per-gpu "
                        f"{workers_per_gpu} = {total} workers; give --workers-per-gpu alone with --gpus.")
    physical = [v.strip() for v in visible.split(",")] if visible else None
    per = threads or max(1, cpus // total)
    return [Placement(device="cuda:0", threads=per,
                      cuda_visible_devices=physical[g] if physical else str(g))
            for g in ids for _ in range(workers_per_gpu)]


def cuda_device_count() -> int:
    """Return how many CUDA GPUs PyTorch can use here (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------- running


def run_study(spec: Spec, *, workers: int | None = None, gpus: str | None = None, workers_per_gpu: int = 1,
              device: str | None = None, allow_space_change: bool = False) -> optuna.Study:
    """Create or resume the spec's study and run workers until its total is reached; return the study.

    The first CPU worker runs in this process, the others as `hpsearch worker` processes; on GPUs
    every worker is a process of its own, seeing only its GPU. Ctrl-C stops every worker with its
    running trial closed as interrupted, then raises KeyboardInterrupt.
    """
    placements = plan(workers, gpus=gpus, workers_per_gpu=workers_per_gpu, threads=spec.task.threads)
    # A bad spec never starts a study: its largest model must fit every device it will train on.
    for dev in [f"cuda:{g}" for g in parse_gpus(gpus)] if gpus else [device]:
        check_memory(spec, dev)
    warn_about_splits(spec)
    study = open_study(spec, allow_space_change=allow_space_change)
    # This process sets up first what every worker would otherwise race to do (the study's data
    # provenance, its MLflow parent run, inpainting's reference classifier) and, on CPUs, goes on
    # to train as the first worker while the others start.
    local = gpus is None
    setup = setup_worker(spec, study, device=device if local else "cpu", threads=placements[0].threads)
    procs = [_start_worker(spec, p, device) for p in (placements[1:] if local else placements)]
    with Progress(spec, study):
        try:
            if local:
                work(spec, study, setup, timeout=spec.study.timeout)
            with on_stop_signals(interrupt):  # SIGTERM and SIGHUP too, as in the local worker
                _wait(procs)
        except BaseException:  # Ctrl-C, or this worker failed: the others stop too, their trials closed
            _stop(spec, study, procs)
            raise
    _report_exits(spec, study, procs)
    return study


def _start_worker(spec: Spec, placement: Placement, device: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if placement.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # numpy/BLAS share the worker's cores too
        env[var] = str(placement.threads)
    # URLs travel in the environment, not the command line: `ps` would show a password.
    env["HPSEARCH_STORAGE"] = spec.study.storage
    env["HPSEARCH_TRACKING_URI"] = spec.tracking.uri
    # The worker prints what this process would (see hpsearch.log): -q, -v or neither.
    cmd = [sys.executable, "-m", "hpsearch", *level_flag(), "worker", spec.path, "--runs-dir", spec.runs_dir,
           "--threads", str(placement.threads), "--quiet"]
    if spec.task.data_dir:
        cmd += ["--data-dir", spec.task.data_dir]
    if spec.study.pack is not None:  # as --pack gave it to this process
        cmd += ["--pack", str(spec.study.pack)]
    if placement.device or device:
        cmd += ["--device", placement.device or device]  # type: ignore[list-item]
    # A session of its own: the terminal's Ctrl-C reaches only this process, which passes it on
    # once (a second signal during a worker's clean-up would cut it short).
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _wait(procs: list[subprocess.Popen[bytes]]) -> None:
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)


def _stop(spec: Spec, study: optuna.Study, procs: list[subprocess.Popen[bytes]]) -> None:
    """Pass Ctrl-C on to the workers, give them time to close their trials, kill the stragglers."""
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C must not skip the clean-up below
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
    killed = [p for p in procs if p.poll() is None]
    for p in killed:
        p.kill()
        p.wait()
    if killed:
        _close_trials_of(spec, study, {p.pid for p in killed})


def _close_trials_of(spec: Spec, study: optuna.Study, pids: set[int]) -> None:
    """Fail the RUNNING trials of killed local workers (and KILL their MLflow runs)."""
    host = worker_id().rsplit(":", 1)[0]
    names = {f"{host}:{pid}" for pid in pids}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(WORKER_ATTR) not in names:
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, "worker killed after Ctrl-C")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        run_id = t.user_attrs.get(RUN_ID_ATTR)
        if run_id and spec.tracking.enabled:
            Tracker(spec.tracking.uri, spec.tracking.experiment, artifact_root=spec.tracking.artifact_root).end_run(run_id, "KILLED", tags={STATE_TAG: "FAIL"})
        logger.info(f"trial {t.number}: its worker did not stop within {STOP_TIMEOUT_S:g} s and was killed; "
                    "the trial is closed as interrupted.")


def _report_exits(spec: Spec, study: optuna.Study, procs: list[subprocess.Popen[bytes]]) -> None:
    failed = [p for p in procs if p.returncode != 0]
    if failed and len(failed) == len(procs) and count_trials(study).finished < spec.study.n_trials:
        codes = ", ".join(str(p.returncode) for p in failed)
        raise HPSearchError(f"all {len(procs)} workers of study {spec.study.name!r} failed (exit codes {codes}); "
                            "their messages are above. Finished trials are kept: fix the cause and run again.")
    for p in failed:
        logger.warning(f"worker pid {p.pid} exited with code {p.returncode}; the other workers went on.")


# --------------------------------------------------------------------------- health


@dataclass(frozen=True)
class TrialLife:
    """A RUNNING trial as `status` shows it."""

    number: int
    worker: str  # host:pid, "?" before the worker wrote it
    device: str
    running_s: float
    silent_s: float  # seconds since its last heartbeat


@dataclass(frozen=True)
class StudyStatus:
    """A shared study at a glance: counts, best value, live workers, trials whose worker died."""

    name: str
    storage: str  # masked
    n_trials: int
    counts: Counts
    best: str  # e.g. "val_accuracy 0.9712 (trial 7)", "-" before any complete trial
    live: tuple[TrialLife, ...]
    stale: tuple[TrialLife, ...]
    grace_period: int
    untracked: tuple[int, ...] = ()  # finished trials missing from MLflow (see record.untracked)
    stop: tuple[str, ...] = ()  # how close each stop rule is, or which one ended the study
    unrecorded: FinalTest | None = None  # the final test, made while MLflow was unreachable, not recorded there yet

    @property
    def workers(self) -> list[str]:
        """Return the live workers, each once."""
        return sorted({t.worker for t in self.live})

    def describe(self) -> str:
        """Return the status as the lines `hpsearch status` prints."""
        c = self.counts
        lines = [f"study {self.name} in {self.storage}",
                 f"trials   {c.finished} of {self.n_trials} finished: {c.complete} complete, {c.pruned} pruned, "
                 f"{c.failed} failed; {c.running} running, {c.waiting} waiting"
                 + (f"; {c.lost} lost (dead worker, Ctrl-C or surplus; not counted)" if c.lost else ""),
                 f"best     {self.best}",
                 f"workers  {len(self.workers)} live (a heartbeat within {self.grace_period} s)"]
        lines += [f"{'stop' if i == 0 else '':<8} {line}" for i, line in enumerate(self.stop)]
        for t in self.live:
            lines.append(f"  {t.worker}  trial {t.number} on {t.device}, running {_clock(t.running_s)}, "
                         f"last heartbeat {t.silent_s:.0f} s ago")
        if self.stale:
            lines.append(f"stale    {len(self.stale)} trial(s) still RUNNING whose worker stopped sending "
                         "heartbeats; `hpsearch cleanup` fails and retries them (workers do it too)")
            for t in self.stale:
                lines.append(f"  trial {t.number} (worker {t.worker}): silent for {_clock(t.silent_s)}")
        if self.untracked:
            lines.append(f"untracked {len(self.untracked)} trial(s) not in MLflow: {untracked_note(self.untracked)}")
        if t := self.unrecorded:
            lines.append(f"untracked the final test of trial {t.trial} and its model (kept in the study's artifacts) "
                         "are not in MLflow, which was unreachable; `hpsearch run` records them once it is back")
        return "\n".join(lines)


def load_study(spec: Spec) -> optuna.Study:
    """Return the spec's existing study (never created here), on a storage that retries dead workers' trials."""
    return open_existing(spec.study.storage, spec.study.name, spec_path=spec.path, storage=lambda: make_storage(
        spec.study, stale_trial_callback=stale_trial_callback(spec), outage_s=STATUS_OUTAGE_S))


def study_status(spec: Spec, study: optuna.Study) -> StudyStatus:
    """Return the study's trials per state, best value, live workers and stale trials."""
    trials = study.get_trials(deepcopy=False)
    by_id = {t._trial_id: t for t in trials}
    live, stale = [], []
    now = datetime.datetime.now()
    for r in running_trials(study):
        t = by_id.get(r.trial_id) or study._storage.get_trial(r.trial_id)
        life = TrialLife(number=r.number, worker=str(t.user_attrs.get(WORKER_ATTR, "?")),
                         device=str(t.user_attrs.get(DEVICE_ATTR, "?")), silent_s=r.silent_s,
                         running_s=(now - t.datetime_start).total_seconds() if t.datetime_start else 0.0)
        (stale if r.silent_s > spec.study.grace_period else live).append(life)
    best = best_trial(spec, trials)
    metric = spec.study.metrics[0].name
    best_text = "-" if best is None else f"{metric} {best.values[0]:.6g} (trial {best.number})"
    stop = stopping.closeness(spec.study.stop, spec.study.metrics[0], trials)
    if stopped := study.user_attrs.get(STOPPED_ATTR):
        stop.insert(0, f"stopped early by {stopped['rule']} at {stopped['at']}: {stopped['reason']}")
    return StudyStatus(name=spec.study.name, storage=mask_password(spec.study.storage), n_trials=spec.study.n_trials,
                       counts=count_trials(study), best=best_text, live=tuple(live), stale=tuple(stale),
                       grace_period=spec.study.grace_period, stop=tuple(stop),
                       untracked=tuple(untracked(trials, study._storage.get_study_system_attrs(study._study_id))),
                       unrecorded=test if (test := FinalTest.from_study(study)) and test.unrecorded else None)


def cleanup(spec: Spec, study: optuna.Study) -> list[int]:
    """Fail the trials left RUNNING by dead workers (silent past the grace period), retry them with
    the same params (up to study.max_retries) and mark their MLflow runs KILLED; return their numbers."""
    return fail_stale_trials(study, grace_period=spec.study.grace_period)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
