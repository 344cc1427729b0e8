"""What a person sees of a study: notes in optuna-dashboard, comparison plots in the dashboard and MLflow.

`annotate` writes markdown notes (the study's, and one per finished trial) that optuna-dashboard
shows; `study_figures` draws the plots that compare trials; `refresh` publishes them as
artifacts of the study's MLflow parent run and of the Optuna study, replacing older versions.
Both are cheap enough to call after every trial. Nothing here imports torch or mlflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, TrialState

from hpsearch.record import (DEVICE_ATTR, EXPERIMENT_ATTR, FAIL_REASON_ATTR, FIGURES_ATTR, IMAGE_ATTRS,
                             INTERRUPTED_ATTR, N_PARAMS_ATTR, NOTE_SHA_KEY, RECONSTRUCTION_ATTR, RUN_ID_ATTR,
                             RUN_URL_ATTR, SEED_ATTR, TEST_ATTR, TRAIN_SECONDS_ATTR, VIEW_ATTR, FinalTest, StoredData,
                             artifact_store, best_trial, count, epoch_text, read_artifact, reports_per_epoch)
from hpsearch.spec import Spec, without_credentials
from hpsearch.tracking import experiment_url, run_page_url

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `hpsearch ui` serves a local MLflow store
_ARTIFACTS_KEY = "artifacts:"  # Optuna's system-attr prefix for artifact metadata
CORRUPTED = {"denoise": "noisy input", "inpaint": "masked input"}

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- links


def run_link(study_attrs: Mapping[str, Any], trial: FrozenTrial, ui_url: str) -> str | None:
    """Return the MLflow UI address of a trial's run, or None when the trial has no run."""
    if url := trial.user_attrs.get(RUN_URL_ATTR):
        return str(url)
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    experiment = study_attrs.get(EXPERIMENT_ATTR)
    if not run_id or not experiment:
        return None
    return run_page_url(ui_url, str(experiment), str(run_id))


def experiment_link(study_attrs: Mapping[str, Any], ui_url: str) -> str | None:
    """Return the MLflow UI address of the study's runs table (its saved view), or None before the first run."""
    experiment = study_attrs.get(EXPERIMENT_ATTR)
    if not experiment:
        return None
    return experiment_url(ui_url, str(experiment), study_attrs.get(VIEW_ATTR))


def ui_url_for(spec: Spec) -> str:
    """Return where a person opens the MLflow UI of the spec: its server, or `hpsearch ui`'s default."""
    uri = spec.tracking.uri
    return without_credentials(uri).rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL


# --------------------------------------------------------------------------- dashboard notes


def annotate(spec: Spec, study: optuna.Study, *, ui_url: str = DEFAULT_UI_URL) -> int:
    """Write the study's note and a note per finished trial for optuna-dashboard; return how many changed.

    Idempotent: a note is rewritten only when its text changes, and never once a person has
    edited it in the dashboard (hpsearch remembers a hash of what it wrote).
    """
    return _annotate(spec, study, study.get_trials(deepcopy=False), ui_url=ui_url)


def _annotate(spec: Spec, study: optuna.Study, trials: Sequence[FrozenTrial], *, ui_url: str) -> int:
    attrs = study.user_attrs
    system = study._storage.get_study_system_attrs(study._study_id)
    written = 0
    if _write_note(study, None, study_note(spec, attrs, trials, ui_url=ui_url), system):
        written += 1
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            if _write_note(study, t._trial_id, trial_note(spec, attrs, t, ui_url=ui_url), system):
                written += 1
    return written


def _write_note(study: optuna.Study, trial_id: int | None, body: str, system: Mapping[str, Any]) -> bool:
    from optuna_dashboard._note import get_note_from_system_attrs, save_note_with_version

    sha_key = f"{NOTE_SHA_KEY}{'study' if trial_id is None else trial_id}"
    if system.get(sha_key) == _sha(body):
        return False  # written before, unchanged: the common case, decided without reading the note
    current = get_note_from_system_attrs(dict(system), trial_id)
    if current["body"] == body:
        return False
    if current["body"] and system.get(sha_key) != _sha(current["body"]):
        return False  # a person wrote or edited this note: theirs wins
    # optuna_dashboard.save_note takes a live Trial only; this is the same write for a FrozenTrial.
    save_note_with_version(study._storage, study._study_id, trial_id, int(current["version"]) + 1, body)
    study._storage.set_study_system_attr(study._study_id, sha_key, _sha(body))
    return True


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def study_note(spec: Spec, attrs: Mapping[str, Any], trials: Sequence[FrozenTrial], *, ui_url: str) -> str:
    """Return the study's dashboard note (markdown): task, data, progress, best so far, where to look.

    ``attrs`` are the study's user attrs (data provenance, test result, MLflow experiment).
    """
    c = count(trials)
    t = spec.task
    lines = [f"## {spec.study.name}: {t.type}, {spec.model.family} models", ""]
    lines += ["**Goal** " + ", ".join(f"{m.direction} `{m.name}`" for m in spec.study.metrics)
              + f" · {spec.study.n_trials} trials · sampler `{spec.study.sampler.type}` · "
              f"pruner `{spec.study.pruner.type}` · spec `{spec.path}`", ""]
    lines += data_lines(StoredData.from_attrs(attrs), requested=t.dataset) + [""]
    lines.append(f"**Trials** {c.finished} of {spec.study.n_trials} finished: {c.complete} complete, "
                 f"{c.pruned} pruned, {c.failed} failed" + (f", {c.lost} lost (worker died)" if c.lost else "")
                 + (f"; {c.running} running" if c.running else "") + ".")
    lines.append("")
    best = best_trial(spec, trials)
    if best is not None:
        values = ", ".join(f"`{m.name}` = {v:.5g}" for m, v in zip(spec.study.metrics, best.values))
        lines.append(f"**Best so far** trial #{best.number}: {values}")
        lines.append("")
        lines.append("Params: " + ", ".join(f"`{k}`={_fmt(v)}" for k, v in sorted(best.params.items())))
        lines.append("")
    if test := FinalTest.from_dict(attrs.get(TEST_ATTR)):
        lines.append(f"**Test split** (best trial #{test.trial}, evaluated once): "
                     + ", ".join(f"`{k}` = {v:.5g}" for k, v in sorted(test.metrics.items())))
        lines.append("")
    if spec.tracking.enabled:
        link = experiment_link(attrs, ui_url)
        where = f"[open in the MLflow UI]({link})" if link else "(created with the first trial)"
        lines.append(f"**MLflow** experiment `{spec.tracking.experiment}` {where}: per-epoch curves, "
                     "images per epoch, the parent run's `study/` plots.")
        lines.append("")
    lines.append("**Comparison plots** (learning curves, importances" + (", reconstructions by bottleneck size"
                 if spec.task.type in CORRUPTED else "") + ") are under *Study Artifacts* at the foot of the "
                 "study's page, redrawn as trials finish; `hpsearch report` puts them all in one HTML file.")
    return "\n".join(lines) + "\n"


def trial_note(spec: Spec, study_attrs: Mapping[str, Any], trial: FrozenTrial, *, ui_url: str) -> str:
    """Return a finished trial's dashboard note (markdown): outcome, metrics, its MLflow run, its images."""
    state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}[trial.state]
    lines = [f"### Trial #{trial.number}: {state}", ""]
    metrics = {k: v for k, v in sorted(trial.user_attrs.items())
               if k.startswith("val_") and isinstance(v, (int, float))}
    if metrics:
        lines.append(" · ".join(f"`{k}` {v:.5g}" for k, v in metrics.items()))
        lines.append("")
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        lines.append(f"Stopped by the pruner after epoch {epoch_text(step, reports_per_epoch(study_attrs))} "
                     f"(`{spec.study.metrics[0].name}` {trial.intermediate_values[step]:.5g}).")
        lines.append("")
    if reason := trial.user_attrs.get(FAIL_REASON_ATTR) or trial.user_attrs.get(INTERRUPTED_ATTR):
        lines.append(f"Reason: `{str(reason)[:300]}`")
        lines.append("")
    a = trial.user_attrs
    facts = [f"{a[N_PARAMS_ATTR]:,} parameters" if N_PARAMS_ATTR in a else None,
             f"seed {a[SEED_ATTR]}" if SEED_ATTR in a else None,
             f"on {a[DEVICE_ATTR]}" if DEVICE_ATTR in a else None,
             f"{a[TRAIN_SECONDS_ATTR]:.1f} s" if TRAIN_SECONDS_ATTR in a else None]
    if facts := [f for f in facts if f]:
        lines.append(" · ".join(facts))
        lines.append("")
    if link := run_link(study_attrs, trial, ui_url):
        lines.append(f"[MLflow run]({link}): curves per epoch, all params, "
                     + ("images per epoch under `images/`." if spec.task.type != "classify"
                        else "the confusion matrix under `images/`."))
        lines.append("")
    images = [a.split(":", 1)[1] for a in IMAGE_ATTRS if a in trial.user_attrs]
    if images:
        lines.append("Images: " + ", ".join(f"`{n}`" for n in images) + " in this trial's **Artifacts** below.")
    return "\n".join(lines).rstrip() + "\n"


def data_lines(data: StoredData | None, *, requested: str) -> list[str]:
    """Return markdown lines on the data a study searched on, loud when it is a fallback."""
    if data is None:
        return [f"**Data** `{requested}` (provenance recorded with the first trial)."]
    lines = [f"**Data** {data.describe(mark=_code)}"]
    if warning := data.fallback_warning(requested, mark=_code):
        lines += ["", f"> **⚠ FALLBACK DATA**: {warning}"]
    return lines


def _code(text: str) -> str:
    return f"`{text}`"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- comparison figures


def study_figures(spec: Spec, study: optuna.Study, *, store: FileSystemArtifactStore | None = None
                  ) -> dict[str, Figure]:
    """Return the study's comparison plots by file stem; plots the study cannot show yet are left out."""
    from hpsearch import figures  # matplotlib: imported where figures are drawn, not by every worker

    trials = study.get_trials(deepcopy=False)
    metrics = spec.study.metrics
    primary = metrics[0]
    out: dict[str, Figure | None] = {
        "optimization_history": figures.optimization_history(trials, primary.name, primary.direction),
        "learning_curves": (None if spec.study.multi_objective
                            else figures.learning_curves(trials, primary.name, primary.direction,
                                                         reports_per_epoch=reports_per_epoch(study.user_attrs))),
        "param_importances": figures.param_importances(study, primary.name),
        "parallel_coordinates": figures.parallel_coordinates(study, primary.name, primary.direction),
    }
    if spec.study.multi_objective:
        out["pareto_front"] = figures.pareto_front(study, [m.name for m in metrics])
    searched = {p.name: p for p in spec.space if p.type != "fixed"}
    if spec.model.family == "autoencoder" and "bottleneck_dim" in searched:
        sizes = {t.params.get("bottleneck_dim") for t in trials if t.state == TrialState.COMPLETE}
        if len(sizes - {None}) >= 2:
            out[f"{primary.name}_vs_bottleneck_dim"] = figures.metric_vs_param(
                trials, "bottleneck_dim", primary.name, primary.direction, log=searched["bottleneck_dim"].log)
    if spec.task.type in CORRUPTED:
        out["reconstructions_by_bottleneck"] = reconstructions_by_size(spec, trials,
                                                                       store or artifact_store(spec))
    return {name: fig for name, fig in out.items() if fig is not None}


def reconstructions_by_size(spec: Spec, trials: Sequence[FrozenTrial], store: FileSystemArtifactStore
                            ) -> Figure | None:
    """Return the best reconstruction of each bottleneck size, stacked on the same validation digits.

    Each trial's reconstruction.png holds the same validation digits in three rows: clean,
    corrupted, reconstructed. The clean and corrupted rows are taken from the best trial's.
    """
    from hpsearch import figures

    primary = spec.study.metrics[0]
    sign = 1.0 if primary.direction == "minimize" else -1.0
    fixed = next((p.value for p in spec.space if p.name == "bottleneck_dim" and p.type == "fixed"), None)
    best_by_size: dict[Any, FrozenTrial] = {}
    for t in trials:
        if t.state != TrialState.COMPLETE or RECONSTRUCTION_ATTR not in t.user_attrs or not t.values:
            continue
        size = t.params.get("bottleneck_dim", fixed)
        held = best_by_size.get(size)
        if held is None or (sign * t.values[0], t.number) < (sign * held.values[0], held.number):
            best_by_size[size] = t
    grids: dict[Any, Any] = {}
    for size, t in best_by_size.items():
        data = read_artifact(store, t.user_attrs[RECONSTRUCTION_ATTR])
        if data is not None:
            grids[size] = figures.load_png(data)
    if not grids:
        return None
    best_size = min(grids, key=lambda s: (sign * best_by_size[s].values[0], best_by_size[s].number))
    clean, corrupted, _ = figures.grid_bands(grids[best_size])
    # Validation corruption is drawn from one fixed seed (tasks.eval_generator): every trial saw these inputs.
    rows = [("clean", clean), (CORRUPTED.get(spec.task.type, "input"), corrupted)]
    for size in sorted(grids, key=lambda s: (s is None, s)):
        t = best_by_size[size]
        name = "best trial" if size is None else f"bottleneck {size}"
        rows.append((f"{name}\n#{t.number}: {primary.name} {t.values[0]:.4g}", figures.grid_bands(grids[size])[2]))
    return figures.image_rows(rows, title=f"Best reconstruction per bottleneck size ({spec.task.type}), "
                                          "same validation images")


# --------------------------------------------------------------------------- publishing


def refresh(spec: Spec, study: optuna.Study, tracker: Any, parent_run_id: str | None, *, every: int = 5,
            min_interval_s: float = 0.0, force: bool = False, ui_url: str | None = None) -> bool:
    """Update the dashboard notes; every ``every`` finished trials (or with ``force``) redraw and publish
    the comparison plots. Return whether plots were published. Never raises: pictures are a bonus.

    Plots go to the MLflow parent run as ``study/<name>.png`` (overwritten in place) and to the
    Optuna study as artifacts the dashboard shows (each name keeps one artifact, rewritten).
    """
    if every < 1:
        raise ValueError(f"`every` must be a positive integer, but got {every!r}.")
    try:
        trials = study.get_trials(deepcopy=False)
        _annotate(spec, study, trials, ui_url=ui_url or ui_url_for(spec))
        finished = count(trials).finished
        drawn = study.user_attrs.get(FIGURES_ATTR) or {}
        drawn_at = int(drawn.get("finished", 0))
        # Drawing costs ~1 s: with short trials, a time floor keeps it a small share of the study.
        too_soon = time.time() - float(drawn.get("at", 0.0)) < min_interval_s
        if finished == 0 or not (force or (finished - drawn_at >= every and not too_soon)):
            return False
        store = artifact_store(spec)
        names = publish(study, study_figures(spec, study, store=store), store=store, tracker=tracker,
                        parent_run_id=parent_run_id)
        study.set_user_attr(FIGURES_ATTR, {"finished": finished, "names": names, "at": time.time()})
        return True
    except Exception as exc:  # noqa: BLE001 - a study must never stop over its pictures
        logger.warning(f"could not refresh the study's plots and notes: {type(exc).__name__}: {exc}")
        return False


def publish(study: optuna.Study, figs: Mapping[str, Figure], *, store: FileSystemArtifactStore, tracker: Any,
            parent_run_id: str | None) -> list[str]:
    """Log ``figs`` to the MLflow parent run and as study artifacts, replacing older versions; return names.

    Each figure is closed afterwards.
    """
    from hpsearch import figures

    existing: dict[str, list[str]] = {}
    for key, raw in study._storage.get_study_system_attrs(study._study_id).items():
        meta = json.loads(raw) if key.startswith(_ARTIFACTS_KEY) and isinstance(raw, str) else None
        if isinstance(meta, dict) and "filename" in meta:
            existing.setdefault(meta["filename"], []).append(meta["artifact_id"])
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in figs.items():
            filename = f"{name}.png"
            path = Path(tmp) / filename
            path.write_bytes(figures.figure_png(fig))  # closes the figure; drawn once, for both stores
            if tracker is not None and parent_run_id:
                tracker.log_artifact(parent_run_id, path, "study")
            if ids := existing.get(filename):
                # Rewrite in place: same id, same metadata, so nothing piles up in the study.
                for artifact_id in ids:
                    with path.open("rb") as body:
                        store.write(artifact_id, body)
            else:
                optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study,
                                                 mimetype="image/png")
            names.append(name)
    return names
