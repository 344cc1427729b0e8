"""Reports within an epoch: validation (and the pruner's decision) several times an epoch, in one unit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from hpsearch.cli import cli
from hpsearch.data import SearchData, load_search_data
from hpsearch.knobs import defaults
from hpsearch.models import build_model
from hpsearch.spec import PrunerSpec, parse_spec
from hpsearch.study import make_pruner
from hpsearch.tasks import make_task
from hpsearch.train import TrainConfig, fit
from hpsearch.record import REPORTS_ATTR, auto_reports_per_epoch, epoch_text


@pytest.fixture(scope="module")
def digits() -> SearchData:
    return load_search_data("digits", download=False)


def _fit(data: SearchData, *, reports_per_epoch: int, epochs: int = 2, batch_size: int = 64) -> list[tuple[int, dict]]:
    p = {**defaults(), "epochs": epochs, "batch_size": batch_size, "width": 32, "n_layers": 1}
    torch.manual_seed(0)
    model = build_model("mlp", p, image_shape=data.image_shape, n_classes=data.n_classes)
    reports: list[tuple[int, dict]] = []
    fit(model, data, make_task("classify", p), TrainConfig.from_params(p, seed=0, device="cpu"),
        lambda step, metrics: reports.append((step, metrics)), reports_per_epoch=reports_per_epoch)
    return reports


def test_four_reports_an_epoch_count_steps_in_quarter_epochs(digits: SearchData) -> None:
    reports = _fit(digits, reports_per_epoch=4)
    assert [step for step, _ in reports] == list(range(1, 9))
    assert [m["epoch"] for _, m in reports] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert all("val_accuracy" in m and "train_loss" in m and "lr" in m for _, m in reports)
    # epoch_seconds only where an epoch ends.
    assert [("epoch_seconds" in m) for _, m in reports] == [False, False, False, True] * 2


def test_one_report_an_epoch_is_todays_behaviour(digits: SearchData) -> None:
    reports = _fit(digits, reports_per_epoch=1, epochs=3)
    assert [step for step, _ in reports] == [1, 2, 3]
    assert all(set(m) == {"train_loss", "val_loss", "val_accuracy", "val_error", "epoch_seconds", "lr"}
               for _, m in reports)


def test_reports_are_never_more_than_batches(digits: SearchData) -> None:
    # 1294 images in batches of 1024: two batches, so at most two reports an epoch.
    reports = _fit(digits, reports_per_epoch=8, epochs=1, batch_size=1024)
    assert [m["epoch"] for _, m in reports] == [0.5, 1.0]


@pytest.mark.parametrize(("n_train", "expected"), [(1294, 1), (4500, 1), (14_999, 1), (15_000, 2), (54_000, 5)])
def test_auto_reports_about_every_ten_thousand_images(n_train: int, expected: int) -> None:
    assert auto_reports_per_epoch(n_train) == expected


def test_pruner_settings_in_epochs_become_reports() -> None:
    pruner = make_pruner(PrunerSpec("median", {"n_warmup_steps": 2, "n_startup_trials": 3}), reports_per_epoch=4)
    assert pruner._n_warmup_steps == 8 and pruner._n_startup_trials == 3  # trials stay trials
    band = make_pruner(PrunerSpec("hyperband", {"min_resource": 1, "max_resource": "auto"}), reports_per_epoch=5)
    assert band._min_resource == 5 and band._max_resource == "auto"
    patient = make_pruner(PrunerSpec("patient", {"patience": 2}, wrapped=PrunerSpec("median", {"n_warmup_steps": 1})),
                          reports_per_epoch=3)
    assert patient._patience == 6 and patient._wrapped_pruner._n_warmup_steps == 3


@pytest.mark.parametrize(("epochs", "per_epoch", "reports"), [(0.5, 4, 2), (0.5, 1, 1), (0.25, 5, 2), (0.3, 10, 3),
                                                             (1.5, 2, 3), (0.0, 5, 0)])
def test_pruner_settings_in_fractions_of_an_epoch_become_the_first_report_at_or_after_them(
        epochs: float, per_epoch: int, reports: int, tmp_path: Path) -> None:
    raw = yaml.safe_load((Path(__file__).parents[1] / "studies" / "quickstart.yaml").read_text())
    raw["study"]["pruner"] = {"type": "patient", "patience": epochs,
                              "wrapped": {"type": "median", "n_warmup_steps": epochs}}
    spec = parse_spec(raw, source="test", runs_dir=tmp_path)  # the spec takes fractions of an epoch
    assert spec.study.pruner.options == {"patience": epochs}
    patient = make_pruner(spec.study.pruner, reports_per_epoch=per_epoch)
    assert patient._patience == reports and patient._wrapped_pruner._n_warmup_steps == reports


@pytest.mark.parametrize(("step", "per_epoch", "text"), [(3, 1, "3"), (1, 4, "0.25"), (9, 4, "2.25"), (6, 6, "1")])
def test_steps_read_as_epochs(step: int, per_epoch: int, text: str) -> None:
    assert epoch_text(step, per_epoch) == text


SPEC: dict[str, Any] = {
    "study": {"name": "quarters", "metric": "val_accuracy", "n_trials": 3, "sampler": {"type": "random"},
              # Prunes any trial below 99 % from its first report on.
              "pruner": {"type": "threshold", "lower": 0.99, "n_warmup_steps": 0}},
    "task": {"type": "classify", "dataset": "digits", "epochs": 3, "batch_size": 32, "reports_per_epoch": 4},
    "model": {"family": "mlp"},
    "space": {"width": {"type": "int", "low": 8, "high": 16}, "lr": {"type": "float", "low": 1e-4, "high": 2e-4}},
    "tracking": {"enabled": False},
}


@pytest.mark.slow
def test_a_report_within_the_first_epoch_prunes_a_trial_before_that_epoch_ends(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(cli, ["run", str(path), "--no-finish"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="quarters", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    assert study.user_attrs[REPORTS_ATTR] == 4
    trials = study.get_trials()
    assert trials and all(t.state == TrialState.PRUNED for t in trials)
    assert all(list(t.intermediate_values) == [1] for t in trials)  # a quarter epoch: judged at once
    report = CliRunner().invoke(cli, ["report", str(path), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert "pruned after epoch 0.25" in (tmp_path / "report" / "summary.md").read_text()


@pytest.mark.parametrize(("value", "ok"), [("auto", True), (1, True), (6, True), (0, False), (2.5, False),
                                           ("often", False)])
def test_reports_per_epoch_is_auto_or_a_count(tmp_path: Path, value: Any, ok: bool) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "task": {**SPEC["task"], "reports_per_epoch": value}}))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert (result.exit_code == 0) is ok, result.output
    if not ok:
        assert "task.reports_per_epoch" in result.output and "Traceback" not in result.output
