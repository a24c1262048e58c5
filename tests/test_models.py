"""Model family: shapes of every preset, budgets against the published figures, configs, the trap."""

import json

import numpy as np
import pytest

from refbnn import models
from refbnn.models.budget import count
from refbnn.models.config import ConfigError
from refbnn.models.diagnostics import binary_input_stats

SMALL = {"mnist": {"input_shape": [1, 28, 28], "num_classes": 10},
         "cifar": {"input_shape": [3, 32, 32], "num_classes": 10}}


@pytest.fixture(scope="module")
def imagenet_budgets():
    return {name: count(models.build(name)) for name in models.list_models()}


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.parametrize("size", sorted(SMALL))
def test_small_variants_shapes_and_finite_forward(name, size):
    model = models.build(name, width_multiplier=0.125, **SMALL[size])
    c, h, w = SMALL[size]["input_shape"]
    x = np.random.default_rng(0).standard_normal((3, c, h, w)).astype(np.float32)
    logits = model.forward(x)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert model.conv1.weight.shape[2:] == (3, 3) and model.maxpool is None
    grad = model.backward(np.ones_like(logits) / 3)
    assert grad.shape == x.shape and np.isfinite(grad).all()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.data.shape, pname


def test_published_birealnet_budgets(imagenet_budgets):
    # Liu et al. (Bi-Real Net): 18 -> BOPs 1.68e9, OPs 1.63e8; 34 -> BOPs 3.53e9, OPs 1.93e8
    for name, bops, ops in (("birealnet18", 1.68e9, 1.63e8), ("birealnet34", 3.53e9, 1.93e8)):
        b = imagenet_budgets[name]
        assert abs(b.bops / bops - 1) < 0.01, (name, b.bops)
        assert abs(b.ops / ops - 1) < 0.01, (name, b.ops)


def test_birealnet18_layer_counts_by_hand(imagenet_budgets):
    # counted by hand: stem 112*112*64*3*49, shortcut 28*28*128*64, FC 512*1000
    layers = {c.name: c for c in imagenet_budgets["birealnet18"].layers}
    assert layers["conv1"].macs == 118_013_952
    assert layers["layer2.0.downsample.1"].macs == 6_422_528
    assert layers["fc"].macs == 512_000
    assert imagenet_budgets["birealnet18"].bops == 1_676_279_808


def test_ftbnn_baseline_costs_the_same_as_birealnet(imagenet_budgets):
    for depth in (18, 34):
        a, b = imagenet_budgets[f"birealnet{depth}"], imagenet_budgets[f"ftbnn{depth}"]
        assert (a.flops, a.bops) == (b.flops, b.bops)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_derived_model_budgets(imagenet_budgets, groups):
    # FTBNN: about 90M OPs for Layer=18 and about 135M for Layer=34
    assert abs(imagenet_budgets[f"ftbnn18_g{groups}"].ops / 90e6 - 1) < 0.03
    assert abs(imagenet_budgets[f"ftbnn34_g{groups}"].ops / 135e6 - 1) < 0.03


def test_purified_models_spend_less_on_real_ops(imagenet_budgets):
    base = imagenet_budgets["ftbnn18"]
    purified = imagenet_budgets["ftbnn18_purified"]
    derived = imagenet_budgets["ftbnn18_g1"]
    assert purified.flops == base.flops - 3 * 6_422_528
    assert derived.flops < purified.flops / 5
    assert all(c.kind == "binary" for c in derived.layers
               if c.op in ("Conv2d", "BinaryConv2d") and c.name != "conv1")


def test_packed_bytes_are_about_32x_smaller_for_binary_layers(imagenet_budgets):
    b = imagenet_budgets["birealnet18"]
    binary = [c for c in b.layers if c.kind == "binary"]
    ratio = sum(c.bytes_float for c in binary) / sum(c.bytes_packed for c in binary)
    assert 31 < ratio <= 32


def test_state_dict_follows_official_birealnet_names():
    names = list(models.build("birealnet18", **SMALL["cifar"]).state_dict())
    for expected in ("conv1.weight", "bn1.running_mean", "layer1.0.binary_conv.weight",
                     "layer1.0.bn1.weight", "layer2.0.downsample.1.weight",
                     "layer2.0.downsample.2.running_var", "layer4.1.bn1.num_batches_tracked",
                     "fc.weight", "fc.bias"):
        assert expected in names, expected
    assert not any(n.startswith("layer1.0.downsample") for n in names)


@pytest.mark.parametrize("name", ["ftbnn18", "ftbnn34_g2", "birealnet34"])
def test_config_round_trips_through_json(name):
    cfg = models.get_config(name, width_multiplier=0.5, **SMALL["mnist"])
    again = models.from_json(models.to_json(cfg))
    assert again == cfg
    assert json.loads(models.to_json(cfg)) == cfg
    a, b = models.build(cfg), models.build(again)
    shapes = [(k, v.shape) for k, v in a.state_dict().items()]
    assert shapes == [(k, v.shape) for k, v in b.state_dict().items()]


def test_default_placement_is_relu_at_stage_ends_on_the_branch():
    cfg = models.get_config("ftbnn18")
    assert cfg["nonlinearity"] == (["fprelu"] * 3 + ["relu"]) * 4
    assert cfg["nonlinearity_position"] == (["after_add"] * 3 + ["before_add"]) * 4


@pytest.mark.parametrize("given", ["after_add", "before_add"])
def test_an_explicit_position_wins_over_the_presets(given):
    """ftbnn18's preset relu_stage_end puts its ReLUs before the add; a config that names the
    position itself gets that position in every block, "after_add" (the default value) included."""
    cfg = models.get_config("ftbnn18", nonlinearity_position=given)
    assert cfg["nonlinearity"] == (["fprelu"] * 3 + ["relu"]) * 4
    assert cfg["nonlinearity_position"] == [given] * 16
    assert models.config.resolve(cfg) == cfg  # idempotent: the resolved lists stay as they are
    preset = models.get_config("ftbnn18")
    assert models.config.resolve(preset) == preset



@pytest.mark.parametrize("bad, match", [
    ({"colour": 1}, "unknown config fields"),
    ({"nonlinearity": "tanh"}, "unknown nonlinearity"),
    ({"nonlinearity": ["relu"] * 3}, "16 entries"),
    ({"groups": 3}, "not divisible by groups"),
    ({"downsample": "cheap", "widths": [64, 96, 256, 512]}, "multiple of"),
    ({"widths": [32, 128, 256, 512]}, "must equal stem_channels"),
    ({"pad_value": 2}, "pad_value"),
])
def test_invalid_configs_are_rejected_with_the_field_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        models.build("ftbnn18", **bad)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="birealnet18"):
        models.build("resnet50")


@pytest.fixture(scope="module")
def mnist_batch(data_dir):
    from refbnn.data import batches, load_dataset
    test = load_dataset("mnist", "test", data_dir=data_dir / "mnist", download=False)
    x, _ = next(batches(test, 32, np.random.default_rng(0), shuffle=True))
    return x


@pytest.mark.parametrize("name", models.list_models())
def test_no_preset_has_a_dead_binary_layer_on_mnist(name, mnist_batch):
    model = models.build(name, width_multiplier=0.25, **SMALL["mnist"])
    stats = binary_input_stats(model, mnist_batch)
    assert stats and not [s.name for s in stats if s.dead]


def test_relu_after_add_is_flagged_as_dead(mnist_batch):
    # the trap itself: ReLU after every add makes every later binarized input +1
    model = models.build("ftbnn18", width_multiplier=0.25, nonlinearity="relu",
                         nonlinearity_position="after_add", **SMALL["mnist"])
    dead = [s.name for s in binary_input_stats(model, mnist_batch) if s.dead]
    assert "layer1.1.binary_conv" in dead and "layer1.0.binary_conv" not in dead
