"""Hand-computed values where a silent slip would survive every comparison with a twin: the latent
weight gradient mask at exactly |W| = 1, BatchNorm's running statistics, and aliasing of arrays
between a state dict, a model, its optimizer and its compiled engine. No torch."""

import numpy as np
import pytest

from refbnn import models, nn
from refbnn.engine import compile_model
from refbnn.training import Adam, param_groups

# --- the clipped straight-through estimator: dL/dW = dL/dWq * (|W| <= 1) --------------------------
W_EDGE = np.array([[1.0, -1.0, np.nextafter(np.float32(1), np.float32(2)),
                    -np.nextafter(np.float32(1), np.float32(2)), 0.5, 0.0]], np.float32)
MASK = np.array([[1, 1, 0, 0, 1, 1]], np.float32)  # +-1.0 exactly (where clipping leaves them) pass


def test_linear_weight_gradient_passes_at_exactly_one():
    layer = nn.BinaryLinear(6, 1, scale="none")
    layer.weight.data = W_EDGE.copy()
    x = np.array([[0.3, -2.0, 1.0, 1.0, -0.1, 4.0]], np.float32)
    layer.forward(x)
    layer.backward(np.array([[2.0]], np.float32))
    # dWq = grad_out.T @ sign(x) = 2 * [+1, -1, +1, +1, -1, +1]
    np.testing.assert_array_equal(layer.weight.grad, 2 * np.array([[1, -1, 1, 1, -1, 1]]) * MASK)


@pytest.mark.parametrize("use_packed", [True, False])
def test_conv_weight_gradient_passes_at_exactly_one(use_packed):
    conv = nn.BinaryConv2d(6, 1, kernel_size=1, padding=0, scale="none")
    conv.use_packed = use_packed
    conv.weight.data = W_EDGE.reshape(1, 6, 1, 1).copy()
    x = np.ones((1, 6, 1, 1), np.float32)
    conv.forward(x)
    conv.backward(np.full((1, 1, 1, 1), 3.0, np.float32))
    np.testing.assert_array_equal(conv.weight.grad.reshape(1, 6), 3 * MASK)


def test_weights_clipped_to_one_keep_learning():
    # Adam pushes a weight past 1; the clip puts it at exactly 1.0, and the next gradient still moves it
    layer = nn.BinaryLinear(1, 1, scale="none")
    layer.weight.data = np.array([[0.9999]], np.float32)
    opt = Adam(param_groups(layer, clip_latent=(-1.0, 1.0)), lr=0.1)
    x = np.ones((1, 1), np.float32)
    layer.forward(x)
    layer.backward(np.array([[-1.0]], np.float32))  # gradient -1: Adam increases the weight by ~lr
    opt.step()
    assert layer.weight.data[0, 0] == 1.0
    layer.zero_grad()
    layer.forward(x)
    layer.backward(np.array([[1.0]], np.float32))
    assert layer.weight.grad[0, 0] == 1.0  # |W| = 1: the gradient passes
    opt.step()
    assert layer.weight.data[0, 0] < 1.0


# --- BatchNorm running statistics ---------------------------------------------------------------------
# channel 0: [1, 2, 3, 6]: mean 3, squared deviations 4 + 1 + 0 + 9 = 14: biased var 3.5, unbiased 14/3
# channel 1: [0, 0, 0, 4]: mean 1, squared deviations 1 + 1 + 1 + 9 = 12: biased var 3, unbiased 4
BATCH = np.array([[1, 0], [2, 0], [3, 0], [6, 4]], np.float32)


def test_running_statistics_by_hand_momentum_01():
    bn = nn.BatchNorm1d(2, momentum=0.1)
    bn.forward(BATCH)
    np.testing.assert_allclose(bn.running_mean, [0.1 * 3, 0.1 * 1], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, [0.9 + 0.1 * 14 / 3, 0.9 + 0.1 * 4], rtol=1e-6)
    bn.forward(BATCH)
    np.testing.assert_allclose(bn.running_mean, [0.9 * 0.3 + 0.3, 0.9 * 0.1 + 0.1], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, [0.9 * (0.9 + 1.4 / 3) + 1.4 / 3, 0.9 * 1.3 + 0.4],
                               rtol=1e-6)
    assert int(bn.num_batches_tracked) == 2
    assert bn.running_mean.dtype == bn.running_var.dtype == np.float32


def test_running_statistics_cumulative_average():
    bn = nn.BatchNorm1d(2, momentum=None)
    bn.forward(BATCH)
    np.testing.assert_allclose(bn.running_mean, [3, 1], rtol=1e-6)  # momentum 1/1
    np.testing.assert_allclose(bn.running_var, [14 / 3, 4], rtol=1e-6)
    bn.forward(BATCH[:, ::-1].copy())  # channels swapped
    np.testing.assert_allclose(bn.running_mean, [2, 2], rtol=1e-6)  # momentum 1/2
    np.testing.assert_allclose(bn.running_var, [(14 / 3 + 4) / 2] * 2, rtol=1e-6)


def test_running_statistics_count_spatial_values_and_eval_uses_them():
    bn = nn.BatchNorm2d(1, momentum=0.5, eps=0.0 + 1e-5)
    x = BATCH[:, 0].reshape(2, 1, 1, 2)  # the 4 values of channel 0 over (N, H, W)
    y = bn.forward(x)
    np.testing.assert_allclose(y.ravel(), (np.array([1, 2, 3, 6]) - 3) / np.sqrt(3.5 + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(bn.running_mean, [1.5], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, [0.5 + 0.5 * 14 / 3], rtol=1e-6)
    bn.weight.data[:] = 2.0
    bn.bias.data[:] = -1.0
    bn.eval()
    out = bn.forward(np.array([[[[1.5, 4.0]]]], np.float32))
    rv = 0.5 + 0.5 * 14 / 3
    np.testing.assert_allclose(out.ravel(), [-1.0, 2.0 * 2.5 / np.sqrt(rv + 1e-5) - 1.0], rtol=1e-5)


# --- aliasing ---------------------------------------------------------------------------------------------
def _tiny():
    return models.build("ftbnn18", seed=0, width_multiplier=0.0625, input_shape=[1, 12, 12], num_classes=3)


def test_load_state_dict_copies_the_callers_arrays():
    model = _tiny()
    state = {k: v.copy() for k, v in model.state_dict().items()}
    kept = {k: v.copy() for k, v in state.items()}
    model.load_state_dict(state)
    for name, p in model.named_parameters():
        assert not np.shares_memory(p.data, state[name]), name
    opt = Adam(param_groups(model), lr=0.1)
    x = np.random.default_rng(0).standard_normal((4, 1, 12, 12)).astype(np.float32)
    model.backward(np.ones_like(model.forward(x)))
    opt.step()
    for k in state:
        np.testing.assert_array_equal(state[k], kept[k], err_msg=k)


def test_compiled_engine_keeps_its_own_copies():
    model = _tiny().eval()
    x = np.random.default_rng(1).standard_normal((2, 1, 12, 12)).astype(np.float32)
    engine = compile_model(model)
    before = engine.forward(x).copy()
    for _, p in model.named_parameters():
        p.data += 0.5  # in place, as an optimizer step does
    np.testing.assert_array_equal(engine.forward(x), before)


def test_accumulate_copies_unless_the_gradient_is_owned():
    p = nn.Parameter(np.zeros((2, 3), np.float32))
    g = np.ones((2, 3), np.float32)
    p.accumulate(g)
    g[0, 0] = 7.0  # the caller keeps g: grad must not change with it
    assert p.grad[0, 0] == 1.0 and not np.shares_memory(p.grad, g)
    p.accumulate(g)  # a second gradient adds into grad, g untouched
    assert p.grad[0, 0] == 8.0 and g[0, 0] == 7.0
    q = nn.Parameter(np.zeros((2, 3), np.float32))
    fresh = np.full((2, 3), 2.0, np.float32)
    q.accumulate(fresh, owned=True)
    assert np.shares_memory(q.grad, fresh)  # taken over without a copy
    view = np.full((3, 2), 3.0, np.float32).T  # not C-contiguous: copied even when owned
    r = nn.Parameter(np.zeros((2, 3), np.float32))
    r.accumulate(view, owned=True)
    assert not np.shares_memory(r.grad, view) and r.grad.flags.c_contiguous and np.all(r.grad == 3.0)
