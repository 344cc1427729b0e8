"""The reference classifier of inpaint: trained once per training split, cached, and a judge worth trusting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hpsearch import reference, tasks
from hpsearch.data import SearchData, load_search_data
from hpsearch.tasks import make_task
from hpsearch.train import evaluate

from .test_tasks import Echo, params


@pytest.fixture(scope="module")
def digits() -> SearchData:
    return load_search_data("digits", download=False)


def test_reference_is_trained_once_then_loaded(digits: SearchData, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = reference.load_or_train_reference(digits, tmp_path, device="cpu")
    path = reference.reference_path(digits, tmp_path)
    assert path.exists() and path.name.startswith(f"reference-{digits.provenance.sha256}-")
    # Another validation split (seed) of the same dataset gets its own judge: it must never have
    # trained on the digits it will judge.
    other = load_search_data("digits", seed=12345)
    assert reference.reference_path(other, tmp_path) != path
    assert not first.training and not any(p.requires_grad for p in first.parameters())

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached reference classifier was trained again")

    monkeypatch.setattr(reference, "train_reference_classifier", no_training)
    second = reference.load_or_train_reference(digits, tmp_path, device="cpu")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    # It judges digits well: a success rate near 1 means the in-painting, not the judge, is good.
    accuracy = evaluate(second, digits.val, make_task("classify", {}), mean=0.0, std=1.0, device="cpu")
    assert accuracy["val_accuracy"] > 0.9

    # A perfect in-painting scores the reference's own accuracy, overall and per class.
    clean = tasks.to_unit(digits.val.images)
    inpaint = make_task("inpaint", params(mask_size=3), reference=second)
    metrics = evaluate(Echo(clean), digits.val, inpaint, mean=0.0, std=1.0, device="cpu", batch_size=len(clean))
    assert metrics["val_inpaint_success"] == pytest.approx(accuracy["val_accuracy"])
    per_class = [metrics[f"val_inpaint_success_{k}"] for k in range(digits.n_classes)]
    counts = torch.bincount(digits.val.labels, minlength=digits.n_classes).tolist()
    assert sum(s * c for s, c in zip(per_class, counts, strict=True)) / len(digits.val) == pytest.approx(
        metrics["val_inpaint_success"])
