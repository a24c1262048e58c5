"""``torch.optim`` optimizers for the PyTorch twin laid out like refbnn's, and their state moved to
and from refbnn's checkpoint naming (needs the ``torch`` extra).

refbnn's optimizers (:mod:`refbnn.training.optim`) follow PyTorch's update rules and name their
state ``"<parameter name>.<slot>"`` with PyTorch's slot names (``step``, ``exp_avg``,
``exp_avg_sq``; ``momentum_buffer``), grouped by :func:`refbnn.training.optim.param_groups`. The
twin has refbnn's parameter names, so :func:`torch_optimizer` builds the ``torch.optim`` optimizer
with exactly the groups (names, order, hyper-parameters, latent-weight clipping) that
:func:`refbnn.training.trainer.make_optimizer` gives the refbnn model of the same config, and a
checkpoint written by either trainer carries the same optimizer state. The only conversion is
Adam's ``step``: a float32 tensor in torch, an int64 scalar in refbnn (exact below 2**24 steps).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

TORCH_OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}
HPARAM_KEYS = {"Adam": ("lr", "betas", "eps", "weight_decay"),
               "AdamW": ("lr", "betas", "eps", "weight_decay"),
               "SGD": ("lr", "momentum", "nesterov", "weight_decay")}


def refbnn_layout(hparams: dict, binary_names, decay_binary: bool = True) -> dict:
    """The optimizer layout for the twin: refbnn's optimizer ``hparams``
    (:meth:`refbnn.training.optim.Optimizer.state_dict`'s, of the optimizer
    :func:`refbnn.training.trainer.make_optimizer` builds for the refbnn model and recipe):
    ``{"type": "Adam"|"AdamW"|"SGD", "groups": [{"names": [...], "lr": ..., ..., ["clip": [lo, hi]]}]}``.

    ``decay_binary=False`` (the Bi-Real recipe) takes the latent binary weights (``binary_names``)
    out of weight decay: a clipped latent group gets ``weight_decay`` 0; without one, decayed binary
    weights move into a group of their own (``weight_decay`` 0) appended last, a layout
    ``refbnn.train`` does not build itself.
    """
    hp = copy.deepcopy(hparams)
    if decay_binary:
        return hp
    binary = set(binary_names)
    latent = [g for g in hp["groups"] if g.get("clip") is not None]
    if latent:
        for g in latent:
            g["weight_decay"] = 0.0
        return hp
    for g in list(hp["groups"]):
        moved = [n for n in g["names"] if n in binary]
        if moved and g["weight_decay"]:
            g["names"] = [n for n in g["names"] if n not in binary]
            hp["groups"].append({**copy.deepcopy(g), "names": moved, "weight_decay": 0.0})
    hp["groups"] = [g for g in hp["groups"] if g["names"]]
    return hp


def torch_optimizer(model, layout: dict) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer of ``layout`` (:func:`refbnn_layout`) over ``model``'s
    parameters, looked up by name (a ``DistributedDataParallel`` wrapper's ``module.`` is fine)."""
    params = dict(_unwrap(model).named_parameters())
    kind = layout["type"]
    if kind not in TORCH_OPTIMIZERS:
        raise ValueError(f"no torch optimizer for {kind!r}")
    groups = []
    for g in layout["groups"]:
        missing = [n for n in g["names"] if n not in params]
        if missing:
            raise ValueError(f"the model has no parameter {missing[0]!r}")
        entry = {"params": [params[n] for n in g["names"]]}
        for k in HPARAM_KEYS[kind]:
            entry[k] = tuple(g[k]) if k == "betas" else g[k]
        groups.append(entry)
    listed = sum(len(g["names"]) for g in layout["groups"])
    if listed != len(params):
        raise ValueError(f"the optimizer layout names {listed} of the model's {len(params)} parameters")
    return TORCH_OPTIMIZERS[kind](groups)


def clip_latent(optimizer: torch.optim.Optimizer, layout: dict) -> None:
    """Clamp every parameter of a group with ``"clip": [lo, hi]`` into ``[lo, hi]`` (after a step)."""
    with torch.no_grad():
        for tg, g in zip(optimizer.param_groups, layout["groups"]):
            clip = g.get("clip")
            if clip is not None:
                for p in tg["params"]:
                    p.clamp_(clip[0], clip[1])


def state_to_refbnn(optimizer: torch.optim.Optimizer, layout: dict) -> tuple[dict, dict]:
    """``(state, hparams)`` in refbnn's checkpoint naming: ``state["<name>.<slot>"]`` NumPy arrays
    (``step`` int64, the rest float32), ``hparams`` = ``layout`` with each group's
    current ``lr``."""
    hp = copy.deepcopy(layout)
    state = {}
    for tg, g in zip(optimizer.param_groups, hp["groups"]):
        g["lr"] = float(tg["lr"])
        for name, p in zip(g["names"], tg["params"]):
            for slot, v in optimizer.state.get(p, {}).items():
                if slot == "step":
                    state[f"{name}.step"] = np.array(int(v), dtype=np.int64)
                else:
                    state[f"{name}.{slot}"] = v.detach().to(torch.float32).cpu().numpy().copy()
    return state, hp


def state_from_refbnn(optimizer: torch.optim.Optimizer, layout: dict, state: dict,
                      hparams: dict) -> None:
    """Load refbnn-named optimizer ``state`` / ``hparams`` (a checkpoint's) into ``optimizer``,
    built by :func:`torch_optimizer` from ``layout``. Raises ``ValueError`` when the groups, types
    or slots do not match."""
    if hparams.get("type") != layout["type"]:
        raise ValueError(f"optimizer state is for {hparams.get('type')}, not {layout['type']}")
    if [g["names"] for g in hparams["groups"]] != [g["names"] for g in layout["groups"]]:
        raise ValueError("optimizer state does not match these parameter groups (names differ)")
    by_name = {}
    for tg, g, saved in zip(optimizer.param_groups, layout["groups"], hparams["groups"]):
        for k in HPARAM_KEYS[layout["type"]]:
            tg[k] = tuple(saved[k]) if k == "betas" else saved[k]
        by_name.update(zip(g["names"], tg["params"]))
    slots = {"Adam": ("step", "exp_avg", "exp_avg_sq"), "AdamW": ("step", "exp_avg", "exp_avg_sq"),
             "SGD": ("momentum_buffer",)}[layout["type"]]
    optimizer.state.clear()
    for key, v in state.items():
        name, _, slot = key.rpartition(".")
        if name not in by_name or slot not in slots:
            raise ValueError(f"unexpected optimizer state entry {key!r}")
        p = by_name[name]
        if slot == "step":
            t = torch.tensor(float(np.asarray(v)), dtype=torch.float32)
        else:
            t = torch.from_numpy(np.array(v, dtype=np.float32, copy=True)).to(p.device, p.dtype)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"optimizer state {key!r} has shape {tuple(t.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
        optimizer.state[p][slot] = t


def _unwrap(model):
    return getattr(model, "module", model)
