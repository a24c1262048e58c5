"""The model-config schema: every field typed and ranged with a ConfigError naming it, size caps
computed before anything is allocated, bounded JSON, and the tensor layout a config determines
(what the file format checks a file against) equal to what refbnn.models builds, for every preset."""

import re
from pathlib import Path

import numpy as np
import pytest

from refbnn import models
from refbnn.models import config as C
from refbnn.models.config import ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "format.md"
SIZES = [{}, {"input_shape": [1, 28, 28], "num_classes": 10, "width_multiplier": 0.25},
         {"input_shape": [3, 33, 17], "num_classes": 7, "width_multiplier": 0.125, "stem_pool": True}]


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.parametrize("size", range(len(SIZES)))
def test_tensor_layout_is_what_the_builder_builds(name, size):
    cfg = models.get_config(name, **SIZES[size])
    net = models.BNNResNet(cfg)
    state = net.state_dict()
    layout = C.tensor_layout(cfg)
    assert [t.name for t in layout] == list(state)
    for t in layout:
        assert t.shape == state[t.name].shape and np.dtype(t.dtype) == state[t.name].dtype, t.name
    assert {t.name: t.groups for t in layout if t.binary} == {
        k: v["groups"] for k, v in net.binary_weights().items()}
    params, _, where = C.size_of(cfg)
    assert params == sum(v.size for v in state.values())
    assert where in dict(net.named_modules())


def test_layout_covers_every_option():
    """Options the presets do not combine: prelu, per-block lists, a bridge with binary shortcuts."""
    cfg = C.resolve({"input_shape": [2, 9, 9], "num_classes": 3, "stem_channels": 8,
                     "bridge_channels": 12, "widths": [12, 24], "blocks": [2, 1], "groups": 2,
                     "reduction_groups": 4, "downsample": "binary",
                     "nonlinearity": ["prelu", "relu", "fprelu"],
                     "nonlinearity_position": ["before_add", "after_add", "before_add"],
                     "sign_at_zero": -1, "pad_value": 1, "bn_eps": 1e-3})
    net = models.BNNResNet(cfg)
    state = net.state_dict()
    assert [(t.name, t.shape) for t in C.tensor_layout(cfg)] == [(k, v.shape) for k, v in state.items()]
    assert all(m.eps == 1e-3 for _, m in net.named_modules() if type(m).__name__ == "BatchNorm2d")


def test_bn_eps_reaches_the_torch_twin():
    torch = pytest.importorskip("torch", reason="the PyTorch twin needs torch")
    from refbnn.interop.torch import TorchBNNResNet

    twin = TorchBNNResNet(models.get_config("ftbnn18", width_multiplier=0.125, bn_eps=1e-3,
                                            input_shape=[1, 12, 12], num_classes=10))
    eps = {m.eps for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {1e-3}


def nested(n):
    x = 1
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.parametrize("bad, field", [
    ({"widths": ["64", 128, 256, 512]}, "'widths' entry 0"),
    ({"widths": [64.0, 128, 256, 512]}, "'widths' entry 0"),
    ({"groups": 0}, "'groups'"),
    ({"groups": True}, "'groups'"),
    ({"stem_pool": 1}, "'stem_pool'"),
    ({"sign_at_zero": True}, "'sign_at_zero'"),
    ({"pad_value": 0.5}, "'pad_value'"),
    ({"num_classes": 10 ** 9}, "'num_classes'"),
    ({"stem_channels": 10 ** 6}, "'stem_channels'"),
    ({"blocks": [10 ** 6] * 4}, "'blocks' entry 0"),
    ({"blocks": [200] * 4}, "blocks: 800 blocks"),
    ({"widths": [20000, 20000, 20000, 20000]}, "'widths' entry 0"),
    ({"stem_channels": 4096, "widths": [4096] * 4}, "more than the cap of 268,435,456"),
    ({"input_shape": [3, 4096, 4096]}, "conv1 holds"),
    ({"input_shape": [3, 224]}, "'input_shape'"),
    ({"input_shape": [0, 224, 224]}, "'input_shape' C"),
    ({"stem_kernel": 4}, "'stem_kernel' must be odd"),
    ({"stem_stride": 100}, "'stem_stride'"),
    ({"width_multiplier": float("nan")}, "'width_multiplier'"),
    ({"width_multiplier": "0.5"}, "'width_multiplier'"),
    ({"bn_eps": 0}, "'bn_eps'"),
    ({"name": "x" * 1000}, "'name'"),
    ({"name": "\udc80"}, "'name'"),
    ({"downsample": ["real"]}, "'downsample'"),
    ({"widths": nested(2000)}, "'widths' entry 0"),
    ({"name": nested(2000)}, "'name'"),
    ({"nonlinearity": ["relu"] * 10 ** 6}, "'nonlinearity'"),
    ({"bridge_channels": 12, "widths": [8, 16, 32, 64]}, "bridge (12) must output the stage-1"),
    ({1: 2}, "unknown config fields"),
])
def test_each_field_is_typed_and_ranged_with_the_field_named(bad, field):
    with pytest.raises(ConfigError) as info:
        C.resolve({**models.presets.PRESETS["ftbnn18"], **bad})
    assert field in str(info.value), str(info.value)
    assert len(str(info.value)) < 400


def test_validate_checks_a_resolved_config_alone():
    cfg = models.get_config("ftbnn18")
    C.validate(cfg)
    for change, words in (({"width_multiplier": 0.5}, "resolved"), ({"stem_kernel": None}, "integer"),
                          ({"nonlinearity": "fprelu"}, "must be a list")):
        with pytest.raises(ConfigError, match=words):
            C.validate({**cfg, **change})
    with pytest.raises(ConfigError, match="missing config field 'act_grad'"):
        C.validate({k: v for k, v in cfg.items() if k != "act_grad"})
    C.validate({k: v for k, v in cfg.items() if k != "bn_eps"})  # optional: added later


def test_caps_admit_the_largest_presets_with_room():
    for name in models.list_models():
        params, activation, _ = C.size_of(models.get_config(name))
        assert params * 5 < C.MAX_PARAMETERS and activation * 10 < C.MAX_ACTIVATION, name


def test_json_is_parsed_with_bounded_depth_and_strictly():
    assert C.json_depth('{"a": [[1], "[[[["], "b": {}}') == 3
    assert C.loads_json('{"a": [1, 2]}') == {"a": [1, 2]}
    for text, words in (("[" * 700 + "]" * 700, "nests 700 levels"), ('{"a": NaN}', "not valid JSON"),
                        ('{"a": -1e400}', "float64 range"),
                        ('{"a": 1, "a": 2}', "duplicate key"), ('["\\udc80"]', "not valid Unicode"),
                        ('{"\\ud800": 1}', "not valid Unicode"), ('{"a": 1', "not valid JSON")):
        with pytest.raises(ValueError, match=words):
            C.loads_json(text)
    with pytest.raises(ConfigError, match="nests"):
        models.from_json('{"name": ' + "[" * 700 + "]" * 700 + "}")


def test_docs_list_every_field_with_its_type_and_range():
    """docs/format.md's config table is SCHEMA: one row per field with its type and range."""
    text = DOCS.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    for f in C.SCHEMA:
        assert f.name in rows, f.name
        assert f.type in rows[f.name] and f.range in rows[f.name], rows[f.name]
