"""The finish of a study: its best configuration tested once on the test split, logged and registered.

`finish` picks the best trial whose model was kept, refits its configuration on training +
validation data (:mod:`hpsearch.refit`) or loads the trial's own model, tests it, records the test
(the study's parent run, the refit's run, the model registry, the study's TEST_ATTR) and gives the
registered version the champion alias if it is the best tested. Once per study, whoever finishes.
The tested model is kept in the study's artifacts, so a test made while MLflow was unreachable is
recorded there by a later finish (:func:`_record_late`), without testing again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from hpsearch import insights, record, refit, space
from hpsearch.data import Provenance, SearchData, Split, load_search_data, load_test_split
from hpsearch.errors import DataError
from hpsearch.objective import MODEL_FILE, track_late
from hpsearch.record import (BEST_RUN_TAG, BEST_TRIAL_TAG, DATA_NAME_TAG, DATA_SHA_TAG, FINISH_KEY, LATE_STALE_S,
                             MODEL_ATTR, PARENT_RUN_ATTR, RECORDED_LATE_KEY, REFIT_HISTORY, RUN_ID_ATTR, STUDY_TAG,
                             TEST_ATTR, TRIAL_TAG, UNRECORDED, StoredData, artifact_store, reports_per_epoch,
                             test_metric, worker_id)
from hpsearch.refit import Refit
from hpsearch.signals import completed_first, interrupt, on_stop_signals
from hpsearch.spec import Spec
from hpsearch.storage import claim, holder_gone, read_claim, release_claim, swap_claim
from hpsearch.tasks import input_stats
from hpsearch.tracking import VERSION_METRIC_TAG, DatasetRecord, Tracker
from hpsearch.worker_setup import dataset_records

logger = logging.getLogger(__name__)

FINISH_BEAT_S = 5.0  # how often the process testing the model says it is alive...
FINISH_STALE_S = 60.0  # ...and after how long without it another process takes the test over


def best_trial(spec: Spec, study: optuna.Study) -> FrozenTrial | None:
    """Return the best complete trial whose model was kept (first objective decides on a Pareto front)."""
    return record.best_trial(spec, [t for t in study.get_trials(deepcopy=False) if MODEL_ATTR in t.user_attrs])


def finish(spec: Spec, study: optuna.Study, *, device: str | None = None, use_refit: bool | None = None) -> dict[str, Any]:
    """Evaluate the final model once on the test split, log and register it; return the result.

    The final model is the best trial's configuration refit on training + validation data
    (``study.refit``, on by default for single-objective studies; ``use_refit`` overrides it), or
    the best trial's own model.

    Once per study, whoever finishes: a study whose best trial was already tested is not tested
    again, and of processes finishing at once one claims the test (see :func:`_finish_claim`)
    while the others wait for its record. Ctrl-C (or SIGTERM, SIGHUP) while the model is tested
    records nothing; once the record is being written (MLflow, the registry, the study) it is
    completed first, so the record is either absent or whole.
    """
    best = best_trial(spec, study)
    if best is None:
        return {}
    with on_stop_signals(interrupt), _finish_claim(study, best.number) as done:
        if done is not None:
            return _record_late(spec, study, best, done) if done.get(UNRECORDED) else done
        model, test_metrics, example, n_test, refitted, test_data = _test_model(
            spec, study, best, device, use_refit=spec.study.refit.enabled if use_refit is None else use_refit)
        result: dict[str, Any] = {"trial": best.number, "metrics": test_metrics, "params": best.params,
                                  "values": best.values, "n_test": n_test}
        if refitted is not None:
            result["refit"] = refitted.as_record()
        tracker = None
        with completed_first():
            result["model_artifact"] = _keep(spec, study, best, model, refitted)
            if spec.tracking.enabled:
                tracker = Tracker(spec.tracking.uri, spec.tracking.experiment,
                                  artifact_root=spec.tracking.artifact_root)
                track_late(study, tracker, study.user_attrs.get(PARENT_RUN_ATTR), limit=None)
                failures = tracker.failures
                recorded = _record_test(spec, study, tracker, best, model, test_metrics, example, refitted, test_data)
                result.update(recorded)
                if not recorded or tracker.failures > failures:  # kept to be recorded later (_record_late)
                    result[UNRECORDED] = "the MLflow store was unreachable when the final model was tested"
                    if refitted is not None:
                        result[REFIT_HISTORY] = list(refitted.history)
            study.set_user_attr(TEST_ATTR, json.loads(json.dumps(result, default=str)))
    insights.refresh(spec, study, tracker, study.user_attrs.get(PARENT_RUN_ATTR), force=True)
    return result


def _keep(spec: Spec, study: optuna.Study, best: FrozenTrial, model: torch.nn.Module, refitted: Refit | None) -> str:
    """Return the id of the final model's weights as an Optuna artifact: the refit's, uploaded to the
    study, or the best trial's own, kept already. Whatever becomes of MLflow, the tested model is never lost."""
    if refitted is None:
        return str(best.user_attrs[MODEL_ATTR])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        return optuna.artifacts.upload_artifact(artifact_store=artifact_store(spec), file_path=str(path),
                                                study_or_trial=study, mimetype="application/octet-stream")


def _record_late(spec: Spec, study: optuna.Study, best: FrozenTrial, done: dict[str, Any]) -> dict[str, Any]:
    """Record in MLflow a final test made while it was unreachable; return the study's test record.

    The model is the one tested, read back from the study's artifacts, and it is not tested again:
    the record's metrics are logged and the model registered as the first finish would have. Of
    processes doing this at once, one does (a claim it keeps, as the sign it was done); while
    MLflow is still down, nothing is claimed and the record stays as it was, for the next run.
    """
    if not spec.tracking.enabled:
        return done
    tracker = Tracker(spec.tracking.uri, spec.tracking.experiment, artifact_root=spec.tracking.artifact_root)
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent is None or tracker.experiment_id is None:
        return done
    track_late(study, tracker, parent, limit=None)
    key = f"{RECORDED_LATE_KEY}{best.number}"
    mine = {"worker": worker_id(), "at": time.time(), "token": uuid.uuid4().hex}
    if not claim(study, key, mine):
        held = read_claim(study, key)
        if held is None or not holder_gone(held, stale_s=LATE_STALE_S) or not swap_claim(study, key, held, mine):
            return done  # another process records it
        logger.info(f"the late MLflow record of trial {best.number}'s final test had been claimed by "
                    f"{held.get('worker')}, which stopped; this process takes it over.")
    if (now := _recorded(study, best.number)) is not None and not now.get(UNRECORDED):
        return now  # recorded by another process since this one looked (the claim stays, as the sign of it)
    try:
        model, example, refitted, test_data = _tested_model(spec, study, best, done)
        with completed_first():
            failures = tracker.failures
            recorded = _record_test(spec, study, tracker, best, model, done["metrics"], example, refitted,
                                    test_data)
            if not recorded or tracker.failures > failures:
                raise _NotYet
            result = {k: v for k, v in {**done, **recorded}.items() if k not in (UNRECORDED, REFIT_HISTORY)}
            study.set_user_attr(TEST_ATTR, json.loads(json.dumps(result, default=str)))
    except BaseException as exc:
        with contextlib.suppress(Exception):  # a claim not released would block every later try
            release_claim(study, key, mine)
        if isinstance(exc, _NotYet):
            return done
        raise
    logger.info("the final test of trial %d, made while MLflow was unreachable, is recorded there now.",
                best.number)
    insights.refresh(spec, study, tracker, parent, force=True)  # the study's figures, which MLflow missed too
    return result


class _NotYet(Exception):
    """MLflow failed again while a late record was written: it is tried again by the next run."""


def _tested_model(spec: Spec, study: optuna.Study, best: FrozenTrial, done: dict[str, Any]
                  ) -> tuple[torch.nn.Module, Any, Refit | None, list[DatasetRecord]]:
    """Return the model the record ``done`` tested (from the study's artifacts), an input example, its refit
    (rebuilt from the record, for its MLflow run) and the test split as an MLflow dataset input. Nothing is
    evaluated: the test split is read for its digest and the example only."""
    stored = StoredData.from_study(study)
    assert stored is not None  # the test was made, so the study has its data
    provenance = stored.provenance()
    model = _load_model(spec, stored, _trial_params(spec, best), done["model_artifact"])
    refitted = None
    if r := done.get("refit"):
        full = refit.merged(_search_data(spec, provenance))
        refitted = Refit(model=model, trial=r["trial"], epochs=r["epochs"], epochs_rule=r["epochs_rule"],
                         n_train=r["n_train"], seed=r["seed"], seconds=r["seconds"],
                         history=tuple(done.get(REFIT_HISTORY, ())), data=full)
    mean, std = input_stats(stored.mean, stored.std, standardise=spec.task.normalize)
    test = load_test_split(provenance, data_dir=spec.task.data_dir)
    return model.eval(), _example(test, mean, std), refitted, dataset_records(provenance, {"test": test})


def _load_model(spec: Spec, stored: StoredData, params: dict[str, Any], artifact_id: str) -> torch.nn.Module:
    """Return the model of ``params`` with the weights kept as the study's Optuna artifact ``artifact_id``."""
    from hpsearch.models import build_model

    model = build_model(spec.model.family, params, image_shape=stored.image_shape, n_classes=int(stored.n_classes))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        optuna.artifacts.download_artifact(artifact_store=artifact_store(spec), file_path=str(path),
                                           artifact_id=artifact_id)
        model.load_state_dict(torch.load(path, map_location="cpu"))
    return model


def _example(test: Split, mean: float, std: float) -> Any:
    """Return the registered model's input example: the first test images, standardised as the model sees them."""
    return ((test.images[:4].float() / 255.0 - mean) / std).cpu().numpy()


def _test_model(spec: Spec, study: optuna.Study, best: FrozenTrial, device: str | None, *,
                use_refit: bool) -> tuple[torch.nn.Module, dict[str, float], Any, int, Refit | None,
                                          list[DatasetRecord]]:
    """Return the final model, its test metrics, an input example, the test split's size, the refit (or None)
    and the test split as an MLflow dataset input.

    The final model is the best trial's configuration refit on training + validation data
    (:mod:`hpsearch.refit`) when ``use_refit``, else the best trial's own saved model.
    """
    from hpsearch import tasks
    from hpsearch.train import evaluate, resolve_device

    stored = StoredData.from_study(study)
    if stored is None:
        raise DataError(f"study {spec.study.name!r} records no data provenance; run a trial first.")
    provenance = stored.provenance()
    dev = resolve_device(device or spec.task.device)
    params = _trial_params(spec, best)
    mean, std = input_stats(stored.mean, stored.std, standardise=spec.task.normalize)
    reference = None
    if spec.task.type == "inpaint":
        reference = _cached_reference(spec, provenance, dev)
    refitted = None
    if use_refit:
        refitted = refit.refit(spec, best, params, _search_data(spec, provenance), device=dev, mean=mean, std=std,
                               reference=reference, reports_per_epoch=reports_per_epoch(study.user_attrs))
        model = refitted.model
    else:
        model = _load_model(spec, stored, params, best.user_attrs[MODEL_ATTR])
    model = model.to(dev).eval()
    # Only now, with the final model chosen and trained, is the test split read.
    test = load_test_split(provenance, data_dir=spec.task.data_dir).to(dev)
    task = tasks.make_task(spec.task.type, params, mask_placement=spec.task.mask.placement,
                           noise_kind=spec.task.noise.kind, reference=reference)
    metrics = evaluate(model, test, task, mean=mean, std=std, device=dev)
    test_metrics = {test_metric(k): v for k, v in metrics.items()}
    test_data = dataset_records(provenance, {"test": test})
    return model, test_metrics, _example(test, mean, std), len(test), refitted, test_data


def _record_test(spec: Spec, study: optuna.Study, tracker: Tracker, best: FrozenTrial, model: torch.nn.Module,
                 test_metrics: dict[str, float], example: Any, refitted: Refit | None,
                 test_data: list[DatasetRecord]) -> dict[str, Any]:
    """Log the test metrics and the model, register it; return what to add to the result.

    The test metrics go on the study's parent run. The model goes on the refit's own run (a child
    of the parent, tagged with the trial it refits) when there is a refit, else on the parent run.
    """
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        return {}
    tracker.log_metrics(parent, test_metrics, step=best.number)
    tracker.set_tags(parent, {BEST_TRIAL_TAG: str(best.number),
                              BEST_RUN_TAG: str(best.user_attrs.get(RUN_ID_ATTR, ""))})
    model_run = parent
    out: dict[str, Any] = {}
    if refitted is not None:
        run_id = tracker.start_refit(parent, best.number, params={
            **_trial_params(spec, best), "epochs": refitted.epochs, "refit.epochs_rule": refitted.epochs_rule,
            "refit.n_train": refitted.n_train, "seed": refitted.seed}, tags={
            BEST_RUN_TAG: str(best.user_attrs.get(RUN_ID_ATTR, ""))})
        if run_id:
            now_ms = int(time.time() * 1000)
            tracker.log_epochs(run_id, [(epoch, now_ms, metrics) for epoch, metrics in enumerate(refitted.history, 1)])
            tracker.log_metrics(run_id, {**test_metrics, "refit_seconds": refitted.seconds}, step=refitted.epochs)
            model_run = out["refit_run_id"] = run_id
            tracker.log_datasets(run_id, dataset_records(refitted.data.provenance, {"training": refitted.data.train}))
    version = tracker.log_model(model_run, model.cpu(), input_example=example,
                                registered_name=spec.study.name if spec.tracking.register_model else None)
    for run_id in dict.fromkeys((parent, model_run)):  # the study's run, and the refit's that was tested
        tracker.log_datasets(run_id, test_data)
    if version:
        out["champion"] = _crown(spec, study, tracker, version, best, test_metrics, test_data[0].digest)
    if refitted is not None and model_run != parent:
        tracker.end_run(model_run, "FINISHED")
    return {**out, "model_version": version, "registered_model": spec.study.name if version else None,
            "experiment_id": tracker.experiment_id, "parent_run_id": parent}


@contextmanager
def _finish_claim(study: optuna.Study, trial: int) -> Iterator[dict[str, Any] | None]:
    """Yield the test record of ``trial`` if there is one; else claim its test for this process and yield None.

    The claim is a study system attr inserted atomically (:func:`hpsearch.storage.claim`): of
    processes finishing at once, one wins; the others wait for its record. The winner renews
    the claim every few seconds; a claim not renewed for a minute (its process died), or left
    by a dead process on this host, is taken over. The claim is released on the way out, test
    recorded or not, even when a stop signal lands the moment after it was stored.
    """
    key = f"{FINISH_KEY}{trial}"
    said = False
    holding: dict[str, Any] = {}  # the claim this process may have stored: released on the way out, whatever stops it
    stop = threading.Event()
    beat: threading.Thread | None = None

    def renew() -> None:
        while not stop.wait(FINISH_BEAT_S):
            renewed = {**holding["value"], "at": time.time()}
            with contextlib.suppress(Exception):  # a missed renewal is retried at the next beat
                if swap_claim(study, key, holding["value"], renewed):
                    holding["value"] = renewed

    try:
        while True:
            done = _recorded(study, trial)
            if done is not None:
                yield done
                return
            holding["value"] = mine = {"worker": worker_id(), "at": time.time(), "token": uuid.uuid4().hex}
            if claim(study, key, mine):
                if _recorded(study, trial) is None:
                    break
                # Another process recorded the test and released its claim since the look above: take its record.
                with contextlib.suppress(Exception):
                    release_claim(study, key, mine)
                del holding["value"]
                continue
            held = read_claim(study, key)
            if held is not None and holder_gone(held, stale_s=FINISH_STALE_S) and swap_claim(study, key, held, mine):
                logger.info(f"the final test of trial {trial} had been claimed by {held.get('worker')}, which "
                            "stopped; this process takes it over.")
                break
            del holding["value"]
            if held is not None and not said:
                logger.info(f"waiting for {held.get('worker')} to finish testing and registering trial {trial}'s "
                            "model.")
                said = True
            time.sleep(1.0)
        beat = threading.Thread(target=renew, daemon=True)
        beat.start()
        yield None
    finally:
        stop.set()
        try:
            if beat is not None:
                beat.join()
        finally:
            if "value" in holding:
                with contextlib.suppress(Exception):  # a claim not released goes stale
                    release_claim(study, key, holding["value"])


def _recorded(study: optuna.Study, trial: int) -> dict[str, Any] | None:
    """Return the study's test record if it is of ``trial``, else None."""
    done = study.user_attrs.get(TEST_ATTR)
    return done if done and done.get("trial") == trial else None


def _search_data(spec: Spec, provenance: Provenance) -> SearchData:
    """Return the study's training and validation splits again, as its trials had them."""
    return load_search_data(provenance.name, data_dir=spec.task.data_dir, val_fraction=spec.task.val_fraction,
                            seed=spec.study.seed, train_limit=spec.task.train_limit)


def _crown(spec: Spec, study: optuna.Study, tracker: Tracker, version: str, best: FrozenTrial,
           test_metrics: dict[str, float], test_digest: str) -> str | None:
    """Tag the registered version with where it comes from and give it the champion alias if it is the best."""
    primary = spec.study.metrics[0]
    data = StoredData.from_study(study)
    tags = {STUDY_TAG: spec.study.name, TRIAL_TAG: str(best.number),
            DATA_SHA_TAG: str(data and data.sha256), DATA_NAME_TAG: str(data and data.name),
            **{f"{VERSION_METRIC_TAG}{m.name}": f"{v:.8g}" for m, v in zip(spec.study.metrics, best.values)},
            **{f"{VERSION_METRIC_TAG}{k}": f"{v:.8g}" for k, v in test_metrics.items()}}
    return tracker.crown(spec.study.name, version, tags=tags, metric=test_metric(primary.name),
                         maximize=primary.direction == "maximize", data=test_digest)


def _cached_reference(spec: Spec, provenance: Provenance, device: torch.device) -> torch.nn.Module:
    from hpsearch.reference import load_or_train_reference

    return load_or_train_reference(_search_data(spec, provenance).to(device), Path(spec.cache_dir), device=device)


def _trial_params(spec: Spec, trial: FrozenTrial) -> dict[str, Any]:
    params = space.base_params(spec)
    params.update(trial.params)
    return params
