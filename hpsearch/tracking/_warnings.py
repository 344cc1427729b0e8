"""What a failed MLflow call says: one line, without secrets, and the same line at most once a minute."""

from __future__ import annotations

import logging
import re
import threading
import time

from hpsearch.spec import hide_secrets

_WARN_EVERY_S = 60.0  # the same warning at most once a minute: a dead server must not flood the log


class RateLimit(logging.Filter):
    """Lets each message through at most once per ``_WARN_EVERY_S`` seconds (on the tracker's logger)."""

    def __init__(self) -> None:
        super().__init__()
        self._passed: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message, now = record.getMessage(), time.monotonic()
        with self._lock:
            last = self._passed.get(message)
            if last is not None and now - last < _WARN_EVERY_S:
                return False
            self._passed[message] = now
        return True


def failure_reason(exc: BaseException, uri: str) -> str:
    """Return a one-line, stable account of a failure (object addresses would defeat the rate limit),
    without the secrets of ``uri``."""
    text = re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", " ".join(str(exc).split())) or type(exc).__name__
    # A failed HTTP call buries its cause deep in urllib3's text: lift it out, without the query.
    request = re.match(r"API request to ([^?\s]+)\S* failed", text)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out|Connection aborted|Remote end closed", text)
    if request and cause:
        text = f"API request to {request.group(1)} failed: {cause.group(0).strip()}"
    return hide_secrets(text, uri)[:300]  # masked first: a cut must not leave half a password
