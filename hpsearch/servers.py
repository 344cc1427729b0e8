"""Start optuna-dashboard and the MLflow UI on a study's stores, for a person to look at.

`dashboard_command` and `ui_command` say what to run; `serve` runs it in the foreground until
Ctrl-C. Both bind to 127.0.0.1 unless told otherwise: these UIs have no login, and the
dashboard can edit notes and delete artifacts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpsearch.errors import HPSearchError
from hpsearch.spec import Spec, mask_password, without_credentials
from hpsearch.storage import CONNECT_TIMEOUT_S, checked_driver_url

DEFAULT_HOST = "127.0.0.1"  # local only: neither UI asks for a password
DASHBOARD_PORT = 8080  # optuna-dashboard's own default
UI_PORT = 5000  # MLflow's own default
START_TIMEOUT_S = 120.0  # the MLflow server migrates its database on first start: slow on small machines
STOP_TIMEOUT_S = 10.0  # then SIGKILL: Ctrl-C must not leave a server behind


@dataclass(frozen=True)
class ServerCommand:
    """A server's command line and the environment it adds: URLs with passwords travel in the
    environment, never on the command line, which every user of the machine sees (`ps`)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def dashboard_command(spec: Spec, host: str = DEFAULT_HOST, port: int = DASHBOARD_PORT) -> ServerCommand:
    """Return how to run optuna-dashboard on the spec's study storage and artifact folder.

    optuna-dashboard takes the storage URL as an argument; `hpsearch._dashboard` hands it over
    from the environment instead.
    """
    from hpsearch._dashboard import STORAGE_ENV

    return ServerCommand([sys.executable, "-m", "hpsearch._dashboard", "--host", host, "--port", str(port),
                          "--artifact-dir", spec.artifacts_dir],
                         {STORAGE_ENV: checked_driver_url(spec.study.storage, what="the Optuna storage"), **_connect_timeout()})


def remote_ui_url(spec: Spec) -> str | None:
    """Return the tracking server's URL (without credentials) when the spec tracks to one over http(s), else None."""
    uri = spec.tracking.uri
    return without_credentials(uri).rstrip("/") if uri.startswith(("http://", "https://")) else None


def ui_command(spec: Spec, host: str = DEFAULT_HOST, port: int = UI_PORT) -> ServerCommand:
    """Return how to run an MLflow server showing the spec's local tracking store.

    Raises HPSearchError when tracking is off or goes to a server (see `remote_ui_url`).
    """
    if not spec.tracking.enabled:
        raise HPSearchError(f"{spec.path}: tracking.enabled is false, so there is no MLflow store to show.")
    if remote := remote_ui_url(spec):
        raise HPSearchError(f"{spec.path}: tracking goes to the MLflow server {remote}; open it there, "
                            "there is nothing to start.")
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    if spec.tracking.artifact_root:
        # The runs' artifacts are local files: serve them from where the trials wrote them, and
        # put experiments created in the UI there too.
        root = spec.tracking.artifact_root
        command += ["--default-artifact-root", Path(root).as_uri(), "--artifacts-destination", root]
    # `mlflow server --backend-store-uri` reads this variable when the option is not given.
    backend = checked_driver_url(spec.tracking.uri, what="the MLflow tracking URI")
    env = {"MLFLOW_BACKEND_STORE_URI": backend, **_connect_timeout()}
    # MLflow 3's server also starts a job runner and its consumers (8 processes, each importing
    # MLflow) for GenAI jobs that hpsearch never submits; unless the user asks for it, not here.
    env[JOB_EXECUTION_ENV] = os.environ.get(JOB_EXECUTION_ENV, "false")
    return ServerCommand(command, env)


JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def _connect_timeout() -> dict[str, str]:
    """Return the variable that makes a server's PostgreSQL driver give up on a host that never answers."""
    # libpq reads it where the URL sets no connect_timeout; a value the user set is left alone.
    return {} if "PGCONNECT_TIMEOUT" in os.environ else {"PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT_S)}


def study_page(spec: Spec, echo: Callable[[str], None]) -> Callable[[str], str]:
    """Return what gives the MLflow UI page of the spec's study: its runs table, in the model-training view.

    The experiment's id and the study's saved view are asked of the running server; before the
    study's first run there is neither, and the answer is the server's own address.
    """
    from hpsearch.tracking import VIEW_TAG, experiment_url, study_view_id

    def page(url: str) -> str:
        query = urllib.parse.urlencode({"experiment_name": spec.tracking.experiment})
        try:
            with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=10) as r:
                experiment = json.load(r)["experiment"]
        except (OSError, ValueError, KeyError) as exc:
            missing = isinstance(exc, urllib.error.HTTPError) and exc.code == 404
            echo(f"the MLflow experiment {spec.tracking.experiment!r} is not in this store yet (run `hpsearch run "
                 f"{spec.path}` first)." if missing else f"could not look up the MLflow experiment "
                 f"{spec.tracking.experiment!r} on the server ({exc}); showing the server's first page.")
            return url
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        view = study_view_id(spec.study.name)
        return experiment_url(url, experiment["experiment_id"], view if VIEW_TAG + view in tags else None)

    return page


def browser_url(host: str, port: int) -> str:
    """Return the address a browser opens for a server bound to ``host:port``."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is reached locally
    return f"http://{shown}:{port}"


def serve(cmd: ServerCommand, url: str, echo: Callable[[str], None], *, host: str, port: int,
          ready_path: str = "/", timeout: float = START_TIMEOUT_S,
          page: Callable[[str], str] | None = None) -> int:
    """Run ``cmd`` until Ctrl-C (or until it exits); return its exit code, 0 after Ctrl-C.

    Echoes ``url`` once ``url + ready_path`` answers, and only if it is this server that answers:
    a port already taken is refused before anything starts. The server runs in its own process
    group, so stopping it also stops the workers it forked (gunicorn, uvicorn). With ``page``, the
    address echoed is ``page(url)``: the page to open first, asked of the running server.
    """
    check_port_free(host, port)
    name = _name(cmd.argv)
    echo(f"starting: {mask_password(' '.join(cmd.argv))}")
    echo(f"waiting for {name} to answer at {url} (up to {timeout:.0f} s)...")
    try:
        process = subprocess.Popen(cmd.argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                   env={**os.environ, **cmd.env})
    except OSError as exc:
        raise HPSearchError(f"cannot start {cmd.argv[0]}: {exc}. Is it installed in this environment?") from None
    with _stopped_by_term_and_hangup(), _stopping(process):
        try:
            ready = _wait_ready(url.rstrip("/") + ready_path, process, timeout)
            # Whatever answered, it was not ours if ours is gone (it lost the port in a race).
            code = process.poll()
            if code is not None:
                raise HPSearchError(f"{name} exited with code {code} before it answered at {url} (its messages "
                                    "are above).")
            if not ready:
                raise HPSearchError(f"{name} did not answer at {url} within {timeout:.0f} s.")
            echo(f"open {page(url) if page else url}  (Ctrl-C stops it)")
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


def check_port_free(host: str, port: int) -> None:
    """Raise HPSearchError unless a server can listen on ``host:port`` (nothing else listens there)."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise HPSearchError(f"--host {host!r} is not an address of this machine ({exc.strerror}).") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            # As servers do: a port whose last connection is in TIME_WAIT is free, a listened-on one is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                taken = exc.errno == errno.EADDRINUSE
                problem = (f"port {port} on {host} is already in use by another program" if taken
                           else f"cannot listen on {host}:{port} ({exc.strerror})")
                raise HPSearchError(f"{problem}; nothing was started. Pass another --port"
                                    + (", or stop the program that holds it." if taken else ".")) from None


def _name(argv: Sequence[str]) -> str:
    """Return what a person calls the server ``argv`` runs."""
    if "mlflow" in argv[:3]:
        return "the MLflow UI"
    return "optuna-dashboard" if "hpsearch._dashboard" in argv[:3] else Path(argv[0]).name


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
