"""A study's runs found by their tags (see :mod:`._tags`): its parent run, its trials' runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpsearch.tracking._tags import PARENT_TAG, ROLE_TAG, STUDY_TAG, TRIAL_TAG
from hpsearch.tracking._values import quote

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

_PAGE = 1000  # runs per search page


def search(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Return every active run of the experiment that matches, oldest first (start time, then id)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def study_runs(client: MlflowClient, experiment_id: str, study_name: str) -> list[Run]:
    """Return the study's parent runs in the experiment, oldest first (one, unless something went wrong)."""
    return search(client, experiment_id, f"tags.`{STUDY_TAG}` = {quote(study_name)} and tags.`{ROLE_TAG}` = 'study'")


def live_study_run(client: MlflowClient, experiment_id: str, study_name: str, run_id: str) -> Run | None:
    """Return the run if it is the study's active parent run in this experiment, else None."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # deleted for good, or made in another store
            return None
        raise
    tags = run.data.tags
    live = run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
    return run if live and tags.get(STUDY_TAG) == study_name and tags.get(ROLE_TAG) == "study" else None


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str,
               trial_number: int | None = None) -> list[Run]:
    """Return the runs under the parent run, oldest first: all of them, or those of one trial."""
    where = f"tags.`{PARENT_TAG}` = {quote(parent_run_id)}"
    if trial_number is not None:
        where += f" and tags.`{TRIAL_TAG}` = '{int(trial_number)}'"
    return search(client, experiment_id, where)
