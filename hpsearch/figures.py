"""Pictures: numpy images to PNG, a trial's confusion matrix, and the study-level plots that compare trials.

Every plot function takes finished trials (or images) and returns a matplotlib Figure, or None
when the study cannot show that plot yet (too few trials, a single parameter). Figures are
built without pyplot's global state where possible, so workers may draw them in threads. The
confusion matrix, drawn once per trial, is painted with PIL instead: a few ms, not matplotlib's ~100.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

DPI = 110  # legible text on a laptop screen and in an HTML report, files stay ~50-100 kB
TOP_K = 5  # learning curves drawn in colour; more turns the legend into noise
_BEST = "#d62728"
_PRUNED = "#7f7f7f"


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 H×W or H×W×3 image as PNG and return its path."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def load_png(data: bytes) -> np.ndarray:
    """Return the uint8 image (H×W or H×W×3) in PNG bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.asarray(image).copy()


def figure_png(fig: Figure) -> bytes:
    """Return ``fig`` as PNG bytes, and release it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    close(fig)
    return buffer.getvalue()


def close(fig: Figure) -> None:
    """Release a figure, also when Optuna drew it through pyplot."""
    import matplotlib.pyplot as plt

    plt.close(fig)  # a no-op for figures pyplot does not hold
    fig.clear()


# --------------------------------------------------------------------------- helpers


def _better(direction: str) -> Any:
    return min if direction == "minimize" else max


def _arrow(direction: str) -> str:
    return "lower is better" if direction == "minimize" else "higher is better"


def _last_value(trial: FrozenTrial) -> float | None:
    """Return a pruned trial's last reported value (the one it was judged on)."""
    if not trial.intermediate_values:
        return None
    value = trial.intermediate_values[max(trial.intermediate_values)]
    return value if math.isfinite(value) else None


def _figure(width: float = 7.5, height: float = 4.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _finite(trials: Sequence[FrozenTrial], index: int = 0) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
            and math.isfinite(t.values[index])]


# --------------------------------------------------------------------------- study plots


def optimization_history(trials: Sequence[FrozenTrial], metric: str, direction: str) -> Figure | None:
    """Return each trial's value by trial number with the best-so-far line; pruned trials as ×."""
    complete = _finite(trials)
    if not complete:
        return None
    fig, ax = _figure()
    better = _better(direction)
    xs = [t.number for t in complete]
    ys = [t.values[0] for t in complete]
    ax.scatter(xs, ys, s=28, color="#1f77b4", label="complete", zorder=3)
    pruned = [(t.number, v) for t in trials if t.state == TrialState.PRUNED and (v := _last_value(t)) is not None]
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", s=28, color=_PRUNED, label="pruned (last reported)", zorder=2)
    best_so_far, best = [], None
    for y in ys:
        best = y if best is None else better(best, y)
        best_so_far.append(best)
    ax.step(xs, best_so_far, where="post", color=_BEST, linewidth=2, label=f"best so far ({best:.4g})")
    ax.set(xlabel="trial", ylabel=metric, title=f"Optimization history: {metric} ({_arrow(direction)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def param_importances(study: optuna.Study, metric: str, *, objective: int = 0) -> Figure | None:
    """Return the fANOVA importance of each searched parameter; None below 2 trials or 2 params."""
    complete = _finite(study.get_trials(deepcopy=False), objective)
    searched = {name for t in complete for name in t.params}
    if len(complete) < 2 or len(searched) < 2:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API and constant-parameter warnings
            importances = optuna.importance.get_param_importances(
                study, target=lambda t: t.values[objective],
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError):
        return None  # e.g. every trial has the same value: nothing to attribute
    if len(importances) < 2:
        return None
    names = list(importances)[::-1]  # most important on top
    values = [importances[n] for n in names]
    fig, ax = _figure(height=max(2.2, 0.38 * len(names) + 1.0))
    bars = ax.barh(names, values, color="#1f77b4")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.set(xlabel=f"importance for {metric} (fANOVA, sums to 1)", xlim=(0, max(values) * 1.15 or 1),
           title=f"Parameter importances ({len(complete)} complete trials)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def parallel_coordinates(study: optuna.Study, metric: str, direction: str, *, objective: int = 0
                         ) -> Figure | None:
    """Return Optuna's parallel-coordinate plot of params and value, the best trials darkest;
    None below 2 trials or without a searched param."""
    complete = _finite(study.get_trials(deepcopy=False), objective)
    searched = {name for t in complete for name in t.params}
    if len(complete) < 2 or not searched:
        return None
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is "experimental"
        ax = plot_parallel_coordinate(study, target=lambda t: t.values[objective], target_name=metric)
    fig = ax.figure
    # Optuna darkens low values whenever a target is given: right for minimize only. The best
    # trials must stand out, not fade into the white end of the map.
    cmap = matplotlib.colormaps["Blues_r" if direction == "minimize" else "Blues"]
    for lines in ax.collections:  # the trials' LineCollection; its colour bar follows it
        lines.set_cmap(cmap)
    fig.set_size_inches(max(7.5, 1.3 * (len(searched) + 1)), 4.5)
    ax.set_title("Parallel coordinates: one line per complete trial")
    return fig


def learning_curves(trials: Sequence[FrozenTrial], metric: str, direction: str, *,
                    top_k: int = TOP_K, reports_per_epoch: int = 1) -> Figure | None:
    """Return the learning curves against epochs: the top-k complete trials in colour, others faint, pruned dashed ×.

    A trial's report ``step`` is drawn at epoch ``step / reports_per_epoch``.
    """
    with_curves = [t for t in trials if len(t.intermediate_values) >= 1
                   and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not with_curves:
        return None
    sign = 1.0 if direction == "minimize" else -1.0
    complete = sorted((t for t in _finite(with_curves)), key=lambda t: (sign * t.values[0], t.number))
    top, rest = complete[:top_k], complete[top_k:]
    pruned = [t for t in with_curves if t.state == TrialState.PRUNED]
    fig, ax = _figure(height=4.6)

    def curve(t: FrozenTrial) -> tuple[list[float], list[float]]:
        steps = sorted(s for s, v in t.intermediate_values.items() if math.isfinite(v))
        return [s / reports_per_epoch for s in steps], [t.intermediate_values[s] for s in steps]

    for t in rest:
        ax.plot(*curve(t), color="#9ecae1", linewidth=1, alpha=0.8)
    for i, t in enumerate(pruned):
        steps, values = curve(t)
        label = f"pruned ({len(pruned)})" if i == 0 else None
        ax.plot(steps, values, color=_PRUNED, linestyle="--", linewidth=1, alpha=0.8, label=label)
        if steps:
            ax.plot(steps[-1], values[-1], marker="x", color=_PRUNED, markersize=7)
    colours = matplotlib.colormaps["tab10"]
    for rank, t in enumerate(top):
        ax.plot(*curve(t), color=colours(rank), linewidth=2, marker="o", markersize=3,
                label=f"#{t.number}: {t.values[0]:.4g}" + (" (best)" if rank == 0 else ""))
    if rest:
        ax.plot([], [], color="#9ecae1", label=f"other complete ({len(rest)})")
    ax.set(xlabel="epoch", ylabel=metric,
           title=f"Learning curves: top {len(top)} of {len(complete)} complete trials ({_arrow(direction)})")
    if reports_per_epoch == 1:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def metric_vs_param(trials: Sequence[FrozenTrial], param: str, metric: str, direction: str, *,
                    log: bool = False) -> Figure | None:
    """Return the metric of each complete trial against one parameter, the best per value joined."""
    points = [(t.params[param], t.values[0]) for t in _finite(trials) if param in t.params]
    if not points:
        return None
    fig, ax = _figure()
    xs, ys = zip(*points)
    ax.scatter(xs, ys, s=30, color="#1f77b4", alpha=0.7, label="complete trial", zorder=3)
    best: dict[Any, float] = {}
    better = _better(direction)
    for x, y in points:
        best[x] = y if x not in best else better(best[x], y)
    bx = sorted(best)
    ax.plot(bx, [best[x] for x in bx], color=_BEST, marker="o", linewidth=2, label=f"best per {param}", zorder=4)
    if log and min(xs) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(bx, [str(x) for x in bx])
        ax.minorticks_off()
    ax.set(xlabel=param, ylabel=metric, title=f"{metric} against {param} ({_arrow(direction)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def pareto_front(study: optuna.Study, metrics: Sequence[str]) -> Figure | None:
    """Return Optuna's Pareto-front plot of a 2- or 3-objective study; None without complete trials."""
    if len(metrics) not in (2, 3) or not _finite(study.get_trials(deepcopy=False)):
        return None
    from optuna.visualization.matplotlib import plot_pareto_front

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = plot_pareto_front(study, target_names=list(metrics))
    fig = ax.figure
    fig.set_size_inches(7.5, 5.0)
    return fig


# --------------------------------------------------------------------------- images


_CELL_PX = 36  # a confusion-matrix cell: room for a 4-digit count in an 11-px font...
_MATRIX_PX = (180, 720)  # ...grown or shrunk so that the matrix is about this wide, at least and at most
_INK = (0, 0, 0)


def confusion_matrix_image(counts: np.ndarray) -> np.ndarray:
    """Return the confusion matrix drawn as an RGB uint8 picture: true classes down, predicted across.

    Cells are shaded by count (matplotlib's "Blues"), each holds its count (up to 20 classes), and
    the title gives the accuracy and the number of samples.
    """
    from PIL import Image, ImageDraw

    counts = np.asarray(counts)
    n_classes = counts.shape[0]
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else float("nan")
    cell = max(4, min(max(_CELL_PX, _MATRIX_PX[0] // max(n_classes, 1)), _MATRIX_PX[1] // max(n_classes, 1)))
    font, small = _font(12), _font(11 if cell >= 28 else 9)
    label_w = _text_size(small, str(n_classes - 1))[0] + 6  # the widest tick label, and a gap
    left, top = 20 + label_w, 28  # room for "true" (turned) and the ticks; for the title
    side = n_classes * cell
    image = Image.new("RGB", (left + side + 12, top + side + label_w + 20), "white")
    # 1. Cells: one coloured pixel per class pair, scaled up without smoothing.
    peak = counts.max() if counts.size and counts.max() > 0 else 1
    colours = matplotlib.colormaps["Blues"](counts / peak, bytes=True)[..., :3]
    cells = Image.fromarray(np.ascontiguousarray(colours, dtype=np.uint8)).resize((side, side), Image.NEAREST)
    image.paste(cells, (left, top))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + side, top + side), outline=_INK)
    # 2. Counts, white on dark cells, when they fit.
    if n_classes <= 20:
        threshold = counts.max() / 2 if counts.size else 0
        for (true, predicted), count in np.ndenumerate(counts):
            centre = (left + predicted * cell + cell / 2, top + true * cell + cell / 2)
            draw.text(centre, str(int(count)), fill="white" if count > threshold else "black", font=small,
                      anchor="mm")
    # 3. Ticks (every class when they fit), axis labels and the title.
    step = max(1, math.ceil(label_w / cell))
    for k in range(0, n_classes, step):
        draw.text((left - 4, top + k * cell + cell / 2), str(k), fill=_INK, font=small, anchor="rm")
        draw.text((left + k * cell + cell / 2, top + side + 4), str(k), fill=_INK, font=small, anchor="mt")
    draw.text((left + side / 2, image.height - 4), "predicted", fill=_INK, font=font, anchor="md")
    draw.text((left + side / 2, top / 2), f"accuracy {accuracy:.2%} of {total}", fill=_INK, font=font, anchor="mm")
    turned = Image.new("RGB", _text_size(font, "true"), "white")
    ImageDraw.Draw(turned).text((0, 0), "true", fill=_INK, font=font, anchor="lt")
    turned = turned.rotate(90, expand=True)
    image.paste(turned, (4, top + (side - turned.height) // 2))
    return np.asarray(image).copy()


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # PIL's own scalable font (a bitmap one without FreeType)


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text, anchor="lt")
    return max(1, int(right - left)), max(1, int(bottom - top))



def grid_bands(grid: np.ndarray, n_bands: int = 3) -> list[np.ndarray]:
    """Return the ``n_bands`` rows of an image grid, top to bottom, without the gaps between them.

    Gaps are rows of the grid's corner colour across the whole width (as `pictures.reconstruction_grid`
    draws them); a grid without such gaps is cut into equal heights.
    """
    pixels = grid if grid.ndim == 3 else grid[..., None]
    gap = np.all(pixels == pixels[0, 0], axis=(1, 2))
    bands, start = [], None
    for y, is_gap in enumerate([*gap.tolist(), True]):
        if not is_gap and start is None:
            start = y
        elif is_gap and start is not None:
            bands.append((start, y))
            start = None
    if len(bands) != n_bands:
        height = grid.shape[0]
        edges = [round(i * height / n_bands) for i in range(n_bands + 1)]
        bands = list(zip(edges[:-1], edges[1:]))
    return [grid[top:bottom] for top, bottom in bands]


def image_rows(rows: Sequence[tuple[str, np.ndarray]], *, title: str = "") -> Figure:
    """Return the image strips ``rows`` stacked top to bottom, each labelled on its left."""
    width = max(r.shape[1] for _, r in rows)
    height = sum(r.shape[0] for _, r in rows)
    inches_per_px = 10.0 / max(width, 1)  # about 10 inches wide, whatever the strip length
    fig = Figure(figsize=(10.0 + 2.2, height * inches_per_px + (0.5 if title else 0.1) + 0.05 * len(rows)),
                 layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False, height_ratios=[r.shape[0] for _, r in rows])
    for ax, (label, strip) in zip(axes[:, 0], rows):
        ax.imshow(strip, cmap="gray" if strip.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest",
                  aspect="equal")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
