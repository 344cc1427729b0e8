"""``nn.Module``s built from a trial's flat params: MLP, LeNet-style CNN, dense and conv autoencoders.

Every family reads the same knobs (``n_layers``, ``width``/``width_i``, ``dropout``, ``batchnorm``,
``activation``, ...), so a knob means one thing across families. Classifiers return logits;
autoencoders take normalised images and return a reconstruction in [0, 1] pixel space.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hpsearch import knobs
from hpsearch.errors import SpecError
from hpsearch.vocab import FAMILIES

# The torch layer of each name in vocab.ACTIVATIONS (tests/test_vocab.py checks they match).
ACTIVATION_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}
# The activations that never decrease (f(a) <= f(b) whenever a <= b), so that pooling the maximum
# first gives the same numbers: a CNN pools before these, on a quarter of the values (gelu and
# silu dip below zero, so they come first). tests/test_models.py checks the list.
POOL_FIRST_ACTIVATIONS = frozenset({"relu", "tanh", "leaky_relu", "elu"})


@dataclass(frozen=True)
class Arch:
    """The architecture knobs of one model, checked."""

    widths: tuple[int, ...]  # one per dense hidden layer (n_layers of them)
    dropout: float
    batchnorm: bool
    activation: str
    conv_blocks: int
    conv_channels: int
    kernel_size: int
    bottleneck_dim: int
    encoder: str

    def act(self) -> nn.Module:
        return ACTIVATION_LAYERS[self.activation]()


def build_model(family: str, params: Mapping[str, Any], *, image_shape: tuple[int, int, int],
                n_classes: int) -> nn.Module:
    """Return an untrained model of ``family`` for images of ``image_shape`` (C, H, W)."""
    if family not in FAMILIES:
        raise SpecError(f"model.family must be one of {list(FAMILIES)}, but got {family!r}.")
    shape = _check_shape(image_shape)
    if family != "autoencoder" and (isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral)
                                    or n_classes < 2):
        raise SpecError(f"model: n_classes must be an integer >= 2, but got {n_classes!r}.")
    n_classes = int(n_classes)
    arch = read_arch(family, params)
    if family == "mlp":
        return nn.Sequential(nn.Flatten(), *_dense_stack(math.prod(shape), arch),
                             nn.Linear(_last_width(math.prod(shape), arch), n_classes))
    if family == "cnn":
        return _cnn(shape, arch, n_classes)
    if arch.encoder == "dense":
        return _dense_autoencoder(shape, arch)
    return ConvAutoencoder(shape, arch)


def count_params(model: nn.Module) -> int:
    """Return the number of trainable parameters (weights and biases) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- params


def read_arch(family: str, params: Mapping[str, Any]) -> Arch:
    """Return the checked architecture knobs of ``family`` from a trial's flat params."""
    conv = family == "cnn" or (family == "autoencoder" and params.get("encoder", "dense") == "conv")

    def get(name: str, shown: str | None = None) -> Any:
        """Return the param ``shown`` (default: ``name``), checked against the knob ``name``'s rules."""
        shown = shown or name
        if shown not in params:
            raise SpecError(f"model params: {family} needs `{shown}`, but it is missing.")
        return knobs.check(name, params[shown], where="model params", shown=shown)

    n_layers = int(get("n_layers"))
    width = int(get("width"))
    # A per-layer width (searched with `per_layer: true`) overrides the shared one.
    widths = tuple(int(get("width", f"width_{i}")) if f"width_{i}" in params else width for i in range(n_layers))
    dropout = get("dropout")
    batchnorm = get("batchnorm")
    activation = get("activation")
    encoder = get("encoder") if family == "autoencoder" else "dense"
    conv_blocks, conv_channels, kernel_size = 0, 1, 1
    if conv:
        conv_blocks = int(get("conv_blocks"))
        if family == "autoencoder" and conv_blocks < 1:  # a cnn with none is a plain dense net; this is no autoencoder
            raise SpecError("model params: `conv_blocks` must be >= 1 for a conv autoencoder (encoder: conv), "
                            f"but got {conv_blocks!r}.")
        conv_channels = int(get("conv_channels"))
        kernel_size = int(get("kernel_size"))
    bottleneck_dim = int(get("bottleneck_dim")) if family == "autoencoder" else 1
    return Arch(widths=widths, dropout=float(dropout), batchnorm=batchnorm, activation=activation,
                conv_blocks=conv_blocks, conv_channels=conv_channels, kernel_size=kernel_size,
                bottleneck_dim=bottleneck_dim, encoder=encoder)


def _check_shape(image_shape: Any) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(s, numbers.Integral) and s >= 1 for s in shape):
        raise SpecError(f"model: image_shape must be (channels, height, width) of positive integers, "
                        f"but got {image_shape!r}.")
    return int(shape[0]), int(shape[1]), int(shape[2])


# --------------------------------------------------------------------------- building blocks


def keep_mask(shape: torch.Size | tuple[int, ...], p: float,
              generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """Return (a bool mask of the units that dropout at rate ``p`` keeps, the scale of kept units), on the CPU.

    ``F.dropout`` draws one random float per unit with ``bernoulli_``: for small MLPs that was a
    fifth of each training step. Here each 64-bit draw gives four 16-bit numbers, and a unit is
    kept when its number clears a threshold: 2x (128 units) to 4x (1024 units) faster. The drop
    probability is ``p`` rounded to a multiple of 1/65536 (off by less than 1e-5), and the scale is
    1 / (1 - that), so the expected activation is unchanged. The bits come from ``generator``
    (default: torch's global one, which ``fit`` seeds with the trial's seed), so a trial packed
    with others (``hpsearch.pack``) draws the very masks its own ``fit`` would.
    """
    n = math.prod(shape)
    dropped = round(p * 65536)
    # random_(-2**63, 2**63 - 1): (all but) the whole int64 range, so every 16-bit quarter is uniform.
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1, generator=generator)
    return bits.view(torch.int16)[:n].view(shape) >= dropped - 32768, 65536 / (65536 - dropped)


class Dropout(nn.Dropout):
    """``nn.Dropout``, with the faster mask of :func:`keep_mask` on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        keep, scale = keep_mask(x.shape, self.p)
        return x * keep.to(x.dtype).mul_(scale)


def _dense_stack(n_in: int, arch: Arch, widths: tuple[int, ...] | None = None) -> list[nn.Module]:
    """Return [Linear → BatchNorm1d? → activation → Dropout?] for each hidden width."""
    layers: list[nn.Module] = []
    for width in arch.widths if widths is None else widths:
        # The batchnorm shift makes the linear bias redundant.
        layers.append(nn.Linear(n_in, width, bias=not arch.batchnorm))
        if arch.batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(arch.act())
        if arch.dropout > 0:
            layers.append(Dropout(arch.dropout))
        n_in = width
    return layers


def _last_width(n_in: int, arch: Arch) -> int:
    return arch.widths[-1] if arch.widths else n_in


def _conv_unit(c_in: int, c_out: int, arch: Arch, *, stride: int = 1) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, arch.kernel_size, stride=stride,
                                         padding=arch.kernel_size // 2, bias=not arch.batchnorm)]
    if arch.batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(arch.act())
    return layers


def _cnn(shape: tuple[int, int, int], arch: Arch, n_classes: int, *, pool_first: bool = True) -> nn.Module:
    """Return the CNN; ``pool_first=False`` keeps the activation before every pool (the older, slower order)."""
    channels, height, width = shape
    layers: list[nn.Module] = []
    for block in range(arch.conv_blocks):
        c_out = arch.conv_channels * 2**block
        unit = _conv_unit(channels, c_out, arch)
        # Pool only while there is something to pool: an 8x8 digit survives 3 poolings, not 4.
        if min(height, width) >= 2:
            # max(f(x)) = f(max(x)) for a non-decreasing f: the activation then runs on (and keeps
            # for its backward) a quarter of the values. The gradients are the same too.
            first = pool_first and arch.activation in POOL_FIRST_ACTIVATIONS
            unit.insert(len(unit) - 1 if first else len(unit), nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        layers += unit
        channels = c_out
    n_flat = channels * height * width
    layers += [nn.Flatten(), *_dense_stack(n_flat, arch), nn.Linear(_last_width(n_flat, arch), n_classes)]
    return nn.Sequential(*layers)


def _dense_autoencoder(shape: tuple[int, int, int], arch: Arch) -> nn.Module:
    n_pixels = math.prod(shape)
    code_in = _last_width(n_pixels, arch)
    decoder_widths = tuple(reversed(arch.widths))
    return nn.Sequential(
        nn.Flatten(),
        *_dense_stack(n_pixels, arch),
        nn.Linear(code_in, arch.bottleneck_dim),  # the code: linear, as in PCA
        *_dense_stack(arch.bottleneck_dim, arch, decoder_widths),
        nn.Linear(decoder_widths[-1] if decoder_widths else arch.bottleneck_dim, n_pixels),
        nn.Sigmoid(),
        nn.Unflatten(1, shape),
    )


class ConvAutoencoder(nn.Module):
    """Stride-2 conv encoder → linear code → mirrored transposed-conv decoder, cropped to the input size."""

    def __init__(self, shape: tuple[int, int, int], arch: Arch) -> None:
        super().__init__()
        channels, height, width = shape
        self.height, self.width = height, width
        widths = [arch.conv_channels * 2**block for block in range(arch.conv_blocks)]
        encoder: list[nn.Module] = []
        c_in, h, w = channels, height, width
        for c_out in widths:
            encoder += _conv_unit(c_in, c_out, arch, stride=2)
            # With odd kernels and padding k//2, a stride-2 conv gives ceil(size / 2).
            c_in, h, w = c_out, (h + 1) // 2, (w + 1) // 2
        n_flat = c_in * h * w
        self.encoder = nn.Sequential(*encoder, nn.Flatten(), nn.Linear(n_flat, arch.bottleneck_dim))
        decoder: list[nn.Module] = [nn.Linear(arch.bottleneck_dim, n_flat), arch.act(), nn.Unflatten(1, (c_in, h, w))]
        outs = [*reversed(widths[:-1]), channels]
        for i, c_out in enumerate(outs):
            # output_padding=1 makes each transposed conv double the size exactly.
            decoder.append(nn.ConvTranspose2d(c_in, c_out, arch.kernel_size, stride=2,
                                              padding=arch.kernel_size // 2, output_padding=1,
                                              bias=not (arch.batchnorm and i < len(outs) - 1)))
            if i < len(outs) - 1:
                if arch.batchnorm:
                    decoder.append(nn.BatchNorm2d(c_out))
                decoder.append(arch.act())
            c_in = c_out
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: Tensor) -> Tensor:
        out = self.decoder(self.encoder(x))
        # The decoder gives size * 2**blocks >= the input; output pixel i sits over input pixel i
        # (stride-2 convs sample 0, 2, 4, ...), so the top-left crop is the aligned one.
        return out[:, :, : self.height, : self.width].sigmoid()
