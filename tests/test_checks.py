"""The checks made before a study starts: the largest model a space allows and its training memory."""

from __future__ import annotations

import itertools

import pytest
import torch

from hpsearch import space
from hpsearch.checks import _activations_per_sample, _model_size, largest_model
from hpsearch.data import TRAIN_SIZES
from hpsearch.knobs import defaults
from hpsearch.models import build_model
from hpsearch.spec import parse_spec


@pytest.mark.parametrize("family,params,shape", [
    ("mlp", {"n_layers": 3, "width": 40, "batchnorm": True, "dropout": 0.2}, (1, 28, 28)),
    ("cnn", {"conv_blocks": 3, "conv_channels": 4, "kernel_size": 5, "batchnorm": True}, (1, 28, 28)),
    ("cnn", {"conv_blocks": 4, "conv_channels": 3, "kernel_size": 3}, (1, 8, 8)),  # pooling stops at 1x1
    ("autoencoder", {"encoder": "dense", "n_layers": 2, "width": 30, "bottleneck_dim": 7}, (1, 28, 28)),
    ("autoencoder", {"encoder": "conv", "conv_blocks": 3, "conv_channels": 4, "kernel_size": 3,
                     "batchnorm": True}, (1, 28, 28)),  # the decoder overshoots 28 to 32, then crops
])
def test_activations_carried_by_hand_are_those_a_forward_pass_gives(family: str, params: dict, shape: tuple) -> None:
    model = build_model(family, {**defaults(), **params}, image_shape=shape, n_classes=10).eval()
    counted = []
    leaves = [m for m in model.modules() if not any(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o: counted.append(o[0].numel())) for m in leaves]
    model(torch.rand(2, *shape))
    for hook in hooks:
        hook.remove()
    assert _activations_per_sample(model, shape) == sum(counted)


@pytest.mark.parametrize("family,space_,knob,expected", [
    # Pooling: one conv block gives the widest dense input (16x14x14), none or four a narrower one.
    ("cnn", {"conv_blocks": {"type": "int", "low": 0, "high": 4}, "conv_channels": [4, 16], "width": 512,
             "n_layers": 1, "batch_size": 2}, "conv_blocks", 1),
    # One-unit layers: no hidden layer (784 x 10 weights) is larger than three.
    ("mlp", {"n_layers": {"type": "int", "low": 0, "high": 3}, "width": 1, "batch_size": [2, 4]}, "n_layers", 0),
])
def test_the_largest_model_is_the_largest_of_the_whole_grid(family: str, space_: dict, knob: str,
                                                            expected: int) -> None:
    # Not every knob grows a model: the values tried must still find the largest of every combination.
    spec = parse_spec({"study": {"name": "t"}, "task": {"type": "classify", "dataset": "mnist-5k"},
                       "model": {"family": family}, "space": space_})
    found = largest_model(spec)
    grid = {p.name: p.choices or tuple(range(int(p.low), int(p.high) + 1)) for p in spec.space if p.type != "fixed"}
    needs = []  # the training memory of every model of the space
    for values in itertools.product(*grid.values()):
        params = {**space.base_params(spec), **dict(zip(grid, values))}
        needs.append(_model_size(family, params, (1, 28, 28), data_bytes=0, shown=[]).bytes)
    assert found.bytes - TRAIN_SIZES["mnist-5k"] * 28 * 28 == max(needs)
    assert found.params[knob] == expected
