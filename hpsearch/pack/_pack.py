"""The pack: K slots of nets trained together, each member trained, reported and ended on its own.

The nets: MLP or CNN classifiers (classify), or dense autoencoders (denoise, inpaint).

Each member is the training ``hpsearch.train.fit`` gives it: built by ``build_model`` after
``torch.manual_seed(seed)`` (as the objective builds a trial's model), shuffled, augmented and
(dropout) masked from generators seeded with its seed in ``fit``'s order, its training batch
corrupted by its own task (its noise level or mask size) from its own generator, stepped by its own
optimizer settings and lr schedule, evaluated on the whole validation split in eval mode at the
same points, with the same metrics, the same divergence checks and the same reporter contract.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpsearch.augment import make_augmenter
from hpsearch.errors import DataError, SpecError
from hpsearch.models import build_model, keep_mask, read_arch
from hpsearch.pack._key import StructureKey, check_batchnorm_batches, layer_widths, pack_refusal, structure_key
from hpsearch.pack._conv import StackedCNN
from hpsearch.pack._optim import StackedOptimizer
from hpsearch.pack._stack import StackedDense
from hpsearch.tasks import Task
from hpsearch.train import (_DIVERGENCE_CHECK_EVERY, Diverged, TrainConfig, TrainResult, batch_bounds, evaluate,
                            fused_step, make_optimizer, make_scheduler, report_points, resolve_device)

if TYPE_CHECKING:
    from hpsearch.data import SearchData

Report = Callable[[int, dict[str, float]], None]


@dataclass(eq=False)
class Member:
    """One trial in a pack: its settings, its own model and generators, and where it is in its training."""

    tag: Any  # whatever the caller tells members apart by (the study loop: its Optuna trial)
    params: Mapping[str, Any]
    config: TrainConfig
    report: Report
    task: Task  # its own: a denoiser's noise level, an in-painter's mask size
    slot: int
    model: nn.Module  # its own unpadded model: evaluated at reports, handed back when it leaves
    dropout_rate: float
    widths: tuple[int, ...]  # every layer's output width but the last's (_key.layer_widths)
    generator: torch.Generator  # shuffles and augmentation: fit's `generator`
    dropout_generator: torch.Generator  # dropout masks: fit's global generator after torch.manual_seed(seed)
    augment: Callable[[Tensor], Tensor] | None
    optimizer: torch.optim.Optimizer  # fit's, over the member's own model: its settings, state and lr
    optimizer_step: Callable[[], None]
    scheduler: Any
    per_batch: bool
    started: float = field(default_factory=time.perf_counter)
    epoch: int = 1  # the epoch it is in (from 1)
    batch: int = 0  # batches taken in this epoch
    step: int = 0  # batches taken in all
    seen: int = 0  # samples since the last report
    lr: float = 0.0  # the lr of its last batch
    order: Tensor | None = None
    epoch_started: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Departure:
    """A member that left its slot: completed (``error`` None), pruned or diverged."""

    member: Member
    model: nn.Module  # its weights, unpadded, in the model build_model made for it: loadable alone
    result: TrainResult  # its reports so far (``metrics``: the last one; {} before the first)
    error: BaseException | None  # what ended it early: the prune signal report raised, or Diverged


class Pack:
    """K slots of nets sharing ``key``, trained together on ``data`` (continuous batching).

    ``add`` puts a trial into a free slot at any time; it starts at epoch 0 with its own data
    order. ``step`` gives every member its next batch and returns the members that left.
    """

    def __init__(self, data: SearchData, task: Task, key: StructureKey, *, capacity: int, device: str = "cpu",
                 mean: float | None = None, std: float | None = None, reports_per_epoch: int = 1) -> None:
        refusal = pack_refusal(key.family, task.name, encoders=(key.encoder,))
        if refusal:
            raise SpecError(refusal)
        if task.name != key.task:
            raise ValueError(f"pack: the task {task.name!r} is not the structure's {key.task!r}.")
        if capacity < 1:
            raise ValueError(f"pack: capacity must be >= 1, but got {capacity!r}.")
        check_batchnorm_batches(key)
        self.key, self.task, self.capacity = key, task, capacity
        self.device = resolve_device(device)
        self.train, self.val = data.train.to(self.device), data.val.to(self.device)
        if len(self.train) == 0:
            raise DataError("a pack needs training samples, but the training split is empty.")
        self.image_shape, self.n_classes = data.image_shape, data.n_classes
        self.mean = data.mean if mean is None else mean
        self.std = data.std if std is None else std
        self.bounds = batch_bounds(len(self.train), key.batch_size)
        self.per_epoch, self.report_after = report_points(len(self.bounds), reports_per_epoch)
        self.batch = self.bounds[0][1] - self.bounds[0][0]  # the widest batch: every slot's column count
        self.reconstructs = key.family == "autoencoder"  # the outputs are images, the loss task.loss's MSE
        n_in = math.prod(data.image_shape)
        self.stack = (StackedCNN(key, capacity=capacity, image_shape=data.image_shape, n_out=data.n_classes,
                                 device=self.device) if key.family == "cnn"
                      else StackedDense(key, capacity=capacity, n_in=n_in,
                                        n_out=n_in if self.reconstructs else data.n_classes, device=self.device))
        # The CPU steps each member's own fit optimizer on its own model (its very kernel and numbers, and
        # cheap there); other devices, where K optimizer calls would cost K kernel launches, one stacked pass.
        self.stacked = (None if self.device.type == "cpu"
                        else StackedOptimizer(key.optimizer, self.stack.params, capacity=capacity))
        self.slots: list[Member | None] = [None] * capacity
        self.loss_sums = torch.zeros(capacity, device=self.device)  # each slot's training loss since its last report
        self._no_draws = torch.Generator(device=self.device)  # classify's training batch draws nothing from it

    # ----------------------------------------------------------------------- membership

    @property
    def members(self) -> list[Member]:
        return [m for m in self.slots if m is not None]

    @property
    def free_slots(self) -> int:
        return self.slots.count(None)

    def add(self, params: Mapping[str, Any], *, seed: int, report: Report, tag: Any = None,
            task: Task | None = None) -> Member:
        """Put a trial with ``params`` and ``seed`` into a free slot, at epoch 0; return its member.

        ``task``: the member's own (the objective's, made from its params: its noise level, its mask
        size); default the pack's.
        """
        if None not in self.slots:
            raise ValueError(f"pack: all {self.capacity} slots are taken; add after a member leaves.")
        family = self.key.family
        key = structure_key(params, family=family, task=self.key.task)
        if key != self.key:
            raise ValueError(f"pack: a member must have the pack's structure {self.key}, but got {key}.")
        task = self.task if task is None else task
        if task.name != self.key.task:
            raise ValueError(f"pack: a member's task must be the pack's {self.key.task!r}, but got {task.name!r}.")
        config = TrainConfig.from_params(params, seed=seed, device=str(self.device))
        arch = read_arch(family, params)
        widths = layer_widths(family, arch)
        torch.manual_seed(seed)  # as the objective builds a trial's model: the seed fixes the initial weights
        model = build_model(family, params, image_shape=self.image_shape, n_classes=self.n_classes).to(self.device)
        slot = self.slots.index(None)
        grown = self.stack.grow_for(arch)
        if grown and self.stacked is not None:
            self.stacked.pad(grown)
        self.stack.load(slot, model)
        optimizer = make_optimizer(model.parameters(), config, self.device)
        scheduler, per_batch = make_scheduler(optimizer, config, steps_per_epoch=len(self.bounds))
        if self.stacked is not None:
            self.stacked.set_member(slot, optimizer)
            optimizer._opt_called = True  # type: ignore[attr-defined]  # the stacked one steps for it
        self.loss_sums[slot] = 0.0
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        dropout_generator = torch.Generator()  # keep_mask draws on the CPU, as fit's Dropout does there
        dropout_generator.manual_seed(seed)
        member = Member(tag=tag, params=params, config=config, report=report, task=task, slot=slot, model=model,
                        dropout_rate=arch.dropout, widths=widths, generator=generator,
                        dropout_generator=dropout_generator,
                        augment=make_augmenter(config.augmentation, tuple(self.train.images.shape[1:]), generator,
                                               self.device),
                        optimizer=optimizer, optimizer_step=fused_step(optimizer), scheduler=scheduler,
                        per_batch=per_batch)
        self.slots[slot] = member
        return member

    def _leave(self, member: Member, error: BaseException | None) -> Departure:
        self.stack.store(member.slot, member.model, steps=member.step)
        self.stack.clear(member.slot)
        if self.stacked is not None:
            self.stacked.clear(member.slot)
        self.slots[member.slot] = None
        history = tuple(member.history)
        result = TrainResult(metrics=dict(history[-1]) if history else {}, history=history,
                             epochs_run=member.epoch - 1 + (member.batch == len(self.bounds)),
                             seconds=time.perf_counter() - member.started)
        return Departure(member=member, model=member.model, result=result, error=error)

    # ----------------------------------------------------------------------- training

    def step(self) -> list[Departure]:
        """Give every member its next batch; return the members that left (completed, pruned, diverged)."""
        members = self.members
        if not members:
            return []
        # 1. Each member's batch from its own stream, gathered in one index_select.
        sizes = self._start_batches(members)
        images, flat = self._gather(members, sizes)
        inputs, targets = (self._reconstruction_batch(members, sizes, images) if self.reconstructs
                           else self._classification_batch(images, flat))
        short = any(size < self.batch for size in sizes.values())
        counts = torch.tensor([sizes.get(slot, self.batch) for slot in range(self.capacity)], device=self.device)
        sample_mask = (torch.arange(self.batch, device=self.device) < counts.view(-1, 1, 1)) if short else None

        # 2. One forward and backward for all slots; each member's loss is its own batch mean.
        for p in self.stack.params.values():
            p.grad = None
        outputs = self.stack.forward(inputs, self._dropout(members, sizes), sample_mask,
                                     counts.view(-1, 1, 1).float() if short else None)
        if self.reconstructs:  # task.loss: the MSE of the sigmoid's pixels against the clean image, per sample
            per_sample = (outputs.sigmoid() - targets.transpose(1, 2)).square().mean(1)
        else:
            per_sample = F.cross_entropy(outputs, targets, reduction="none")
        if short:
            losses = torch.where(sample_mask.squeeze(1), per_sample, 0.0).sum(1) / counts
        else:
            losses = per_sample.mean(1)
        active = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
        active[[m.slot for m in members]] = True
        torch.where(active, losses, 0.0).sum().backward()

        # 3. Every member's optimizer step, at the lr its schedule gives now.
        for member in members:
            member.lr = member.optimizer.param_groups[0]["lr"]
        if self.stacked is None:
            for member in members:
                self.stack.step_member(member.slot, member.model, member.optimizer_step)
        else:
            lrs = torch.zeros(self.capacity, dtype=torch.float64)
            lrs[[m.slot for m in members]] = torch.tensor([m.lr for m in members], dtype=torch.float64)
            self.stacked.step(self.stack.params, lrs.to(self.device))
        self.loss_sums.add_(torch.where(active, losses.detach() * counts, 0.0))
        for member in members:
            if member.per_batch:
                member.scheduler.step()
            member.batch += 1
            member.step += 1
            member.seen += sizes[member.slot]
        # 4. Divergence checks and reports, each member at its own points.
        return self._after_step(members)

    def _start_batches(self, members: list[Member]) -> dict[int, int]:
        """Return {slot: its batch's size}; a member starting an epoch draws the epoch's permutation."""
        sizes = {}
        for member in members:
            if member.batch == 0:
                member.order = torch.randperm(len(self.train), generator=member.generator, device=self.device)
                member.epoch_started = time.perf_counter()
            start, stop = self.bounds[member.batch]
            sizes[member.slot] = stop - start
        return sizes

    def _gather(self, members: list[Member], sizes: dict[int, int]) -> tuple[Tensor, Tensor]:
        """Return (each slot's batch of uint8 images (K, batch, C, H, W), augmented, and their indexes (K * batch,));
        empty slots and short batches get sample 0."""
        index = torch.zeros(self.capacity, self.batch, dtype=torch.int64, device=self.device)
        for member in members:
            start, stop = self.bounds[member.batch]
            index[member.slot, : stop - start] = member.order[start:stop]
        flat = index.view(-1)
        images = self.train.images.index_select(0, flat).view(self.capacity, self.batch, *self.image_shape)
        for member in members:
            if member.augment is not None:  # from its own generator, after its permutation: fit's order
                size = sizes[member.slot]
                images[member.slot, :size] = member.augment(images[member.slot, :size])
        return images, flat

    def _classification_batch(self, images: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Return (inputs (K, batch, n_in), labels (K, batch)): classify draws nothing, so all slots at once."""
        inputs, _, _ = self.task.training_batch(images.view(-1, *self.image_shape), self._no_draws, self.mean,
                                                self.std)
        labels = self.train.labels.index_select(0, flat).view(self.capacity, self.batch)
        return inputs.reshape(self.capacity, self.batch, -1), labels

    def _reconstruction_batch(self, members: list[Member], sizes: dict[int, int], images: Tensor
                              ) -> tuple[Tensor, Tensor]:
        """Return (inputs, clean images in [0, 1]), both (K, batch, n_pixels): each member's batch corrupted by
        its own task from its own generator, after its augmentation (fit's order); zeros elsewhere."""
        inputs = torch.zeros(self.capacity, self.batch, self.stack.n_in, device=self.device)
        targets = torch.zeros_like(inputs)
        for member in members:
            size = sizes[member.slot]
            corrupted, clean, _ = member.task.training_batch(images[member.slot, :size], member.generator,
                                                             self.mean, self.std)
            inputs[member.slot, :size] = corrupted.flatten(1)
            targets[member.slot, :size] = clean.flatten(1)
        return inputs, targets

    def _dropout(self, members: list[Member], sizes: dict[int, int]) -> Callable[[int, int], Tensor | None]:
        """Return the dropout masks of one step: each member's from its own generator, layer by layer."""
        dropping = [m for m in members if m.dropout_rate > 0]

        def masks(layer: int, batch: int) -> Tensor | None:
            if not dropping:
                return None
            mask = torch.ones(self.capacity, batch, self.stack.widths[layer], device=self.device)
            for member in dropping:
                shape = (sizes[member.slot], member.widths[layer])
                keep, scale = keep_mask(shape, member.dropout_rate, member.dropout_generator)
                mask[member.slot, : shape[0], : shape[1]] = keep.to(self.device, mask.dtype).mul_(scale)
            return mask.transpose(1, 2)

        return masks

    def _after_step(self, members: list[Member]) -> list[Departure]:
        departures = []
        due = [m for m in members if m.step % _DIVERGENCE_CHECK_EVERY == 0]
        values = self.loss_sums.tolist() if due else []
        for member in members:
            if member in due and not math.isfinite(values[member.slot]):
                departures.append(self._leave(member, Diverged(member.epoch, member.step, values[member.slot])))
                continue
            if member.batch in self.report_after:
                error = self._report(member, self.report_after[member.batch])
                if error is not None:
                    departures.append(self._leave(member, error))
                    continue
            if member.batch == len(self.bounds):
                member.batch = 0
                member.epoch += 1
                if member.epoch > member.config.epochs:
                    departures.append(self._leave(member, None))
        return departures

    def _report(self, member: Member, j: int) -> BaseException | None:
        """Evaluate ``member`` and report it, as fit does; return what ended it (Diverged, a prune), or None."""
        train_loss = self.loss_sums[member.slot].item() / member.seen
        if not math.isfinite(train_loss):
            return Diverged(member.epoch, member.step, train_loss)
        end_of_epoch = j == self.per_epoch
        if end_of_epoch and member.scheduler is not None and not member.per_batch:
            member.scheduler.step()
        metrics = {"train_loss": train_loss}
        # The member's model holds its weights of the moment: evaluated here, and the reporter's to use
        # (the objective draws a trial's images from its model at epochs' ends).
        self.stack.store(member.slot, member.model, steps=member.step)
        if len(self.val):  # no validation split (a refit on all the training data): nothing to evaluate
            metrics.update(evaluate(member.model, self.val, member.task, mean=self.mean, std=self.std,
                                    device=self.device))
        if end_of_epoch:
            metrics["epoch_seconds"] = time.perf_counter() - member.epoch_started
        metrics["lr"] = member.lr
        if self.per_epoch > 1:
            metrics["epoch"] = member.epoch - 1 + j / self.per_epoch
        member.history.append(metrics)
        self.loss_sums[member.slot] = 0.0
        member.seen = 0
        try:
            member.report((member.epoch - 1) * self.per_epoch + j, dict(metrics))
        except Exception as exc:  # the prune signal, or anything the reporter raises: this member ends alone
            return exc
        return None

    def drain(self) -> list[Departure]:
        """Step until every member has left; return the departures in the order they left."""
        departures: list[Departure] = []
        while self.members:
            departures += self.step()
        return departures
