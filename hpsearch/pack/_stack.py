"""K dense nets of one structure as stacked (K, ...) tensors: one batched forward and backward for all.

The nets are the MLP classifier and the dense autoencoder (``hpsearch.models.build_model``): a
chain of Linear layers, each hidden one followed by batchnorm (optional), the activation and
dropout (optional); the autoencoder's code layer is a plain Linear (``_key.hidden_layers``).

Activations run feature-major, (K, features, batch), so that each weight's gradient comes out in
the weight's own (K, out, in) layout (benchmarks/batched_trials.py: the batch-major ``h @ W^T``
made autograd copy a transposed gradient every step). Widths are padded to the widest member:
a padded unit has zero weights in and out (and, with batchnorm, a zero scale and shift), so it
outputs 0 for every activation the models offer, gets zero gradients, and leaves its member's
numbers exactly those of its own narrower model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpsearch.models import ACTIVATION_LAYERS, Arch
from hpsearch.pack._key import StructureKey, hidden_layers, layer_widths

_BN_MOMENTUM = 0.1  # nn.BatchNorm1d's defaults, which build_model's layers keep
_BN_EPS = 1e-5


class StackedDense:
    """The parameters (K, ...) and batchnorm buffers of K slots, and their training forward pass."""

    def __init__(self, key: StructureKey, *, capacity: int, n_in: int, n_out: int, device: torch.device) -> None:
        self.key, self.capacity, self.device = key, capacity, device
        self.n_in, self.n_out = n_in, n_out
        self.hidden = hidden_layers(key)  # per layer but the last: hidden (batchnorm?, activation, dropout?)
        self.widths = (1,) * len(self.hidden)  # every layer's output width but the last's: grows (see grow)
        self.activation = ACTIVATION_LAYERS[key.activation]()
        self.params: dict[str, Tensor] = {}
        self.buffers: dict[str, Tensor] = {}
        for name, shape in self.shapes(self.widths).items():
            tensor = torch.zeros(shape, device=device)
            if "running" in name:
                self.buffers[name] = tensor
            else:
                self.params[name] = tensor.requires_grad_()

    def shapes(self, widths: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Return the stacked shape of every parameter and buffer for layer ``widths``."""
        dims = [self.n_in, *widths, self.n_out]
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(len(widths) + 1):
            out = dims[layer + 1]
            shapes[f"weight{layer}"] = (self.capacity, out, dims[layer])
            batchnorm = self.key.batchnorm and layer < len(widths) and self.hidden[layer]
            if not batchnorm:  # build_model drops the Linear's bias before a batchnorm
                shapes[f"bias{layer}"] = (self.capacity, out)
                continue
            for name in ("gamma", "beta", "running_mean", "running_var"):
                shapes[f"{name}{layer}"] = (self.capacity, out)
        return shapes

    # ----------------------------------------------------------------------- slots

    def grow_for(self, arch: Arch) -> dict[str, tuple[int, ...]] | None:
        """Pad every tensor to hold a member of ``arch``; return the new shapes, or None when it fits already."""
        return self.grow(layer_widths(self.key.family, arch))

    def grow(self, widths: tuple[int, ...]) -> dict[str, tuple[int, ...]] | None:
        """Pad every tensor to hold layer ``widths``; return the new shapes, or None when they fit already."""
        wanted = tuple(max(a, b) for a, b in zip(self.widths, widths))
        if wanted == self.widths:
            return None
        self.widths = wanted
        return self._pad()

    def _pad(self) -> dict[str, tuple[int, ...]]:
        """Pad every tensor to the shapes of the present widths; return them."""
        shapes = self.shapes(self.widths)
        self.params = {name: pad_to(p.detach(), shapes[name]).requires_grad_() for name, p in self.params.items()}
        self.buffers = {name: pad_to(b, shapes[name]) for name, b in self.buffers.items()}
        return shapes

    @torch.no_grad()
    def load(self, slot: int, model: nn.Module) -> None:
        """Put ``model``'s weights (built by build_model) into ``slot``, zero elsewhere in the slot."""
        for name, tensor in self._slot_views(slot, model):
            self._slot(name, slot).zero_()
            self._own(name, slot, tensor).copy_(tensor)

    @torch.no_grad()
    def store(self, slot: int, model: nn.Module, *, steps: int) -> None:
        """Copy ``slot``'s weights into ``model``, unpadded; its batchnorms have counted ``steps`` batches."""
        for name, tensor in self._slot_views(slot, model):
            tensor.copy_(self._own(name, slot, tensor))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_batches_tracked is not None:
                module.num_batches_tracked.fill_(steps)

    @torch.no_grad()
    def step_member(self, slot: int, model: nn.Module, optimizer_step: Callable[[], None]) -> None:
        """Step ``model``'s own optimizer on ``slot``'s gradients, then put its new weights back in the slot."""
        views = [(name, tensor) for name, tensor in self._parameter_views(model)]
        for (name, tensor), param in zip(views, model.parameters()):
            param.grad = self._own(name, slot, tensor, grad=True).clone()
        optimizer_step()
        for name, tensor in views:
            self._own(name, slot, tensor).copy_(tensor)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Zero ``slot`` (a member left): its padded-zero invariant holds for the next one."""
        for name in [*self.params, *self.buffers]:
            self._slot(name, slot).zero_()

    def _slot(self, name: str, slot: int, *, grad: bool = False) -> Tensor:
        if grad:
            return self.params[name].grad[slot]
        return (self.params[name].detach() if name in self.params else self.buffers[name])[slot]

    def _own(self, name: str, slot: int, tensor: Tensor, *, grad: bool = False) -> Tensor:
        """Return the part of ``slot``'s stacked tensor (or gradient) that a member of ``tensor``'s shape owns."""
        return self._slot(name, slot, grad=grad)[tuple(slice(0, size) for size in tensor.shape)]

    def _slot_views(self, slot: int, model: nn.Module) -> list[tuple[str, Tensor]]:
        """Return (stacked name, the model's tensor) for every parameter and buffer of ``model``."""
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
        buffers = [(f"{name}{layer}", getattr(m, name)) for layer, m in zip(self._norm_layers(), norms)
                   for name in ("running_mean", "running_var")]
        return self._parameter_views(model) + buffers

    def _norm_layers(self) -> list[int]:
        """Return the layers with a batchnorm, in the order the model's BatchNorm1d modules come."""
        return [layer for layer, hidden in enumerate(self.hidden) if hidden and self.key.batchnorm]

    def _parameter_views(self, model: nn.Module) -> list[tuple[str, Tensor]]:
        """Return (stacked name, the parameter, detached) in ``model.parameters()``'s order."""
        names = self._parameter_names(model)
        return [(names[id(p)], p.detach()) for p in model.parameters()]

    def _parameter_names(self, model: nn.Module) -> dict[int, str]:
        """Return {id(parameter): its stacked name} for ``model``'s dense layers."""
        names: dict[int, str] = {}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        norm_layers = self._norm_layers()
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
        if len(linears) != len(self.hidden) + 1 or len(norms) != len(norm_layers):
            raise ValueError(f"pack: the model does not have the pack's structure {self.key}.")
        for i, m in enumerate(linears):
            names[id(m.weight)] = f"weight{i}"
            if m.bias is not None:
                names[id(m.bias)] = f"bias{i}"
        for layer, m in zip(norm_layers, norms):
            names[id(m.weight)], names[id(m.bias)] = f"gamma{layer}", f"beta{layer}"
        return names

    # ----------------------------------------------------------------------- training

    def forward(self, inputs: Tensor, dropout: Callable[[int, int], Tensor | None],
                sample_mask: Tensor | None, counts: Tensor | None) -> Tensor:
        """Return the last layer's outputs (K, n_out, batch) of ``inputs`` (K, batch, n_in) in training mode.

        Logits for the classifier; for the autoencoder, before its sigmoid. ``dropout(layer, batch)``
        gives that hidden layer's (K, width, batch) mask (kept units'
        scale, else 0) or None. ``sample_mask`` (K, 1, batch), where some member's batch is short,
        says which columns are real samples and ``counts`` (K, 1, 1) how many: batchnorm then
        takes each member's statistics over its own samples only.
        """
        last = len(self.hidden)
        h = inputs.transpose(1, 2)
        for layer in range(last + 1):
            weight = self.params[f"weight{layer}"]
            bias = self.params.get(f"bias{layer}")
            h = torch.bmm(weight, h) if bias is None else torch.baddbmm(bias.unsqueeze(2), weight, h)
            if layer == last:
                return h
            if not self.hidden[layer]:  # the autoencoder's code: linear
                continue
            if self.key.batchnorm:
                h = self._batchnorm(layer, h, sample_mask, counts)
            h = self.activation(h)
            mask = dropout(layer, h.shape[2])
            if mask is not None:
                h = h * mask
        raise AssertionError("unreachable: the output layer returns")

    def _batchnorm(self, layer: int, h: Tensor, sample_mask: Tensor | None, counts: Tensor | None) -> Tensor:
        """Return nn.BatchNorm1d's training output per member and unit; update its running stats."""
        gamma, beta = self.params[f"gamma{layer}"], self.params[f"beta{layer}"]
        running_mean, running_var = self.buffers[f"running_mean{layer}"], self.buffers[f"running_var{layer}"]
        k, width, batch = h.shape
        if sample_mask is None:
            # Every member's batch is whole: PyTorch's own kernel, one channel per (member, unit).
            out = F.batch_norm(h.reshape(1, k * width, batch), running_mean.view(-1), running_var.view(-1),
                               gamma.reshape(-1), beta.reshape(-1), training=True, momentum=_BN_MOMENTUM,
                               eps=_BN_EPS)
            return out.view(k, width, batch)
        # Short batches: the statistics of each member's real samples only.
        mean = (h * sample_mask).sum(2, keepdim=True) / counts
        centered = h - mean
        var = (centered.square() * sample_mask).sum(2, keepdim=True) / counts
        with torch.no_grad():
            unbiased = var.squeeze(2) * (counts.view(-1, 1) / (counts.view(-1, 1) - 1).clamp_min(1))
            running_mean.lerp_(mean.squeeze(2), _BN_MOMENTUM)
            running_var.lerp_(unbiased, _BN_MOMENTUM)
        return centered * torch.rsqrt(var + _BN_EPS) * gamma.unsqueeze(2) + beta.unsqueeze(2)


def pad_to(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Return ``tensor`` zero-padded at the end of each dimension to ``shape``."""
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return padded
