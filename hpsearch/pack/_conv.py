"""K CNN classifiers of one structure as stacked tensors: grouped convolutions, then the dense head.

The CNN (``hpsearch.models.build_model``, family ``cnn``): conv blocks of conv → batchnorm
(optional) → activation and 2x2 max pool (pool first for the activations that never decrease, as
the model does), then the MLP's dense layers on the flattened features. Member k's batch runs in
the k-th group of channels of one ``(batch, K * channels, H, W)`` tensor, and each conv is one
``F.conv2d(..., groups=K)``: one kernel call per layer for all K. Channels are padded to the
widest member's ``conv_channels`` (times 2 per block): a padded channel has zero weights in and
out (and, with batchnorm, a zero scale and shift), so it stays 0 through every activation and
pool, gets zero gradients, and its member's numbers are those of its own narrower model. The
flattened features of a member's channels come first in its group (channel-major, as
``nn.Flatten`` orders them), so the dense head (``StackedDense``) pads its input like any width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpsearch.models import POOL_FIRST_ACTIVATIONS, Arch
from hpsearch.pack._key import StructureKey
from hpsearch.pack._stack import _BN_EPS, _BN_MOMENTUM, StackedDense


class StackedCNN(StackedDense):
    """The conv blocks (K, ...) of K CNN slots before the dense head of ``StackedDense``."""

    def __init__(self, key: StructureKey, *, capacity: int, image_shape: tuple[int, int, int], n_out: int,
                 device: torch.device) -> None:
        self.image_shape = image_shape
        self.channels = 1  # the widest member's conv_channels: grows (see grow_for)
        _, height, width = image_shape
        self.pools: list[bool] = []  # per block: whether it pools (build_model's rule: while there is something)
        for _ in range(key.conv_blocks):
            self.pools.append(min(height, width) >= 2)
            height, width = (height // 2, width // 2) if self.pools[-1] else (height, width)
        self.spatial = height * width  # of each channel after the last block
        self.pool_first = key.activation in POOL_FIRST_ACTIVATIONS
        self.key = key  # before StackedDense's __init__, whose first shapes() call reads it
        super().__init__(key, capacity=capacity, n_in=self._flat(), n_out=n_out, device=device)

    def _block_channels(self, block: int) -> int:
        """Return the padded output channels of conv ``block`` (-1: the image's)."""
        return self.image_shape[0] if block < 0 else self.channels * 2**block

    def _flat(self) -> int:
        """Return the padded number of flattened features per member: the dense head's input."""
        return self._block_channels(self.key.conv_blocks - 1) * self.spatial

    def shapes(self, widths: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Return the stacked shape of every conv and dense parameter and buffer for the present channels."""
        shapes: dict[str, tuple[int, ...]] = {}
        size = self.key.kernel_size
        for block in range(self.key.conv_blocks):
            out = self._block_channels(block)
            shapes[f"conv_weight{block}"] = (self.capacity, out, self._block_channels(block - 1), size, size)
            if not self.key.batchnorm:  # build_model drops the conv's bias before a batchnorm
                shapes[f"conv_bias{block}"] = (self.capacity, out)
                continue
            for name in ("gamma", "beta", "running_mean", "running_var"):
                shapes[f"conv_{name}{block}"] = (self.capacity, out)
        return {**shapes, **super().shapes(widths)}

    def grow_for(self, arch: Arch) -> dict[str, tuple[int, ...]] | None:
        """Pad every tensor to hold a member of ``arch``; return the new shapes, or None when it fits already."""
        if arch.conv_channels <= self.channels or not self.key.conv_blocks:
            return super().grow_for(arch)
        self.channels = arch.conv_channels
        self.n_in = self._flat()
        self.widths = tuple(max(a, b) for a, b in zip(self.widths, arch.widths))
        return self._pad()

    # ----------------------------------------------------------------------- a member's own model

    def _conv_modules(self, model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
        """Return ``model``'s modules of ``kind`` (nn.Conv2d, nn.BatchNorm2d): one per conv block, if any."""
        found = [m for m in model.modules() if isinstance(m, kind)]
        expected = self.key.conv_blocks if kind is nn.Conv2d or self.key.batchnorm else 0
        if len(found) != expected:
            raise ValueError(f"pack: the model does not have the pack's structure {self.key}.")
        return found

    def _parameter_names(self, model: nn.Module) -> dict[int, str]:
        names = super()._parameter_names(model)
        for block, conv in enumerate(self._conv_modules(model, nn.Conv2d)):
            names[id(conv.weight)] = f"conv_weight{block}"
            if conv.bias is not None:
                names[id(conv.bias)] = f"conv_bias{block}"
        for block, norm in enumerate(self._conv_modules(model, nn.BatchNorm2d)):
            names[id(norm.weight)], names[id(norm.bias)] = f"conv_gamma{block}", f"conv_beta{block}"
        return names

    def _slot_views(self, slot: int, model: nn.Module) -> list[tuple[str, Tensor]]:
        buffers = [(f"conv_{name}{block}", getattr(norm, name))
                   for block, norm in enumerate(self._conv_modules(model, nn.BatchNorm2d))
                   for name in ("running_mean", "running_var")]
        return super()._slot_views(slot, model) + buffers

    # ----------------------------------------------------------------------- training

    def forward(self, inputs: Tensor, dropout: Callable[[int, int], Tensor | None], sample_mask: Tensor | None,
                counts: Tensor | None) -> Tensor:
        """Return the logits (K, n_classes, batch) of ``inputs`` (K, batch, pixels) in training mode.

        As ``StackedDense.forward``; ``sample_mask`` and ``counts`` keep each member's conv
        batchnorm statistics to its own samples too.
        """
        if not self.key.conv_blocks:  # a CNN without conv blocks is a dense net on the pixels
            return super().forward(inputs, dropout, sample_mask, counts)
        k, batch = inputs.shape[:2]
        # (batch, K * C, H, W): member k's images in channel group k. NHWC, as fit runs a CNN on the CPU and CUDA.
        h = inputs.transpose(0, 1).reshape(batch, k * self.image_shape[0], *self.image_shape[1:])
        h = h.contiguous(memory_format=torch.channels_last)
        for block, pool in enumerate(self.pools):
            weight = self.params[f"conv_weight{block}"]
            bias = self.params.get(f"conv_bias{block}")
            h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                         padding=self.key.kernel_size // 2, groups=k)
            if self.key.batchnorm:
                h = self._conv_batchnorm(block, h, sample_mask, counts)
            if pool and self.pool_first:  # max(f(x)) = f(max(x)): the model's order, on a quarter of the values
                h = self.activation(F.max_pool2d(h, 2))
            else:
                h = self.activation(h)
                h = F.max_pool2d(h, 2) if pool else h
        features = h.reshape(batch, k, -1).transpose(0, 1)  # (K, batch, features), channel-major as nn.Flatten
        return super().forward(features, dropout, sample_mask, counts)

    def _conv_batchnorm(self, block: int, h: Tensor, sample_mask: Tensor | None, counts: Tensor | None) -> Tensor:
        """Return nn.BatchNorm2d's training output per member and channel; update its running stats."""
        gamma, beta = self.params[f"conv_gamma{block}"], self.params[f"conv_beta{block}"]
        running_mean, running_var = self.buffers[f"conv_running_mean{block}"], self.buffers[f"conv_running_var{block}"]
        if sample_mask is None:  # every member's batch is whole: PyTorch's own kernel, one channel per (member, c)
            return F.batch_norm(h, running_mean.view(-1), running_var.view(-1), gamma.reshape(-1), beta.reshape(-1),
                                training=True, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        # Short batches: the statistics of each member's real samples only, over (samples, H, W).
        batch, _, height, width = h.shape
        k, channels = gamma.shape
        grouped = h.view(batch, k, channels, height, width)
        mask = sample_mask.view(k, batch).t().reshape(batch, k, 1, 1, 1)
        n = counts.view(1, k, 1, 1, 1) * (height * width)
        mean = (grouped * mask).sum((0, 3, 4), keepdim=True) / n
        centered = grouped - mean
        var = (centered.square() * mask).sum((0, 3, 4), keepdim=True) / n
        with torch.no_grad():
            running_mean.lerp_(mean.view(k, channels), _BN_MOMENTUM)
            running_var.lerp_((var * (n / (n - 1).clamp_min(1))).view(k, channels), _BN_MOMENTUM)
        out = centered * torch.rsqrt(var + _BN_EPS) * gamma.view(1, k, channels, 1, 1) + beta.view(1, k, channels, 1, 1)
        return out.reshape(batch, k * channels, height, width)
