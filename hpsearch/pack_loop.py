"""The worker loop of trial packs: trials of a study asked from Optuna, trained K at a time, told one by one.

Each member of a pack is a trial with exactly the records a trial trained alone has (the
objective's :func:`~hpsearch.objective.begin_trial`, its reporter and its end), asked and told
here rather than through ``Study.optimize``. A slot freed by a member that completes, is pruned or
fails is refilled at once with a newly asked trial at epoch 0 (continuous batching).

How the sampler meets the structure key (see docs/workers.md, "Trial packs"): members of a pack
share the params of :class:`~hpsearch.pack.StructureKey`. A trial asked freely starts a pack of
its own structure; its pack's next ``K - 1`` refills are asked with those structural params fixed
before anything is suggested (as ``enqueue_trial`` fixes them, in the trial's system attr
``fixed_params``), so the sampler proposes everything else knowing them; then the next trial is
asked freely again, and a new structure starts a pack beside the old one, which drains as its
members end. Waiting trials (enqueued ones, retries of a dead worker's) are taken first, as they
are, into the pack of their own structure. No trial's params change after it was asked.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import fields
from functools import partial
from typing import Any

import optuna
import torch
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.study._optimize import _log_failed_trial
from optuna.trial import TrialState

from hpsearch.checks import available_memory, largest_model
from hpsearch.knobs import KNOBS
from hpsearch.objective import TakenOver, TrialContext, TrialFailed, _Running, begin_trial, guarded, say_taken_over
from hpsearch.pack import Pack, StructureKey, pack_refusal, structure_key
from hpsearch.signals import StopSignals
from hpsearch.spec import Spec

logger = logging.getLogger(__name__)
_logger = logging.getLogger("optuna.study._optimize")  # where Optuna logs a finished trial: the same filters apply
STRUCTURE_PARAMS = tuple(f.name for f in fields(StructureKey))  # param names, as the key names them
AUTO_MAX = 64  # auto never packs more: past this the launch-bound speed-up flattens (docs/benchmarks.md)
AUTO_MEMORY_SHARE = 0.5  # of the free device memory, the rest left to the evaluation and the allocator


def pack_capacity(spec: Spec, device: torch.device) -> int:
    """Return how many trials this worker trains together (1: one at a time, as without packs), saying why once."""
    asked = spec.study.pack
    if asked == 1:
        return 1
    refusal = pack_refusal(spec.model.family, spec.task.type, precision=spec.task.precision,
                           encoders=_encoders(spec))
    if refusal is not None:
        if asked is not None or device.type == "cuda":  # where a pack was asked for, or auto would choose one
            logger.warning(f"study.pack: {refusal}")
        return 1
    if asked is not None:
        return asked
    if device.type != "cuda":
        # Debug, not info: the default on the CPU changes nothing, and the quickstart's output stays as it was.
        logger.debug("study.pack auto: 1 trial at a time on the CPU (a pack is not faster there); --pack K packs K.")
        return 1
    size, free = largest_model(spec), available_memory(device)
    k = max(1, min(AUTO_MAX, int(AUTO_MEMORY_SHARE * (free or 0) // size.bytes)))
    logger.info(f"study.pack auto: {k} trials trained together on {device} (the largest model needs about "
                f"{size.bytes / 2**20:.0f} MB, {(free or 0) / 2**30:.1f} GB are free).")
    return k


def _encoders(spec: Spec) -> tuple[str, ...]:
    """Return the autoencoder encoders the study's trials can have (searched, fixed, or the knob's default)."""
    param = next((p for p in spec.space if p.name == "encoder"), None)
    if param is None:
        return (KNOBS["encoder"].default,)
    return tuple(param.choices) if param.type == "categorical" else (param.value,)


class Heartbeats:
    """One thread that keeps every running member's trial alive in the storage, as Optuna's heartbeat thread
    does for the one trial of ``Study.optimize`` (which packs do not run under)."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.heartbeat = storage if is_heartbeat_enabled(storage) else None
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="hpsearch-pack-heartbeats")

    def add(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.add(trial_id)
        if self.heartbeat is not None:
            self.heartbeat.record_heartbeat(trial_id)  # at once, as Optuna's thread does when it starts

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def __enter__(self) -> Heartbeats:
        if self.heartbeat is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _beat(self) -> None:
        assert isinstance(self.heartbeat, BaseHeartbeat)
        interval = self.heartbeat.get_heartbeat_interval() or 60
        while not self._stop.wait(interval):
            with self._lock:
                ids = sorted(self.trial_ids)
            for trial_id in ids:
                try:
                    self.heartbeat.record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001 - a lost beat is retried next interval, the grace allows it
                    _logger.debug(f"heartbeat of trial id {trial_id} not recorded: {exc}")


def work_packed(ctx: TrialContext, study: optuna.Study, capacity: int, *, decide: Callable[[], str],
                admit: Callable[[optuna.Trial], bool], wait: Callable[[], None], after_trial: Callable[[], None],
                signals: StopSignals, deadline: float | None) -> int:
    """Run the study's trials ``capacity`` at a time, in packs, until ``decide()`` says stop; return how many ran.

    ``decide`` says whether a new trial may start now ("start"), whether others' last trials are
    awaited ("wait", then ``wait()``), or "stop"; ``admit(trial)`` tags a new trial (False: it is
    surplus, already failed and told). A stop signal or a fault of the worker ends every member
    (interrupted members are not counted) and propagates; no trial is left RUNNING.
    """
    packs: dict[StructureKey, Pack] = {}
    fixed_left: dict[StructureKey, int] = {}  # refills each pack's structure still gets before a free ask
    running: dict[int, tuple[optuna.Trial, _Running]] = {}  # trial number -> (trial, its record)
    # A grid sampler gives a trial with fixed params no grid point: its trials are asked as they come.
    fix_structure = ctx.spec.study.sampler.type != "grid"
    ran = 0

    def build(this: _Running) -> torch.nn.Module:
        key = structure_key(this.params, family=ctx.spec.model.family, task=ctx.spec.task.type)
        if key not in packs:
            mean, std = ctx.input_stats
            packs[key] = Pack(ctx.data, this.task, key, capacity=capacity, device=str(ctx.device), mean=mean,
                              std=std, reports_per_epoch=ctx.reports_per_epoch)
            fixed_left.setdefault(key, capacity - 1)
        return packs[key].add(this.params, seed=this.seed, report=this.report, tag=this.trial, task=this.task).model

    with Heartbeats(study._storage) as heartbeats:
        try:
            while True:
                signals.check()
                # 1. Fill the free slots, while new trials may start.
                what = "start"
                while len(running) < capacity and (deadline is None or time.monotonic() < deadline):
                    what = decide()
                    if what != "start":
                        break
                    trial = _ask(study, _refill_structure(packs, fixed_left) if fix_structure else None)
                    if not admit(trial):
                        continue
                    heartbeats.add(trial._trial_id)
                    try:
                        this = guarded(trial, ctx, lambda: begin_trial(trial, ctx, build))
                    except TrialFailed as exc:
                        heartbeats.remove(trial._trial_id)
                        _tell(study, trial, TrialState.FAIL, None, exc)
                        ran += 1
                        after_trial()
                        continue
                    running[trial.number] = (trial, this)
                if not running:
                    if what == "wait" and (deadline is None or time.monotonic() < deadline):
                        wait()
                        continue
                    return ran
                # 2. Every member takes its next batch; 3. each that left is told and its slot freed.
                signals.check()
                with signals.training():
                    departures = [d for pack in list(packs.values()) for d in pack.step()]
                for d in departures:
                    trial, this = running.pop(d.member.tag.number)
                    heartbeats.remove(trial._trial_id)
                    _end(study, trial, this, partial(this.completed, d.result) if d.error is None
                         else partial(this.left_early, d.error))
                    ran += 1
                    after_trial()
                for key in [k for k, p in packs.items() if not p.members]:
                    del packs[key]  # its memory back; a later trial of its structure starts a new one
        except BaseException as exc:
            # Ctrl-C, SIGTERM, or a fault of the whole worker: every member ends, as a trial alone would.
            for trial, this in running.values():
                heartbeats.remove(trial._trial_id)
                with suppress(Exception):  # the storage itself may be what failed: the grace period fails it
                    _end(study, trial, this, partial(this.left_early, exc), quiet=True)
            raise


def _refill_structure(packs: dict[StructureKey, Pack], fixed_left: dict[StructureKey, int]) -> dict[str, Any] | None:
    """Return the structural params the next trial is asked with, fixed (the fullest pack still refilled), or
    None: asked freely."""
    open_packs = [(len(p.members), key) for key, p in packs.items() if fixed_left.get(key, 0) > 0 and p.free_slots]
    if not open_packs:
        return None
    _, key = max(open_packs, key=lambda pair: pair[0])
    fixed_left[key] -= 1
    member = packs[key].members[0]
    return {name: member.params[name] for name in STRUCTURE_PARAMS if name in member.tag.params}


def _ask(study: optuna.Study, fixed: dict[str, Any] | None) -> optuna.Trial:
    """Return a new trial (a waiting one first), its params ``fixed`` before the sampler proposes any."""
    with warnings.catch_warnings():
        # "Heartbeat of storage is supposed to be used with Study.optimize": this loop keeps the heartbeats.
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if is_heartbeat_enabled(study._storage):  # as Study.optimize does before each trial: a dead worker's
            optuna.storages.fail_stale_trials(study)  # trials are failed and retried (waiting) first
        waiting = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
        if not fixed or waiting:
            return study.ask()
        study._thread_local.cached_all_trials = None  # as Study.ask: sync the storage once every trial
        trial_id = study._storage.create_new_trial(study._study_id)
        study._storage.set_trial_system_attr(trial_id, "fixed_params", fixed)  # what enqueue_trial sets
        return optuna.Trial(study, trial_id)


def _end(study: optuna.Study, trial: optuna.Trial, this: _Running, ending: Callable[[], Any], *,
         quiet: bool = False) -> None:
    """Record how a member ended (``ending()``: its values, or the prune signal, a failure, an interruption)
    and tell the study, as ``Study.optimize`` tells a trial trained alone."""
    try:
        values = guarded(trial, this.ctx, ending)
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            raise TakenOver(f"trial {trial.number} was closed by another worker")
    except TakenOver:  # declared stale by another worker (this one was stalled), failed and retried there
        if not quiet:
            say_taken_over(trial.number, this.ctx.spec.study.grace_period)
    except optuna.TrialPruned as exc:
        _tell(study, trial, TrialState.PRUNED, None, exc)
    except (Exception, KeyboardInterrupt) as exc:  # failed; or interrupted, or the worker's fault: FAIL, then on
        _tell(study, trial, TrialState.FAIL, None, exc, quiet=quiet or not isinstance(exc, TrialFailed))
        if not isinstance(exc, TrialFailed) and not quiet:
            raise
    else:
        _tell(study, trial, TrialState.COMPLETE, values, None)


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, values: Any, error: BaseException | None,
          *, quiet: bool = False) -> None:
    frozen = study.tell(trial, values, state=None if state == TrialState.COMPLETE else state, skip_if_finished=True)
    if frozen.state == TrialState.COMPLETE:
        study._log_completed_trial(frozen.values, trial.number, trial.params)
    elif frozen.state == TrialState.PRUNED:
        _logger.info(f"Trial {trial.number} pruned. {error}")
    elif not quiet:
        _log_failed_trial(trial.number, trial.params, repr(error))
