"""hpsearch's messages go through `logging`: the CLI prints them (-q quieter, -v louder), a library
user silences or redirects them like any library's."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hpsearch.cli import cli
from hpsearch.log import ROOT, level_flag

from .test_stopping import _write

STOP_NOTE = "study 'stops' stops early: "  # an INFO note the CLI prints by default
DEBUG_LINE = "debug: this worker trains on cpu with 1 CPU thread(s)."


@pytest.mark.parametrize(("flags", "note", "debug"), [([], True, False), (["-q"], False, False),
                                                      (["-v"], True, True), (["--quiet"], False, False)],
                         ids=["default", "-q", "-v", "--quiet"])
def test_the_cli_prints_notes_by_default_fewer_with_q_and_debug_lines_with_v(
        tmp_path: Path, flags: list[str], note: bool, debug: bool) -> None:
    path = _write(tmp_path, {"target": 0.0}, n_trials=3)  # the first complete trial reaches the target
    data = yaml.safe_load(path.read_text())
    data["task"]["epochs"] = 1
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, [*flags, "worker", str(path), "--quiet", "--threads", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (STOP_NOTE in result.stderr) is note, result.stderr
    assert (DEBUG_LINE in result.stderr) is debug, result.stderr
    assert STOP_NOTE not in result.stdout  # messages go to stderr, as before


def test_q_keeps_warnings(tmp_path: Path) -> None:
    path = _write(tmp_path, None)
    data = yaml.safe_load(path.read_text())
    data["task"]["batch_size"] = 4096  # larger than digits' training split: warned
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["-q", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"warning: {path}: a batch size of 4096 is larger than" in result.stderr


def test_v_and_q_together_are_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["-v", "-q", "validate", str(tmp_path / "spec.yaml")])
    assert result.exit_code == 2 and "not both" in result.output


# A library user who configures nothing: hpsearch's warnings reach stderr through Python's
# last-resort handler; one line of `logging` silences them.
_FALLBACK = """
import logging, sys
from hpsearch.data import load_search_data
if sys.argv[1] == "silenced":
    logging.getLogger("hpsearch").setLevel(logging.ERROR)
data = load_search_data("kmnist", data_dir=sys.argv[2], fallback="digits", download=False)
print(data.provenance.name)
"""


@pytest.mark.parametrize("mode", ["default", "silenced"])
def test_a_library_user_sees_warnings_and_can_silence_them(tmp_path: Path, mode: str) -> None:
    done = subprocess.run([sys.executable, "-c", _FALLBACK, mode, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "digits"  # the fallback was used either way
    warned = "dataset 'kmnist' could not be loaded" in done.stderr
    assert warned is (mode == "default"), done.stderr


@pytest.mark.parametrize(("level", "flag"), [(logging.DEBUG, ["-v"]), (logging.INFO, []),
                                             (logging.WARNING, ["-q"]), (logging.ERROR, ["-q"])])
def test_worker_processes_get_the_parents_level(level: int, flag: list[str]) -> None:
    logger = logging.getLogger(ROOT)
    before = logger.level
    logger.setLevel(level)
    try:
        assert level_flag() == flag
    finally:
        logger.setLevel(before)
