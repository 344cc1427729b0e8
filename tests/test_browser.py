"""What a person sees: optuna-dashboard, the MLflow UI and the report, in a real headless Chromium.

The servers are started with the command lines `hpsearch dashboard` / `hpsearch ui` use
(`hpsearch.servers`); the browser is Debian's /usr/bin/chromium driven by Playwright. Screenshots
land in test-output/screenshots/ for a person to look at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpsearch import insights, report, servers
from hpsearch.errors import HPSearchError
from hpsearch.spec import parse_spec

from .servers import _QUIET_ENV, free_port, port_is_open, wait_http
from .test_figures import Built, _tracker, build_study, make_spec, spec_raw

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-output" / "screenshots"
CHROMIUM = "/usr/bin/chromium"  # Debian's; never a downloaded browser
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
UI_TIMEOUT_MS = 30_000  # the MLflow UI's first render pulls megabytes of JavaScript: slow on 2 cores
_IMAGE_LOADED = """sel => { const i = document.querySelector(sel); return !!i && i.complete && i.naturalWidth > 0; }"""
_QUIET = _QUIET_ENV  # no phoning home from a test, no MLflow job runner (tests/servers.py says why)
_QUIET_NOT_JOBS = {k: v for k, v in _QUIET.items() if k != servers.JOB_EXECUTION_ENV}  # what `hpsearch ui` sets


# --------------------------------------------------------------------------- command lines (fast)


def test_dashboard_command(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "denoise")
    cmd = servers.dashboard_command(spec, port=8123)
    assert cmd.argv == [sys.executable, "-m", "hpsearch._dashboard", "--host", "127.0.0.1", "--port", "8123",
                        "--artifact-dir", spec.artifacts_dir]
    assert cmd.env["HPSEARCH_DASHBOARD_STORAGE"] == spec.study.storage  # the URL: in the environment, not in `ps`


def test_ui_command_serves_the_local_store_and_its_artifacts(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "denoise")
    cmd = servers.ui_command(spec, host="0.0.0.0", port=5123)
    assert cmd.argv[:4] == [sys.executable, "-m", "mlflow", "server"]
    options = dict(zip(cmd.argv[4::2], cmd.argv[5::2]))
    assert options == {
        "--host": "0.0.0.0", "--port": "5123", "--workers": "1",
        "--default-artifact-root": Path(spec.tracking.artifact_root).as_uri(),
        "--artifacts-destination": spec.tracking.artifact_root}
    assert cmd.env["MLFLOW_BACKEND_STORE_URI"] == spec.tracking.uri  # the store URL: in the environment
    assert servers.remote_ui_url(spec) is None


@pytest.mark.parametrize("url", ["postgresql://u:pw@db:5432/x", "postgresql+psycopg2://u:pw@db:5432/x"])
def test_server_command_lines_name_an_installed_postgresql_driver(tmp_path: Path, url: str) -> None:
    # SQLAlchemy reads postgresql:// as psycopg (3), which is not installed: the servers get psycopg2's form.
    raw = {"study": {"name": "s", "storage": url}, "task": {"type": "classify", "dataset": "digits"},
           "model": {"family": "mlp"}, "tracking": {"uri": url}}
    spec = parse_spec(raw, source="s.yaml", runs_dir=tmp_path)
    from hpsearch._dashboard import STORAGE_ENV

    assert servers.dashboard_command(spec).env[STORAGE_ENV] == "postgresql+psycopg2://u:pw@db:5432/x"
    assert servers.ui_command(spec).env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://u:pw@db:5432/x"


@pytest.mark.parametrize("tracking, message", [
    ({"uri": "http://mlflow.example:5000/"}, "open it there"),
    ({"enabled": False}, "tracking.enabled is false"),
])
def test_ui_command_refuses_what_it_cannot_start(tmp_path: Path, tracking: dict[str, Any], message: str) -> None:
    raw = {"study": {"name": "s", "storage": f"sqlite:///{tmp_path / 'o.db'}"},
           "task": {"type": "classify", "dataset": "digits"}, "model": {"family": "mlp"}, "tracking": tracking}
    spec = parse_spec(raw, source="s.yaml", runs_dir=tmp_path)
    with pytest.raises(HPSearchError, match=message):
        servers.ui_command(spec)
    if "uri" in tracking:
        assert servers.remote_ui_url(spec) == "http://mlflow.example:5000"


@pytest.mark.parametrize("tracking, exit_code, output", [
    ({"uri": "http://mlflow.example:5000"}, 0, "s.yaml tracks to the MLflow server at http://mlflow.example:5000: "
                                                "open it there.\n"),
    ({"enabled": False}, 1, "Error: s.yaml: tracking.enabled is false, so there is no MLflow store to show.\n"),
])
def test_ui_command_line_without_a_server_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tracking: dict[str, Any], exit_code: int, output: str) -> None:
    import yaml
    from click.testing import CliRunner

    from hpsearch.cli import cli

    if "ui" not in cli.commands:
        pytest.skip("`hpsearch ui` is not wired into cli.py yet")
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(yaml.safe_dump({
        "study": {"name": "s"}, "task": {"type": "classify", "dataset": "digits"}, "model": {"family": "mlp"},
        "tracking": tracking}))
    result = CliRunner().invoke(cli, ["ui", "s.yaml"])
    assert (result.exit_code, result.output) == (exit_code, output)


@pytest.mark.parametrize("host, expected", [("127.0.0.1", "http://127.0.0.1:80"), ("0.0.0.0", "http://127.0.0.1:80"),
                                            ("myhost", "http://myhost:80")])
def test_browser_url(host: str, expected: str) -> None:
    assert servers.browser_url(host, 80) == expected


@contextlib.contextmanager
def _someone_elses_server() -> Iterator[int]:
    """Yield the port of another program's web server on 127.0.0.1: it answers 200 to everything."""
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["dashboard", "ui"])
def test_a_taken_port_is_refused_not_reported_open(tmp_path: Path, command: str) -> None:
    import yaml

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"study": {"name": "s"}, "task": {"type": "classify", "dataset": "digits"},
                                    "model": {"family": "mlp"}}))
    with _someone_elses_server() as port:
        result = subprocess.run([sys.executable, "-m", "hpsearch", command, str(spec), "--port", str(port)],
                                capture_output=True, text=True, timeout=120, cwd=REPO,
                                env={**os.environ, **_QUIET, "PYTHONPATH": str(REPO),
                                     "HPSEARCH_RUNS_DIR": str(tmp_path / "runs")})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"Error: port {port} on 127.0.0.1 is already in use by another program; nothing was started." in output
    assert "open http" not in output and "Traceback" not in output, output


# --------------------------------------------------------------------------- real servers, real browser


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory, mlflow_schema: Path) -> Built:
    """A finished denoise study, tracked in MLflow, with its notes, published plots and report."""
    built = build_study(tmp_path_factory.mktemp("seen"), "denoise", mlflow_schema=mlflow_schema)
    assert insights.refresh(built.spec, built.study, _tracker(built.spec), built.parent_run_id, force=True)
    report.write_report(built.spec, built.study, Path(built.spec.runs_dir) / "report")
    SHOTS.mkdir(parents=True, exist_ok=True)
    return built


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module: Playwright's sync API allows one instance per thread at a time."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def page(seen: Built, browser: Any) -> Iterator[Any]:
    opened = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        yield opened
    finally:
        opened.close()


@contextlib.contextmanager
def running(cmd: servers.ServerCommand, ready_url: str, log: Path,
            env: dict[str, str] = _QUIET) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server command until the block exits (stopped as `hpsearch dashboard/ui` stop it)."""
    with log.open("ab") as out:
        process = subprocess.Popen(cmd.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env, **cmd.env}, start_new_session=True)
    try:
        try:
            wait_http(ready_url, process=process)
        except Exception as exc:
            raise AssertionError(f"{cmd.argv[0]} did not start: {exc}\n{log.read_text()[-3000:]}") from None
        yield process
    finally:
        servers.stop(process)


def _wait_image(page: Any, selector: str) -> None:
    page.wait_for_function(_IMAGE_LOADED, arg=selector, timeout=UI_TIMEOUT_MS)


@pytest.mark.slow
def test_dashboard_shows_the_study_its_trials_notes_and_images(seen: Built, page: Any) -> None:
    from playwright.sync_api import expect

    spec, study_id = seen.spec, seen.study._study_id
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(servers.dashboard_command(spec, port=port), f"{url}/api/studies",
                 Path(spec.runs_dir) / "dashboard.log"):
        # The study list names the study.
        page.goto(f"{url}/dashboard")
        expect(page.get_by_role("heading", name=f"{study_id}. bottleneck")).to_be_visible(timeout=UI_TIMEOUT_MS)
        page.screenshot(path=SHOTS / "dashboard-studies.png")

        # The study page: plots of its own, and hpsearch's comparison plots as study artifacts.
        page.goto(f"{url}/dashboard/studies/{study_id}")
        _wait_image(page, 'img[alt="reconstructions_by_bottleneck.png"]')
        _wait_image(page, 'img[alt="learning_curves.png"]')
        page.screenshot(path=SHOTS / "dashboard-study.png", full_page=True)

        # The trial list: all 9 trials, the selected trial's note and its reconstruction image.
        page.goto(f"{url}/dashboard/studies/{study_id}/trials")
        expect(page.get_by_text("9 Trials")).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(page.get_by_text("Trial #0: complete")).to_be_visible()
        expect(page.get_by_role("link", name="MLflow run")).to_have_attribute(
            "href", f"http://127.0.0.1:5000/#/experiments/{seen.experiment_id}/runs/{seen.mlflow_run_ids[0]}"
                    "?workflowType=machine_learning")
        _wait_image(page, 'img[alt="reconstruction.png"]')
        page.get_by_role("heading", name="Artifacts").evaluate("e => e.scrollIntoView()")
        page.screenshot(path=SHOTS / "dashboard-trial.png")

        # The study note, loud about the fallback dataset.
        page.goto(f"{url}/dashboard/studies/{study_id}/note")
        expect(page.get_by_text("FALLBACK DATA", exact=False).first).to_be_visible(timeout=UI_TIMEOUT_MS)
        page.screenshot(path=SHOTS / "dashboard-note.png")


@pytest.mark.slow
def test_mlflow_ui_shows_the_experiment_runs_and_images(seen: Built, page: Any) -> None:
    from playwright.sync_api import expect

    spec = seen.spec
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(servers.ui_command(spec, port=port), f"{url}/health", Path(spec.runs_dir) / "mlflow-ui.log",
                 env=_QUIET_NOT_JOBS) as process:
        # Only the server and its one worker: not MLflow's job runner and its consumers (8 processes).
        group = subprocess.run(["ps", "-o", "args=", "-g", str(process.pid)], capture_output=True, text=True).stdout
        assert "huey" not in group and "_job_runner" not in group, group
        # MLflow 3 opens experiments in its GenAI view; the query picks the model-training view.
        page.goto(f"{url}/#/experiments/{seen.experiment_id}/runs?workflowType=machine_learning")
        expect(page.get_by_text(spec.tracking.experiment).first).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(page.get_by_role("link", name=spec.study.name, exact=True)).to_be_visible(timeout=UI_TIMEOUT_MS)
        page.screenshot(path=SHOTS / "mlflow-experiment.png")

        # A trial's run: its reconstruction grid, served from the local artifact root.
        run_id = seen.mlflow_run_ids[2]
        page.goto(f"{url}/#/experiments/{seen.experiment_id}/runs/{run_id}/artifacts?workflowType=machine_learning")
        page.get_by_text("images", exact=True).click(timeout=UI_TIMEOUT_MS)
        page.get_by_text("reconstruction.png", exact=True).click()
        _wait_image(page, 'img[src^="blob:"]')
        page.screenshot(path=SHOTS / "mlflow-trial-image.png")

        # The parent run: hpsearch's study plots under study/.
        page.goto(f"{url}/#/experiments/{seen.experiment_id}/runs/{seen.parent_run_id}?workflowType=machine_learning")
        expect(page.get_by_role("heading", name=spec.study.name)).to_be_visible(timeout=UI_TIMEOUT_MS)
        page.screenshot(path=SHOTS / "mlflow-parent-run.png")
        page.goto(f"{url}/#/experiments/{seen.experiment_id}/runs/{seen.parent_run_id}/artifacts")
        page.get_by_text("study", exact=True).click(timeout=UI_TIMEOUT_MS)
        page.get_by_text("reconstructions_by_bottleneck.png", exact=True).click()
        _wait_image(page, 'img[src^="blob:"]')
        page.screenshot(path=SHOTS / "mlflow-study-plot.png")


@pytest.mark.slow
def test_report_images_all_load_from_the_file_alone(seen: Built, page: Any) -> None:
    html = Path(seen.spec.runs_dir) / "report" / report.HTML_FILE
    page.goto(html.as_uri())
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete && e.naturalWidth > 0])")
    assert len(images) == 7, images  # 6 study plots + the best trial's reconstruction grid
    assert all(ok for _, ok in images), [alt for alt, ok in images if not ok]
    page.screenshot(path=SHOTS / "report.png", full_page=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; `kill`, `docker stop`
def test_serve_answers_then_stops_with_its_server(seen: Built, signum: int) -> None:
    port = free_port()
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_figures import make_spec; from hpsearch import servers;"
        "spec = make_spec(Path(sys.argv[2]), 'denoise'); port = int(sys.argv[3]);"
        "sys.exit(servers.serve(servers.dashboard_command(spec, port=port),"
        " servers.browser_url('127.0.0.1', port), lambda m: print(m, flush=True), host='127.0.0.1', port=port,"
        " ready_path='/api/studies'))"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(REPO), str(Path(seen.spec.runs_dir).parent),
                                str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **_QUIET})
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if line.startswith("open "):
                break
        assert lines[-1].strip() == f"open http://127.0.0.1:{port}  (Ctrl-C stops it)", lines
        assert port_is_open(port)
        process.send_signal(signum)  # the server, in a session of its own, gets nothing from the terminal
        assert process.wait(timeout=30) == 0
        assert "stopping..." in process.stdout.read()
        assert not port_is_open(port), "the dashboard stopped with it"
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_hpsearch_ui_opens_on_the_study_runs_their_metric_and_images(tmp_path: Path, browser: Any,
                                                                    mlflow_schema: Path) -> None:
    """After a tiny real study, the page `hpsearch ui` prints shows the runs table first: every trial
    run (a child of the study's parent run) with its validation accuracy, best first; a trial's image
    is a click away."""
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    from hpsearch.tracking import experiment_url

    from .test_tracking import run_cli, tiny_spec

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    runs_dir = tmp_path / "runs"
    spec_path = tiny_spec(tmp_path)
    shutil.copy(mlflow_schema, tmp_path / "mlflow.db")  # its MLflow store, tables made (not this test's point)
    assert run_cli("run", str(spec_path), "--runs-dir", str(runs_dir)).exit_code == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment_id])
    (parent,) = [r for r in runs if r.data.tags["hpsearch.role"] == "study"]
    trials = [r for r in runs if r.data.tags["hpsearch.role"] == "trial"]
    assert len(trials) == 2 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "hpsearch", "ui", str(spec_path), "--port", str(port),
                                "--runs-dir", str(runs_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, **_QUIET}, start_new_session=True)
    shots = []
    try:
        lines = []
        deadline = time.monotonic() + servers.START_TIMEOUT_S + 30
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("open ")):
            lines.append(process.stdout.readline())
            assert lines[-1] or process.poll() is None, "".join(lines)
        printed = lines[-1].split()[1]
        assert printed == experiment_url(f"http://127.0.0.1:{port}", experiment_id, "hpsearch-tiny"), lines

        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.goto(printed)  # exactly what `hpsearch ui` printed
            # 1. The first page is the model-training runs table: every run of the study, the
            #    trials best first, with their validation accuracy as a column.
            def row_link(run: Any) -> Any:
                return page.locator(f'[role=row] a[href$="/runs/{run.info.run_id}"]').first

            for run in trials + [parent]:
                expect(row_link(run)).to_have_text(run.info.run_name, timeout=UI_TIMEOUT_MS)
            expect(page.locator('[role=columnheader][col-id="metrics.`val_accuracy`"]')).to_be_visible()
            shots.append(SHOTS / "mlflow-ui-first-page.png")
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=shots[-1])
            shown = page.eval_on_selector_all(
                '[role=row][row-id] [col-id="metrics.`val_accuracy`"]',
                "cells => cells.map(c => [c.closest('[role=row]').getAttribute('row-id'),"
                " Number(c.closest('[role=row]').getAttribute('row-index')), c.innerText.trim()])")
            order = [run_id for run_id, _, _ in sorted(shown, key=lambda cell: cell[1])]
            values = {run_id: text for run_id, _, text in shown}
            best_first = sorted(trials, key=lambda r: -r.data.metrics["val_accuracy"])
            assert order == [r.info.run_id for r in best_first] + [parent.info.run_id]
            for run in trials:
                assert float(values[run.info.run_id]) == pytest.approx(run.data.metrics["val_accuracy"])
            assert values[parent.info.run_id] == "-"  # the study's run has test metrics only
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()  # not GenAI's overview

            # 2. A trial's image, from its row: its run page, then its artifacts. (MLflow 3.17's row
            #    links drop the model-training view, so the run page shows GenAI's side bar.)
            row_link(best_first[0]).click()
            page.get_by_role("tab", name="Artifacts").click(timeout=UI_TIMEOUT_MS)
            page.get_by_text("images", exact=True).click(timeout=UI_TIMEOUT_MS)
            page.get_by_text("confusion_matrix.png", exact=True).click()
            _wait_image(page, 'img[src^="blob:"]')
            shots.append(SHOTS / "mlflow-ui-trial-image.png")
            page.screenshot(path=shots[-1])
        finally:
            page.close()
        print("screenshots:", *shots)
    finally:
        servers.stop(process)


@pytest.mark.slow
def test_the_study_page_is_asked_of_the_running_server(tmp_path: Path, mlflow_url: str) -> None:
    import uuid

    from mlflow import MlflowClient

    # The session's server may hold other tests' experiments: this one's name is its own.
    raw = spec_raw(tmp_path, "classify")
    raw["tracking"] = {**raw["tracking"], "experiment": f"page-{uuid.uuid4().hex[:8]}"}
    spec = parse_spec(raw, source="classify.yaml", runs_dir=tmp_path / "runs")
    said: list[str] = []
    url = mlflow_url
    page = servers.study_page(spec, said.append)
    # Before the study's first run: the server's own address, and why.
    assert page(url) == url
    assert said == [f"the MLflow experiment {spec.tracking.experiment!r} is not in this store yet "
                    f"(run `hpsearch run {spec.path}` first)."]
    # An experiment without hpsearch's saved view (an older study): its runs, in the model-training view.
    client = MlflowClient(url)
    experiment_id = client.create_experiment(spec.tracking.experiment)
    assert page(url) == f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.hpsearch-{spec.study.name}", "{}")
    assert page(url).endswith(f"?workflowType=machine_learning&viewStateShareKey=hpsearch-{spec.study.name}")
