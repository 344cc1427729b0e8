"""The Model Registry: a trained model logged and registered, and the alias ``champion`` on the best tested version."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

from hpsearch.tracking._store import process_uris
from hpsearch.tracking._values import quote

if TYPE_CHECKING:
    import numpy as np
    import torch
    from mlflow import MlflowClient

CHAMPION = "champion"  # the registered model alias of the best tested version (see Tracker.crown)
VERSION_METRIC_TAG = "hpsearch."  # + metric name (val_..., test_...): a registered version's measures
RANKED_TAG = "hpsearch.ranked_by"  # the test metric versions are compared on for the alias...
DIRECTION_TAG = "hpsearch.direction"  # ...which way is better...
DATA_TAG = "hpsearch.test_data"  # ...and the content hash of the test split it was measured on


def crown(client: MlflowClient, name: str, version: str, *, tags: Mapping[str, str], metric: str, maximize: bool,
          data: str) -> str:
    """Tag a registered model version, give it the alias if it beats the holder; return what was decided.

    See ``Tracker.crown`` for the rule.
    """
    for key, text in {**tags, RANKED_TAG: metric, DIRECTION_TAG: "maximize" if maximize else "minimize",
                      DATA_TAG: data}.items():
        client.set_model_version_tag(name, version, key, text)
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    holder = client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None
    kept = f"{CHAMPION} stays on version {holder.version}" if holder else f"no version is {CHAMPION}"
    if holder is not None and str(holder.version) != str(version) \
            and not comparable(holder.tags, metric, maximize, data):
        return (f"{kept}: it was not tested on the same data by {metric}, so this version cannot be "
                "compared with it (move the alias with MlflowClient.set_registered_model_alias)")
    new = float(tags[f"{VERSION_METRIC_TAG}{metric}"])
    rivals = [(float(v.tags[f"{VERSION_METRIC_TAG}{metric}"]), str(v.version))
              for v in client.search_model_versions(f"name = {quote(name)}")
              if str(v.version) != str(version) and comparable(v.tags, metric, maximize, data)]
    best = (max if maximize else min)(rivals, default=None)
    if best is not None and not beats(new, best[0], maximize):
        return f"{kept}: version {best[1]} has {metric} {best[0]:.5g}, this one {new:.5g}"
    client.set_registered_model_alias(name, CHAMPION, version)
    return f"{CHAMPION} (models:/{name}@{CHAMPION}): the best {metric} of its versions, {new:.5g}"


def comparable(tags: Mapping[str, str], metric: str, maximize: bool, data: str) -> bool:
    """Return whether a version's tags hold ``metric``, measured the same way on the same test data."""
    try:
        float(tags[f"{VERSION_METRIC_TAG}{metric}"])
    except (KeyError, ValueError):
        return False
    return tags.get(RANKED_TAG) == metric and tags.get(DATA_TAG) == data \
        and tags.get(DIRECTION_TAG) == ("maximize" if maximize else "minimize")


def beats(value: float, other: float, maximize: bool) -> bool:
    return value > other if maximize else value < other


def log_model(client: MlflowClient, store_uri: str, run_id: str, model: torch.nn.Module,
              input_example: np.ndarray, registered_name: str | None) -> str | None:
    """Log ``model`` on ``run_id``; return its registered version, or None (see ``Tracker.log_model``)."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    example = np.asarray(input_example)
    if example.ndim > 0 and example.shape[0] == 1:
        example = np.concatenate([example, example])
    # A copy, on the CPU, in evaluation mode and in the standard memory layout: a conv net trained
    # channels_last (hpsearch.train.memory_format) made torch.export's archive warn "No complete
    # tensor found in the group!" (its weights were written right, but the user saw the warning).
    model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        output = model(torch.as_tensor(example)).numpy()
    signature = infer_signature(example, output)
    # mlflow.pytorch.log_model takes no client: it finds the run's experiment, the store and
    # the registry through process-wide state. Creating the logged model here names the
    # experiment; the URIs are set for the call only (see process_uris).
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    with process_uris(store_uri):
        info = mlflow.pytorch.log_model(
            model, name="model", model_id=logged.model_id, run_id=run_id, signature=signature,
            input_example=example, registered_model_name=registered_name,
            # Stated, not inferred: inferring them imports the model in a subprocess (seconds).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    version = info.registered_model_version
    return None if version is None else str(version)
