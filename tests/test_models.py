"""Models built from flat params: shapes for 28x28 and 8x8 digits, parameter counts, bad values."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hpsearch.errors import SpecError
from hpsearch.knobs import defaults
from hpsearch.models import (ACTIVATION_LAYERS, FAMILIES, POOL_FIRST_ACTIVATIONS, Dropout, _cnn, build_model,
                             count_params, read_arch)

SHAPES = [(1, 28, 28), (1, 8, 8)]
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "batchnorm+dropout": {"batchnorm": True, "dropout": 0.3, "activation": "gelu"},
    "per-layer widths": {"n_layers": 3, "width_0": 48, "width_1": 7, "width_2": 20, "activation": "tanh"},
    "no hidden layers": {"n_layers": 0},
    "deep convs, big kernel": {"conv_blocks": 4, "kernel_size": 5, "conv_channels": 4, "activation": "elu"},
}
# (family, encoder): the autoencoder comes in two architectures.
ARCHITECTURES = [("mlp", "dense"), ("cnn", "dense"), ("autoencoder", "dense"), ("autoencoder", "conv")]


def params(**overrides: Any) -> dict[str, Any]:
    p = defaults()
    p.update(conv_channels=8, width=32, bottleneck_dim=6)  # small: these tests are about shapes
    p.update(overrides)
    return p


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=["28x28", "8x8"])
@pytest.mark.parametrize(("family", "encoder"), ARCHITECTURES, ids=[f"{f}-{e}" for f, e in ARCHITECTURES])
def test_output_shapes(family: str, encoder: str, shape: tuple[int, int, int], variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(family, params(encoder=encoder, **VARIANTS[variant]), image_shape=shape, n_classes=10)
    x = torch.randn(5, *shape)
    out = model(x)
    if family == "autoencoder":
        # A reconstruction: the input's shape, in [0, 1] pixel space.
        assert out.shape == (5, *shape)
        assert 0.0 <= out.min().item() and out.max().item() <= 1.0
    else:
        assert out.shape == (5, 10)  # logits
    out.sum().backward()  # every parameter takes part in the forward pass
    assert all(p.grad is not None for p in model.parameters())
    model.eval()  # and in eval mode, batch statistics are not needed: one sample works
    assert model(x[:1]).shape[0] == 1


def test_count_params_of_a_known_mlp() -> None:
    model = build_model("mlp", params(n_layers=1, width=128), image_shape=(1, 28, 28), n_classes=10)
    assert count_params(model) == (784 * 128 + 128) + (128 * 10 + 10)


def test_count_params_ignores_frozen_parameters() -> None:
    model = build_model("mlp", params(n_layers=1, width=16), image_shape=(1, 8, 8), n_classes=10)
    before = count_params(model)
    model[1].requires_grad_(False)  # the hidden Linear
    assert count_params(model) == before - (64 * 16 + 16)


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_per_layer_width_wins_over_width(family: str) -> None:
    model = build_model(family, params(n_layers=3, width=100, width_0=12, width_2=5), image_shape=(1, 8, 8),
                        n_classes=10)
    linears = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [12, 100, 5, 10]  # width_1 absent: the shared width fills in


def test_dense_autoencoder_mirrors_its_encoder() -> None:
    model = build_model("autoencoder", params(n_layers=2, width_0=64, width_1=16, bottleneck_dim=4),
                        image_shape=(1, 28, 28), n_classes=10)
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(784, 64), (64, 16), (16, 4), (4, 16), (16, 64), (64, 784)]


def test_cnn_pools_only_while_the_image_is_at_least_2x2() -> None:
    model = build_model("cnn", params(conv_blocks=5, n_layers=0), image_shape=(1, 8, 8), n_classes=10)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # 8 → 4 → 2 → 1, then no more pooling
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_pool_first_activations_are_exactly_the_non_decreasing_ones() -> None:
    x = torch.linspace(-8.0, 8.0, 100_001)
    for name, layer in ACTIVATION_LAYERS.items():
        non_decreasing = bool((layer()(x).diff() >= 0).all())
        assert (name in POOL_FIRST_ACTIVATIONS) == non_decreasing, name


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("activation", sorted(ACTIVATION_LAYERS))
def test_cnn_pooling_before_the_activation_gives_the_same_outputs_and_gradients(activation: str,
                                                                               batchnorm: bool) -> None:
    p = params(conv_blocks=2, conv_channels=4, n_layers=1, activation=activation, batchnorm=batchnorm)
    arch = read_arch("cnn", p)
    models = []
    for pool_first in (True, False):
        torch.manual_seed(0)
        models.append(_cnn((1, 12, 12), arch, 10, pool_first=pool_first))
    fast, slow = models
    order = [type(m) for m in fast if type(m) in (nn.MaxPool2d, ACTIVATION_LAYERS[activation])]
    first = activation in POOL_FIRST_ACTIVATIONS
    assert order[:2] == ([nn.MaxPool2d, ACTIVATION_LAYERS[activation]] if first
                         else [ACTIVATION_LAYERS[activation], nn.MaxPool2d])
    assert fast.state_dict().keys() == slow.state_dict().keys()  # a saved model loads in either order
    images = torch.randn(16, 1, 12, 12)
    outputs = [model(images) for model in models]
    assert torch.equal(outputs[0], outputs[1])  # max(f(x)) is f(max(x)), bit for bit
    for output in outputs:
        output.square().sum().backward()
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_cnn_with_no_conv_blocks_is_a_dense_net() -> None:
    model = build_model("cnn", params(conv_blocks=0), image_shape=(1, 28, 28), n_classes=10)
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_and_batchnorm_appear_only_when_asked(family: str) -> None:
    def kinds(**overrides: Any) -> set[type]:
        model = build_model(family, params(encoder="dense", **overrides), image_shape=(1, 8, 8), n_classes=10)
        return {type(m) for m in model.modules()}

    assert not kinds() & {Dropout, nn.BatchNorm1d}
    assert {Dropout, nn.BatchNorm1d} <= kinds(dropout=0.2, batchnorm=True)


def test_dropout_keeps_the_expected_share_and_scale() -> None:
    torch.manual_seed(0)
    dropout = Dropout(0.25)
    x = torch.ones(200_000)
    y = dropout(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))  # inverted dropout: scaled up
    dropout.eval()
    assert torch.equal(dropout(x), x)  # identity at evaluation


@pytest.mark.parametrize(
    ("family", "overrides", "named"),
    [
        ("mlp", {"dropout": 1.0}, "dropout"),
        ("mlp", {"dropout": -0.1}, "dropout"),
        ("mlp", {"n_layers": -1}, "n_layers"),
        ("mlp", {"n_layers": 2.5}, "n_layers"),
        ("mlp", {"width": 0}, "width"),
        ("mlp", {"n_layers": 2, "width_1": 0}, "width_1"),
        ("mlp", {"batchnorm": "yes"}, "batchnorm"),
        ("mlp", {"activation": "swish"}, "activation"),
        ("cnn", {"kernel_size": 4}, "kernel_size"),
        ("cnn", {"conv_blocks": -1}, "conv_blocks"),
        ("cnn", {"conv_channels": 0}, "conv_channels"),
        ("autoencoder", {"encoder": "conv", "conv_blocks": 0}, "conv_blocks"),
        ("autoencoder", {"encoder": "lstm"}, "encoder"),
        ("autoencoder", {"bottleneck_dim": 0}, "bottleneck_dim"),
        ("rnn", {}, "model.family"),
    ],
)
def test_bad_values_raise_spec_error_naming_param_and_value(family: str, overrides: dict[str, Any],
                                                            named: str) -> None:
    with pytest.raises(SpecError) as caught:
        build_model(family, params(**overrides), image_shape=(1, 28, 28), n_classes=10)
    message = str(caught.value)
    assert named in message
    value = overrides.get(named, family)
    assert repr(value) in message  # the offending value, as given


def test_missing_param_is_named() -> None:
    p = params()
    del p["dropout"]
    with pytest.raises(SpecError, match="dropout"):
        build_model("mlp", p, image_shape=(1, 28, 28), n_classes=10)


@pytest.mark.parametrize(("shape", "n_classes"), [((28, 28), 10), ((1, 0, 28), 10), ((1, 28, 28), 1)])
def test_bad_shapes_and_class_counts_raise(shape: tuple[int, ...], n_classes: int) -> None:
    with pytest.raises(SpecError):
        build_model("mlp", params(), image_shape=shape, n_classes=n_classes)  # type: ignore[arg-type]
