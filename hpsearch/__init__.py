"""hpsearch: declared hyperparameter searches for PyTorch models, on Optuna and MLflow."""

import os

# Idle OpenMP threads sleep instead of spinning: on a shared or busy machine (several workers,
# CI) spinning threads made a small model's epoch up to 10x slower. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hpsearch.errors import DataError, HPSearchError, SpecError, StorageError

__all__ = ["DataError", "HPSearchError", "SpecError", "StorageError"]
__version__ = "0.1.0"
