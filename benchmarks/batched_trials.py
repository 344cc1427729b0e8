"""Same-shape trials trained together: K sequential `fit` epochs against one batched epoch of K models.

K "trials" share the MLP of benchmarks/epoch_speed.py (784-128-64-10, ReLU, built by
`hpsearch.models.build_model`) but not their hyperparameters: each has its own learning rate,
dropout rate and seed (hence its own initial weights and data order). All see the same data
(Fashion-MNIST's training images, split train / validation by hpsearch.data, optionally capped
with --train-limit), batch size 128 and Adam. An "epoch" is one pass over the training split plus
one over the validation split (loss and accuracy per trial), on both sides.

    (a) sequential  one `hpsearch.train.fit` epoch per trial, K of them, as a study runs them today.
    (b) batched     one epoch that trains the K models at once: their parameters stacked along a
                    leading K axis, one forward and one backward for all of them, Adam with a
                    learning rate per model (see StackedAdam: fused per-model groups on the
                    CPU, foreach ops on a GPU), a dropout mask per model (its own rate).
        bmm         the forward written with addmm / baddbmm on the stacked weights;
        vmap        `torch.vmap(torch.func.functional_call)` over the template module, the stacked
                    parameters and the dropout masks (drawn outside, as in bmm).
        -own        each model draws its own shuffle every epoch, from its own seed as `fit` does:
                    K gathers per step, one bmm per layer;
        -shared     one shuffle for all models: one gather per step, and the first layer becomes one
                    wide matmul, since every model sees the same input.

The figure is seconds per trial-epoch: (a)'s K epochs, or (b)'s one epoch, divided by K. The
sides take turns, an epoch each, after a warm-up epoch of each; the best of the repeats is shown.
Before timing, a check that the batched training is the same training: with dropout 0 and one seed
(one initialisation, one data order), (1) K copies with one lr must end an epoch where one `fit`
epoch ends, and (2) K models with K learning rates where K `fit`s with those rates end.

Usage: python benchmarks/batched_trials.py [--ks 1,2,4,8] [--repeats 3] [--train-limit 20000]
                                           [--variants bmm-own,bmm-shared,vmap-own] [--threads 2]
                                           [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
import hpsearch  # noqa: E402,F401  before torch: its OpenMP wait policy holds for both sides

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from epoch_speed import FASHION_DIR, load_data  # noqa: E402
from hpsearch.data import SearchData  # noqa: E402
from hpsearch.knobs import defaults  # noqa: E402
from hpsearch.models import build_model  # noqa: E402
from hpsearch.tasks import Classify  # noqa: E402
from hpsearch.train import TrainConfig, TrainResult, fit, resolve_device  # noqa: E402

VARIANTS = ("bmm-own", "bmm-shared", "vmap-own", "vmap-shared")
BATCH_SIZE = 128
EVAL_BATCH = 1024  # as hpsearch.train.evaluate
CHECK_LR = 1e-3
CHECK_SEED = 7
# The check's measure: ||batched - fit|| / ||fit - initial|| over all parameters. Models given each
# other's lr differ by 0.3-2 of it after an epoch; float rounding alone by ~1e-6, except that an
# epoch of Adam amplifies it in a few runs out of ten: `fit` itself, 1 vs 2 threads, differed by
# up to 0.2 for 2 lrs of 16 (measured on an H100 machine's CPU). So the copies (one trajectory)
# must agree, and so must the median model of those with K lrs, not each of them.
CHECK_TOLERANCE = 0.01


@dataclass(frozen=True)
class Trial:
    """One trial's hyperparameters: what differs between the K models."""

    lr: float
    dropout: float
    seed: int


def make_trials(k: int) -> list[Trial]:
    """Return K trials as a search would draw them: lr log-uniform in [3e-4, 3e-3], dropout in [0, 0.4)."""
    rng = random.Random(0)  # trial i is the same whatever K
    return [Trial(lr=10 ** rng.uniform(-3.5, -2.5), dropout=round(rng.uniform(0.0, 0.4), 2), seed=1000 * (i + 1))
            for i in range(k)]


def mlp_params(dropout: float) -> dict:
    return {**defaults(), "n_layers": 2, "width_0": 128, "width_1": 64, "dropout": dropout}


def build_trial_model(trial: Trial, data: SearchData) -> nn.Module:
    """Return the trial's untrained MLP, its initial weights drawn from the trial's seed."""
    torch.manual_seed(trial.seed)
    return build_model("mlp", mlp_params(trial.dropout), image_shape=data.image_shape, n_classes=data.n_classes)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Return fit's batches: (start, stop) into an epoch's permutation, a lone last sample dropped."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


# --------------------------------------------------------------------------- (a) sequential


class SequentialTrials:
    """(a): K models that keep training, one `fit` epoch each per round."""

    def __init__(self, trials: list[Trial], data: SearchData, *, device: str) -> None:
        self.trials, self.data, self.device = trials, data, device
        self.models = [build_trial_model(trial, data) for trial in trials]
        self.rounds = 0
        self.last_metrics: list[dict[str, float]] = []

    def epoch(self) -> float:
        """Return the summed seconds of one epoch of every trial (fit's own epoch timer)."""
        self.rounds += 1
        seconds, self.last_metrics = 0.0, []
        for trial, model in zip(self.trials, self.models):
            # A new shuffle each round, as one long fit would draw; distinct per trial, as in a study.
            result = fit_epoch(model, self.data, trial.lr, seed=trial.seed + self.rounds, device=self.device)
            seconds += result.history[0]["epoch_seconds"]
            self.last_metrics.append(result.metrics)
        return seconds


def fit_epoch(model: nn.Module, data: SearchData, lr: float, *, seed: int, device: str) -> TrainResult:
    """Return the result of one `fit` epoch of ``model`` (trained in place) with Adam at ``lr``."""
    config = TrainConfig(epochs=1, batch_size=BATCH_SIZE, optimizer="adam", lr=lr, seed=seed, device=device)
    return fit(model, data, Classify(), config, lambda step, metrics: None)


# --------------------------------------------------------------------------- (b) batched


class _Mask(nn.Module):
    """Dropout with the mask given from outside (a buffer that functional_call replaces)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


class StackedModels:
    """K models of one shape as stacked (K, ...) tensors: one forward for all, a dropout rate and lr each."""

    def __init__(self, models: list[nn.Module], trials: list[Trial], *, device: torch.device,
                 foreach: bool | None = None) -> None:
        # The template is the models' structure: every Dropout becomes a _Mask slot. A model built
        # with dropout 0 has no Dropout module at all, so parameters are matched by order, not name.
        probe = build_model("mlp", mlp_params(0.5), image_shape=(1, 28, 28), n_classes=10)
        self.template = nn.Sequential(*[_Mask() if isinstance(m, nn.Dropout) else m for m in probe]).to(device)
        names = [name for name, _ in self.template.named_parameters()]
        per_model = [list(model.parameters()) for model in models]
        shapes = [[tuple(p.shape) for p in params] for params in per_model]
        if any(s != [tuple(p.shape) for _, p in self.template.named_parameters()] for s in shapes):
            raise ValueError(f"StackedModels needs models of the template's shape, but got {shapes}.")
        self.k = len(models)
        self.params = {name: torch.stack([params[i].detach() for params in per_model]).to(device).requires_grad_()
                       for i, name in enumerate(names)}
        # (module name, width) of each dropout slot: the out_features of the Linear before it.
        self.mask_slots: list[tuple[str, int]] = []
        width = 0
        for name, module in self.template.named_children():
            if isinstance(module, nn.Linear):
                width = module.out_features
            elif isinstance(module, _Mask):
                self.mask_slots.append((name, width))
        # hpsearch.models.Dropout's rule: a unit is kept when its 16-bit random number clears a threshold.
        dropped = torch.tensor([round(t.dropout * 65536) for t in trials], device=device)
        self.keep_threshold = (dropped - 32768).to(torch.int16).view(-1, 1, 1)
        self.keep_scale = (65536 / (65536 - dropped)).float().view(-1, 1, 1)
        self.optimizer = StackedAdam(list(self.params.values()), lrs=[t.lr for t in trials],
                                     foreach=device.type != "cpu" if foreach is None else foreach)

    def masks(self, batch: int, *, variant: str) -> dict[str, Tensor]:
        """Return a fresh dropout mask for every dropout slot, one per model, in the variant's layout."""
        masks = {}
        for name, width in self.mask_slots:
            n = self.k * batch * width
            bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=self.keep_scale.device)
            bits.random_(-(2**63), 2**63 - 1)
            shape = (self.k, batch, width) if variant.startswith("vmap") else (self.k, width, batch)
            keep = bits.view(torch.int16)[:n].view(shape) >= self.keep_threshold
            masks[name] = keep.to(torch.float32).mul_(self.keep_scale)
        return masks

    def forward(self, inputs: Tensor, masks: dict[str, Tensor], *, variant: str) -> Tensor:
        """Return logits (K, classes, B); ``inputs`` is (B, ...) for all models or (K, B, ...) per model."""
        shared = inputs.dim() == 4
        if variant.startswith("vmap"):
            def one_model(params: dict[str, Tensor], masks: dict[str, Tensor], x: Tensor) -> Tensor:
                buffers = {f"{name}.mask": mask for name, mask in masks.items()}
                return torch.func.functional_call(self.template, {**params, **buffers}, (x,))
            logits = torch.vmap(one_model, in_dims=(0, 0, None if shared else 0))(self.params, masks, inputs)
            return logits.transpose(1, 2)
        # bmm: activations feature-major, (K, features, B), so that each weight's gradient comes out
        # in the weight's own (K, out, in) layout; the batch-major h @ W^T made autograd copy a
        # transposed (K, 128, 784) gradient every step, a fifth of the step.
        h = inputs.flatten(start_dim=-3)  # (B, in) or (K, B, in): batch-major until the first layer
        first = True
        for name, module in self.template.named_children():
            if isinstance(module, nn.Linear):
                weight, bias = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
                if shared and first:  # one input for all models: one wide matmul, (K*out, in) @ (in, B)
                    h = torch.addmm(bias.reshape(-1, 1), weight.reshape(-1, weight.shape[-1]), h.t())
                    h = h.view(self.k, -1, h.shape[-1])
                else:
                    h = torch.baddbmm(bias.unsqueeze(2), weight, h.transpose(1, 2) if first else h)
                first = False
            elif isinstance(module, _Mask):
                if name in masks:
                    h = h * masks[name]
            elif not isinstance(module, nn.Flatten):
                h = module(h)  # the activation: elementwise, any layout
        return h


class StackedAdam:
    """Adam over stacked (K, ...) parameters, with a learning rate per model (slice of the K axis).

    torch.optim's Adam takes one lr per param group, so there are two ways, each faster on its device:

    - groups (the CPU): torch's fused Adam, one param group per model holding views of its slices:
      the kernel and arithmetic of `fit`'s optimizer, one pass over the parameters. The foreach way
      was 2.5x (K=1) to 7x (K=8) slower on 2 cores: ten passes, and a per-tensor loop where operands
      broadcast.
    - foreach (a GPU): Adam's steps as torch._foreach ops on the stacked tensors, the lr as a (K, 1, ...)
      tensor: ~15 kernel launches a step whatever K, where the groups cost K launches and K groups'
      Python each step.
    """

    def __init__(self, params: list[Tensor], *, lrs: list[float], foreach: bool) -> None:
        self.params, self.foreach = params, foreach
        if foreach:
            lr = torch.tensor(lrs, dtype=torch.float32, device=params[0].device)
            self.lrs = [lr.view(-1, *[1] * (p.dim() - 1)) for p in params]  # broadcast over each slice
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]
            self.step_count = 0
        else:
            # Views of a tensor that needs no grad are leaves, so the optimizer takes them.
            self.slices = [[p.detach()[k] for p in params] for k in range(len(lrs))]
            self.optimizer = torch.optim.Adam([{"params": views, "lr": lr} for views, lr in zip(self.slices, lrs)],
                                              fused=True)

    @torch.no_grad()
    def step(self) -> None:
        if not self.foreach:
            for k, views in enumerate(self.slices):
                for param, view in zip(self.params, views):
                    view.grad = param.grad[k]
            self.optimizer.step()
            return
        # torch.optim.Adam's defaults (betas 0.9, 0.999, eps 1e-8) and its foreach op order.
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        self.step_count += 1
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(self.exp_avg_sq, beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, (1 - beta2**self.step_count) ** 0.5)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(self.exp_avg, denom)
        torch._foreach_mul_(update, self.lrs)
        torch._foreach_div_(update, 1 - beta1**self.step_count)
        torch._foreach_sub_(self.params, update)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class BatchedTrials:
    """(b): the K models in one StackedModels, trained together, an epoch per round."""

    def __init__(self, trials: list[Trial], data: SearchData, *, variant: str, device: str,
                 foreach: bool | None = None) -> None:
        self.device = resolve_device(device)
        self.train, self.val = data.train.to(self.device), data.val.to(self.device)
        self.mean, self.std = data.mean, data.std
        self.variant, self.shared = variant, variant.endswith("shared")
        self.stack = StackedModels([build_trial_model(trial, data) for trial in trials], trials, device=self.device,
                                   foreach=foreach)
        # Shared: one generator, the first trial's; own: one per trial, seeded as fit seeds its own.
        self.generators = []
        for trial in trials[:1] if self.shared else trials:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(trial.seed)
            self.generators.append(generator)
        self.bounds = batch_bounds(len(self.train), BATCH_SIZE)
        torch.manual_seed(trials[0].seed)  # the dropout masks' stream
        self.last_metrics: list[dict[str, float]] = []

    def epoch(self) -> float:
        """Return the seconds of one epoch of all K models: train, then validation per model."""
        started = time.perf_counter()
        train, stack, k, device = self.train, self.stack, self.stack.k, self.device
        n = len(train)
        orders = torch.stack([torch.randperm(n, generator=g, device=device) for g in self.generators])
        loss_sum = torch.zeros(k, device=device)
        for start, stop in self.bounds:
            index = orders[:, start:stop].reshape(-1)  # (1 or K) * B rows
            inputs = self._inputs(train.images.index_select(0, index))
            labels = train.labels.index_select(0, index)
            if not self.shared:
                inputs = inputs.view(k, stop - start, *inputs.shape[1:])
            logits = stack.forward(inputs, stack.masks(stop - start, variant=self.variant), variant=self.variant)
            labels = labels.expand(k, -1) if self.shared else labels.view(k, -1)
            # Per-model mean losses, summed: each model's gradient is that of its own mean loss.
            losses = F.cross_entropy(logits, labels, reduction="none").mean(dim=1)
            stack.optimizer.zero_grad()
            losses.sum().backward()
            stack.optimizer.step()
            loss_sum.add_(losses.detach(), alpha=stop - start)
        train_loss = (loss_sum / self.bounds[-1][1]).tolist()
        self.last_metrics = [{"train_loss": loss, **val} for loss, val in zip(train_loss, self.evaluate())]
        return time.perf_counter() - started

    def _inputs(self, images: Tensor) -> Tensor:
        # Classify's scaling, as in fit: the same floats reach the first layer.
        return images.float().mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)

    @torch.inference_mode()
    def evaluate(self) -> list[dict[str, float]]:
        """Return each model's val_loss and val_accuracy, as hpsearch.train.evaluate computes them."""
        k, n = self.stack.k, len(self.val)
        loss, correct = torch.zeros(k, device=self.device), torch.zeros(k, device=self.device)
        for start in range(0, n, EVAL_BATCH):
            inputs = self._inputs(self.val.images[start:start + EVAL_BATCH])
            labels = self.val.labels[start:start + EVAL_BATCH]
            logits = self.stack.forward(inputs, {}, variant=self.variant)
            loss += F.cross_entropy(logits, labels.expand(k, -1), reduction="none").sum(dim=1)
            correct += (logits.argmax(dim=1) == labels).sum(dim=1)
        return [{"val_loss": l / n, "val_accuracy": c / n} for l, c in zip(loss.tolist(), correct.tolist())]

    def model_params(self, index: int) -> list[Tensor]:
        """Return model ``index``'s parameters, in the order of ``nn.Module.parameters()``."""
        return [p[index].detach() for p in self.stack.params.values()]


# --------------------------------------------------------------------------- correctness


def run_check(data: SearchData, *, k: int, variants: list[str], device: str) -> tuple[str, bool]:
    """Return (the check's report, whether every variant passed): batched vs `fit` after one epoch.

    Dropout 0 and one seed: every model starts from the same weights and sees the same data order,
    so a batched model and a `fit` with its lr do the same arithmetic, up to float rounding.
    """
    lrs = [CHECK_LR] + [t.lr for t in make_trials(k)[1:]]
    start = build_trial_model(Trial(lr=CHECK_LR, dropout=0.0, seed=CHECK_SEED), data)
    initial = [p.detach().clone() for p in start.parameters()]
    fitted = [fitted_params(data, lr, device=device) for lr in lrs]
    lines = [f"Correctness after one epoch, dropout 0, one seed (one init, one data order): batched vs `fit`, "
             f"max abs parameter difference and relative (||batched - fit|| / ||fit - initial||, tolerance "
             f"{CHECK_TOLERANCE:g}; the largest parameter change in the epoch was "
             f"{max_abs_diff(fitted[0], initial):.3f}):"]
    if resolve_device(device).type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        other = fitted_params(data, CHECK_LR, device=device)
        torch.set_num_threads(threads)
        lines.append(f"- float noise for scale, `fit` itself at {threads} threads vs {1 if threads > 1 else 2}, "
                     f"lr {CHECK_LR:g}: {max_abs_diff(other, fitted[0]):.1e} "
                     f"(relative {relative_diff(other, fitted[0], initial):.0e})")
    passed = True
    for variant in variants:
        copies = checked_epoch(data, [CHECK_LR] * k, variant=variant, device=device)
        per_lr = checked_epoch(data, lrs, variant=variant, device=device)
        same = max(max_abs_diff(copies.model_params(i), fitted[0]) for i in range(k))
        same_rel = max(relative_diff(copies.model_params(i), fitted[0], initial) for i in range(k))
        each = sorted(relative_diff(per_lr.model_params(i), fitted[i], initial) for i in range(k))
        median = each[(k - 1) // 2]
        ok = same_rel <= CHECK_TOLERANCE and median <= CHECK_TOLERANCE
        passed = passed and ok
        lines.append(f"- {variant}: {k} copies (lr {CHECK_LR:g}) vs one `fit`: {same:.1e} (relative {same_rel:.0e}); "
                     f"{k} lrs vs {k} `fit`s, relative: median {median:.0e}, max {each[-1]:.0e} "
                     f"({sum(e > CHECK_TOLERANCE for e in each)} of {k} above {CHECK_TOLERANCE:g}); "
                     f"{'ok' if ok else '**FAILED**'}")
    return "\n".join(lines), passed


def fitted_params(data: SearchData, lr: float, *, device: str) -> list[Tensor]:
    model = build_trial_model(Trial(lr=lr, dropout=0.0, seed=CHECK_SEED), data)
    fit_epoch(model, data, lr, seed=CHECK_SEED, device=device)
    return [p.detach().cpu() for p in model.parameters()]


def checked_epoch(data: SearchData, lrs: list[float], *, variant: str, device: str) -> BatchedTrials:
    batched = BatchedTrials([Trial(lr=lr, dropout=0.0, seed=CHECK_SEED) for lr in lrs], data, variant=variant,
                            device=device)
    batched.epoch()
    return batched


def max_abs_diff(params: list[Tensor], others: list[Tensor]) -> float:
    return max(float((p.cpu() - o.cpu()).abs().max()) for p, o in zip(params, others))


def relative_diff(params: list[Tensor], reference: list[Tensor], initial: list[Tensor]) -> float:
    """Return ||params - reference|| / ||reference - initial||, all tensors as one vector."""
    def norm(tensors: list[Tensor], others: list[Tensor]) -> float:
        return float(torch.cat([(t.cpu() - o.cpu()).flatten() for t, o in zip(tensors, others)]).norm())
    return norm(params, reference) / norm(reference, initial)


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class KResult:
    """Seconds per trial-epoch at one K: the sequential side and each batched variant."""

    k: int
    sequential: list[float]
    batched: dict[str, list[float]]
    accuracy: dict[str, list[float]]  # each side's val_accuracy per trial after its last epoch


def measure_k(k: int, data: SearchData, *, repeats: int, variants: list[str], device: str) -> KResult:
    """Return seconds per trial-epoch of (a) and each (b) at K trials, their epochs interleaved."""
    trials = make_trials(k)
    sides: list[tuple[str, SequentialTrials | BatchedTrials]] = [
        ("sequential", SequentialTrials(trials, data, device=device)),
        *((variant, BatchedTrials(trials, data, variant=variant, device=device)) for variant in variants)]
    for _, side in sides:
        side.epoch()  # warm-up: first-touch allocations, thread pools, CUDA kernels
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    for round_ in range(repeats):
        # The sides take turns, and the order flips every round: a busy neighbour slows them alike.
        for name, side in sides if round_ % 2 == 0 else reversed(sides):
            times[name].append(side.epoch() / k)
    accuracy = {name: [m["val_accuracy"] for m in side.last_metrics] for name, side in sides}
    return KResult(k=k, sequential=times.pop("sequential"), batched=times, accuracy=accuracy)


def format_table(results: list[KResult], variants: list[str]) -> str:
    """Return the markdown table: best s per trial-epoch of (a) and each (b), and the speed-ups."""
    lines = ["| K | (a) sequential `fit` | " + " | ".join(f"(b) {v} | speed-up" for v in variants) + " |",
             "|---:|---:|" + "---:|---:|" * len(variants)]
    for r in results:
        ours = min(r.sequential)
        cells = [f"{min(r.batched[v]):.4f} s | **{ours / min(r.batched[v]):.2f}x**" for v in variants]
        lines.append(f"| {r.k} | {ours:.4f} s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="1,2,4,8", help="comma-separated numbers of trials trained together")
    parser.add_argument("--repeats", type=int, default=3, help="measured epochs per side and K (best shown)")
    parser.add_argument("--variants", default="bmm-own,bmm-shared,vmap-own",
                        help="comma-separated, from " + ",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (as task.device)")
    parser.add_argument("--data-dir", default=FASHION_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--train-limit", type=int, default=20000, help="cap on train+validation images")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants must be from {list(VARIANTS)}, but got {unknown}.")
    ks = [int(k) for k in args.ks.split(",")]
    if any(k < 1 for k in ks):
        parser.error(f"--ks must be positive integers, but got {args.ks!r}.")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_data(args.data_dir, args.train_limit)
    print(f"Fashion-MNIST: {len(data.train)} train + {len(data.val)} validation images; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; {_device_name(device)}; batch size "
          f"{BATCH_SIZE}; best of {args.repeats} epochs per side; load average {_load()}\n", flush=True)

    report, passed = run_check(data, k=max(ks), variants=variants, device=args.device)
    print(report + "\n", flush=True)
    results = [measure_k(k, data, repeats=args.repeats, variants=variants, device=args.device) for k in ks]
    print("Seconds per trial-epoch (train + validation), best of the repeats:\n")
    print(format_table(results, variants))
    last = results[-1]
    print(f"\nval_accuracy per trial after {args.repeats + 1} epochs, K = {last.k} (dropout draws differ "
          f"between the sides, so close, not equal):")
    for trial_index, trial in enumerate(make_trials(last.k)):
        values = " ".join(f"{name} {acc[trial_index]:.3f}" for name, acc in last.accuracy.items())
        print(f"- lr {trial.lr:.1e}, dropout {trial.dropout:.2f}: {values}")
    print(f"\nload average at end: {_load()}")
    if not passed:
        sys.exit("the correctness check failed: a batched variant does not train as `fit` does")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
