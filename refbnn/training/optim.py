"""Optimizers with PyTorch's exact update rules (float32, in place): ``SGD``, ``Adam``, ``AdamW``.

Parameters come in groups (dicts with ``"params"``, ``"names"`` and per-group hyper-parameters,
e.g. from :func:`param_groups`); a plain list of Parameters is one group. A group may carry
``"clip": (lo, hi)``: its parameters are clipped to [lo, hi] after every step (latent binary
weights). Parameters whose ``grad`` is None are skipped, as in PyTorch.

``state_dict()`` returns ``{"state": {"<name>.<slot>": ndarray}, "hparams": JSON-able dict}`` so a
checkpoint can store it and :meth:`Optimizer.load_state_dict` can resume bit-identically.
"""

from __future__ import annotations

import math

import numpy as np

from refbnn.nn.binary import BinaryConv2d, BinaryLinear
from refbnn.nn.module import Parameter
from refbnn.training import _optim_kernels as _ok

_f32 = np.float32


def param_groups(model, weight_decay: float = 0.0, clip_latent=None) -> list[dict]:
    """Split ``model``'s parameters by name into a decayed group (``Parameter.decay`` True, with
    ``weight_decay``) and a group without decay. With ``clip_latent=(lo, hi)`` the latent weights
    of binary layers form a third group (decay as their flag says) clipped after each step."""
    latent = set()
    if clip_latent is not None:
        latent = {id(m.weight) for _, m in model.named_modules()
                  if isinstance(m, (BinaryConv2d, BinaryLinear))}
    groups = {"decay": ([], []), "no_decay": ([], []), "latent": ([], [])}
    for name, p in model.named_parameters():
        key = "latent" if id(p) in latent else ("decay" if p.decay else "no_decay")
        groups[key][0].append(name)
        groups[key][1].append(p)
    out = []
    for key, (names, params) in groups.items():
        if not params:
            continue
        g = {"names": names, "params": params,
             "weight_decay": float(weight_decay) if key == "decay" else 0.0}
        if key == "latent":
            g["weight_decay"] = float(weight_decay) if params[0].decay else 0.0
            g["clip"] = (float(clip_latent[0]), float(clip_latent[1]))
        out.append(g)
    return out


class Optimizer:
    """Base class: group handling, learning-rate access, clipping, state (de)serialisation."""

    _slots: tuple = ()

    def __init__(self, params, defaults: dict):
        params = list(params)
        if params and isinstance(params[0], Parameter):
            params = [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups = []
        seen = set()
        for gi, g in enumerate(params):
            if not isinstance(g, dict) or "params" not in g:
                raise ValueError("param_groups must be Parameters or dicts with a 'params' list")
            g = dict(g)
            g["params"] = list(g["params"])
            g.setdefault("names", [f"group{gi}.{j}" for j in range(len(g["params"]))])
            if len(g["names"]) != len(g["params"]):
                raise ValueError(f"group {gi}: {len(g['names'])} names for "
                                 f"{len(g['params'])} parameters")
            for k, v in self.defaults.items():
                g.setdefault(k, v)
            for name in g["names"]:
                if name in seen:
                    raise ValueError(f"parameter name {name!r} appears twice")
                seen.add(name)
            self.param_groups.append(g)
        self.state: dict[str, dict] = {}

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for g in self.param_groups:
            g["lr"] = float(value)

    def zero_grad(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def step(self) -> None:
        for g in self.param_groups:
            clip = g.get("clip")
            for name, p in zip(g["names"], g["params"]):
                clipped = False
                if p.grad is not None:
                    clipped = self._update(p, p.grad.astype(p.data.dtype, copy=False),
                                           self.state.setdefault(name, {}), g)
                if clip is not None and not clipped:
                    np.clip(p.data, clip[0], clip[1], out=p.data)

    def _update(self, p, grad, state, group) -> bool:
        """Update ``p.data`` in place; True when it also applied the group's ``"clip"``."""
        raise NotImplementedError

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        arrays = {}
        for name, st in self.state.items():
            for slot, v in st.items():
                arrays[f"{name}.{slot}"] = np.array(v, copy=True)
        groups = [{k: (list(v) if k in ("names", "clip") else v) for k, v in g.items()
                   if k != "params"} for g in self.param_groups]
        return {"state": arrays, "hparams": {"type": type(self).__name__, "groups": groups}}

    def load_state_dict(self, sd: dict) -> None:
        hp = sd["hparams"]
        if hp.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {hp.get('type')}, not {type(self).__name__}")
        if [g["names"] for g in hp["groups"]] != [g["names"] for g in self.param_groups]:
            raise ValueError("optimizer state does not match these parameter groups (names differ)")
        for g, saved in zip(self.param_groups, hp["groups"]):
            for k, v in saved.items():
                if k not in ("names", "params"):
                    g[k] = tuple(v) if k == "clip" and v is not None else v
        names = {n for g in self.param_groups for n in g["names"]}
        state: dict[str, dict] = {}
        for key, v in sd["state"].items():
            name, _, slot = key.rpartition(".")
            if name not in names or slot not in self._slots:
                raise ValueError(f"unexpected optimizer state entry {key!r}")
            state.setdefault(name, {})[slot] = np.array(v, copy=True)
        self.state = state


class SGD(Optimizer):
    """``torch.optim.SGD`` (dampening 0): ``g = grad + wd * p``; with momentum ``buf = g`` on the
    first step, then ``buf = momentum * buf + g``; ``g = g + momentum * buf`` (nesterov) or
    ``g = buf``; ``p -= lr * g``. All in float32."""

    _slots = ("momentum_buffer",)

    def __init__(self, param_groups, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum requires momentum > 0")
        super().__init__(param_groups, {"lr": float(lr), "momentum": float(momentum),
                                        "nesterov": bool(nesterov),
                                        "weight_decay": float(weight_decay)})

    def _update(self, p, grad, state, g):
        wd, mom = g["weight_decay"], g["momentum"]
        d = grad + _f32(wd) * p.data if wd else grad
        if mom:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(d, dtype=p.data.dtype, copy=True)
            else:
                buf *= _f32(mom)
                buf += d
            d = d + _f32(mom) * buf if g["nesterov"] else buf
        p.data -= _f32(g["lr"]) * d
        return False


class Adam(Optimizer):
    """``torch.optim.Adam`` (amsgrad off, L2 weight decay added to the gradient):
    ``g = grad + wd * p``; ``m += (1 - b1) * (g - m)``; ``v = b2 * v + (1 - b2) * g * g``;
    ``p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)``. Float32 arrays; the
    bias corrections are Python floats, as in PyTorch."""

    _slots = ("step", "exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("need lr, eps, weight_decay >= 0 and betas in [0, 1)")
        super().__init__(param_groups, {"lr": float(lr), "betas": [float(b) for b in betas],
                                        "eps": float(eps), "weight_decay": float(weight_decay)})

    def _update(self, p, grad, state, g):
        b1, b2 = g["betas"]
        lr, wd = g["lr"], g["weight_decay"]
        if "step" not in state:
            state["step"] = np.array(0, dtype=np.int64)
            state["exp_avg"] = np.zeros_like(p.data)
            state["exp_avg_sq"] = np.zeros_like(p.data)
        state["step"] = np.array(state["step"] + 1, dtype=np.int64)
        t = int(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        arrays = (p.data, grad, m, v)
        clip = g.get("clip")
        if all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
            # one Numba pass, bit-identical to the NumPy expressions below; on the calling thread
            # for a parameter of one block (waking the workers would cost more)
            kernel = _ok.adam_kernel if p.data.size > _ok.BLOCK else _ok.adam_kernel_serial
            kernel(*(a.reshape(-1) for a in arrays), _f32(1 - b1), _f32(b2), _f32(1 - b2),
                   _f32(math.sqrt(1 - b2 ** t)), _f32(g["eps"]), _f32(lr / (1 - b1 ** t)),
                   _f32(wd if wd and not self._decoupled else 0), _f32(1 - lr * wd),
                   bool(wd and self._decoupled), clip is not None,
                   *(_f32(c) for c in (clip or (0.0, 0.0))))
            return True  # the kernel clipped p (as np.clip after the update would)
        adam_update_reference(p, grad, state, g, t, self._decoupled)
        return False


def adam_update_reference(p, grad, state, g, t, decoupled):
    """NumPy form of one Adam / AdamW step (step count ``t``) on ``p``, in float32 arrays."""
    b1, b2 = g["betas"]
    lr, wd = g["lr"], g["weight_decay"]
    if wd:
        if decoupled:
            p.data *= _f32(1 - lr * wd)
        else:
            grad = grad + _f32(wd) * p.data
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m += _f32(1 - b1) * (grad - m)
    v *= _f32(b2)
    v += _f32(1 - b2) * (grad * grad)
    step_size = lr / (1 - b1 ** t)
    denom = np.sqrt(v)
    denom /= _f32(math.sqrt(1 - b2 ** t))
    denom += _f32(g["eps"])
    p.data -= _f32(step_size) * (m / denom)


class AdamW(Adam):
    """``torch.optim.AdamW``: decoupled decay ``p *= 1 - lr * wd`` before the Adam step (default
    ``weight_decay=0.01`` as PyTorch)."""

    _decoupled = True

    def __init__(self, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(param_groups, lr, betas, eps, weight_decay)
