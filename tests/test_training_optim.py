"""Optimizers: updates against hand-written float64 recurrences, PyTorch agreement, param_groups,
clipping, and bit-identical resumption through state_dict."""

import json

import numpy as np
import pytest

from refbnn import nn
from refbnn.nn.module import Parameter
from refbnn.training import SGD, Adam, AdamW, param_groups


def _params(rng, n=2):
    return [Parameter(rng.standard_normal((3, 4))) for _ in range(n)]


def _grads(rng, steps, shapes):
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.copy()
        opt.step()


def _sgd_literal(p0, grads, lr, mom, nesterov, wd):
    p, buf = p0.astype(np.float64), None
    for g in grads:
        d = g + wd * p
        if mom:
            buf = d.copy() if buf is None else mom * buf + d
            d = d + mom * buf if nesterov else buf
        p = p - lr * d
    return p


def _adam_literal(p0, grads, lr, b1, b2, eps, wd, decoupled):
    p = p0.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
    return p


# float32 arithmetic over 5 steps of O(1) values vs the float64 recurrence: 1e-5 absolute
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("mom,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.01),
                                             (0.9, True, 0.05)])
def test_sgd_formula(mom, nesterov, wd):
    rng = np.random.default_rng(0)
    params = _params(rng)
    p0 = [p.data.copy() for p in params]
    grads = _grads(rng, 5, [p.shape for p in params])
    _run(SGD(params, lr=0.1, momentum=mom, nesterov=nesterov, weight_decay=wd), params, grads)
    for i, p in enumerate(params):
        want = _sgd_literal(p0[i], [g[i] for g in grads], 0.1, mom, nesterov, wd)
        np.testing.assert_allclose(p.data, want, **TOL)


@pytest.mark.parametrize("cls,wd", [(Adam, 0.0), (Adam, 0.1), (AdamW, 0.1)])
def test_adam_formula(cls, wd):
    rng = np.random.default_rng(1)
    params = _params(rng)
    p0 = [p.data.copy() for p in params]
    grads = _grads(rng, 5, [p.shape for p in params])
    _run(cls(params, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd), params, grads)
    for i, p in enumerate(params):
        want = _adam_literal(p0[i], [g[i] for g in grads], 0.01, 0.8, 0.99, 1e-6, wd,
                             cls is AdamW)
        np.testing.assert_allclose(p.data, want, **TOL)


def _torch_compare(make_ours, make_theirs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    params = _params(rng)
    tparams = [torch.nn.Parameter(torch.tensor(p.data)) for p in params]
    grads = _grads(rng, 4, [p.shape for p in params])
    ours, theirs = make_ours(params), make_theirs(tparams)
    for gs in grads:
        for p, tp, g in zip(params, tparams, gs):
            p.grad = g.copy()
            tp.grad = torch.tensor(g)
        ours.step()
        theirs.step()
    # both float32; PyTorch may fuse multiply-adds: a few ulp after 4 steps
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_sgd_matches_torch():
    torch = pytest.importorskip("torch")
    _torch_compare(lambda ps: SGD(ps, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
                   lambda ps: torch.optim.SGD(ps, 0.05, momentum=0.9, nesterov=True,
                                              weight_decay=1e-2))


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    _torch_compare(lambda ps: Adam(ps, 1e-2, weight_decay=1e-2),
                   lambda ps: torch.optim.Adam(ps, 1e-2, weight_decay=1e-2))
    _torch_compare(lambda ps: AdamW(ps, 1e-2, weight_decay=0.1),
                   lambda ps: torch.optim.AdamW(ps, 1e-2, weight_decay=0.1))


def _model():
    nn.init.manual_seed(5)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4),
                         nn.BinaryConv2d(4, 4), nn.PReLU(4))


def test_param_groups_split_and_clip():
    m = _model()
    groups = param_groups(m, 0.1, clip_latent=(-1.0, 1.0))
    by = {tuple(g["names"]): g for g in groups}
    assert by[("0.weight",)]["weight_decay"] == 0.1
    assert by[("0.bias", "1.weight", "1.bias", "3.weight")]["weight_decay"] == 0.0
    latent = by[("2.weight",)]
    assert latent["clip"] == (-1.0, 1.0) and latent["weight_decay"] == 0.1
    for p in m.parameters():
        p.grad = np.full(p.shape, -100.0, np.float32)
    SGD(groups, lr=1.0).step()
    assert m[2].weight.data.max() == 1.0
    assert m[0].weight.data.max() > 50


@pytest.mark.parametrize("make", [lambda g: SGD(g, 0.1, momentum=0.9, nesterov=True),
                                  lambda g: Adam(g, 1e-2), lambda g: AdamW(g, 1e-2)])
def test_state_dict_resumes_bit_identically(make):
    rng = np.random.default_rng(3)
    a, b = _model(), _model()
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in a.parameters()]
             for _ in range(6)]
    opt_a = make(param_groups(a, 1e-3))
    _run(opt_a, a.parameters(), grads)
    opt_b = make(param_groups(b, 1e-3))
    _run(opt_b, b.parameters(), grads[:3])
    sd = opt_b.state_dict()
    json.dumps(sd["hparams"])
    assert all(isinstance(v, np.ndarray) for v in sd["state"].values())
    opt_c = make(param_groups(b, 1e-3))
    opt_c.lr = 123.0
    opt_c.load_state_dict(sd)
    assert opt_c.lr == opt_b.lr
    _run(opt_c, b.parameters(), grads[3:])
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)


def test_bad_input():
    m = _model()
    with pytest.raises(ValueError, match="nesterov"):
        SGD(m.parameters(), 0.1, nesterov=True)
    with pytest.raises(ValueError, match="twice"):
        SGD([{"params": [m[0].weight], "names": ["a"]},
             {"params": [m[0].bias], "names": ["a"]}], 0.1)
    sd = SGD(m.parameters(), 0.1).state_dict()
    with pytest.raises(ValueError, match="not Adam"):
        Adam(m.parameters()).load_state_dict(sd)


def test_small_binary_net_learns_a_separable_task():
    # end to end: layers + loss + Adam with latent clipping must fit a trivially separable task
    from refbnn.training import cross_entropy
    nn.init.manual_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 128)
    x = rng.standard_normal((128, 1, 8, 8)).astype(np.float32) * 0.5
    x[y == 1, :, :4] += 1.5  # class 1: bright top half
    x[y == 0, :, 4:] += 1.5  # class 0: bright bottom half
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                          nn.Residual(nn.Sequential(nn.BinaryConv2d(8, 8), nn.BatchNorm2d(8))),
                          nn.GlobalAvgPool2d(), nn.Linear(8, 2))
    # global pooling hides "where": the first conv must learn a vertical-gradient detector
    opt = Adam(param_groups(model, 0.0, clip_latent=(-1.0, 1.0)), lr=0.02)
    losses = []
    for _ in range(80):
        logits = model.forward(x)
        loss, d = cross_entropy(logits, y)
        losses.append(loss)
        model.zero_grad()
        model.backward(d)
        opt.step()
    model.eval()
    acc = (model.forward(x).argmax(1) == y).mean()
    assert losses[-1] < 0.5 * losses[0] and acc > 0.9, (losses[0], losses[-1], acc)
    assert np.abs(model[2].body[0].weight.data).max() <= 1.0
