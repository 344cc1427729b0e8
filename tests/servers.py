"""Real PostgreSQL, MLflow and optuna-dashboard servers for tests.

Each server is a context manager that starts a real process bound to
127.0.0.1 on a free port, yields its URL once it answers, and stops it on exit
(SIGTERM to its whole process group, SIGKILL after a timeout), so no process
outlives the ``with`` block. Server output goes to a log file in the given
directory; a failed start raises :class:`ServerStartError` with the log's tail.

Tests import the context managers they need; the session fixtures ``postgres_url``
and ``mlflow_url`` come from tests/conftest.py, so that every test module of a test
process shares one server of each (imported into a test module, a fixture would be
that module's own and start a server per module)::

    from .servers import mlflow_server  # the fixtures need no import

Set ``HPSEARCH_TEST_POSTGRES_URL`` (see ``.ci/start-postgres``) to use a running
PostgreSQL instead of starting one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from hpsearch.servers import JOB_EXECUTION_ENV

__all__ = [
    "POSTGRES_URL_ENV",
    "ServerStartError",
    "dashboard_server",
    "free_port",
    "mlflow_server",
    "mlflow_url",
    "port_is_open",
    "postgres_server",
    "silent_server",
    "postgres_url",
    "wait_http",
    "with_database",
]

POSTGRES_URL_ENV = "HPSEARCH_TEST_POSTGRES_URL"
# Debian's layout; override for other installs rather than searching PATH for a random version.
PG_BIN = Path(os.environ.get("HPSEARCH_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT_S = 90.0  # MLflow runs its database migrations on first start: slow on 2 cores
STOP_TIMEOUT_S = 15.0  # then SIGKILL: a test run must not hang on a stuck server
LOG_TAIL_CHARS = 4000  # enough of a log to show the traceback that ended a failed start

# The PostgreSQL role and databases every hpsearch setup uses (docker-compose.yml, .ci/start-postgres).
PG_USER = "hpsearch"
PG_DATABASES = ("hpsearch", "mlflow")  # MLflow needs its own: both it and Optuna keep `alembic_version`

# Servers must not phone home from a test run (and there is no internet here anyway). MLflow's job
# runner (a huey consumer process, for GenAI jobs hpsearch never submits) would cost each server
# start another process that imports MLflow: seconds of CPU on 2 cores.
_QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
              JOB_EXECUTION_ENV: "false"}


class ServerStartError(RuntimeError):
    """A test server did not start or did not answer in time."""


# --- small helpers ---------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    """Return whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def wait_http(
    url: str, timeout: float = START_TIMEOUT_S, *, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Return once ``GET url`` answers 200; raise ``ServerStartError`` after ``timeout`` seconds.

    With ``process``, give up as soon as it exits: a crashed server never answers.
    """
    deadline = time.monotonic() + timeout
    last_problem = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerStartError(f"the server exited with code {process.returncode} before {url} answered.")
        try:
            with urllib.request.urlopen(url, timeout=5.0) as response:
                if response.status == 200:
                    return
                last_problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            last_problem = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            last_problem = str(error)
        time.sleep(0.2)
    raise ServerStartError(f"{url} did not answer 200 within {timeout:.0f} s (last: {last_problem}).")


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """Yield the port of a TCP server on 127.0.0.1 that accepts every connection and never answers.

    What a wedged database host or a half-dead proxy looks like from a client: the connection
    is made, then nothing comes back, ever.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed: done
            while True:
                held.append(listener.accept()[0])  # accepted, kept open, never read from nor written to

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        listener.close()
        thread.join(timeout=5)
        for conn in held:
            conn.close()


def with_database(url: str, database: str) -> str:
    """Return ``url`` with its database (the path) replaced by ``database``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _log_tail(log_path: Path) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError as error:
        return f"(no log: {error})"
    return text[-LOG_TAIL_CHARS:]


def _group_alive(pgid: int) -> bool:
    """Return whether a process group still has a live (not zombie) member."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ')'.
            state, _ppid, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # the process ended while we looked
        # Zombies count as gone: where PID 1 does not reap orphans (containers), they stay forever.
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _stop_process_group(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    pgid = process.pid  # a session leader's pid is its process group id
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)
        deadline = time.monotonic() + timeout
        # Wait for the whole group, not just the leader: uvicorn and gunicorn fork workers.
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.1)


@contextlib.contextmanager
def _serve(command: Sequence[str], *, ready_url: str, log_path: Path) -> Iterator[None]:
    """Run ``command`` until the block exits, once ``ready_url`` answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **_QUIET_ENV},
            start_new_session=True,  # its own process group, so stopping it reaches its workers too
        )
    try:
        try:
            wait_http(ready_url, process=process)
        except ServerStartError as error:
            _stop_process_group(process)  # first, so that the log holds its last words
            tail = _log_tail(log_path)
            raise ServerStartError(f"{command[0]} did not start: {error}\n--- {log_path} ---\n{tail}") from None
        yield
    finally:
        _stop_process_group(process)


# --- PostgreSQL --------------------------------------------------------------------


def _as_postgres_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; as root, drop to the `postgres` account.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run_logged(command: list[str], log: Path, what: str, timeout: float = START_TIMEOUT_S) -> None:
    with log.open("ab") as log_file:
        log_file.write(f"$ {' '.join(command)}\n".encode())
        log_file.flush()
        # The started postmaster inherits this file as its stdout: its log lands here too.
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    if result.returncode != 0:
        raise ServerStartError(f"{what} failed with code {result.returncode}.\n--- {log} ---\n{_log_tail(log)}")


def _create_role_and_databases(port: int, superuser_password: str, password: str) -> None:
    import psycopg2  # imported here so that modules importing only the HTTP helpers need no driver

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            connection = psycopg2.connect(
                host="127.0.0.1", port=port, user="postgres", password=superuser_password, dbname="postgres"
            )
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE ROLE {PG_USER} LOGIN PASSWORD %s", (password,))
            for database in PG_DATABASES:
                cursor.execute(f"CREATE DATABASE {database} OWNER {PG_USER}")
    finally:
        connection.close()


@contextlib.contextmanager
def postgres_server(tmp_dir: Path) -> Iterator[str]:
    """Yield ``postgresql+psycopg2://hpsearch:<password>@127.0.0.1:<port>/hpsearch`` of a throwaway cluster.

    The role ``hpsearch`` owns the databases ``hpsearch`` and ``mlflow`` and is no
    superuser, as in docker-compose.yml. With ``HPSEARCH_TEST_POSTGRES_URL`` set,
    yield that URL and start nothing.
    """
    if external_url := os.environ.get(POSTGRES_URL_ENV):
        yield external_url
        return

    if not (PG_BIN / "initdb").exists():
        raise ServerStartError(
            f"PostgreSQL 15 must be installed in {PG_BIN} (apt-get install postgresql-15; or set "
            f"HPSEARCH_TEST_PG_BIN, or {POSTGRES_URL_ENV} to use a running server), but {PG_BIN / 'initdb'} is missing."
        )
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_dir / "postgres.log"
    # The cluster cannot live in tmp_dir: pytest's tmp dirs are private to the user running the
    # tests, so as root the `postgres` account could not enter them, and a Unix socket path must stay under 108 bytes.
    cluster = Path(tempfile.mkdtemp(prefix="hpsearch-pg-"))
    data_dir, socket_dir, password_file = cluster / "data", cluster / "socket", cluster / "superuser-password"
    superuser_password, password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    password_file.write_text(superuser_password + "\n")
    socket_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        for path in (cluster, socket_dir, password_file):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    started = False
    try:
        # 1. A cluster whose superuser is `postgres`; TCP logins need a password (scram).
        _run_logged(
            _as_postgres_user([
                str(PG_BIN / "initdb"), "-D", str(data_dir), "-U", "postgres", f"--pwfile={password_file}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
            ]),
            log,
            "initdb",
        )
        # 2. Start it; `-w` returns once it accepts connections. No `-l`: its log goes to our log file.
        server_options = (
            f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
            " -c fsync=off"  # a throwaway cluster: durability buys nothing and costs seconds
        )
        started = True
        _run_logged(
            _as_postgres_user(
                [str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-w", "-t", "60", "-o", server_options, "start"]
            ),
            log,
            "pg_ctl start",
        )
        # 3. The unprivileged role and its databases.
        _create_role_and_databases(port, superuser_password, password)
        yield f"postgresql+psycopg2://{PG_USER}:{password}@127.0.0.1:{port}/{PG_DATABASES[0]}"
    finally:
        if started:
            _stop_postgres(data_dir, log)
        shutil.rmtree(cluster, ignore_errors=True)


def _stop_postgres(data_dir: Path, log: Path) -> None:
    try:
        # `-m fast` ends open sessions (a test may leave a connection pool behind).
        _run_logged(
            _as_postgres_user([str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "-t", "30", "stop"]),
            log,
            "pg_ctl stop",
            timeout=STOP_TIMEOUT_S + 30,
        )
    except (ServerStartError, subprocess.TimeoutExpired):
        # Last resort: kill the postmaster we started, by the pid it recorded.
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL for the whole test session (starting one takes seconds); use unique study names."""
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


# --- MLflow ------------------------------------------------------------------------


@contextlib.contextmanager
def mlflow_server(tmp_dir: Path, backend_uri: str | None = None, port: int | None = None) -> Iterator[str]:
    """Yield ``http://127.0.0.1:<port>`` of an MLflow tracking server that serves artifacts.

    The backend is ``sqlite:///<tmp_dir>/mlflow.db`` unless ``backend_uri`` is given;
    artifacts land in ``<tmp_dir>/mlartifacts``. A ``port`` given brings a server back where
    an earlier one was (the same stores, the same URL).
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",  # tests send a handful of requests; more workers only cost start-up time
        "--backend-store-uri", backend_uri or f"sqlite:///{tmp_dir / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_dir / "mlartifacts"),
        "--serve-artifacts",
    ]  # fmt: skip
    # The default security middleware already accepts Host 127.0.0.1:<port>; no --allowed-hosts needed.
    with _serve(command, ready_url=f"{url}/health", log_path=tmp_dir / "mlflow.log"):
        yield url


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow server (SQLite backend) for the whole test session; use unique experiment names."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


# --- optuna-dashboard --------------------------------------------------------------


def _script(name: str) -> str:
    """Return the console script ``name`` of this interpreter's environment, else the one on PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name) or name


@contextlib.contextmanager
def dashboard_server(
    storage_url: str, artifact_dir: Path | None = None, *, log_dir: Path | None = None
) -> Iterator[str]:
    """Yield ``http://127.0.0.1:<port>`` of optuna-dashboard on ``storage_url``.

    Its log goes to ``<log_dir>/optuna-dashboard.log``; without ``log_dir``, to a
    temporary directory that is removed afterwards.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [_script("optuna-dashboard"), storage_url, "--host", "127.0.0.1", "--port", str(port)]
    if artifact_dir is not None:
        command += ["--artifact-dir", str(artifact_dir)]
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hpsearch-dashboard-")))
        with _serve(command, ready_url=f"{url}/api/studies", log_path=Path(log_dir) / "optuna-dashboard.log"):
            yield url
