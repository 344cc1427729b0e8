"""Warm starts (`study.warm_start`): a new study begins from an earlier one's results.

Before the new study's first trial, the earlier study (found by name in its storage) is checked
against this one: the same task, the same data (content hash), the same model family and the same
first metric, or the warm start is refused with what differs. Then:

- its ``top_k`` best complete trials are enqueued here, evaluated first (params outside this
  study's space are left to the sampler);
- where the two studies search exactly the same thing (equal fingerprints: task, model, space and
  metrics), its finished trials (complete and pruned, with their learning curves) are also added
  to this study's history, so the sampler and the pruner learn from them at once. Each copy
  carries the user attr ``warm_start_from`` ("<study>#<number>"); copies have no model, are never
  this study's best, and do not count towards its ``n_trials`` or its stop rules.

What was done is recorded in the study (``WARM_ATTR``), once: a resumed study is not warm-started again.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch.errors import SpecError
from hpsearch.record import (ENQUEUED_ATTR, FINGERPRINT_ATTR, N_PARAMS_ATTR, ORIGIN_ATTR, SEED_ATTR, WARM_ATTR,
                             WARM_OF_ATTR, StoredData, read_spec)
from hpsearch.spec import ParamSpec, Spec, mask_password

logger = logging.getLogger(__name__)


def needed(spec: Spec, study: optuna.Study) -> bool:
    """Return whether ``study`` is still to be warm-started: asked for, not done, no trial yet."""
    started = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)  # not WAITING: enqueued
    return (spec.study.warm_start is not None and WARM_ATTR not in study.user_attrs
            and not study.get_trials(deepcopy=False, states=started))


def warm_start(spec: Spec, study: optuna.Study, source: optuna.Study, data: StoredData) -> dict[str, Any]:
    """Warm-start ``study`` from ``source`` (the study named in ``spec.study.warm_start``); return what was done.

    ``data`` is this study's data provenance. Call it once, before the first trial (see :func:`needed`).
    """
    ws = spec.study.warm_start
    assert ws is not None  # needed() said so
    where = f"{spec.path}: study.warm_start"
    old = read_spec(source.user_attrs, runs_dir=spec.runs_dir)
    if old is None:
        raise SpecError(f"{where}: study {ws.study!r} in {mask_password(ws.storage)} was not created by hpsearch "
                        "(it has no stored spec), so hpsearch cannot tell whether its results apply here.")
    _check_matches(where, ws.study, old, spec, StoredData.from_study(source), data)
    same_search = source.user_attrs.get(FINGERPRINT_ATTR) == spec.fingerprint()
    finished = [t for t in source.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and ORIGIN_ATTR not in t.user_attrs]
    added = 0
    if same_search:
        for t in finished:
            study.add_trial(_copy(t, ws.study))
            added += 1
    best = _best(finished, spec)[:ws.top_k]
    enqueued = []
    for t in best:
        params = {k: v for k, v in t.params.items() if _possible(spec.space, k, v)}
        if params:
            # Not skipped when the copied history holds the same params: the study trains its own
            # model of each (copies have none), once (a study is warm-started once).
            study.enqueue_trial(params, user_attrs={ENQUEUED_ATTR: True, WARM_OF_ATTR: f"{ws.study}#{t.number}"})
            enqueued.append(t.number)
    record = {"study": ws.study, "storage": mask_password(ws.storage), "history": added, "enqueued": enqueued,
              "same_search": same_search}
    study.set_user_attr(WARM_ATTR, record)
    how = (f"added its {added} finished trials to this study's history and " if same_search else
           "its search differs from this one (task settings, space or metrics), so its trials are not added to "
           "the history; ")
    logger.info(f"warm start from study {ws.study!r}: {how}enqueued its {len(enqueued)} best configuration(s) "
                f"(trials {enqueued}).")
    return record


def _check_matches(where: str, name: str, old: Spec, new: Spec, old_data: StoredData | None,
                   new_data: StoredData) -> None:
    """Refuse a source study whose task, data, model family or first metric differ from this one's."""
    differences = []
    if old.task.type != new.task.type:
        differences.append(f"task.type {old.task.type!r} here {new.task.type!r}")
    if old.model.family != new.model.family:
        differences.append(f"model.family {old.model.family!r} here {new.model.family!r}")
    if old.study.metrics[0] != new.study.metrics[0]:
        o, n = old.study.metrics[0], new.study.metrics[0]
        differences.append(f"first metric {o.direction} {o.name} here {n.direction} {n.name}")
    if old_data is None or old_data.sha256 != new_data.sha256:
        differences.append(f"data {old_data and old_data.name} (sha256 {old_data and old_data.sha256}) here "
                           f"{new_data.name} (sha256 {new_data.sha256})")
    if differences:
        raise SpecError(f"{where}: study {name!r} does not match this one, so its results do not apply here: "
                        + "; ".join(differences) + ". Warm-start from a study of the same task, data, model family "
                        "and metric.")


def _best(trials: list[FrozenTrial], spec: Spec) -> list[FrozenTrial]:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values and math.isfinite(t.values[0])]
    sign = 1.0 if spec.study.metrics[0].direction == "minimize" else -1.0
    return sorted(complete, key=lambda t: (sign * t.values[0], t.number))


def _possible(space: tuple[ParamSpec, ...], name: str, value: Any) -> bool:
    """Return whether ``name`` is searched in ``space`` and may take ``value`` there."""
    # Per-layer widths (width_0, ...) are searched under `width`.
    base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
    return any(p.name in (name, base) and p.type != "fixed" and p.possible(value) for p in space)


def _copy(t: FrozenTrial, study_name: str) -> FrozenTrial:
    """Return a copy of an earlier study's finished trial, marked with where it came from."""
    return optuna.trial.create_trial(
        state=t.state, values=t.values if t.state == TrialState.COMPLETE else None, params=t.params,
        distributions=t.distributions, intermediate_values=dict(t.intermediate_values),
        user_attrs={ORIGIN_ATTR: f"{study_name}#{t.number}",
                    **{k: v for k, v in t.user_attrs.items() if k in (SEED_ATTR, N_PARAMS_ATTR)}})
