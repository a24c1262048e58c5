"""refbnn networks exported to OpenVINO (optional extra ``openvino``) against refbnn's own outputs.

Binary layers: OpenVINO's BinaryConvolution accumulators are integers, so every ``binary_conv``
output must equal refbnn's exactly (FTBNN; Bi-Real's ``acc * alpha`` too: the same single float32
product). Real layers (stem, 1x1 shortcuts, BN affines, pools, classifier) run in f32 with another
summation order: each layer within relative 1e-5 of its largest value (a few ulp of partial sums
of up to ~600 products); the default bf16 precision is not checked against refbnn.
"""

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'refbnn[openvino]')")

from test_engine import trained_looking  # noqa: E402

from refbnn import fileformat, models, nn  # noqa: E402
from refbnn.crosscheck import run_refbnn  # noqa: E402
from refbnn.engine import network_from_model  # noqa: E402
from refbnn.interop import openvino as rov  # noqa: E402
from refbnn.ops import bconv2d, pack_kernel  # noqa: E402


@pytest.mark.parametrize("name", ["birealnet18", "ftbnn18", "ftbnn18_g2", "ftbnn18_purified"])
def test_every_layer_agrees_with_refbnn(name):
    model = trained_looking(name)
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    ref = run_refbnn(model, x).outputs
    got = rov.run_layers(rov.to_openvino(network_from_model(model), layer_outputs=True), x)
    compared = 0
    for layer, r in ref.items():
        if layer == "fc":
            continue
        g = got[layer].reshape(r.shape)
        if layer.endswith("binary_conv") or isinstance(dict(model.named_modules()).get(layer),
                                                       nn.BinaryConv2d):
            np.testing.assert_array_equal(g, r, err_msg=layer)
        else:
            assert np.abs(g - r).max() <= 1e-5 * max(np.abs(r).max(), 1e-30), layer
        compared += 1
    assert compared >= 40
    assert (got["logits"].argmax(1) == ref["logits"].argmax(1)).all()


@pytest.mark.parametrize("pad_value", [0, 1, -1])
@pytest.mark.parametrize("cin, groups", [(16, 1), (19, 1), (38, 2), (7, 1)])
@pytest.mark.parametrize("stride", [1, 2])
def test_binary_conv_is_exact(pad_value, cin, groups, stride):
    """The sign (FakeQuantize at -1.4e-45 keeps sign(0) = +1, -0.0 too), the lowest-bit-first u1
    weights and the channel padding for groups that are not a multiple of 8 channels."""
    rng = np.random.default_rng(cin * 10 + stride)
    x = rng.standard_normal((2, 7, 6, cin)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0.0
    x[rng.random(x.shape) < 0.05] = -0.0
    w = rng.standard_normal((3, 3, cin // groups, 8)).astype(np.float32)
    want = bconv2d(x, w, stride=stride, padding=1, pad_value=pad_value, groups=groups)
    from refbnn.engine.network import BN, BinaryConv

    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    conv = BinaryConv("c", pack_kernel(w), cin, 3, stride, 1, groups, pad_value, 1, None,
                      BN("b", ones, zeros))
    _, ops = rov._ov()
    p = ops.parameter([2, cin, 7, 6], np.float32)
    node = rov._binary(ov, ops, p, conv, (7, 6))
    got = rov.compile_model(ov.Model([node], [p]))(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))[0]
    np.testing.assert_array_equal(got.transpose(0, 2, 3, 1), want)


def test_sign_at_zero_minus_one():
    model = trained_looking("ftbnn18", sign_at_zero=-1)
    x = np.random.default_rng(2).standard_normal((2, 1, 28, 28)).astype(np.float32)
    x[:, :, ::3] = 0.0
    got = rov.run_layers(rov.to_openvino(network_from_model(model)), x)["logits"]
    np.testing.assert_allclose(got, model.forward(x), rtol=0, atol=1e-4)


def test_export_writes_ir_and_crosscheck_cli(tmp_path, capsys):
    from refbnn import crosscheck, export

    model = trained_looking("ftbnn18_g2")
    src = tmp_path / "m.h5"
    fileformat.save_model(src, model.state_dict(), config=model.config,
                          binary_weights=model.binary_weights())
    xml = tmp_path / "m.xml"
    assert export.main([str(src), str(xml), "--openvino"]) == 0
    assert xml.exists() and xml.with_suffix(".bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("m.xml.")]  # temp folder gone
    capsys.readouterr()
    assert crosscheck.main([str(src), "--against", "openvino", str(xml)]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.binary_conv" in out and "within tolerance" in out
    # a packed-only file exports the same network
    packed = tmp_path / "p.h5"
    fileformat.export_packed(src, packed)
    assert export.main([str(packed), str(tmp_path / "p.xml"), "--openvino"]) == 0
    x = np.random.default_rng(3).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(rov.run_layers(tmp_path / "p.xml", x)["logits"],
                                  rov.run_layers(xml, x)["logits"])


def test_default_precision_is_reported():
    model = models.build("ftbnn18", width_multiplier=0.125, input_shape=[1, 28, 28], num_classes=10)
    m = rov.to_openvino(network_from_model(model.eval()), batch=1)
    prec = rov.compile_model(m, precision=None).get_property("INFERENCE_PRECISION_HINT")
    assert str(prec) in ("<Type: 'float32'>", "<Type: 'bfloat16'>", "<Type: 'float16'>")
