"""Larq (Keras) models in (refbnn.interop.larq): a larq_zoo-style Bi-Real Net built here converts,
and refbnn's float path equals Keras layer by layer (binary convs bit-exact where Keras's sums are
integers); unsupported layers are one-line errors naming the layer and its class.

Needs tensorflow, tf-keras and larq (the 'larq' extra, its own virtual environment in CI)."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow", reason="needs tensorflow (the 'larq' extra)")
lq = pytest.importorskip("larq", reason="needs larq (the 'larq' extra)")

from refbnn import convert, crosscheck, fileformat, models  # noqa: E402
from refbnn.interop import larq as rlarq  # noqa: E402

pytestmark = pytest.mark.larq


def birealnet(input_shape=(32, 32, 3), filters=8, stages=(2, 2, 2), classes=5, kernel="magnitude_aware_sign",
              inq="approx_sign", pad_one=(), shortcut="real", extra=None, seed=0):
    """larq_zoo's BiRealNet structure (TF 'same' padding, BN eps 1e-3, pad_values per layer) at a
    small size, with seeded trained-looking BatchNorm statistics."""
    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    q = dict(input_quantizer=inq, kernel_quantizer=kernel, kernel_constraint="weight_clip", use_bias=False)
    inp = tf.keras.Input(input_shape)
    x = tf.keras.layers.Conv2D(filters, 7, strides=2, padding="same", use_bias=False)(inp)
    x = tf.keras.layers.BatchNormalization(momentum=0.8)(x)
    x = tf.keras.layers.MaxPool2D(3, strides=2, padding="same")(x)
    n = 0
    for si, blocks in enumerate(stages):
        for bi in range(blocks):
            cin = x.shape[-1]
            cout = cin * 2 if (si > 0 and bi == 0) else cin
            stride = 2 if cout != cin else 1
            short = x
            if cout != cin:
                short = tf.keras.layers.AvgPool2D(2, strides=2, padding="same")(short)
                if shortcut == "real":
                    short = tf.keras.layers.Conv2D(cout, 1, use_bias=False)(short)
                else:
                    short = lq.layers.QuantConv2D(cout, 1, **q)(short)
                short = tf.keras.layers.BatchNormalization(momentum=0.8)(short)
            y = lq.layers.QuantConv2D(cout, 3, strides=stride, padding="same",
                                      pad_values=1.0 if n in pad_one else 0.0, **q)(x)
            y = tf.keras.layers.BatchNormalization(momentum=0.8)(y)
            x = tf.keras.layers.add([y, short])
            n += 1
    if extra is not None:
        x = extra(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dense(classes)(x)
    x = tf.keras.layers.Activation("softmax", dtype="float32")(x)
    model = tf.keras.Model(inp, x, name="birealnet_small")
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.normal(1, 0.5, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c),
                               rng.uniform(0.5, 2, c)])
    return model


def _save(model, tmp_path, name="m.h5"):
    path = tmp_path / name
    model.save(path)
    return path


@pytest.mark.parametrize("variant", ["bireal", "ste_binary_shortcut"])
def test_convert_and_match_keras_layer_by_layer(tmp_path, variant, capsys):
    kw = dict(pad_one=(1, 3)) if variant == "bireal" else dict(
        kernel="ste_sign", inq="ste_sign", shortcut="binary", pad_one=(0,))
    model = birealnet(**kw)
    src = _save(model, tmp_path)
    out = tmp_path / "refbnn.h5"
    assert convert.main(["larq", str(src), str(out)]) == 0
    loaded = fileformat.load(out)
    cfg = loaded.config
    assert cfg["conv_padding"] == "tf" and cfg["bn_eps"] == pytest.approx(1e-3)
    assert cfg["widths"] == [8, 16, 32] and cfg["blocks"] == [2, 2, 2] and cfg["stem_pool"]
    assert cfg["scale"] == ("mean_abs" if variant == "bireal" else "none")
    if variant == "bireal":
        assert cfg["pad_values"] == {"layer1.1.binary_conv": 1, "layer2.1.binary_conv": 1}
    net = models.BNNResNet(cfg)
    net.load_state_dict(loaded.state_dict)
    _, _, names = rlarq.from_keras(rlarq.load_keras(src))
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = crosscheck.run_refbnn(net, x)
    other = rlarq.keras_outputs(model, names, x)
    assert list(other)[:3] == ["conv1", "bn1", "maxpool"]
    for name, r in ref.outputs.items():
        o = other[name].reshape(r.shape)
        assert np.abs(r - o).max() <= 1e-4 * max(np.abs(o).max(), 1e-30), name
        if name.endswith("binary_conv") and variant != "bireal":  # integer sums: bit-exact
            assert np.array_equal(r, o), name
    # the CLI: every row within tolerance, exit 0
    assert crosscheck.main([str(out), "--against", "keras", str(src)]) == 0
    assert "all " in capsys.readouterr().out


def test_crosscheck_catches_another_weight(tmp_path, capsys):
    model = birealnet()
    src = _save(model, tmp_path)
    out = tmp_path / "r.h5"
    assert convert.main(["larq", str(src), str(out)]) == 0
    other = birealnet(seed=1)
    assert crosscheck.main([str(out), "--against", "keras", str(_save(other, tmp_path, "o.h5"))]) == 1
    assert "BEYOND TOLERANCE" in capsys.readouterr().out


def test_keras_format_file(tmp_path):
    src = _save(birealnet(stages=(1, 1)), tmp_path, "m.keras")
    cfg = convert.convert_larq(src, tmp_path / "r.h5")
    assert cfg["blocks"] == [1, 1]


@pytest.mark.parametrize(("extra", "where"), [
    (lambda x: tf.keras.layers.Dropout(0.5, name="drop")(x), "layer 'drop' (Dropout)"),
    (lambda x: tf.keras.layers.ReLU(name="relu_end")(x), "layer 'relu_end' (ReLU)"),
])
def test_unsupported_layer_is_one_line_exit_2(tmp_path, capsys, extra, where):
    src = _save(birealnet(stages=(1, 1), extra=extra), tmp_path)
    assert convert.main(["larq", str(src), str(tmp_path / "r.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {where} is not supported") and err.count("\n") == 1
    assert not (tmp_path / "r.h5").exists()


def test_unsupported_quantizer_and_missing_file(tmp_path, capsys):
    src = _save(birealnet(stages=(1, 1), inq="swish_sign"), tmp_path)
    assert convert.main(["larq", str(src), str(tmp_path / "r.h5")]) == 2
    assert "(QuantConv2D) is not supported: input_quantizer" in capsys.readouterr().err
    assert convert.main(["larq", str(tmp_path / "absent.h5"), str(tmp_path / "r.h5")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_zero_padding_reach_past_the_input_matches_keras():
    """A 2x3 map under a zero-padded 3x3 binary conv (LCE's fast kernels are wrong here; Keras and
    refbnn agree): the golden case bconv_same_zero_reach_past_input in Keras form."""
    from refbnn import reference

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 3, 10)).astype(np.float32)
    layer = lq.layers.QuantConv2D(3, 3, padding="same", input_quantizer="ste_sign",
                                  kernel_quantizer="ste_sign", use_bias=False)
    y = layer(x).numpy()
    want = reference.bconv2d(x, layer.get_weights()[0], 1, "same", 0)
    assert np.array_equal(y, want)
