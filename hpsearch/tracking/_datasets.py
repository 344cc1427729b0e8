"""The data a run used, as MLflow dataset inputs: a description (name, digest, source, sizes), never the data."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DatasetRecord:
    """One split of the data as an MLflow dataset input: what a run trained, validated or tested on."""

    name: str  # the dataset's name; a fallback says so in it
    digest: str  # content hash of the split's images and labels
    source: str  # where it was read: a folder, a URL, or a package
    context: str  # "training", "validation" or "test" (MLflow's mlflow.data.context)
    profile: Mapping[str, Any] = field(default_factory=dict)  # sizes and provenance, shown on the run page


def dataset_entity(record: DatasetRecord) -> Any:
    """Return the MLflow Dataset entity describing ``record`` (its source typed as MLflow's data sources are)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.entities import Dataset

    source: Any = CodeDatasetSource({"source": record.source})  # a package that ships the data
    if record.source.startswith(("http://", "https://")):
        source = HTTPDatasetSource(record.source)
    elif record.source.startswith("/"):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        # MLflow registers its local source twice and warns that a file URI is ambiguous: it is not.
        with contextlib.suppress(Exception), warnings.catch_warnings():  # no local source: the code source above
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(Path(record.source).as_uri())
    return Dataset(name=record.name, digest=record.digest, source_type=source._get_source_type(),
                   source=source.to_json(), profile=json.dumps(dict(record.profile)))
