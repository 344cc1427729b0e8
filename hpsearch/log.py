"""hpsearch's messages: every module logs to a child of the ``hpsearch`` logger, as Optuna does.

The library installs no handler. A program that configures nothing sees hpsearch's warnings
through Python's last-resort handler (stderr, the bare message), and its notes (``INFO``: what a
worker waits for, a study that stops early, a storage that is back) not at all; a program that
wants them calls :func:`show` (what the ``hpsearch`` command does), or configures ``logging`` as for
any library: ``logging.getLogger("hpsearch").setLevel(logging.ERROR)`` silences hpsearch.
"""

from __future__ import annotations

import logging
import sys

ROOT = "hpsearch"
# What the command line prints before a message of each level; notes (INFO) print bare.
_PREFIX = {logging.DEBUG: "debug: ", logging.WARNING: "warning: ", logging.ERROR: "error: ",
           logging.CRITICAL: "error: "}


LOUD = {"loud": True}  # ``logger.warning(..., extra=LOUD)``: a warning nobody may miss prints as ``WARNING: ...``


class Formatter(logging.Formatter):
    """Formats a record as the command line shows it: ``warning: ...``, or a note as it is."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = _PREFIX.get(record.levelno, "")
        return (prefix.upper() if getattr(record, "loud", False) else prefix) + record.getMessage()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the sys.stderr of the moment (click's test runner swaps it), flushed per line."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(Formatter())

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ sets it; the property wins
        pass


def show(level: int = logging.INFO) -> None:
    """Print hpsearch's messages of ``level`` and above to stderr, as the ``hpsearch`` command does.

    Called again, it replaces the handler it installed before (never two of them).
    """
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_StderrHandler())
    logger.setLevel(level)


def level_flag() -> list[str]:
    """Return the command-line flag that gives a child ``hpsearch`` process this process's level."""
    level = logging.getLogger(ROOT).getEffectiveLevel()
    return ["-v"] if level <= logging.DEBUG else ["-q"] if level >= logging.WARNING else []
