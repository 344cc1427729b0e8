"""What a person opens first: the MLflow UI's pages of a study, and its saved view of the runs table."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

from hpsearch.tracking._tags import STUDY_TAG
from hpsearch.tracking._values import quote as filter_quote

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow 3's UI says what an experiment is for with this tag; "custom_model_development" is its
# "Machine learning" kind (the GenAI kinds open on traces). The 3.17 UI decides the view from the
# page address instead (TRAINING_VIEW), but reads the tag where its workflow switch is off.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# The MLflow UI's own query: open the model-training view (the runs table), not the GenAI one.
TRAINING_VIEW = "workflowType=machine_learning"
# Saved views of the runs table live in experiment tags with this prefix (the UI's "Views" menu);
# `viewStateShareKey=<id>` in the address opens one.
VIEW_TAG = "mlflow.sharedViewState."


def experiment_url(ui_url: str, experiment_id: str, view: str | None = None) -> str:
    """Return the MLflow UI page of an experiment's runs table, in the model-training view.

    With ``view``, the page opens that saved view of the table (see :meth:`Tracker.study_view`).
    """
    query = TRAINING_VIEW + (f"&viewStateShareKey={quote(view, safe='')}" if view else "")
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def study_view_id(study_name: str) -> str:
    """Return the id of a study's saved view of the runs table (see :meth:`Tracker.study_view`)."""
    return f"hpsearch-{study_name}"


def run_page_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """Return the MLflow UI page of one run, in the model-training view."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def save_study_view(client: MlflowClient, experiment_id: str, study_name: str, *, order_by: str, ascending: bool,
                     metrics: Sequence[str], params: Sequence[str]) -> str:
    """Save the study's view of the runs table in the experiment if new or changed; return its id.

    See ``Tracker.study_view`` for what it shows.
    """
    view_id = study_view_id(study_name)
    columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in params]
    state = {"searchFilter": f"tags.`{STUDY_TAG}` = {filter_quote(study_name)}",
             "orderByKey": f"metrics.`{order_by}`", "orderByAsc": ascending,
             "selectedColumns": [*columns, "attributes.`Dataset`", "attributes.`Models`"],
             "columnOrder": columns}
    key = VIEW_TAG + view_id
    saved = client.get_experiment(experiment_id).tags.get(key)
    with contextlib.suppress(Exception):
        if saved and json.loads(json.loads(saved)["state"]) == state:
            return view_id  # every worker asks; the first one wrote it
    now = int(time.time() * 1000)
    client.set_experiment_tag(experiment_id, key, json.dumps({
        "name": f"hpsearch: study {study_name}, best {order_by} first", "createdAt": now, "updatedAt": now,
        "state": json.dumps(state)}))
    return view_id
