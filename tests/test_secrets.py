"""No secret escapes: a password in a storage or tracking URL, in any form a URL can carry it, is never
printed, stored in the study, tagged or logged in MLflow, written into a report, or put on a command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
import yaml
from click.testing import CliRunner

from hpsearch.cli import cli
from hpsearch.spec import hide_secrets, mask_password, url_secrets, without_credentials

from .servers import free_port, postgres_server

REPO = Path(__file__).resolve().parents[1]

# Every piece of this password is distinctive, so that half of it escaping is caught too.
PIECES = ("Kq7x", "Wz3v", "Rt8p", "Mn5j", "Lb2h", "Gy6d", "Fc9s")
PASSWORD = "Kq7x@Wz3v:Rt8p/Mn5j?Lb2h#Gy6d%Fc9s"  # "@", ":", "/", "?", "#", "%": all need escaping in a URL
RAW_OK = "Kq7x:Wz3v/Rt8p"  # ":" and "/" unescaped: SQLAlchemy (and so Optuna) still reads the password right


def _leaks(text: str, password: str = PASSWORD) -> list[str]:
    """Return the pieces of ``password`` found in ``text``."""
    return [p for p in PIECES if p in password and p in text]


# --------------------------------------------------------------------------- the rule (fast)


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://u:pw-1@h:5432/db", "postgresql://u:***@h:5432/db"),  # userinfo
    ("postgresql://:pw-1@h/db?user=u", "postgresql://:***@h/db?user=u"),  # an empty user name
    ("postgresql+psycopg2://u:p%40w%3A1%2F@h/db", "postgresql+psycopg2://u:***@h/db"),  # percent-escaped
    ("postgresql://u:pa:ss/wd@h/db", "postgresql://u:***@h/db"),  # raw ":" and "/" in the password
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # raw "@": masked whole all the same
    ("postgresql://user@server:pw-1@h/db", "postgresql://user@server:***@h/db"),  # "@" in the user name
    ("postgresql://u@h/db?sslmode=require&password=pw-1&application_name=a",
     "postgresql://u@h/db?sslmode=require&password=***&application_name=a"),  # a query parameter
    ("mysql://u@h/db?passwd=pw-1;token=t-1", "mysql://u@h/db?passwd=***;token=***"),
    ("postgresql://u@h/db?sslpassword=pw-1&api%5Fkey=k-1", "postgresql://u@h/db?sslpassword=***&api%5Fkey=***"),
    ("http://u:pw-1@127.0.0.1:5000", "http://u:***@127.0.0.1:5000"),
    ("https://tok-1@mlflow.example", "https://***@mlflow.example"),  # a bare token as the user
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),  # nothing to hide: unchanged
    ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
    # In a message, every URL is masked and the words around it are kept.
    ("error: 'postgresql://u:pw-1@h/db' refused; see https://sqlalche.me/e/20/e3q8",
     "error: 'postgresql://u:***@h/db' refused; see https://sqlalche.me/e/20/e3q8"),
])
def test_mask_password_covers_every_form(url: str, masked: str) -> None:
    assert mask_password(url) == masked
    for secret in url_secrets(url):
        assert secret not in mask_password(url)


def test_hide_secrets_masks_the_password_a_driver_quotes_decoded() -> None:
    url = f"postgresql://u:{quote(PASSWORD, safe='')}@h/db"
    # A driver reports the decoded password, or the URL as given, or percent-escaped again.
    message = f"auth failed for {PASSWORD!r} at {url} ({quote(PASSWORD, safe='')})"
    assert _leaks(hide_secrets(message, url)) == []
    assert hide_secrets("connection refused", url) == "connection refused"


def test_links_carry_no_credentials() -> None:
    assert without_credentials("http://u:pw-1@127.0.0.1:5000/") == "http://127.0.0.1:5000/"
    assert without_credentials("https://tok@host/prefix?token=t") == "https://host/prefix"


def _spec(tmp_path: Path, **study: object) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "study": {"name": f"secret-{uuid.uuid4().hex[:8]}", "n_trials": 1, "sampler": "random", "pruner": "none",
                  **study},
        "task": {"type": "classify", "dataset": "digits", "epochs": 1, "batch_size": 64, "train_limit": 300},
        "model": {"family": "mlp"},
        "space": {"width": {"type": "int", "low": 8, "high": 16}},
    }))
    return path


@pytest.mark.parametrize("option", ["--storage", "--tracking-uri"])
def test_a_raw_at_in_a_password_is_refused_without_showing_it(tmp_path: Path, option: str) -> None:
    # A driver would end the password at its first "@" and take the rest for the host name.
    url = f"postgresql://u:{PASSWORD}@127.0.0.1:5432/db"
    result = CliRunner().invoke(cli, ["validate", str(_spec(tmp_path)), option, url])
    assert result.exit_code == 1 and "Error:" in result.output and "%40" in result.output, result.output
    assert _leaks(result.output) == []


@pytest.mark.parametrize("uri", [f"http://u:{quote(PASSWORD, safe='')}@127.0.0.1:5000 x",  # a space: no URL
                                 f"ftp://u:{quote(PASSWORD, safe='')}@h/x"])
def test_a_refused_tracking_uri_is_shown_masked(tmp_path: Path, uri: str) -> None:
    result = CliRunner().invoke(cli, ["validate", str(_spec(tmp_path)), "--tracking-uri", uri])
    assert result.exit_code == 1 and "Error:" in result.output, result.output
    assert _leaks(result.output) == [] and "***" in result.output


# --------------------------------------------------------------------------- end to end (real servers)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory):
    """A PostgreSQL of this module's own (its role's password is changed), as (host:port, database URL)."""
    with postgres_server(tmp_path_factory.mktemp("pg-secrets")) as url:
        yield url


def _set_password(url: str, password: str) -> None:
    """Give the role of ``url`` the password ``password`` (whichever of this module's it has now)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    given = make_url(url)
    for current in (given.password, PASSWORD, RAW_OK):
        try:
            conn = psycopg2.connect(host=given.host, port=given.port, dbname=given.database, user=given.username,
                                    password=current)
        except psycopg2.OperationalError:
            continue
        with conn, conn.cursor() as cur:
            cur.execute("ALTER ROLE CURRENT_USER PASSWORD %s", (password,))  # a role may change its own
        conn.close()
        return
    raise AssertionError("none of this module's passwords opens the test database")


def _forms(url: str) -> dict[str, tuple[str, str]]:
    """Return each way of writing the storage URL's password, as (storage URL, the password it carries)."""
    rest = url.split("@", 1)[1]  # 127.0.0.1:PORT/hpsearch
    escaped = quote(PASSWORD, safe="")
    return {
        "userinfo": (f"postgresql+psycopg2://hpsearch:{escaped}@{rest}", PASSWORD),
        "empty user": (f"postgresql+psycopg2://:{escaped}@{rest}?user=hpsearch", PASSWORD),
        "query": (f"postgresql+psycopg2://hpsearch@{rest}?password={escaped}", PASSWORD),
        "raw : and /": (f"postgresql+psycopg2://hpsearch:{RAW_OK}@{rest}", RAW_OK),
    }


def _study_text(storage: str, name: str) -> str:
    """Return everything the Optuna study stores (attrs of the study and of its trials) as text."""
    study = optuna.load_study(study_name=name, storage=storage)
    system = study._storage.get_study_system_attrs(study._study_id)
    trials = [[t.user_attrs, t.system_attrs, t.params] for t in study.get_trials()]
    return json.dumps([study.user_attrs, system, trials], default=str)


def _mlflow_text(tracking: str, experiment: str) -> str:
    """Return every param, tag and metric name of the experiment's runs, and its registered models, as text."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    versions = client.search_model_versions(f"name='{experiment}'")
    return json.dumps([exp.tags, [[r.data.params, r.data.tags, r.info.artifact_uri] for r in runs],
                       [[v.tags, v.source, v.description] for v in versions]], default=str)


def _process_tree_cmdlines(root: int) -> list[str]:
    """Return the command lines of ``root`` and every process it started, as `ps` shows them to anyone."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            out.append((Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
        todo += children.get(pid, [])
    return out


def _serve_and_read_cmdlines(args: list[str], env: dict[str, str], timeout: float = 150) -> tuple[str, list[str]]:
    """Start `hpsearch ARGS`, wait until it says the server is open, return its output and the tree's command lines."""
    process = subprocess.Popen([sys.executable, "-m", "hpsearch", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("open "):
                break
        assert lines and lines[-1].startswith("open "), "".join(lines)
        cmdlines = _process_tree_cmdlines(process.pid)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
        return "".join(lines) + rest, cmdlines
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["userinfo", "empty user", "query", "raw : and /"])
def test_no_form_of_the_password_escapes(form: str, pg: str, mlflow_url: str, tmp_path: Path,
                                         _isolated_runs_dir: Path) -> None:
    storage, password = _forms(pg)[form]
    _set_password(pg, password)
    # The MLflow server has no login, so the credentials in its URL are only carried, never checked.
    tracking = mlflow_url.replace("http://", f"http://u:{quote(password, safe='')}@")
    path = _spec(tmp_path, storage="${HPSEARCH_TEST_DB}")
    name = yaml.safe_load(path.read_text())["study"]["name"]
    env = {"HPSEARCH_TEST_DB": storage, "HPSEARCH_TRACKING_URI": tracking, "MLFLOW_DISABLE_TELEMETRY": "true"}
    runner = CliRunner()
    outputs = {}
    for command in (["validate"], ["validate", "--json"], ["run"], ["status"], ["report", "--out",
                                                                                 str(tmp_path / "report")]):
        result = runner.invoke(cli, [command[0], str(path), *command[1:]], env=env)
        assert result.exit_code == 0, (command, result.output)
        outputs[" ".join(command)] = result.output
    assert "***" in outputs["validate"]  # the URL is shown, masked
    reports = {p.name: p.read_text() for p in (tmp_path / "report").iterdir() if p.suffix in (".md", ".html")}
    places = {**outputs, "study": _study_text(storage, name), "mlflow": _mlflow_text(mlflow_url, name), **reports}

    # The dashboard: the URL reaches it, through the environment, not the command line anyone can read.
    served, cmdlines = _serve_and_read_cmdlines(
        ["dashboard", str(path), "--port", str(free_port())],
        {**os.environ, **env, "PYTHONPATH": str(REPO), "HPSEARCH_RUNS_DIR": str(_isolated_runs_dir)})
    assert any("hpsearch._dashboard" in c for c in cmdlines), cmdlines
    places.update({"dashboard output": served, "dashboard command lines": "\n".join(cmdlines)})
    assert {where: _leaks(text, password) for where, text in places.items() if _leaks(text, password)} == {}


@pytest.mark.slow
def test_the_mlflow_ui_gets_its_store_url_out_of_sight(pg: str, tmp_path: Path, _isolated_runs_dir: Path) -> None:
    _set_password(pg, PASSWORD)
    rest = pg.split("@", 1)[1].rsplit("/", 1)[0]
    tracking = f"postgresql+psycopg2://hpsearch:{quote(PASSWORD, safe='')}@{rest}/mlflow"
    served, cmdlines = _serve_and_read_cmdlines(
        ["ui", str(_spec(tmp_path)), "--port", str(free_port())],
        {**os.environ, "PYTHONPATH": str(REPO), "HPSEARCH_RUNS_DIR": str(_isolated_runs_dir),
         "HPSEARCH_TRACKING_URI": tracking, "MLFLOW_DISABLE_TELEMETRY": "true"})  # a user's secret: not in argv
    assert any("mlflow" in c for c in cmdlines), cmdlines
    assert _leaks(served + "\n".join(cmdlines)) == [], (served, cmdlines)
