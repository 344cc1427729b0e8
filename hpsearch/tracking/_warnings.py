"""What a failed MLflow call says: one line, without secrets, and the same line at most once a minute."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable

from hpsearch.spec import hide_secrets

_WARN_EVERY_S = 60.0  # the same warning at most once a minute: a dead server must not flood the log


class RateLimitedWarn:
    """Pass each message on to ``warn``, the same one at most once per ``_WARN_EVERY_S`` seconds."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self._warn = warn
        self._warned: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._warned.get(message)
            if last is not None and now - last < _WARN_EVERY_S:
                return
            self._warned[message] = now
        self._warn(message)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
