"""The errors hpsearch raises for bad input and failed resources.

Every user-facing problem is an :class:`HPSearchError`; the CLI prints its
message as ``Error: ...`` with no traceback and exits non-zero.
"""

from __future__ import annotations


class HPSearchError(Exception):
    """Base class of every error that is the user's to fix."""


class SpecError(HPSearchError):
    """A study spec (YAML) or a command-line setting breaks a rule."""


class DataError(HPSearchError):
    """A dataset cannot be found, read or split as asked."""


class StorageError(HPSearchError):
    """An Optuna storage or MLflow store cannot be reached or used."""
