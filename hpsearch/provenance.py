"""Which data a study used (name, source, sizes, content hash, fallback or not): plain data, no torch.

Read by data.py, which finds it, and by record.py, which stores it with the study.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Provenance:
    """Which data a study actually used, where it came from, and its content hash."""

    name: str
    requested: str
    source: str
    n_train: int
    n_val: int
    n_test: int
    sha256: str
    fallback: bool

    def as_params(self) -> dict[str, str]:
        """Return flat string params (``data.name`` ...) for MLflow params and Optuna user attrs."""
        params = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            params[f"data.{field.name}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return params
