"""Stop signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP stop a worker cleanly, never in the middle of a write.

`StopSignals` turns them into one KeyboardInterrupt inside a trial's own code and a stop request
elsewhere (the worker loop); `on_stop_signals` runs a handler on them for a while; `completed_first`
holds them off while a record is written, so it is either absent or whole.
"""

from __future__ import annotations

import _thread
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna

from hpsearch.record import INTERRUPTED_ATTR

logger = logging.getLogger(__name__)

# Code that must not be cut off in the middle: an interrupted commit can leave a SQLite lock held
# (stalling every worker on the file) or a half-written record.
_IO_MODULES = ("sqlalchemy", "sqlite3", "psycopg2", "psycopg", "pymysql", "alembic", "mlflow", "requests",
               "urllib3", "http.client", "optuna.storages", "optuna.artifacts", "hpsearch.storage",
               "hpsearch.tracking")
_IO_RECHECK_S = 0.05
# Waits for another thread's writes, (module, function): cut short, they leave nothing half written (the
# writes go on), and a signal deferred through them could outlast the trial (a trial waiting for a locked
# MLflow store to take its last records would end COMPLETE, the stop request lost for it).
_WAITS_ONLY = (("hpsearch.tracking._writer", "flush"),)


def _in_io(frame: Any) -> bool:
    """Return whether the stack under ``frame`` is inside a database, tracking or HTTP call (not a wait only)."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if (module, frame.f_code.co_name) in _WAITS_ONLY:
            return False
        if module.startswith(_IO_MODULES):
            return True
        frame = frame.f_back
    return False


# What stops a worker: Ctrl-C, `kill` or `docker stop`, and a closed terminal or dropped SSH session.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class _Later:
    """Calls made a moment later (re-checks of a deferred signal), and never once closed.

    A signal delivered again after the handlers that asked for it were restored would meet
    Python's own: a KeyboardInterrupt printed as "Exception ignored" in the interpreter's
    shutdown, or, for SIGTERM, the process killed outright instead of exiting as stopped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._timers: list[threading.Timer] = []

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if not self._open:
                return
            self._timers = [t for t in self._timers if t.is_alive()]
            timer = threading.Timer(_IO_RECHECK_S, self._run, (fn, args))
            timer.daemon = True
            self._timers.append(timer)
        timer.start()

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        with self._lock:
            if self._open:
                fn(*args)

    def close(self) -> None:
        with self._lock:
            self._open = False
            for timer in self._timers:
                timer.cancel()


@contextmanager
def on_stop_signals(handler: Callable[[int, Any], None], *,
                    swallowed: Callable[[int], None] | None = None) -> Iterator[None]:
    """Run ``handler`` on the stop signals while inside (main thread only; one ignored, as under nohup, stays so).

    A KeyboardInterrupt that ``handler`` raises where Python ignores exceptions (a weakref
    callback or ``__del__`` that happened to run when the signal came) would be lost, printed as
    "Exception ignored"; instead it is dropped silently and ``swallowed(signum)`` runs, by default
    delivering the signal again a moment later, where it can stop the code (not once outside).
    """
    previous = {}
    last = [signal.SIGINT]
    later = _Later()

    def handle(signum: int, frame: Any) -> None:
        last[0] = signum
        handler(signum, frame)

    def hook(unraisable: Any) -> None:
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            return unraisable_before(unraisable)
        logger.debug("a stop signal landed in code whose exceptions Python ignores (%r); it is delivered again.",
                     unraisable.object)
        if swallowed is not None:
            swallowed(last[0])
        else:
            later.call(_signal_main, last[0])

    unraisable_before = sys.unraisablehook
    main = threading.current_thread() is threading.main_thread()  # only the main thread gets signals
    if main:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handle)
        sys.unraisablehook = hook
    try:
        yield
    finally:
        later.close()
        for signum, old in previous.items():
            signal.signal(signum, old)
        if main:
            sys.unraisablehook = unraisable_before


def _signal_main(signum: int) -> None:
    """Send ``signum`` to the main thread (a real signal wakes a sleep or a blocking read; Windows: simulated)."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident or 0, signum)
    else:
        _thread.interrupt_main(signum)


def interrupt(signum: int, frame: Any) -> None:
    """A signal handler: stop as Ctrl-C does."""
    raise KeyboardInterrupt


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP as one KeyboardInterrupt inside a trial's own code, a stop elsewhere.

    A signal that lands while Optuna creates or closes a trial would leave it RUNNING; so it
    interrupts only the trial's code (which closes the trial as interrupted), once, and
    otherwise stops the worker loop at its next check. Inside the trial, a database or tracking
    call is let finish first (the signal is looked at again every 50 ms). A third signal
    interrupts at once, wherever it lands: the user insists (the trial may then go stale).
    """

    def __init__(self) -> None:
        self.requested = False
        self._count = 0  # signals received (re-checks of a deferred one excluded)
        self._rechecks = 0
        self._in_trial = False
        self._raised = False

    def __enter__(self) -> StopSignals:
        self._later = _Later()  # re-checks of a deferred signal: none after __exit__
        self._handling = on_stop_signals(self._handle, swallowed=self._swallowed)
        self._handling.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._later.close()
        self._handling.__exit__(*exc)

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop Optuna's failure report (a warning with a traceback) once stopping: Ctrl-C is no failure."""
        return not self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self._rechecks:
            self._rechecks -= 1
        else:
            self._count += 1
        if self._count >= 3:
            raise KeyboardInterrupt
        if not self._in_trial or self._raised:
            return
        if _in_io(frame) and hasattr(signal, "pthread_kill"):  # (not on Windows: interrupt at once there)
            self._later.call(self._recheck, signum)
            return
        self._raised = True  # a second Ctrl-C must not break the interrupted trial's clean-up
        raise KeyboardInterrupt

    def _swallowed(self, signum: int) -> None:
        """The KeyboardInterrupt raised was lost (raised inside a finalizer): raise it again, as a re-check."""
        self._raised = False
        self._later.call(self._recheck, signum)

    def _recheck(self, signum: int) -> None:
        self._rechecks += 1
        _signal_main(signum)  # runs _handle in the main thread

    @contextmanager
    def trial(self, trial: optuna.Trial) -> Iterator[None]:
        if self.requested:
            trial.set_user_attr(INTERRUPTED_ATTR, "stopped before the trial began")
            raise KeyboardInterrupt
        with self.training():
            yield

    @contextmanager
    def training(self) -> Iterator[None]:
        """Let a stop signal interrupt the code inside (trials' own code: a trial's, or a pack's step)."""
        self._in_trial = True
        try:
            yield
        finally:
            self._in_trial = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            time.sleep(0.1)


@contextmanager
def completed_first() -> Iterator[None]:
    """Hold off stop signals while inside: a record half written is worse than one finished (third signal: stop)."""
    received = 0

    def defer(signum: int, frame: Any) -> None:
        nonlocal received
        received += 1
        if received >= 3:
            raise KeyboardInterrupt
        if received == 1:
            logger.info("finishing the test record first (a few seconds); a third Ctrl-C leaves it half written.")

    with on_stop_signals(defer):
        yield
