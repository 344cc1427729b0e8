"""``fit``'s optimizers (sgd, adam, adamw, rmsprop) for K stacked models, each with its own settings.

Each member's settings are read from the very optimizer ``hpsearch.train.make_optimizer`` builds
for it (its lr, betas, momentum, weight decay, eps, nesterov, alpha: PyTorch's defaults where the
trial sets none), and the update is PyTorch's, written over stacked tensors with a (K, 1, ...)
value per member. Where a gradient and the state are zero (padded units, empty slots), every
update here is exactly zero, so padding stays zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpsearch.pack._stack import pad_to

_SETTINGS = ("lr", "weight_decay", "momentum", "beta1", "beta2", "eps", "alpha", "nesterov")
_STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"),
          "rmsprop": ("square_avg", "momentum_buffer")}


class StackedOptimizer:
    """One optimizer of ``kind`` over K stacked models; member settings per slot."""

    def __init__(self, kind: str, params: dict[str, Tensor], *, capacity: int) -> None:
        self.kind = kind
        device = next(iter(params.values())).device
        # float64 per-member settings: bias corrections as PyTorch's kernels compute them.
        self.settings = {name: torch.zeros(capacity, dtype=torch.float64, device=device) for name in _SETTINGS}
        self.settings["eps"].fill_(1.0)  # empty slots: zero state over a positive eps is a zero step, not 0/0
        self.steps = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.state = {name: {key: torch.zeros_like(p.detach()) for key in _STATE[kind]} for name, p in params.items()}

    def set_member(self, slot: int, optimizer: torch.optim.Optimizer) -> None:
        """Take ``optimizer``'s settings (a member's own, from make_optimizer) into ``slot``; reset its state."""
        group = optimizer.param_groups[0]
        beta1, beta2 = group.get("betas", (0.0, 0.0))
        values = {"lr": group["lr"], "weight_decay": group["weight_decay"], "momentum": group.get("momentum", 0.0),
                  "beta1": beta1, "beta2": beta2, "eps": group.get("eps", 0.0), "alpha": group.get("alpha", 0.0),
                  "nesterov": float(group.get("nesterov", False))}
        for name, value in values.items():
            self.settings[name][slot] = value
        self.clear(slot)

    def clear(self, slot: int) -> None:
        """Zero ``slot``'s state and step count (a member left, or a new one starts)."""
        self.steps[slot] = 0
        for states in self.state.values():
            for tensor in states.values():
                tensor[slot].zero_()

    def pad(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Pad every state tensor to its parameter's new shape (the pack grew wider)."""
        self.state = {name: {key: pad_to(t, shapes[name]) for key, t in states.items()}
                      for name, states in self.state.items()}

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], lrs: Tensor) -> None:
        """Update every slot's parameters from their gradients, with learning rates ``lrs`` (K,)."""
        self.steps += 1
        settings = {**self.settings, "lr": lrs.to(torch.float64)}
        for name, p in params.items():
            per = {key: v.to(p.dtype).view(-1, *[1] * (p.dim() - 1)) for key, v in settings.items()}
            update = getattr(self, f"_{self.kind}")
            update(p.detach(), p.grad, self.state[name], per, settings)

    def _sgd(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], per: dict[str, Tensor],
             settings: dict[str, Tensor]) -> None:
        d_p = grad + per["weight_decay"] * p
        buffer = state["momentum_buffer"]
        # A zero buffer makes the first step PyTorch's `buffer = d_p`; momentum 0 makes it plain SGD.
        buffer.mul_(per["momentum"]).add_(d_p)
        direction = torch.where(per["nesterov"] > 0, d_p + per["momentum"] * buffer, buffer)
        p.sub_(per["lr"] * direction)

    def _adam(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], per: dict[str, Tensor],
              settings: dict[str, Tensor]) -> None:
        if self.kind == "adamw":
            p.mul_(1 - per["lr"] * per["weight_decay"])
        else:
            grad = grad + per["weight_decay"] * p
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - per["beta1"])
        exp_avg_sq.mul_(per["beta2"]).add_((1 - per["beta2"]) * grad * grad)
        shape = per["lr"].shape
        bias1 = (1 - settings["beta1"] ** self.steps).to(p.dtype).view(shape)
        bias2_sqrt = (1 - settings["beta2"] ** self.steps).sqrt().to(p.dtype).view(shape)
        denom = exp_avg_sq.sqrt().div_(bias2_sqrt).add_(per["eps"])
        p.sub_((per["lr"] / bias1) * exp_avg / denom)

    _adamw = _adam

    def _rmsprop(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], per: dict[str, Tensor],
                 settings: dict[str, Tensor]) -> None:
        grad = grad + per["weight_decay"] * p
        square_avg, buffer = state["square_avg"], state["momentum_buffer"]
        square_avg.mul_(per["alpha"]).add_((1 - per["alpha"]) * grad * grad)
        average = square_avg.sqrt().add_(per["eps"])
        buffer.mul_(per["momentum"]).add_(grad / average)  # momentum 0: the plain step grad / average
        p.sub_(per["lr"] * buffer)
