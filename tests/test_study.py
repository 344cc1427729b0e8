"""Opening a study (hpsearch.study.open_study): created once, resumed after, its known-good configurations first."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from hpsearch.record import ENQUEUED_ATTR, INTERRUPTED_ATTR
from hpsearch.spec import Spec, parse_spec
from hpsearch.study import open_study

KNOWN_GOOD = {"lr": 0.01, "width": 16}


def _spec(tmp_path: Path) -> Spec:
    return parse_spec({
        "study": {"name": "s", "metric": "val_accuracy", "n_trials": 3, "enqueue": [KNOWN_GOOD],
                  "storage": f"sqlite:///{tmp_path / 'optuna.db'}"},
        "task": {"type": "classify", "dataset": "digits", "epochs": 1},
        "model": {"family": "mlp"},
        "space": {"width": {"type": "int", "low": 8, "high": 32}, "lr": {"type": "float", "low": 1e-3, "high": 0.1}},
        "tracking": {"enabled": False},
    }, source="spec.yaml", runs_dir=tmp_path)


def _waiting(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.WAITING,))


def test_an_enqueued_configuration_is_tried_once_across_resumes(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    study = open_study(spec)
    assert [t.system_attrs["fixed_params"] for t in _waiting(study)] == [KNOWN_GOOD]
    assert _waiting(open_study(spec)) and len(study.get_trials()) == 1  # waiting: not enqueued twice
    trial = study.ask()
    study.tell(trial, 0.5)
    assert not _waiting(open_study(spec))  # tried: not again


# Seen rerunning the Fashion-MNIST CNN: a Ctrl-C during the study's first trial, the known-good
# configuration the spec lists first, lost it for good; the resumed study never tried it.
def test_an_enqueued_configuration_interrupted_by_ctrl_c_is_tried_again_on_resume(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    study = open_study(spec)
    trial = study.ask()
    trial.set_user_attr(INTERRUPTED_ATTR, "stopped by SIGINT")  # as a stop signal leaves it
    study.tell(trial, state=TrialState.FAIL)
    again = _waiting(open_study(spec))
    assert [t.system_attrs["fixed_params"] for t in again] == [KNOWN_GOOD]
    assert again[0].user_attrs[ENQUEUED_ATTR] is True


def test_an_enqueued_configuration_that_failed_on_its_own_is_not_tried_again(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    study = open_study(spec)
    study.tell(study.ask(), state=TrialState.FAIL)  # e.g. its loss diverged: trying it again gives the same
    assert not _waiting(open_study(spec))
