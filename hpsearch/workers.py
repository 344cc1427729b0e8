"""Local worker processes sharing one study: placement on CPUs and GPUs, start, wait.

Each worker is a separate `hpsearch worker` process, the same command that joins a study from
another machine, so a worker that dies takes nothing with it but its own running trial.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import optuna

from hpsearch.errors import SpecError
from hpsearch.progress import Progress
from hpsearch.spec import Spec
from hpsearch.study import open_study, setup_worker, work


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: its device, visible GPU and CPU threads."""

    device: str | None  # None: the spec's task.device
    cuda_visible_devices: str | None
    threads: int


def plan(workers: int, *, gpus: str | None = None, workers_per_gpu: int = 1, cpus: int | None = None,
         threads: int | None = None) -> list[Placement]:
    """Return one placement per worker: GPUs round-robin, CPU threads divided among workers."""
    cpus = cpus or os.cpu_count() or 1
    if gpus is None:
        per = threads or max(1, cpus // workers)
        return [Placement(device=None, cuda_visible_devices=None, threads=per) for _ in range(workers)]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise SpecError(f"--gpus must be a comma-separated list of CUDA device ids such as 0,1, but got {gpus!r}.")
    import torch

    if not torch.cuda.is_available():
        raise SpecError(f"--gpus {gpus} asks for CUDA devices, but this machine has no usable CUDA "
                        "(torch.cuda.is_available() is False). Leave out --gpus to run on the CPU.")
    count = torch.cuda.device_count()
    missing = [g for g in ids if int(g) >= count]
    if missing:
        raise SpecError(f"--gpus names CUDA device(s) {missing}, but this machine has {count} "
                        f"(ids 0..{count - 1}).")
    total = max(workers, len(ids) * workers_per_gpu)
    per = threads or max(1, cpus // total)
    return [Placement(device="cuda:0", cuda_visible_devices=ids[i % len(ids)], threads=per)
            for i in range(total)]


def run_study(spec: Spec, *, workers: int = 1, gpus: str | None = None, workers_per_gpu: int = 1,
              device: str | None = None, allow_space_change: bool = False) -> optuna.Study:
    """Create or resume the spec's study and run workers until its total is reached; return the study."""
    placements = plan(workers, gpus=gpus, workers_per_gpu=workers_per_gpu, threads=spec.task.threads)
    study = open_study(spec, allow_space_change=allow_space_change)
    if len(placements) == 1 and gpus is None:
        setup = setup_worker(spec, study, device=device, threads=placements[0].threads)
        with Progress(spec, study):
            work(spec, study, setup, timeout=spec.study.timeout)
        return study
    # Prepare once what every worker would otherwise race to do (parent run, reference model).
    setup_worker(spec, study, device="cpu", threads=placements[0].threads)
    procs = [_start_worker(spec, p, device) for p in placements]
    with Progress(spec, study):
        _wait(procs)
    return study


def _start_worker(spec: Spec, placement: Placement, device: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if placement.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
    # URLs travel in the environment, not the command line: `ps` would show a password.
    env["HPSEARCH_STORAGE"] = spec.study.storage
    env["HPSEARCH_TRACKING_URI"] = spec.tracking.uri
    cmd = [sys.executable, "-m", "hpsearch", "worker", spec.path, "--runs-dir", spec.runs_dir,
           "--threads", str(placement.threads), "--quiet"]
    if spec.task.data_dir:
        cmd += ["--data-dir", spec.task.data_dir]
    if placement.device or device:
        cmd += ["--device", placement.device or device]  # type: ignore[list-item]
    return subprocess.Popen(cmd, env=env)


def _wait(procs: list[subprocess.Popen[bytes]]) -> None:
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        # The workers got the same Ctrl-C: give them time to close their trials cleanly.
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    failed = [p for p in procs if p.returncode not in (0, None)]
    for p in failed:
        print(f"warning: worker pid {p.pid} exited with code {p.returncode}; the other workers went on.",
              file=sys.stderr)
