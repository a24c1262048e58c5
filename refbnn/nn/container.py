"""Structural layers: ``Sequential``, ``Residual``, ``Identity``, ``Flatten``, ``ChannelRepeat``."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from refbnn.nn._checks import check_grad, check_input, positive_int
from refbnn.nn._elementwise_kernels import add
from refbnn.nn.module import Module


class Identity(Module):
    """``y = x``; gradient passes unchanged."""

    def forward(self, x):
        return x

    def backward(self, grad_out):
        return grad_out


class Flatten(Module):
    """(N, ...) -> (N, prod(...)), C-order (PyTorch ``nn.Flatten()``)."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x):
        x = np.asarray(x)
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out):
        return grad_out.reshape(check_grad(self._shape, "Flatten"))


class ChannelRepeat(Module):
    """Parameter-free channel duplication: ``y = concat([x] * times, axis=1)``, so
    ``y[:, k*C + c] = x[:, c]``; the backward pass sums the ``times`` copies' gradients."""

    def __init__(self, times):
        super().__init__()
        self.times = positive_int(times, "times")

    def forward(self, x):
        x = check_input(x, (2, 3, 4), "ChannelRepeat")
        reps = (1, self.times) + (1,) * (x.ndim - 2)
        return np.tile(x, reps)

    def backward(self, grad_out):
        n, c = grad_out.shape[:2]
        g = grad_out.reshape((n, self.times, c // self.times) + grad_out.shape[2:])
        return g.sum(axis=1)

    def extra_repr(self):
        return f"times={self.times}"


class Sequential(Module):
    """Children named ``"0"``, ``"1"``, ... (or the keys of one ``OrderedDict`` argument), run in
    order; ``backward`` runs them in reverse."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (OrderedDict, dict)):
            items = list(modules[0].items())
        else:
            items = [(str(i), m) for i, m in enumerate(modules)]
        for name, m in items:
            if not isinstance(m, Module):
                raise ValueError(f"Sequential: child {name!r} is not a Module ({type(m).__name__})")
            self.add_module(name, m)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for m in self._modules.values():
            x = m.forward(x)
        return x

    def backward(self, grad_out):
        for m in reversed(self._modules.values()):
            grad_out = m.backward(grad_out)
        return grad_out


class Residual(Module):
    """``y = body(x) + (shortcut(x) if shortcut is not None else x)``; children ``body`` and
    ``shortcut``. Backward: ``dx = body.backward(dy) + shortcut.backward(dy)`` (or ``+ dy``)."""

    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body = body
        if shortcut is not None:
            self.shortcut = shortcut
        else:
            object.__setattr__(self, "shortcut", None)

    def forward(self, x):
        y = self.body.forward(x)
        s = self.shortcut.forward(x) if self.shortcut is not None else x
        if y.shape != s.shape:
            raise ValueError(f"Residual: body output {y.shape} and shortcut {s.shape} differ")
        return add(y, s)

    def backward(self, grad_out):
        dx = self.body.backward(grad_out)
        ds = self.shortcut.backward(grad_out) if self.shortcut is not None else grad_out
        return add(dx, ds)
