"""Start optuna-dashboard and the MLflow UI on a study's stores, for a person to look at.

`dashboard_command` and `ui_command` say what to run; `serve` runs it in the foreground until
Ctrl-C. Both bind to 127.0.0.1 unless told otherwise: these UIs have no login, and the
dashboard can edit notes and delete artifacts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from hpsearch.errors import HPSearchError
from hpsearch.spec import Spec, mask_password

DEFAULT_HOST = "127.0.0.1"  # local only: neither UI asks for a password
DASHBOARD_PORT = 8080  # optuna-dashboard's own default
UI_PORT = 5000  # MLflow's own default
START_TIMEOUT_S = 120.0  # the MLflow server migrates its database on first start: slow on small machines
STOP_TIMEOUT_S = 10.0  # then SIGKILL: Ctrl-C must not leave a server behind


def dashboard_command(spec: Spec, host: str = DEFAULT_HOST, port: int = DASHBOARD_PORT) -> list[str]:
    """Return the optuna-dashboard command line for the spec's study storage and artifact folder.

    The storage URL (with any password) is on the command line, as optuna-dashboard takes it.
    """
    return [_script("optuna-dashboard"), spec.study.storage, "--host", host, "--port", str(port),
            "--artifact-dir", spec.artifacts_dir]


def remote_ui_url(spec: Spec) -> str | None:
    """Return the tracking server's URL when the spec tracks to one over http(s), else None."""
    uri = spec.tracking.uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def ui_command(spec: Spec, host: str = DEFAULT_HOST, port: int = UI_PORT) -> list[str]:
    """Return the command line of an MLflow server showing the spec's local tracking store.

    Raises HPSearchError when tracking is off or goes to a server (see `remote_ui_url`).
    """
    if not spec.tracking.enabled:
        raise HPSearchError(f"{spec.path}: tracking.enabled is false, so there is no MLflow store to show.")
    if remote := remote_ui_url(spec):
        raise HPSearchError(f"{spec.path}: tracking goes to the MLflow server {remote}; open it there, "
                            "there is nothing to start.")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", spec.tracking.uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    if spec.tracking.artifact_root:
        # The runs' artifacts are local files: serve them from where the trials wrote them, and
        # put experiments created in the UI there too.
        root = spec.tracking.artifact_root
        command += ["--default-artifact-root", Path(root).as_uri(), "--artifacts-destination", root]
    return command


def browser_url(host: str, port: int) -> str:
    """Return the address a browser opens for a server bound to ``host:port``."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is reached locally
    return f"http://{shown}:{port}"


def serve(cmd: Sequence[str], url: str, echo: Callable[[str], None], *, ready_path: str = "/",
          timeout: float = START_TIMEOUT_S) -> int:
    """Run ``cmd`` until Ctrl-C (or until it exits); return its exit code, 0 after Ctrl-C.

    Echoes ``url`` once ``url + ready_path`` answers. The server runs in its own process group,
    so stopping it also stops the workers it forked (gunicorn, uvicorn).
    """
    echo(f"starting: {mask_password(' '.join(cmd))}")
    try:
        process = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise HPSearchError(f"cannot start {cmd[0]}: {exc}. Is it installed in this environment?") from None
    with _stopped_by_term_and_hangup(), _stopping(process):
        try:
            if not _wait_ready(url.rstrip("/") + ready_path, process, timeout):
                code = process.poll()
                if code is not None:
                    raise HPSearchError(f"{Path(cmd[0]).name} exited with code {code} before {url} answered "
                                        "(its messages are above).")
                raise HPSearchError(f"{Path(cmd[0]).name} did not answer at {url} within {timeout:.0f} s.")
            echo(f"open {url}  (Ctrl-C stops it)")
            return process.wait()
        except KeyboardInterrupt:
            echo("stopping...")
            return 0


@contextlib.contextmanager
def _stopping(process: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        stop(process)


@contextlib.contextmanager
def _stopped_by_term_and_hangup() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt while serving.

    The server runs in its own session, out of reach of the terminal's signals: without this, a
    `kill` or a closed terminal would end hpsearch and leave the server running.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started with ``start_new_session=True`` and its children: TERM, then KILL."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)  # a session leader's pid is its process group id
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False  # a crashed server never answers
        try:
            with urllib.request.urlopen(url, timeout=5.0) as response:
                if response.status < 500:
                    return True
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return True  # it answers; a 404 on the probe path still means it is up
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


def _script(name: str) -> str:
    """Return console script ``name`` of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)
