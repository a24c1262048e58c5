"""Every layer's forward and backward against PyTorch on the same float32 inputs.

Tolerances: float32 results whose summation order differs from PyTorch's (convolutions, matmuls,
batch reductions) agree to a few ulp of the largest partial sum; with O(1) inputs and at most a few
hundred terms that is < 1e-4 absolute, so ``rtol=atol=1e-4`` (2e-4 for BatchNorm input gradients,
which subtract two such sums). Element-wise layers match to 1e-6.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbnn import nn

torch = pytest.importorskip("torch")
TF = torch.nn.functional

seeds = st.integers(0, 2**31 - 1)


def _t(a, grad=True):
    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=grad)


def _run(layer, tlayer_fn, x, rng, atol=1e-4, dx_atol=None):
    """Forward/backward both; compare outputs, input gradients; return torch input tensor."""
    layer.train()
    y = layer.forward(x)
    xt = _t(x)
    yt = tlayer_fn(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=atol)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    layer.zero_grad()
    dx = layer.backward(dy.copy())
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=dx_atol or atol)


def _grad_close(p, tp, atol=1e-4):
    np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-4, atol=atol)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 3]),
       st.integers(1, 2), st.integers(0, 1), st.integers(1, 2), st.booleans(), seeds)
@settings(max_examples=15)
def test_conv2d(n, cg, og, k, stride, pad, dil, bias, seed):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 3))
    m = nn.Conv2d(cg * groups, og * groups, k, stride, pad, dil, groups, bias=bias)
    x = rng.standard_normal((n, cg * groups, 7, 6)).astype(np.float32)
    tw = _t(m.weight.data)
    tb = _t(m.bias.data) if bias else None
    _run(m, lambda xt: TF.conv2d(xt, tw, tb, stride, pad, dil, groups), x, rng)
    _grad_close(m.weight, tw)
    if bias:
        _grad_close(m.bias, tb)


def test_linear():
    rng = np.random.default_rng(0)
    m = nn.Linear(20, 7)
    tw, tb = _t(m.weight.data), _t(m.bias.data)
    _run(m, lambda xt: TF.linear(xt, tw, tb), rng.standard_normal((5, 20)).astype(np.float32), rng)
    _grad_close(m.weight, tw)
    _grad_close(m.bias, tb)


@pytest.mark.parametrize("shape", [(8, 3, 5, 4), (16, 3), (6, 3, 5)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_train_eval_and_running_stats(shape, momentum):
    rng = np.random.default_rng(1)
    cls, tcls = (nn.BatchNorm2d, torch.nn.BatchNorm2d) if len(shape) == 4 else \
        (nn.BatchNorm1d, torch.nn.BatchNorm1d)
    m, tm = cls(3, momentum=momentum), tcls(3, momentum=momentum)
    w, b = rng.uniform(0.5, 2, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    m.weight.data, m.bias.data = w.copy(), b.copy()
    with torch.no_grad():
        tm.weight.copy_(torch.tensor(w))
        tm.bias.copy_(torch.tensor(b))
    for _ in range(3):
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
        tm.zero_grad()
        _run(m, tm, x, rng, dx_atol=2e-4)
    _grad_close(m.weight, tm.weight)
    _grad_close(m.bias, tm.bias)
    np.testing.assert_allclose(m.running_mean, tm.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.running_var, tm.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert int(m.num_batches_tracked) == int(tm.num_batches_tracked) == 3
    assert m.running_var.dtype == np.float32 and m.num_batches_tracked.dtype == np.int64
    m.eval()
    tm.eval()
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(m.forward(x), tm(torch.tensor(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)


def test_activations_and_structural():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    x[0, 0, 0, :3] = 0.0  # kinks at exactly 0
    _run(nn.ReLU(), torch.relu, x, rng, atol=1e-6)
    for num in (1, 3):
        m, tm = nn.PReLU(num, init=0.3), torch.nn.PReLU(num, init=0.3)
        _run(m, tm, x, rng, atol=1e-6)
        _grad_close(m.weight, tm.weight)
    m = nn.FPReLU(3)
    m.pos_slope.data = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    m.neg_slope.data = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
    tp, tn = _t(m.pos_slope.data), _t(m.neg_slope.data)
    _run(m, lambda xt: torch.where(xt >= 0, tp.view(1, -1, 1, 1) * xt,
                                   tn.view(1, -1, 1, 1) * xt), x, rng, atol=1e-6)
    _grad_close(m.pos_slope, tp)
    _grad_close(m.neg_slope, tn)
    _run(nn.ChannelRepeat(3), lambda xt: torch.cat([xt] * 3, dim=1), x, rng, atol=1e-6)
    _run(nn.GlobalAvgPool2d(), lambda xt: xt.mean(dim=(2, 3)), x, rng, atol=1e-6)
    _run(nn.Flatten(), torch.nn.Flatten(), x, rng, atol=0)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans(), seeds)
@settings(max_examples=15)
def test_pools(k, s, pad, include_pad, seed):
    rng = np.random.default_rng(seed)
    pad = min(pad, k // 2)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    x[:, :, :6:2, ::2] = x[:, :, 1::2, 1::2]  # ties for max-pool
    _run(nn.MaxPool2d(k, s, pad), torch.nn.MaxPool2d(k, s, pad), x, rng, atol=1e-6)
    _run(nn.AvgPool2d(k, s, pad, count_include_pad=include_pad),
         torch.nn.AvgPool2d(k, s, pad, count_include_pad=include_pad), x, rng, atol=1e-6)


def _approx_sign(xt):
    """Bi-Real Net's activation: sign forward (x >= 0 -> +1), piecewise-polynomial backward (the
    PyTorch twin's, :class:`refbnn.interop.torch.BinarizeActivation`)."""
    from refbnn.interop.torch import BinarizeActivation

    return BinarizeActivation.apply(xt, 1, "approx_sign")


def test_binary_conv_matches_bireal_torch():
    rng = np.random.default_rng(4)
    m = nn.BinaryConv2d(4, 6, 3, 1, 1, scale="mean_abs")
    m.weight.data = rng.uniform(-1.2, 1.2, m.weight.shape).astype(np.float32)
    tw = _t(m.weight.data)

    def bireal(xt):
        alpha = tw.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
        wb = alpha * torch.where(tw >= 0, 1.0, -1.0)
        clipped = torch.clamp(tw, -1.0, 1.0)
        wq = wb.detach() - clipped.detach() + clipped
        return TF.conv2d(_approx_sign(xt), wq, padding=1)

    x = rng.standard_normal((3, 4, 6, 6)).astype(np.float32)
    _run(m, bireal, x, rng)
    _grad_close(m.weight, tw)


def test_state_dict_names_match_torch():
    ours = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.PReLU(4),
                         nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))),
                         nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4),
                                 torch.nn.PReLU(4), torch.nn.Module(), torch.nn.Flatten(),
                                 torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    theirs[3].body = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, bias=False),
                                         torch.nn.BatchNorm2d(4))
    sd, tsd = ours.state_dict(), theirs.state_dict()
    assert list(sd) == list(tsd)
    for k in sd:
        assert sd[k].shape == tuple(tsd[k].shape), k
    ours.load_state_dict({k: v.numpy() for k, v in tsd.items()})


def test_binary_linear_and_residual_match_torch():
    rng = np.random.default_rng(6)
    m = nn.BinaryLinear(12, 5, bias=True, scale="mean_abs", act_grad="approx_sign")
    m.weight.data = rng.uniform(-1.2, 1.2, m.weight.shape).astype(np.float32)
    tw, tb = _t(m.weight.data), _t(m.bias.data)

    def bireal_linear(xt):
        alpha = tw.abs().mean(dim=1, keepdim=True).detach()
        clipped = torch.clamp(tw, -1.0, 1.0)
        wq = (alpha * torch.where(tw >= 0, 1.0, -1.0)).detach() - clipped.detach() + clipped
        return TF.linear(_approx_sign(xt), wq, tb)

    _run(m, bireal_linear, rng.standard_normal((4, 12)).astype(np.float32), rng)
    _grad_close(m.weight, tw)
    _grad_close(m.bias, tb)
    res = nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()), nn.Conv2d(3, 3, 1))
    w1, w2 = _t(res.body[0].weight.data), _t(res.shortcut.weight.data)
    _run(res, lambda xt: torch.relu(TF.conv2d(xt, w1, padding=1)) + TF.conv2d(xt, w2),
         rng.standard_normal((2, 3, 5, 5)).astype(np.float32), rng)
    _grad_close(res.body[0].weight, w1)
    _grad_close(res.shortcut.weight, w2)
