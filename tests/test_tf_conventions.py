"""Model configs in Keras/TensorFlow conventions (conv_padding "tf", bn_eps, per-layer pad_values):
refbnn's layers equal the oracle with explicit padding, and the whole network matches its PyTorch
twin built independently with F.pad; config errors name the field."""

import numpy as np
import pytest

from refbnn import models, nn, reference
from refbnn.golden.model import randomize_state
from refbnn.models.config import ConfigError, binary_conv_names, resolve

TF_CFG = {"input_shape": [3, 64, 64], "width_multiplier": 0.125, "num_classes": 7,
          "conv_padding": "tf", "bn_eps": 1e-3, "scale": "mean_abs",
          "pad_values": {"layer2.0.binary_conv": 1, "layer3.1.binary_conv": 1}}


@pytest.mark.parametrize(("hw", "stride", "pad_value"), [((8, 8), 2, 0), ((8, 7), 2, 1), ((5, 6), 1, 0),
                                                         ((7, 7), 2, -1)])
def test_same_binary_conv_equals_the_oracle(hw, stride, pad_value):
    rng = np.random.default_rng(0)
    layer = nn.BinaryConv2d(5, 4, 3, stride=stride, padding="same", pad_value=pad_value)
    x = rng.standard_normal((2, 5, *hw)).astype(np.float32)
    want = reference.bconv2d(x.transpose(0, 2, 3, 1), layer.weight.data.transpose(2, 3, 1, 0),
                             stride, "same", pad_value).transpose(0, 3, 1, 2)
    assert np.array_equal(layer.accumulators(x), want)
    layer.use_packed = False  # the float GEMM path with the same geometry
    assert np.array_equal(layer.forward(x), want)


def test_same_conv_and_maxpool_equal_explicit_padding():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding="same")
    ref = nn.Conv2d(2, 3, 3, stride=2, padding=0)
    ref.weight.data[...] = conv.weight.data
    xp = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))  # TF: 8 -> 4 needs one row/column, bottom/right
    assert np.array_equal(conv.forward(x), ref.forward(xp))
    pool = nn.MaxPool2d(3, 2, "same")
    y = pool.forward(-np.abs(x) - 1)  # all negative: a padded 0 would win, -inf never does
    want = np.max(np.lib.stride_tricks.sliding_window_view(
        np.pad(-np.abs(x) - 1, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=-np.inf), (3, 3), (2, 3)),
        axis=(-2, -1))[:, :, ::2, ::2]
    assert np.array_equal(y, want)


def test_config_fields_and_their_errors():
    cfg = resolve(TF_CFG)
    assert cfg["conv_padding"] == "tf" and cfg["bn_eps"] == 1e-3
    assert "layer2.0.binary_conv" in binary_conv_names(cfg)
    assert resolve({})["conv_padding"] == "symmetric" and resolve({})["bn_eps"] == 1e-5
    for bad, field in [({"conv_padding": "keras"}, "conv_padding"), ({"bn_eps": 0}, "bn_eps"),
                       ({"pad_values": {"layer9.0.binary_conv": 1}}, "pad_values"),
                       ({"pad_values": {"layer1.0.binary_conv": 2}}, "pad_values")]:
        with pytest.raises(ConfigError, match=field):
            resolve(dict(TF_CFG, **bad))
    net = models.BNNResNet(TF_CFG)
    assert net.layer2[0].binary_conv.pad_value == 1 and net.layer2[1].binary_conv.pad_value == 0
    assert net.bn1.eps == 1e-3 and net.layer4[0].downsample[2].eps == 1e-3


def test_tf_config_matches_its_torch_twin(torch_one_thread):
    from refbnn.crosscheck import run_refbnn, run_torch
    from refbnn.interop.torch import to_torch_state, twin

    net = models.BNNResNet(TF_CFG)
    randomize_state(net, 0)
    tnet = twin(net.config)
    tnet.load_state_dict(to_torch_state(net.state_dict()))
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref, other = run_refbnn(net, x), run_torch(tnet, x)
    a, b = ref.outputs["logits"], other.outputs["logits"]
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    # the stride-2 stem of a 64x64 input: 32x32 (TF "same"), then the max-pool 16x16
    assert ref.outputs["conv1"].shape[2:] == (32, 32) and ref.outputs["maxpool"].shape[2:] == (16, 16)
    labels = np.array([1, 4])
    ref, other = run_refbnn(net, x, labels), run_torch(tnet, x, labels)
    worst = max(np.abs(ref.grads[k] - other.grads[k].reshape(ref.grads[k].shape)).max() /
                max(np.abs(other.grads[k]).max(), 1e-30) for k in ref.grads)
    assert worst <= 1e-4


def test_engine_folds_bn_eps_and_pad_values_and_refuses_tf_padding():
    from refbnn import engine

    small = {"input_shape": [3, 16, 16], "widths": [8, 16], "blocks": [1, 1], "stem_channels": 8,
             "num_classes": 5}
    net = models.BNNResNet(dict(small, bn_eps=1e-3, pad_values={"layer2.0.binary_conv": 1}))
    randomize_state(net, 1)
    net.eval()
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = net(x)
    assert np.abs(engine.compile_model(net)(x) - want).max() <= 1e-4 * np.abs(want).max()
    with pytest.raises(engine.EngineError, match="conv_padding='tf'"):
        engine.compile_model(models.BNNResNet(dict(small, conv_padding="tf")))
