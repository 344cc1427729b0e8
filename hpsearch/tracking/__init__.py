"""MLflow at the edge: one parent run per study, one child run per trial, never a stopped study.

The only package that imports mlflow (lazily: commands that track nothing stay fast). Its modules,
one concept each:

- ``_tracker``: :class:`Tracker`, through which every call to the store goes, its failures turned
  into warnings;
- ``_writer``: a trial's writes made by one background thread per process (``Tracker.later``), in
  order, flushed before the trial is told and at exit;
- ``_store``: a tracking URI checked (by the spec's one rule) and MLflow opened on it safely and with time limits;
- ``_warnings``: what a failed call says, once a minute at most;
- ``_tags``, ``_runs`` and ``_values``: what ties runs to a study, those runs found again, and values
  logged within MLflow's limits;
- ``_datasets``: the data a run used, as MLflow dataset inputs;
- ``_registry``: models logged and registered, and the alias ``champion``;
- ``_views``: the MLflow UI's pages of a study, and its saved view of the runs table.
"""

from hpsearch.tracking._datasets import DatasetRecord
from hpsearch.tracking._registry import CHAMPION, DATA_TAG, DIRECTION_TAG, RANKED_TAG, VERSION_METRIC_TAG
from hpsearch.tracking._store import check_store
from hpsearch.tracking._tags import PARENT_TAG, REFIT_TAG, ROLE_TAG, STUDY_TAG, TRIAL_TAG
from hpsearch.tracking._tracker import Tracker
from hpsearch.tracking._values import NONFINITE_TAG
from hpsearch.tracking._views import (KIND_TAG, MODEL_TRAINING, TRAINING_VIEW, VIEW_TAG, experiment_url,
                                      run_page_url, study_view_id)

__all__ = [
    "CHAMPION", "DATA_TAG", "DIRECTION_TAG", "KIND_TAG", "MODEL_TRAINING", "NONFINITE_TAG", "PARENT_TAG",
    "RANKED_TAG", "REFIT_TAG", "ROLE_TAG", "STUDY_TAG", "TRAINING_VIEW", "TRIAL_TAG", "VERSION_METRIC_TAG",
    "VIEW_TAG", "DatasetRecord", "Tracker", "check_store", "experiment_url", "run_page_url",
    "study_view_id",
]
