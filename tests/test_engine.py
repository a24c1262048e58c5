"""The packed engine against the float training path (eval mode).

Bound: for FTBNN models (no weight scale) every binary layer's float output equals the float path's
exactly (same integer accumulator, same two float32 roundings); real layers differ only in summation
order (a few float32 ulp). With logits of order 1-10 that keeps |engine - float| far below 1e-4
unless a binary input within rounding of 0 flips sign; on these inputs none does, so the test holds
every preset to 1e-4 absolute and identical predictions.
"""

import numpy as np
import pytest

from refbnn import fileformat, models, nn
from refbnn.engine import EngineError, compile_model
from refbnn.models.trace import trace


def trained_looking(name, seed=0, **overrides):
    """A model with non-trivial BatchNorm statistics and slopes, as after training."""
    model = models.build(name, seed=seed, width_multiplier=0.25, input_shape=[1, 28, 28], num_classes=10,
                         **overrides)
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean = rng.normal(0, 0.5, c).astype(np.float32)
            m.running_var = rng.uniform(0.5, 2.0, c).astype(np.float32)
            m.weight.data = rng.normal(0.5, 0.5, c).astype(np.float32)   # some negative scales
            m.bias.data = rng.normal(0, 0.2, c).astype(np.float32)
        if isinstance(m, nn.FPReLU):
            m.pos_slope.data = rng.uniform(0.5, 1.5, m.num_channels).astype(np.float32)
            m.neg_slope.data = rng.uniform(-0.5, 1.0, m.num_channels).astype(np.float32)
    return model.eval()


@pytest.mark.parametrize("name", models.list_models())
def test_engine_matches_float_path(name):
    model = trained_looking(name)
    x = np.random.default_rng(1).standard_normal((16, 1, 28, 28)).astype(np.float32)
    want = model.forward(x)
    got = compile_model(model).forward(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_binary_layers_are_exact_for_unscaled_models():
    model = trained_looking("ftbnn18_g2")
    x = np.random.default_rng(2).standard_normal((4, 1, 28, 28)).astype(np.float32)
    engine = compile_model(model)
    records = {name: (inp, out) for name, _, inp, out in trace(model, x)}
    for i, blk in enumerate(engine.blocks):
        s, b = divmod(i, 4)
        conv_in, _ = records[f"layer{s + 1}.{b}.binary_conv"]
        _, bn_out = records[f"layer{s + 1}.{b}.bn1"]
        got = blk.conv(np.ascontiguousarray(conv_in.transpose(0, 2, 3, 1)))
        np.testing.assert_array_equal(got, bn_out.transpose(0, 2, 3, 1), err_msg=f"block {i}")


def test_engine_refuses_ternary_sign():
    model = models.build("ftbnn18", width_multiplier=0.125, input_shape=[1, 28, 28], num_classes=10,
                         sign_at_zero=0)
    with pytest.raises(EngineError, match="ternary"):
        compile_model(model)


def test_engine_rejects_bad_input():
    engine = compile_model(trained_looking("ftbnn18"))
    with pytest.raises(ValueError, match="input must be"):
        engine.forward(np.zeros((2, 3, 28, 28), np.float32))
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        engine.forward(x)


@pytest.mark.parametrize("name", ["birealnet18", "ftbnn18_g1"])
def test_packed_only_file_runs_like_the_full_file(name, tmp_path):
    from refbnn.infer import load_runner

    model = trained_looking(name)
    spec = {"shape": [1, 28, 28], "layout": "NCHW", "channel_order": "L", "mean": [0.1307],
            "std": [0.3081]}
    full, packed = tmp_path / "full.h5", tmp_path / "packed.h5"
    fileformat.save_model(full, model.state_dict(), config=model.config,
                          binary_weights=model.binary_weights(), input_spec=spec, dataset="mnist")
    fileformat.export_packed(full, packed)
    assert packed.stat().st_size < full.stat().st_size
    x = np.random.default_rng(3).standard_normal((8, 1, 28, 28)).astype(np.float32)
    want = model.forward(x)
    for kind in ("packed", "reference"):
        a, _ = load_runner(str(full), kind)
        b, _ = load_runner(str(packed), kind)
        np.testing.assert_allclose(a(x), want, rtol=0, atol=1e-4)
        # scale-free models are exact from the bits; Bi-Real's alpha * sign round-trips within 1 ulp
        np.testing.assert_allclose(b(x), a(x), rtol=0, atol=0 if name.startswith("ftbnn") else 1e-5)
