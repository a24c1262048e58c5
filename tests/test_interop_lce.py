"""LCE (refbnn.interop.lce): refbnn predicts LCE's binary-conv outputs bit for bit from the constants
LCE folds into the .tflite, zero padding included (its float border correction, modelled in
refbnn.reference); where LCE's kernel reaches past the whole input LCE is wrong and refbnn follows
Keras; export --lce goes through Larq and LCE's converter and crosscheck --against lce agrees.

Needs tensorflow, tf-keras, larq and larq-compute-engine (the 'larq' extra, NumPy < 2)."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow", reason="needs tensorflow (the 'larq' extra)")
lq = pytest.importorskip("larq", reason="needs larq (the 'larq' extra)")
pytest.importorskip("larq_compute_engine", reason="needs larq-compute-engine (the 'larq' extra)")

from refbnn import crosscheck, export, fileformat, models, ops, reference  # noqa: E402
from refbnn.golden.model import randomize_state  # noqa: E402
from refbnn.interop import lce  # noqa: E402

pytestmark = pytest.mark.larq

# (H, W, Cin, Cout, stride, pad_values, kernel quantizer)
GEOMETRIES = [(7, 7, 40, 6, 2, 0.0, "ste_sign"), (8, 8, 64, 10, 2, 0.0, "magnitude_aware_sign"),
              (7, 7, 40, 6, 2, 1.0, "ste_sign"), (6, 5, 33, 8, 1, 0.0, "ste_sign"),
              (8, 8, 32, 16, 1, 1.0, "magnitude_aware_sign")]


def _one_layer(h, w, c, o, stride, pad, kq, seed=0):
    rng = np.random.default_rng(seed)
    inp = tf.keras.Input((h, w, c))
    y = lq.layers.QuantConv2D(o, 3, strides=stride, padding="same", pad_values=pad,
                              input_quantizer="ste_sign", kernel_quantizer=kq,
                              kernel_constraint="weight_clip", use_bias=False)(inp)
    bn = tf.keras.layers.BatchNormalization(epsilon=1e-3)
    model = tf.keras.Model(inp, bn(y))
    bn.set_weights([rng.normal(1, 0.5, o), rng.normal(0, 0.5, o), rng.normal(0, 2, o),
                    rng.uniform(0.5, 2, o)])
    return model, rng.standard_normal((3, h, w, c)).astype(np.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[f"{g[0]}x{g[1]}c{g[2]}s{g[4]}pad{g[5]:g}"
                                                      for g in GEOMETRIES])
def test_lce_binary_conv_is_bit_exact_from_its_constants(geometry):
    model, x = _one_layer(*geometry)
    data = lce.convert(model)
    op = lce.read_bconvs(data)[0]
    assert op["padding"] == "same" and op["pad_values"] == int(geometry[5])
    assert op["filter"].dtype == np.int32 and op["filter"].shape[-1] == -(-geometry[2] // 32)
    got = lce.run(data, x)[0]
    want = lce.predict_bconv(op, x)
    assert np.array_equal(got, want)  # every value, border pixels included
    # the filter is Keras's kernel, packed (bit 1 = -1, OHWI)
    kernel = model.layers[1].get_weights()[0]
    assert np.array_equal(lce.filter_kernel(op), np.where(kernel < 0, -1.0, 1.0))
    # Keras computes the same layer in another float order: close, not bit-identical
    keras = model(x, training=False).numpy()
    assert np.abs(keras - want).max() <= 1e-4 * np.abs(keras).max()
    if geometry[5] == 0.0:  # without the border correction the border pixels are wrong
        k = int(np.prod(lce.filter_kernel(op).shape[:3]))
        acc = ops.bconv2d(x, lce.filter_kernel(op), stride=geometry[4], padding="same", pad_value=1)
        naive = reference.output_transform_lce(acc, k, op["multiplier"], op["bias"])
        assert not np.array_equal(naive, got)


def test_lce_zero_padding_is_wrong_where_the_kernel_reaches_past_the_input():
    """A 2x3 input under a zero-padded 3x3 kernel: LCE's fast kernel derives its border correction
    from one side only; refbnn follows the definition, which Keras agrees with."""
    model, x = _one_layer(2, 3, 10, 3, 1, 0.0, "ste_sign")
    data = lce.convert(model)
    want = lce.predict_bconv(lce.read_bconvs(data)[0], x)
    keras = model(x, training=False).numpy()
    assert np.abs(keras - want).max() <= 1e-4 * np.abs(keras).max()
    agreement = lce.bconv_agreement(data, x)
    assert agreement["equal"] < 0.9 and agreement["max_abs"] > 1.0, agreement


def _tf_model_file(tmp_path, seed=0):
    net = models.BNNResNet({"input_shape": [3, 32, 32], "stem_channels": 8, "widths": [8, 16, 32],
                            "blocks": [1, 2, 1], "stem_kernel": 7, "stem_stride": 2, "stem_pool": True,
                            "num_classes": 5, "conv_padding": "tf", "bn_eps": 1e-3, "scale": "mean_abs",
                            "pad_values": {"layer2.1.binary_conv": 1}})
    randomize_state(net, seed)
    path = tmp_path / f"m{seed}.h5"
    fileformat.save_model(path, net.state_dict(), config=net.config, binary_weights=net.binary_weights())
    return net, path


def test_export_lce_and_crosscheck(tmp_path, capsys):
    net, path = _tf_model_file(tmp_path)
    out = tmp_path / "m.tflite"
    assert export.main([str(path), str(out), "--lce"]) == 0
    convs = lce.read_bconvs(out.read_bytes())
    assert len(convs) == 4  # every 3x3 binary conv became an LceBconv2d
    assert [c["pad_values"] for c in convs] == [0, 0, 1, 0]
    x, _ = crosscheck.seeded_batch(net.config, 0, 2)
    got = lce.lce_outputs(out, x)["logits"]
    ref = crosscheck.run_refbnn(net, x).outputs["logits"]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    capsys.readouterr()
    assert crosscheck.main([str(path), "--against", "lce", str(out)]) == 0
    _, other = _tf_model_file(tmp_path, seed=1)
    assert export.main([str(other), str(tmp_path / "o.tflite"), "--lce"]) == 0
    assert crosscheck.main([str(path), "--against", "lce", str(tmp_path / "o.tflite")]) == 1


def test_export_lce_refuses_what_larq_cannot_express(tmp_path, capsys):
    net = models.build("birealnet18", input_shape=[1, 12, 12], width_multiplier=0.125, num_classes=4)
    path = tmp_path / "sym.h5"
    fileformat.save_model(path, net.state_dict(), config=net.config, binary_weights=net.binary_weights())
    assert export.main([str(path), str(tmp_path / "x.tflite"), "--lce"]) == 2
    assert "conv_padding must be 'tf'" in capsys.readouterr().err
    assert not (tmp_path / "x.tflite").exists()
