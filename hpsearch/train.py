"""The training and evaluation loop. It knows nothing of Optuna or MLflow: only ``report(step, metrics)``.

Speed is the point of this module: a search trains hundreds of small models, and for those the
usual ``DataLoader`` of PIL images costs far more than the arithmetic. So the data stay on the
device as uint8 tensors, each epoch draws one permutation there, and every batch is gathered by
index, scaled, corrupted and normalised as whole tensors: no per-sample Python, no worker processes.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hpsearch import knobs
from hpsearch.augment import Augmentation, make_augmenter
from hpsearch.errors import DataError, SpecError
from hpsearch.mlp_step import mlp_step
from hpsearch.tasks import Classify, Task, eval_generator, evaluating, normalize, to_unit
from hpsearch.vocab import DEVICE_RULE, PRECISIONS, is_device

if TYPE_CHECKING:
    from hpsearch.data import SearchData, Split

# The torch class of each name in vocab.OPTIMIZERS (tests/test_vocab.py checks they match).
OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
_optimizer_module = importlib.import_module("torch.optim.optimizer")  # where the global step hooks live
_DIVERGENCE_CHECK_EVERY = 64  # batches between NaN checks: a blown-up trial stops early, without a sync per batch


@dataclass(frozen=True)
class TrainConfig:
    """How one trial trains: optimizer, schedule, batches, seed and device."""

    epochs: int
    batch_size: int = 128  # small enough for many steps per epoch, large enough for fast matmuls
    optimizer: str = "adam"  # forgiving of the learning rate: the safest default for a search
    lr: float = 1e-3
    momentum: float = 0.9  # sgd and rmsprop only
    nesterov: bool = False  # sgd only
    beta1: float = 0.9  # adam and adamw only: PyTorch's defaults
    beta2: float = 0.999
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    augment_shift: int = 0  # off by default: augmentation is a choice the study makes, searched or fixed
    augment_rotate: float = 0.0
    augment_scale: float = 0.0
    augment_flip: bool = False
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": forward passes under bfloat16 autocast; weights and optimizer stay fp32
    channels_last: bool | None = None  # conv models' memory layout; None: see memory_format

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, numbers.Integral) or self.epochs < 1:
            raise SpecError(f"training params: `epochs` must be an integer >= 1, but got {self.epochs!r}.")
        if self.precision not in PRECISIONS:
            raise SpecError(f"training params: `precision` must be one of {list(PRECISIONS)}, "
                            f"but got {self.precision!r}.")
        for f in fields(self):  # the hyperparameters among them: their rules live in the knob table
            if f.name in knobs.KNOBS:
                knobs.check(f.name, getattr(self, f.name), where="training params")

    @property
    def augmentation(self) -> Augmentation:
        """Return how training batches are augmented (all zero: not at all)."""
        return Augmentation(shift=self.augment_shift, rotate=self.augment_rotate, scale=self.augment_scale,
                            flip=self.augment_flip)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, seed: int, device: str, precision: str = "fp32",
                    channels_last: bool | None = None) -> TrainConfig:
        """Return the training config held in a trial's flat params (and the task's device settings)."""
        settings = ("seed", "device", "precision", "channels_last")
        names = [f.name for f in fields(cls) if f.name not in settings]
        missing = [name for name in names if name not in params]
        if missing:
            raise SpecError(f"training params: {missing} must be given, but they are missing.")
        return cls(**{name: params[name] for name in names}, seed=seed, device=device, precision=precision,
                   channels_last=channels_last)


class Diverged(Exception):
    """The training loss became NaN or infinite: the trial is lost, the study goes on."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(epoch, step, value)  # as args, so the exception pickles across processes
        self.epoch, self.step, self.value = epoch, step, value

    def __str__(self) -> str:
        return (f"training diverged: the training loss became {self.value} in epoch {self.epoch} "
                f"(found by step {self.step}); try a lower learning rate")


@dataclass(frozen=True)
class TrainResult:
    """What one training run gives back."""

    metrics: dict[str, float]  # the last report: train_loss, val metrics, epoch_seconds, lr
    history: tuple[dict[str, float], ...]  # every report, in order
    epochs_run: int  # whole epochs trained
    seconds: float  # wall time of the whole fit, evaluation included


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``name``: "auto" picks cuda, then mps, then the cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        if not is_device(name):
            raise ValueError(name)
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):  # torch refuses an index it cannot hold, too
        raise SpecError(f"task.device {DEVICE_RULE}, but got {name!r}.") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"task.device asks for {name!r}, but PyTorch sees no CUDA GPU on this machine; "
                            "use 'cpu' or 'auto'.")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise SpecError(f"task.device {name!r} names GPU {index}, but this machine has "
                            f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise SpecError(f"task.device asks for {name!r}, but Apple's MPS is not available here; use 'cpu' "
                            "or 'auto'.")
        return device
    raise AssertionError(f"is_device({name!r}) holds, but resolve_device has no case for it")  # unreachable


def fit(model: nn.Module, data: SearchData, task: Task, config: TrainConfig,
        report: Callable[[int, dict[str, float]], None], *, mean: float | None = None,
        std: float | None = None, reports_per_epoch: int = 1) -> TrainResult:
    """Return the metrics of ``model`` after training it in place on ``data.train`` for ``config.epochs``.

    Inputs are standardised with ``mean`` and ``std`` (default: the training pixels' own,
    ``data.mean`` and ``data.std``); a study passes what :func:`hpsearch.tasks.input_stats` gives.

    ``reports_per_epoch`` times an epoch (evenly spaced, at most once per batch, the last at the
    epoch's end), ``report(step, metrics)`` gets: train_loss (the mean since the previous report),
    the task's validation metrics on the whole validation split (none when ``data.val`` is empty,
    as in a refit), epoch_seconds (at an epoch's end), lr and, with several reports an epoch,
    epoch (where the report falls, e.g. 1.25). ``step`` counts reports: ``step / reports_per_epoch``
    is the epoch, so with one report per epoch it is the epoch number. Whatever ``report`` raises (a prune signal) ends the fit and propagates.
    Raises :class:`Diverged` when the training loss becomes NaN or infinite.

    Threads: fit leaves torch's intra-op thread count as the caller set it
    (``torch.set_num_threads``): the worker decides once how many cores each trial gets, so that
    parallel workers share the machine without oversubscribing it.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    train, val = data.train.to(device), data.val.to(device)
    if len(train) == 0:
        raise DataError("fit needs training samples, but the training split is empty.")
    model.to(device)
    layout = memory_format(model, device, config.channels_last)
    model.to(memory_format=layout)
    if config.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise SpecError(f"training params: batchnorm needs `batch_size` >= 2, but got {config.batch_size}.")

    # 1. Seeds: dropout draws from torch's global generator, shuffling and noise from our own.
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)

    # 2. Batches: (start, stop) into each epoch's permutation.
    n = len(train)
    bounds = batch_bounds(n, config.batch_size)

    optimizer = make_optimizer(model.parameters(), config, device)
    optimizer_step = fused_step(optimizer)
    # A plain MLP classifier on the CPU sets its gradients without autograd: same numbers, less overhead.
    plain_step = mlp_step(model, device, config.precision) if type(task) is Classify else None
    scheduler, per_batch = make_scheduler(optimizer, config, steps_per_epoch=len(bounds))
    group = optimizer.param_groups[0]
    mean = data.mean if mean is None else mean
    std = data.std if std is None else std
    augment = make_augmenter(config.augmentation, tuple(train.images.shape[1:]), generator, device)

    per_epoch, report_after = report_points(len(bounds), reports_per_epoch)

    # 3. Epochs: train, check; at each report, evaluate and report.
    history: list[dict[str, float]] = []
    step = 0
    epochs_run = 0
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator, device=device)
        loss_sum = torch.zeros((), device=device)  # since the last report
        seen = 0
        lr = group["lr"]
        for batch, (start, stop) in enumerate(bounds, 1):
            index = order[start:stop]
            # index_select, not images[index]: advanced indexing of uint8 rows is ~10x slower on the CPU.
            images = train.images.index_select(0, index)
            if augment is not None:
                images = augment(images)
            inputs, images01, mask = task.training_batch(images, generator, mean, std)
            labels = train.labels.index_select(0, index)
            if layout is torch.channels_last:  # conv models: NHWC inputs; no extra call otherwise
                inputs = inputs.contiguous(memory_format=layout)
            if plain_step is not None:
                loss = plain_step(inputs, labels)
            else:
                with autocast(device, config.precision):
                    loss = task.loss(model(inputs), images01, labels, mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            lr = group["lr"]
            optimizer_step()
            if per_batch:
                scheduler.step()
            # Summed on the device: reading the loss every batch would wait for the GPU every batch.
            loss_sum.add_(loss.detach(), alpha=stop - start)
            seen += stop - start
            step += 1
            if step % _DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
                raise Diverged(epoch, step, loss_sum.item())
            if batch not in report_after:
                continue
            j = report_after[batch]
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                raise Diverged(epoch, step, train_loss)
            end_of_epoch = j == per_epoch
            if end_of_epoch and scheduler is not None and not per_batch:
                scheduler.step()
            metrics = {"train_loss": train_loss,
                       # No validation split (a refit on all the training data): nothing to evaluate.
                       **(evaluate(model, val, task, mean=mean, std=std, device=device, precision=config.precision,
                                   layout=layout) if len(val) else {})}
            if end_of_epoch:
                metrics["epoch_seconds"] = time.perf_counter() - epoch_started
            metrics["lr"] = lr
            if per_epoch > 1:
                metrics["epoch"] = epoch - 1 + j / per_epoch  # where in the training this report is
            history.append(metrics)
            # A copy: whatever the reporter does, the history stays as measured.
            report((epoch - 1) * per_epoch + j, dict(metrics))
            loss_sum = torch.zeros((), device=device)
            seen = 0
        epochs_run = epoch
    return TrainResult(metrics=dict(history[-1]), history=tuple(history), epochs_run=epochs_run,
                       seconds=time.perf_counter() - started)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Return each batch's (start, stop) into an epoch's permutation of ``n`` samples."""
    # A lone last sample is dropped: it would break batchnorm and take a step on one sample's gradient.
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


def report_points(n_batches: int, reports_per_epoch: int) -> tuple[int, dict[int, int]]:
    """Return (reports an epoch, {batch number (from 1): report number j in the epoch})."""
    # At most one report per batch; the j-th after batch ceil(j * batches / per_epoch): the last ends the epoch.
    per_epoch = max(1, min(reports_per_epoch, n_batches))
    return per_epoch, {math.ceil(j * n_batches / per_epoch): j for j in range(1, per_epoch + 1)}


def evaluate(model: nn.Module, split: Split, task: Task, *, mean: float, std: float,
             device: str | torch.device, batch_size: int = 1024, precision: str = "fp32",
             layout: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """Return the task's ``val_*`` metrics of ``model`` (already on ``device``) on ``split``.

    The corruption is the fixed one of :func:`hpsearch.tasks.eval_generator`, so every call scores
    the same inputs (for a given ``batch_size``). ``precision`` "bf16" runs the forward passes
    under bfloat16 autocast, as training did; the metrics are summed in float32.
    """
    n = len(split)
    if n == 0:
        raise DataError("evaluate needs samples, but the split is empty.")
    generator = eval_generator()
    sums: dict[str, Tensor] = {}
    with evaluating(model), torch.inference_mode():
        for start in range(0, n, batch_size):
            images01 = to_unit(split.images[start:start + batch_size].to(device))
            labels = split.labels[start:start + batch_size].to(device)
            inputs01, mask = task.corrupt(images01, generator)
            with autocast(torch.device(device), precision):
                output = model(normalize(inputs01, mean, std).contiguous(memory_format=layout))
            for name, value in task.batch_sums(output.float(), images01, labels, inputs01, mask).items():
                sums[name] = sums[name] + value if name in sums else value
    return task.summarize(sums, n)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Return the autocast context of ``precision`` on ``device`` ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_format(model: nn.Module, device: torch.device, channels_last: bool | None) -> torch.memory_format:
    """Return the memory layout for ``model``'s inputs: channels_last for conv models where asked.

    ``None`` (auto) means channels_last on CUDA, where cuDNN's convolutions are fastest in NHWC
    (and bf16 tensor cores need it), and on the CPU for models without transposed convolutions
    (the CNN): oneDNN's convolutions and PyTorch's max pooling are faster in NHWC there (pooling
    8x at 28x28; a CNN epoch 1.3-1.7x, docs/benchmarks.md). The conv autoencoder keeps the
    default layout on the CPU: its transposed convolutions were not measured there.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if channels_last is None:
        transposed = any(isinstance(m, nn.modules.conv._ConvTransposeNd) for m in convs)
        channels_last = device.type == "cuda" or (device.type == "cpu" and not transposed)
    return torch.channels_last if channels_last and convs else torch.contiguous_format


def make_optimizer(parameters: Iterable[nn.Parameter], config: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """Return the optimizer of ``config``, using the fused or multi-tensor kernels of ``device``."""
    # Fused kernels update all parameters in one pass; where there is none, foreach batches the
    # per-parameter ops. Either beats the per-parameter loop by far for small models.
    fast: dict[str, bool] = {"foreach": True}
    if config.optimizer != "rmsprop" and device.type in ("cpu", "cuda"):
        fast = {"fused": True}
    common = {"lr": config.lr, "weight_decay": config.weight_decay, **fast}
    if config.optimizer == "sgd":
        # Nesterov with zero momentum is plain SGD (and PyTorch refuses the combination).
        common.update(momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    elif config.optimizer == "rmsprop":
        common.update(momentum=config.momentum)
    else:
        common.update(betas=(config.beta1, config.beta2))
    return OPTIMIZER_CLASSES[config.optimizer](parameters, **common)


def fused_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """Return a function that takes one step of ``optimizer``, calling its fused kernel directly where it can.

    On the CPU, ``Optimizer.step`` spends about 100 µs per call around a 30 µs kernel (it regroups
    the tensors, checks devices, runs hooks and profiler scopes): a seventh of a small MLP's step.
    For a one-group fused Adam, AdamW or SGD on the CPU, the first step is ``optimizer.step()``
    itself, which creates the state; later steps call the same kernel on the same state tensors
    with the group's settings of the moment (so schedulers still work), which gives the same
    numbers. Anything else (another optimizer, hooks, amsgrad, a parameter without a gradient)
    steps through ``step()``.
    """
    groups = optimizer.param_groups
    group = groups[0]
    kernel = _fused_kernel(optimizer)
    eligible = (kernel is not None and len(groups) == 1 and group.get("fused") is True
                and not group.get("amsgrad", False) and not group.get("capturable", False)
                and not group.get("differentiable", False)
                and all(p.device.type == "cpu" for p in group["params"])
                and not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks)
    if not eligible:
        return lambda: optimizer.step()  # looked up per call: a scheduler made later wraps step()
    params: list[nn.Parameter] = list(group["params"])
    sgd = type(optimizer) is torch.optim.SGD
    with_momentum = sgd and group["momentum"] != 0
    keys = ("exp_avg", "exp_avg_sq", "step") if not sgd else ("momentum_buffer",) if with_momentum else ()
    state: list[list[Tensor]] | None = None  # one list per key, taken from the optimizer after its first step

    def step() -> None:
        nonlocal state
        grads = [p.grad for p in params]
        if (state is None or any(g is None for g in grads) or isinstance(group["lr"], Tensor)
                or (sgd and (group["momentum"] != 0) != with_momentum) or _global_step_hooks()):
            optimizer.step()
            if state is None and all(key in optimizer.state.get(p, {}) for p in params for key in keys):
                state = [[optimizer.state[p][key] for p in params] for key in keys]
            return
        if sgd:
            kernel(params, grads, state[0] if with_momentum else [], weight_decay=group["weight_decay"],
                   momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                   nesterov=group["nesterov"], maximize=group["maximize"], is_first_step=False)
            return
        exp_avgs, exp_avg_sqs, steps = state
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])

    return step


def _fused_kernel(optimizer: torch.optim.Optimizer) -> Callable[..., Any] | None:
    """Return the fused kernel that ``optimizer.step`` calls (Adam, AdamW or SGD), or None."""
    if type(optimizer) is torch.optim.SGD:
        return getattr(torch, "_fused_sgd_", None)
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = optimizer.param_groups[0].get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)
        return getattr(torch, "_fused_adamw_" if decoupled else "_fused_adam_", None)
    return None


def _global_step_hooks() -> bool:
    return bool(getattr(_optimizer_module, "_global_optimizer_pre_hooks", None)
                or getattr(_optimizer_module, "_global_optimizer_post_hooks", None))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   *, steps_per_epoch: int) -> tuple[Any, bool]:
    """Return (the lr scheduler or None, whether it steps per batch rather than per epoch)."""
    schedule = config.lr_schedule
    if schedule == "none":
        return None, False
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs), False
    if schedule == "step":
        # Three drops by 10x over the run, wherever it ends.
        step_size = max(1, config.epochs // 3)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1), False
    # One-cycle peaks at `lr`; momentum is not cycled, so the searched momentum/beta1 keep their meaning.
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs,
                                               steps_per_epoch=steps_per_epoch, cycle_momentum=False), True


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
