"""The background writer: a trial's MLflow records written by one thread per process, so training never waits.

:meth:`Tracker.later <hpsearch.tracking.Tracker.later>` gives a :class:`QueuedRun`: its calls
(metrics, params, tags, datasets, images, artifacts, the run's end) are queued and made by the
writer's thread, one at a time, in the order they were queued (so a run's records keep their
order, and its end comes last). Each is the Tracker's own call, run later: a failure is a warning
and counts in ``Tracker.failures``, as when it is made at once.

Nothing queued is lost while the process lives: :meth:`QueuedRun.flush` waits for a run's
records (a trial flushes before Optuna is told its state, so a finished trial's run is whole, or
its failure counted first), and everything queued is written at exit (``atexit``), Ctrl-C and
SIGTERM included since the worker turns them into an interrupted trial, which flushes. A process
killed outright (SIGKILL, a power cut) loses what was queued; its trial's run stays RUNNING
until the study marks the trial stale and the run KILLED (see ``study.stale_trial_callback``).
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpsearch.storage import announced_wait

if TYPE_CHECKING:
    import numpy as np

    from hpsearch.tracking._datasets import DatasetRecord

logger = logging.getLogger(__name__)

EXIT_FLUSH_S = 120.0  # at exit, how long queued records are waited for (a dead server fails each call in 30 s at most)


class _Writer:
    """One thread, started on first use (again in a forked child), making queued calls in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._queue: queue.SimpleQueue[tuple[str, Callable[[], object]]] = queue.SimpleQueue()
        self._pending: collections.Counter[str] = collections.Counter()  # key -> calls queued or under way
        self._thread: threading.Thread | None = None

    def submit(self, key: str, call: Callable[[], object]) -> None:
        """Queue ``call`` (it must not raise; the Tracker's calls do not), to be made after those queued before."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's thread and queue are not its own
                self._reset()
            self._pending[key] += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="hpsearch-tracking-writer", daemon=True)
                self._thread.start()
            self._queue.put((key, call))

    def _serve(self) -> None:
        while True:
            key, call = self._queue.get()
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the thread and strand the queue
                logger.warning("a queued MLflow record could not be written: %s", exc)
            finally:
                with self._lock:
                    self._pending[key] -= 1
                    if self._pending[key] <= 0:
                        del self._pending[key]
                    self._idle.notify_all()

    def pending(self, key: str | None = None) -> int:
        """Return how many calls (for ``key``, or all) are queued or under way."""
        with self._lock:
            return self._count(key)

    def _count(self, key: str | None) -> int:  # under the lock
        return sum(self._pending.values()) if key is None else self._pending.get(key, 0)

    def flush(self, key: str | None = None, *, timeout: float | None = None) -> bool:
        """Wait until the calls queued for ``key`` (or all) are made; return False if ``timeout`` ran out first.

        A wait of more than a few seconds says what it waits for (a slow or unreachable store).
        """
        if self._pid != os.getpid() or self.pending(key) == 0:
            return True
        what = "the MLflow store to take " + (f"the queued records of run {key}" if key else "the queued records")
        with announced_wait(what), self._lock:
            return self._idle.wait_for(lambda: self._count(key) == 0, timeout)


_WRITER = _Writer()


def flush_all(timeout: float | None = None) -> bool:
    """Wait for every queued record of this process (see :meth:`_Writer.flush`)."""
    return _WRITER.flush(timeout=timeout)


@atexit.register
def _flush_at_exit() -> None:
    started = time.monotonic()
    if not _WRITER.flush(timeout=EXIT_FLUSH_S):
        logger.warning("%d queued MLflow records were not written within %.0f s at exit; their runs may be "
                       "incomplete.", _WRITER.pending(), time.monotonic() - started)


class QueuedRun:
    """The writes of one run, made by the background writer in the order they are called (see the module)."""

    def __init__(self, tracker: Any, run_id: str) -> None:
        self.tracker = tracker  # the Tracker whose calls are queued (not imported here: it imports this module)
        self.run_id = run_id

    def _submit(self, method: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        _WRITER.submit(self.run_id, functools.partial(method, self.run_id, *args, **kwargs))

    def log_epochs(self, epochs: Sequence[tuple[int, int, Mapping[str, float]]]) -> None:
        """Queue :meth:`Tracker.log_epochs`."""
        self._submit(self.tracker.log_epochs, list(epochs))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue :meth:`Tracker.log_params`."""
        self._submit(self.tracker.log_params, dict(params))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue :meth:`Tracker.set_tags`."""
        self._submit(self.tracker.set_tags, dict(tags))

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        """Queue :meth:`Tracker.log_datasets`."""
        self._submit(self.tracker.log_datasets, list(datasets))

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Queue :meth:`Tracker.log_image` (the array must not change afterwards)."""
        self._submit(self.tracker.log_image, image, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Queue :meth:`Tracker.log_artifact` of a copy of the file, made now (the caller may delete its own)."""
        keep = Path(tempfile.mkdtemp(prefix="hpsearch-queued-"))
        copy = keep / Path(local_path).name
        shutil.copy2(local_path, copy)

        def log(run_id: str) -> None:
            try:
                self.tracker.log_artifact(run_id, copy, artifact_path)
            finally:
                shutil.rmtree(keep, ignore_errors=True)

        self._submit(log)

    def end_run(self, status: str, *, tags: Mapping[str, str] | None = None,
                epochs: Sequence[tuple[int, int, Mapping[str, float]]] = ()) -> None:
        """Queue :meth:`Tracker.end_run`: after the run's other records, as it is called after them."""
        self._submit(self.tracker.end_run, status, tags=dict(tags or {}), epochs=list(epochs))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until this run's queued records are written (or failed, and counted); False if ``timeout`` ran out."""
        return _WRITER.flush(self.run_id, timeout=timeout)
