"""Values logged to a run within MLflow's limits: strings cut to length, batches split, NaN and inf as tags."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

NONFINITE_TAG = "hpsearch.nonfinite_"  # + metric name: the last NaN/inf value that was not logged, and its step


def quote(value: str) -> str:
    """Return ``value`` quoted for an MLflow search filter."""
    return f"'{value}'" if "'" not in value else f'"{value}"'


def to_int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def strings(tags: Mapping[str, Any]) -> dict[str, str]:
    """Return tag values as strings cut to MLflow's limit (8,000 characters)."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return {str(k): cut(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


def param_value(value: Any) -> str:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return cut(str(value), MAX_PARAM_VAL_LENGTH)


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log_epochs(client: MlflowClient, run_id: str, epochs: Sequence[tuple[int, int, Mapping[str, float]]], *,
                tags: Mapping[str, str] | None = None) -> None:
    """Log (step, time in ms, metrics) triples and ``tags`` in one batch; NaN and inf become tags."""
    from mlflow.entities import Metric, RunTag

    points, flags = [], {}
    for step, timestamp, metrics in epochs:
        for name, value in metrics.items():
            number = float(value)
            if math.isfinite(number):
                points.append(Metric(str(name), number, int(timestamp), int(step)))
            else:  # the latest one per name: a batch may not set one tag twice
                flags[f"{NONFINITE_TAG}{name}"] = f"{number} at step {step}"
    flags.update(strings(tags or {}))
    log_batch(client, run_id, metrics=points, tags=[RunTag(k, v) for k, v in flags.items()])


def log_missing_params(client: MlflowClient, run: Run, params: Mapping[str, Any]) -> None:
    """Log the params the run lacks: params cannot change once logged, and the others are there.

    Workers sharing a run (the study's parent) may log the same params at once. MLflow's store
    checks for a param, then inserts it, so the slower insert fails (a UNIQUE constraint); a param
    another process logged with the same value counts as logged, and only a different value fails.
    """
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    wanted = {str(k): param_value(v) for k, v in params.items()}
    have = run.data.params
    for attempt in range(3):
        try:
            log_batch(client, run.info.run_id, params=[Param(k, v) for k, v in wanted.items() if k not in have])
            return
        except MlflowException:
            have = client.get_run(run.info.run_id).data.params
            if attempt == 2 or any(k in have and have[k] != v for k, v in wanted.items()):
                raise


def log_batch(client: MlflowClient, run_id: str, *, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
               tags: Sequence[Any] = ()) -> None:
    """Log in as few log_batch calls as MLflow's limits allow (1,000 metrics, 100 params, 100 tags)."""
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    m, p, t = list(metrics), list(params), list(tags)
    while m or p or t:
        client.log_batch(run_id, metrics=m[:MAX_METRICS_PER_BATCH], params=p[:MAX_PARAMS_TAGS_PER_BATCH],
                         tags=t[:MAX_PARAMS_TAGS_PER_BATCH])
        m, p, t = m[MAX_METRICS_PER_BATCH:], p[MAX_PARAMS_TAGS_PER_BATCH:], t[MAX_PARAMS_TAGS_PER_BATCH:]
