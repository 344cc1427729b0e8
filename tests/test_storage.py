"""Storages that survive many workers: SQLite in WAL mode opened by racing processes, PostgreSQL
connections that drop and servers that restart under a live storage, passwords kept out of messages."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import yaml

from hpsearch.errors import StorageError
from hpsearch.spec import parse_spec
from hpsearch.storage import (CONNECT_TIMEOUT_S, PG_CONNECT_ARGS, engine_kwargs, is_connection_error,
                              make_storage, prepare_sqlite)

from .conftest import LogLines
from .servers import POSTGRES_URL_ENV, PG_BIN, postgres_server, silent_server

REPO = Path(__file__).resolve().parents[1]


def _study_spec(storage: str, name: str = "s", **study: object):
    raw = {"study": {"name": name, "n_trials": 4, "storage": storage, "heartbeat_interval": 1, "grace_period": 3,
                     **study},
           "task": {"type": "classify", "dataset": "digits"}, "model": {"family": "mlp"},
           "tracking": {"enabled": False}}
    return parse_spec(raw).study


# --------------------------------------------------------------------------- settings


_POOL = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 300, "pool_timeout": 60}


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:////tmp/x.db", {"connect_args": {"timeout": 120}}),  # waited for, never "database is locked"
    # A host that never answers is given up on; a vanished peer and a stuck statement are noticed.
    ("postgresql+psycopg2://u@h/db", {**_POOL, "connect_args": PG_CONNECT_ARGS}),
    # What the URL sets itself wins (SQLAlchemy would let connect_args override it).
    ("postgresql+psycopg2://u@h/db?connect_timeout=60&sslmode=require",
     {**_POOL, "connect_args": {k: v for k, v in PG_CONNECT_ARGS.items() if k != "connect_timeout"}}),
    ("postgresql+pg8000://u@h/db", _POOL),  # not libpq: its options would be refused
])
def test_engine_kwargs_suit_long_trials_and_many_workers(url: str, expected: dict) -> None:
    assert engine_kwargs(url) == expected
    assert PG_CONNECT_ARGS["connect_timeout"] == CONNECT_TIMEOUT_S


def test_sqlite_storage_is_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'optuna.db'}"
    assert prepare_sqlite(url)  # creates the folder too, and says WAL is on
    with sqlite3.connect(tmp_path / "sub" / "optuna.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_storage_connections_commit_without_a_disk_sync(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = make_storage(_study_spec(url), url=url)
    with storage.engine.connect() as conn:  # a fresh connection of Optuna's own pool
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL (FULL is 2)
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    reopened = optuna.load_study(study_name="s", storage=url)  # another process's view: all there
    assert len(reopened.trials) == 3


@pytest.mark.parametrize(("exc", "expected"), [
    (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection")), True),
    (sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed")), True),
    (sqlite3.OperationalError("database is locked"), True),
    (sqlalchemy.exc.DataError("INSERT", {}, Exception("value too long")), False),  # a bug: never waited for
    (ValueError("no"), False),
])
def test_connection_errors_are_told_from_bugs(exc: BaseException, expected: bool) -> None:
    assert is_connection_error(exc) is expected
    # Optuna wraps driver errors in StorageInternalError: the cause still decides.
    try:
        raise optuna.exceptions.StorageInternalError("commit failed") from exc
    except optuna.exceptions.StorageInternalError as wrapped:
        assert is_connection_error(wrapped) is expected


# --------------------------------------------------------------------------- SQLite, many processes


def _open_and_create(url: str, barrier: multiprocessing.synchronize.Barrier, name: str) -> None:
    barrier.wait()  # all at once, on a database that does not exist yet
    storage = make_storage(_study_spec(url), url=url)
    optuna.create_study(storage=storage, study_name=name, load_if_exists=True)


def test_processes_opening_a_fresh_sqlite_storage_at_once_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    # As separate as `hpsearch worker` processes (no storage opened before they start), forked from
    # a server process that imported this module once rather than spawned to import it four times.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_open_and_create, args=(url, barrier, "shared")) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    # Without the retry, all but one die with "table studies already exists".
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert optuna.get_all_study_names(storage=url) == ["shared"]


# --------------------------------------------------------------------------- PostgreSQL


def _postmaster(url: str) -> tuple[str, list[str]]:
    """Return the data directory and server options of the local PostgreSQL listening on url's port."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if args and args[0].endswith("postgres") and "-D" in args and port in args:
            data = args[args.index("-D") + 1]
            return data, [a for i, a in enumerate(args[1:], 1) if a != "-D" and args[i - 1] != "-D"]
    pytest.skip(f"no local PostgreSQL server process listens on port {port}: cannot restart it")
    raise AssertionError  # unreachable


def _pg_ctl(*args: str) -> None:
    command = [str(PG_BIN / "pg_ctl"), *args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def stop_postgres(url: str) -> tuple[str, list[str]]:
    """Stop the local PostgreSQL behind ``url`` (its sessions end at once); return how to start it again."""
    data, options = _postmaster(url)
    _pg_ctl("-D", data, "-m", "fast", "-w", "stop")
    return data, options


def start_postgres(data: str, options: list[str]) -> None:
    _pg_ctl("-D", data, "-w", "-o", " ".join(options), "start")


def restart_postgres(url: str, down_s: float) -> None:
    """Stop the server behind ``url``, keep it down ``down_s`` seconds, start it again."""
    data, options = stop_postgres(url)
    time.sleep(down_s)
    start_postgres(data, options)


def test_storage_reconnects_after_its_connections_are_killed(postgres_url: str) -> None:
    tag = f"hpsearch-test-{os.getpid()}-{time.time_ns()}"  # only this storage's sessions are killed
    url = f"{postgres_url}?application_name={tag}"
    storage = make_storage(_study_spec(url), url=url, outage_s=30)
    study = optuna.create_study(storage=storage, study_name=tag)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    # The server ends the pool's sessions: what a restart or a proxy's idle timeout does to a pool.
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        killed = conn.execute(sqlalchemy.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :tag"),
            {"tag": tag}).scalar()
    engine.dispose()
    assert killed >= 1
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # no error: the pool reconnects
    assert len(study.trials) == 2


@pytest.mark.slow
def test_storage_waits_for_a_restarting_server_then_gives_up_on_a_dead_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: LogLines) -> None:
    monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)  # a cluster of its own: this test stops it
    with postgres_server(tmp_path / "pg") as url:
        password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        storage = make_storage(_study_spec(url), url=url, outage_s=8)
        study = optuna.create_study(storage=storage, study_name="restart")

        # 1. Down for 3 s while a call is made: the call waits and succeeds.
        data, options = stop_postgres(url)
        restarter = threading.Timer(3.0, start_postgres, args=(data, options))
        restarter.start()
        started = time.monotonic()
        study.set_user_attr("written", "after the restart")
        restarter.join()
        assert 2.5 < time.monotonic() - started < 20
        assert study.user_attrs["written"] == "after the restart"
        assert any("lost the Optuna storage" in m for m in messages) and any("is back" in m for m in messages)

        # 2. Down for good: the call gives up after outage_s with a message that hides the password.
        stop_postgres(url)
        started = time.monotonic()
        with pytest.raises(StorageError, match="lost the Optuna storage") as info:
            storage.get_all_studies()
        assert 7 < time.monotonic() - started < 20
        for text in [str(info.value), *messages]:
            assert password not in text and "***" in text
        start_postgres(data, options)  # postgres_server stops it itself


def test_storage_error_hides_the_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg2://hpsearch:s3cret-pw@127.0.0.1:1/hpsearch"  # nothing listens on port 1
    with pytest.raises(StorageError) as info:
        make_storage(_study_spec(url), url=url)
    assert "s3cret-pw" not in str(info.value) and "hpsearch:***@127.0.0.1:1" in str(info.value)


@pytest.mark.slow
def test_worker_rides_out_a_postgres_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `hpsearch worker` on PostgreSQL; the server restarts mid-trial; the worker goes on."""
    monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)  # a cluster of its own: this test restarts it
    with postgres_server(tmp_path / "pg") as url:
        spec = {
            "study": {"name": "restart", "n_trials": 4, "storage": "${HPSEARCH_TEST_DB}", "sampler": "random",
                      "pruner": "none", "heartbeat_interval": 1, "grace_period": 20},
            "task": {"type": "classify", "dataset": "digits", "epochs": 200, "batch_size": 64},  # ~1 s a trial
            "model": {"family": "mlp"},
            "space": {"width": {"type": "int", "low": 16, "high": 32}},
            "tracking": {"enabled": False},
        }
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "HPSEARCH_TEST_DB": url, "HPSEARCH_RUNS_DIR": str(tmp_path / "runs"),
               "PYTHONPATH": str(REPO)}
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(["python", "-m", "hpsearch", "worker", str(tmp_path / "spec.yaml"), "--quiet",
                                   "--threads", "1"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            study = optuna.load_study(study_name="restart", storage=_wait_for_study(url, "restart", worker))
            _wait_until(lambda: any(t.intermediate_values for t in study.get_trials(deepcopy=False)
                                    if t.state.name == "RUNNING"), worker, what="a trial to be mid-training")
            restart_postgres(url, down_s=3.0)
            assert worker.wait(timeout=180) == 0, (tmp_path / "worker.log").read_text()
        finally:
            if worker.poll() is None:
                worker.kill()
        output = (tmp_path / "worker.log").read_text()
        assert "lost the Optuna storage" in output and "is back" in output
        states = [t.state.name for t in optuna.load_study(study_name="restart", storage=url).trials]
        assert states.count("COMPLETE") == 4 and "RUNNING" not in states


def _wait_for_study(url: str, name: str, worker: subprocess.Popen[bytes]) -> str:
    _wait_until(lambda: name in optuna.get_all_study_names(storage=url), worker,
                what=f"study {name!r} to exist")
    return url


def _wait_until(condition, worker: subprocess.Popen[bytes], *, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise AssertionError(f"the worker exited with {worker.returncode} while waiting for {what}")
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - the tables may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- nothing hangs silently


def _hpsearch(args: list[str], tmp_path: Path, *, timeout: float, **env: str) -> tuple[int, str, float]:
    """Run the `hpsearch` command; return its exit code, its output and how long it took."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO),
                                                  "HPSEARCH_RUNS_DIR": str(tmp_path / "runs"),
                                                  "MLFLOW_DISABLE_TELEMETRY": "true", **env})
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def _small_spec(tmp_path: Path, **tracking: object) -> Path:
    spec = {"study": {"name": "small", "n_trials": 2, "sampler": "random", "pruner": "none"},
            "task": {"type": "classify", "dataset": "digits", "epochs": 1, "batch_size": 64, "train_limit": 300},
            "model": {"family": "mlp"}, "space": {"width": {"type": "int", "low": 8, "high": 16}},
            "tracking": tracking or {"enabled": False}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "status"])
def test_a_database_host_that_never_answers_is_named_and_given_up_on(command: str, tmp_path: Path) -> None:
    with silent_server() as port:
        url = f"postgresql://hpsearch:s3cret-pw@127.0.0.1:{port}/hpsearch"
        code, output, took = _hpsearch([command, str(_small_spec(tmp_path)), "--storage", url], tmp_path,
                                       timeout=120)
    assert code == 1, output
    # While it waits it says for what; then one clear error, no traceback, within the connect timeout.
    assert f"waiting for the Optuna storage postgresql+psycopg2://hpsearch:***@127.0.0.1:{port}/hpsearch" in output
    assert "Error: cannot open the Optuna storage" in output and "timeout expired" in output, output
    assert "Traceback" not in output and "s3cret-pw" not in output
    assert took < 60  # imports (~10 s on a busy 2-core box) + the 10 s connect timeout


@pytest.mark.slow
def test_a_tracking_server_that_never_answers_costs_a_bounded_wait(tmp_path: Path) -> None:
    with silent_server() as port:
        # A user's own MLflow HTTP settings win over hpsearch's defaults: 2 s, one retry.
        code, output, took = _hpsearch(["run", str(_small_spec(tmp_path, uri=f"http://127.0.0.1:{port}")),
                                        "--no-finish"], tmp_path, timeout=300, MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    assert code == 0, output  # tracking is a bonus: the study itself ran
    assert f"waiting for the MLflow store http://127.0.0.1:{port} (to create or find the experiment" in output
    assert f"warning: MLflow store http://127.0.0.1:{port} could not create or find the experiment" in output
    assert "Read timed out" in output and "2 of 2 trials finished" in output, output
    assert took < 150, output  # ~40 s on an idle 2-core box: imports, a 4 s wait, two tiny trials


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """Yield a folder on a real 600 KiB file system of its own (a tmpfs), removed afterwards.

    Needs the right to mount (root, as in CI's container); there is no full disk to be had otherwise.
    """
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a small tmpfs (needs root): {mounted.stderr}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# Packed: the pack loop left a member RUNNING, its worker's full disk unnamed as such.
@pytest.mark.slow
@pytest.mark.parametrize("pack", [1, 3], ids=["alone", "packed"])
def test_a_full_disk_stops_the_study_with_a_clear_error_and_no_running_trial(small_disk: Path, tmp_path: Path,
                                                                              pack: int) -> None:
    spec = _small_spec(tmp_path)
    spec.write_text(spec.read_text().replace("n_trials: 2", "n_trials: 60").replace("epochs: 1", "epochs: 2"))
    started = time.monotonic()
    code, output, _ = _hpsearch(["run", str(spec), "--runs-dir", str(small_disk / "runs"), "--pack", str(pack)],
                                tmp_path, timeout=300)
    took = time.monotonic() - started
    assert code == 1, output
    # Named as a full disk, at once: not taken for a database outage (no 2-minute wait, no "is back").
    assert "the disk is full" in output and ("database or disk is full" in output
                                             or "No space left on device" in output), output
    assert "lost the Optuna storage" not in output and "is back" not in output
    assert "Traceback" not in output and "Should not reach" not in output, output
    assert took < 120, output
    study = optuna.load_study(study_name="small", storage=f"sqlite:///{small_disk / 'runs' / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and 0 < states.count("COMPLETE") < 60, states
