"""A study's report: one self-contained HTML file (images inline) and a markdown summary.

The HTML needs nothing but a browser: images are base64 data URIs, the CSS is inline, there is
no script and no font or stylesheet from elsewhere, so it can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch import figures, insights
from hpsearch.record import (DEVICE_ATTR, FAIL_REASON_ATTR, IMAGE_ATTRS, INTERRUPTED_ATTR, N_PARAMS_ATTR, SEED_ATTR,
                             STOPPED_ATTR, TEST_ATTR, TRAIN_SECONDS_ATTR, FinalTest, StoredData, artifact_store,
                             best_trial, count, epoch_text, read_artifact, reports_per_epoch, untracked, untracked_note)
from hpsearch.spec import Spec, mask_password

HTML_FILE = "report.html"
MD_FILE = "summary.md"
FIGURES_DIR = "figures"  # PNGs the markdown summary links to
MAX_TRIAL_ROWS = 30  # the trial table of a 500-trial study would bury the rest

CAPTIONS = {
    "reconstructions_by_bottleneck": "The best trial of each bottleneck size on the same validation images: "
                                     "clean, corrupted, then one reconstruction row per size.",
    "learning_curves": "Validation metric per epoch; pruned trials dashed, ending in × where the pruner "
                       "stopped them.",
    "optimization_history": "Each trial's final value by trial number, and the best so far.",
    "param_importances": "How much of the metric's variation each parameter explains (fANOVA).",
    "parallel_coordinates": "Each complete trial's parameters, coloured by its value.",
    "pareto_front": "The trade-off between the objectives; the Pareto-optimal trials stand out.",
}
_STATE = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.muted{color:#666}.warn{background:#fff3cd;border:2px solid #d39e00;padding:.7em 1em;border-radius:6px;
font-weight:600}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.complete{color:#1a7f37}.pruned{color:#8a6d00}.failed{color:#c62828}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
img.pixels{width:900px;image-rendering:pixelated}
figcaption{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .25em;border-radius:3px}
"""


def write_report(spec: Spec, study: optuna.Study, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``summary.md`` (+ its PNGs) into ``out_dir``; return both paths."""
    out = Path(out_dir)
    (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    store = artifact_store(spec)
    images: dict[str, bytes] = {}
    for name, fig in insights.study_figures(spec, study, store=store).items():
        images[name] = figures.figure_png(fig)
    best = best_trial(spec, trials)
    if best is not None:
        for attr in IMAGE_ATTRS:
            if attr in best.user_attrs and (data := read_artifact(store, best.user_attrs[attr])):
                images[f"best_{attr.split(':', 1)[1].removesuffix('.png')}"] = data
    for name, data in images.items():
        (out / FIGURES_DIR / f"{name}.png").write_bytes(data)
    facts = _Facts(spec, study.user_attrs, trials, best,
                   untracked=untracked(trials, study._storage.get_study_system_attrs(study._study_id)))
    html_path, md_path = out / HTML_FILE, out / MD_FILE
    html_path.write_text(_html(facts, images), encoding="utf-8")
    md_path.write_text(_markdown(facts, images), encoding="utf-8")
    return html_path, md_path


class _Facts:
    """What both the HTML and the markdown say, gathered once."""

    def __init__(self, spec: Spec, attrs: Mapping[str, Any], trials: Sequence[FrozenTrial],
                 best: FrozenTrial | None, *, untracked: Sequence[int] = ()) -> None:
        self.spec, self.attrs, self.trials, self.best = spec, attrs, trials, best
        self.untracked = list(untracked)
        self.counts = count(trials)
        self.data = StoredData.from_attrs(attrs)
        self.test = FinalTest.from_dict(attrs.get(TEST_ATTR))
        self.ui_url = insights.ui_url_for(spec)
        self.metrics = spec.study.metrics
        self.per_epoch = reports_per_epoch(attrs)
        self.created = dt.datetime.now().strftime("%Y-%m-%d %H:%M")

    def title(self) -> str:
        return f"Study {self.spec.study.name}: {self.spec.task.type}, {self.spec.model.family} models"

    def goal(self) -> str:
        return ", ".join(f"{m.direction} {m.name}" for m in self.metrics)

    def counts_line(self) -> str:
        c = self.counts
        line = (f"{c.finished} of {self.spec.study.n_trials} trials finished: {c.complete} complete, "
                f"{c.pruned} pruned, {c.failed} failed")
        if c.lost:
            line += f", {c.lost} lost (their worker died; retried)"
        if c.running:
            line += f"; {c.running} running"
        if self.untracked:
            line += f"; {len(self.untracked)} not in MLflow: {untracked_note(self.untracked)}"
        if stopped := self.attrs.get(STOPPED_ATTR):
            line += f"; stopped early by study.stop.{stopped['rule']}: {stopped['reason']}"
        return line + "."

    def data_line(self) -> str:
        if self.data is None:
            return f"{self.spec.task.dataset} (no trial has recorded its data yet)."
        return self.data.describe()

    def fallback_warning(self) -> str | None:
        warning = self.data and self.data.fallback_warning(self.spec.task.dataset)
        return f"FALLBACK DATA: {warning}" if warning else None

    def best_values(self) -> list[tuple[str, float]]:
        if self.best is None:
            return []
        return list(zip((m.name for m in self.metrics), self.best.values))

    def best_extra(self) -> list[tuple[str, Any]]:
        """Return the best trial's other validation metrics and facts."""
        if self.best is None:
            return []
        a = self.best.user_attrs
        rows = [(k, v) for k, v in sorted(a.items()) if k.startswith("val_") and isinstance(v, (int, float))
                and k not in {m.name for m in self.metrics}]
        for key in (N_PARAMS_ATTR, SEED_ATTR, DEVICE_ATTR, TRAIN_SECONDS_ATTR):
            if key in a:
                rows.append((key, a[key]))
        return rows

    def experiment_link(self) -> str | None:
        return insights.experiment_link(self.attrs, self.ui_url) if self.spec.tracking.enabled else None

    def run_link(self, trial: FrozenTrial) -> str | None:
        return insights.run_link(self.attrs, trial, self.ui_url) if self.spec.tracking.enabled else None

    def table(self) -> list[FrozenTrial]:
        """Return the trials to list: complete best first, then pruned, failed and others."""
        sign = 1.0 if self.metrics[0].direction == "minimize" else -1.0
        order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2}

        def key(t: FrozenTrial) -> tuple[int, float, int]:
            value = t.values[0] if t.values and math.isfinite(t.values[0]) else math.inf
            return order.get(t.state, 3), sign * value if value != math.inf else math.inf, t.number

        return sorted(self.trials, key=key)[:MAX_TRIAL_ROWS]

    def param_names(self) -> list[str]:
        return sorted({name for t in self.trials for name in t.params})


def _value(t: FrozenTrial, per_epoch: int) -> str:
    if t.values:
        return ", ".join(_fmt(v) for v in t.values)
    if t.state == TrialState.PRUNED and t.intermediate_values:
        step = max(t.intermediate_values)
        return f"{_fmt(t.intermediate_values[step])} @ epoch {epoch_text(step, per_epoch)}"
    return ""


def _reason(t: FrozenTrial, per_epoch: int) -> str:
    if t.state == TrialState.PRUNED and t.intermediate_values:
        return f"pruned after epoch {epoch_text(max(t.intermediate_values), per_epoch)}"
    return str(t.user_attrs.get(FAIL_REASON_ATTR) or t.user_attrs.get(INTERRUPTED_ATTR) or "")[:200]


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 10_000:
        value = int(value)  # a count stored as float (n_params as an objective)
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _ordered(images: Mapping[str, bytes]) -> list[str]:
    """Return the image names in reading order: what the study found first, then how it searched."""
    first = ["reconstructions_by_bottleneck", "best_reconstruction", "best_confusion_matrix"]
    names = [n for n in first if n in images]
    names += [n for n in images if n.endswith("_vs_bottleneck_dim")]
    names += [n for n in ("learning_curves", "optimization_history", "param_importances", "parallel_coordinates",
                          "pareto_front") if n in images]
    return names + [n for n in images if n not in names]


def _caption(name: str, facts: _Facts) -> str:
    if name in CAPTIONS:
        return CAPTIONS[name]
    if name.startswith("best_"):
        what = name.removeprefix("best_").replace("_", " ")
        return f"The best trial's ({'#' + str(facts.best.number) if facts.best else ''}) {what} on validation data."
    if name.endswith("_vs_bottleneck_dim"):
        return "The validation metric of every complete trial against its bottleneck size; best per size joined."
    return name.replace("_", " ")


# --------------------------------------------------------------------------- HTML


def _html(f: _Facts, images: Mapping[str, bytes]) -> str:
    e = html.escape
    s = f.spec
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(f.title())}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(f.title())}</h1>",
        f'<p class="muted">Goal: {e(f.goal())} · sampler {e(s.study.sampler.type)} · pruner '
        f"{e(s.study.pruner.type)} · spec <code>{e(s.path)}</code> · storage "
        f"<code>{e(mask_password(s.study.storage))}</code> · written {e(f.created)}</p>",
    ]
    if warning := f.fallback_warning():
        parts.append(f'<p class="warn">⚠ {e(warning)}</p>')
    parts += ["<h2>Summary</h2>", f"<p>{e(f.counts_line())}</p>", f"<p><b>Data</b>: {e(f.data_line())}</p>"]
    if f.best is None:
        parts.append("<p>No trial has completed yet, so there is no best model.</p>")
    else:
        rows = [(n, _fmt(v)) for n, v in f.best_values()] + [(k, _fmt(v)) for k, v in f.best_extra()]
        parts.append(f"<h2>Best trial: #{f.best.number}</h2>")
        parts.append(_html_table(["best trial", "value"], rows, numeric=(1,)))
        parts.append(_html_table(["parameter", "value"],
                                 [(k, _fmt(v)) for k, v in sorted(f.best.params.items())], numeric=(1,)))
        if link := f.run_link(f.best):
            parts.append(f"<p>MLflow run of this trial: <code>{e(link)}</code> (start the UI with "
                         f"<code>hpsearch ui {e(s.path)}</code>).</p>")
    parts.append("<h2>Test split</h2>")
    parts.append(_test_html(f))
    if images:
        parts.append("<h2>Plots</h2>")
    for name in _ordered(images):
        data = base64.b64encode(images[name]).decode("ascii")
        # The trial's own grid is drawn at one pixel per pixel: show it big, and sharp.
        extra = ' class="pixels"' if name == "best_reconstruction" else ""
        parts.append(f'<figure id="{e(name)}"><img{extra} src="data:image/png;base64,{data}" alt="{e(name)}">'
                     f"<figcaption><b>{e(name.replace('_', ' '))}</b>: {e(_caption(name, f))}</figcaption></figure>")
    shown = f"; the first {MAX_TRIAL_ROWS}" if len(f.trials) > MAX_TRIAL_ROWS else ""
    parts.append(f"<h2>Trials ({len(f.trials)}{shown})</h2>")
    params = f.param_names()
    head = ["#", "state", " / ".join(m.name for m in f.metrics), *params, "n_params", "note"]
    body = []
    for t in f.table():
        state = _STATE.get(t.state, t.state.name.lower())
        body.append([str(t.number), f'<span class="{state}">{state}</span>', e(_value(t, f.per_epoch)),
                     *(e(_fmt(t.params[p])) if p in t.params else "" for p in params),
                     e(_fmt(t.user_attrs.get(N_PARAMS_ATTR, ""))), e(_reason(t, f.per_epoch))])
    parts.append(_html_table(head, body, numeric=(0, 2), escaped=True))
    if s.tracking.enabled:
        parts.append(f"<p class=\"muted\">MLflow experiment <code>{e(s.tracking.experiment)}</code> at "
                     f"<code>{e(mask_password(s.tracking.uri))}</code>; per-epoch curves and images of every trial "
                     f"are there (<code>hpsearch ui {e(s.path)}</code>"
                     + (f", then <code>{e(link)}</code>" if (link := f.experiment_link()) else "") + ").</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _test_html(f: _Facts) -> str:
    e = html.escape
    test = f.test
    if test is None:
        return ("<p>The best model has not been evaluated on the test split yet "
                f"(<code>hpsearch run {e(f.spec.path)}</code> does it when the study ends).</p>")
    rows = [(k, _fmt(v)) for k, v in sorted(test.metrics.items())]
    lines = [f"<p>{e(test.model_text())}, evaluated once on {e(str(test.n_test))} "
             "test images the search never saw:</p>", _html_table(["test", "value"], rows, numeric=(1,))]
    if test.model_version:
        lines.append(f"<p>Registered model <code>{e(str(test.registered_model))}</code> version "
                     f"{e(str(test.model_version))}" + (f"; {e(test.champion)}" if test.champion else "")
                     + ".</p>")
    return "\n".join(lines)


def _html_table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Collection[int] = (),
                escaped: bool = False) -> str:
    """Return an HTML table; cells are escaped unless ``escaped`` says they already are."""
    e = (lambda x: str(x)) if escaped else (lambda x: html.escape(str(x)))
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        cells = "".join(f'<td class="num">{e(c)}</td>' if i in numeric else f"<td>{e(c)}</td>"
                        for i, c in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# --------------------------------------------------------------------------- markdown


def _markdown(f: _Facts, images: Mapping[str, bytes]) -> str:
    s = f.spec
    lines = [f"# {f.title()}", "",
             f"Goal: {f.goal()} · sampler `{s.study.sampler.type}` · pruner `{s.study.pruner.type}` · "
             f"spec `{s.path}` · written {f.created}. The full report with all plots: `{HTML_FILE}`.", ""]
    if warning := f.fallback_warning():
        lines += [f"> **⚠ {warning}**", ""]
    lines += [f"**Trials**: {f.counts_line()}", "", f"**Data**: {f.data_line()}", ""]
    if f.best is None:
        lines += ["No trial has completed yet, so there is no best model.", ""]
    else:
        lines += [f"## Best trial: #{f.best.number}", ""]
        lines += _md_table(["best trial", "value"],
                           [(n, _fmt(v)) for n, v in f.best_values()] + [(k, _fmt(v)) for k, v in f.best_extra()])
        lines += _md_table(["parameter", "value"], [(k, _fmt(v)) for k, v in sorted(f.best.params.items())])
        if link := f.run_link(f.best):
            lines += [f"MLflow run: <{link}> (`hpsearch ui {s.path}`)", ""]
    lines += ["## Test split", ""]
    if test := f.test:
        lines += [f"{test.model_text()}, evaluated once on {test.n_test} test images:", ""]
        lines += _md_table(["test", "value"], [(k, _fmt(v)) for k, v in sorted(test.metrics.items())])
        if test.model_version:
            lines += [f"Registered model `{test.registered_model}` version {test.model_version}"
                      + (f"; {test.champion}" if test.champion else "") + ".", ""]
    else:
        lines += ["Not evaluated yet (`hpsearch run` does it when the study ends).", ""]
    if images:
        lines += ["## Plots", ""]
        for name in _ordered(images):
            lines += [f"![{name}]({FIGURES_DIR}/{name}.png)", "", f"*{_caption(name, f)}*", ""]
    lines += ["## Trials", ""]
    params = f.param_names()
    lines += _md_table(["#", "state", " / ".join(m.name for m in f.metrics), *params, "note"],
                       [[t.number, _STATE.get(t.state, t.state.name.lower()), _value(t, f.per_epoch),
                         *(_fmt(t.params[p]) if p in t.params else "" for p in params), _reason(t, f.per_epoch)]
                        for t in f.table()])
    if link := f.experiment_link():
        lines += [f"MLflow: the study's runs at <{link}> (`hpsearch ui {s.path}`)", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def default_out_dir(spec: Spec) -> Path:
    """Return where `hpsearch report` writes when not told: ``reports/<study name>/``."""
    return Path("reports") / spec.study.name
