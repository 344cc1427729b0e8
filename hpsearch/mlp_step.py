"""A hand-written training step for plain MLP classifiers on the CPU: autograd's numbers in less time.

A search trains hundreds of small MLPs, and on the CPU their training step is mostly overhead
around two matmuls: for a 784-128-64-10 network, PyTorch's autograd engine, the module calls and
the loss's backward nodes cost about a sixth of each step. For the commonest model of a search
(``build_model("mlp", ...)`` with ReLU and no batchnorm: Flatten, then Linear → ReLU → Dropout?
blocks, then the output Linear), in float32 on the CPU, :func:`mlp_step` gives a step that runs
the same forward ops and writes the gradients itself. It draws the dropout masks from the same
generator in the same order, so its forward pass is bit for bit the layer-by-layer one, and its
gradients agree with autograd's to float rounding (``tests/test_mlp_step.py`` holds it to that).
Every other model, device or precision trains through autograd, and so does every task but
classify: :func:`hpsearch.train.fit` asks for the step only when the loss is cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpsearch.models import Dropout, keep_mask


def mlp_step(model: nn.Module, device: torch.device, precision: str) -> Callable[[Tensor, Tensor], Tensor] | None:
    """Return ``step(inputs, labels) -> loss``, which sets the gradients of one training step, or None.

    None unless ``model`` is a plain MLP as :func:`hpsearch.models.build_model` makes it with ReLU
    and no batchnorm, the device the CPU and the precision fp32, and no hook is registered that
    autograd or the modules would have run. The loss is ``F.cross_entropy`` of the model's output
    against the labels (returned detached), so the caller asks only when that is the task's loss:
    ``fit`` does for classify. The model must be in training mode, as in ``fit``.
    """
    plan = _plan(model)
    if plan is None or device.type != "cpu" or precision != "fp32" or _has_hooks(model):
        return None
    linears, rates = plan

    def step(inputs: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            # 1. Forward, keeping each Linear's input. After a ReLU and dropout that input is
            #    positive exactly where the gradient flows, so it doubles as the backward's mask.
            x = inputs.flatten(1)
            layer_inputs, scales = [x], []
            for linear, rate in zip(linears[:-1], rates):
                x = torch.addmm(linear.bias, x, linear.weight.t()).relu_()
                scale = 1.0
                if rate > 0.0:
                    keep, scale = keep_mask(x.shape, rate)
                    x.mul_(keep).mul_(scale)
                layer_inputs.append(x)
                scales.append(scale)
            output = linears[-1]
            log_probs = torch.log_softmax(torch.addmm(output.bias, x, output.weight.t()), dim=1)
            loss = F.nll_loss(log_probs, labels)  # F.cross_entropy, in its two steps

            # 2. Backward: d loss / d logits = (softmax - one-hot) / batch; then each Linear's
            #    weight and bias gradients, and its input's gradient through the mask above.
            minus_one = torch.full((len(labels), 1), -1.0, dtype=log_probs.dtype)
            grad = log_probs.exp_().scatter_add_(1, labels.unsqueeze(1), minus_one)
            grad.div_(len(labels))
            for i in reversed(range(len(linears))):
                linear = linears[i]
                linear.weight.grad = grad.t().mm(layer_inputs[i])
                linear.bias.grad = grad.sum(0)
                if i > 0:
                    grad = grad.mm(linear.weight).mul_(layer_inputs[i] > 0)
                    if scales[i - 1] != 1.0:
                        grad.mul_(scales[i - 1])
        return loss

    return step


def _plan(model: nn.Module) -> tuple[list[nn.Linear], list[float]] | None:
    """Return (the Linears, the dropout rate after each hidden one) of a plain MLP, or None."""
    if type(model) is not nn.Sequential:
        return None
    layers = list(model)
    if not layers or type(layers[0]) is not nn.Flatten or (layers[0].start_dim, layers[0].end_dim) != (1, -1):
        return None
    linears: list[nn.Linear] = []
    rates: list[float] = []
    i = 1
    while i < len(layers):
        linear = layers[i]
        if type(linear) is not nn.Linear or linear.bias is None:
            return None
        linears.append(linear)
        i += 1
        if i == len(layers):
            break  # the output layer
        if type(layers[i]) is not nn.ReLU:
            return None
        i += 1
        rate = 0.0
        if i < len(layers) and type(layers[i]) is Dropout:
            rate = float(layers[i].p)
            i += 1
        rates.append(rate)
    if not linears or len(rates) != len(linears) - 1:
        return None  # no layers, or a hidden block without a Linear after it
    params = list(model.parameters())
    if not all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in params):
        return None
    return linears, rates


def _has_hooks(model: nn.Module) -> bool:
    """Return whether a module, parameter or global hook would see the layer-by-layer step."""
    module_hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(m, name, None) for m in model.modules() for name in module_hooks):
        return True
    if any(getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None)
           for p in model.parameters()):
        return True
    module = nn.modules.module
    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                    "_global_backward_pre_hooks")
    return any(getattr(module, name, None) for name in global_hooks)
