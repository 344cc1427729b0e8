"""hpsearch: declared hyperparameter searches for PyTorch models, on Optuna and MLflow."""

from hpsearch.errors import DataError, HPSearchError, SpecError, StorageError

__all__ = ["DataError", "HPSearchError", "SpecError", "StorageError"]
__version__ = "0.1.0"
