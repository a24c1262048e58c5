"""Any importable PyTorch module as the other side of a cross-check (needs PyTorch).

``PKG.MODULE:FACTORY`` names a callable returning an ``nn.Module`` (for instance the official Bi-Real
Net ``birealnet.py``'s ``birealnet18``); :func:`load_checkpoint` fills it from a file read with
``torch.load(..., weights_only=True)`` (``{"state_dict": ...}`` unwrapped, ``module.`` prefixes dropped
when the module has none). Its leaf modules are matched to refbnn's layers by name, after an optional
renaming (:func:`rename_layer`). Every message is one line.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping


class ModuleSpecError(ValueError):
    """A factory, checkpoint or rename map that cannot be used (one-line message)."""


def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def build_module(spec: str, kwargs: Mapping | None = None):
    """Import ``PKG.MODULE:FACTORY`` and return ``FACTORY(**kwargs)``, an ``nn.Module``."""
    import torch

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModuleSpecError(f"--against torch-module takes PKG.MODULE:FACTORY, got {spec!r}")
    try:
        mod = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises on import
        raise ModuleSpecError(f"cannot import {module_name} ({type(e).__name__}: {_one_line(e)})") \
            from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModuleSpecError(f"{module_name} has no callable {attr}")
    try:
        net = factory(**dict(kwargs or {}))
    except Exception as e:
        raise ModuleSpecError(f"{spec}(): {type(e).__name__}: {_one_line(e)}") from None
    if not isinstance(net, torch.nn.Module):
        raise ModuleSpecError(f"{spec}() returned {type(net).__name__}, not a torch.nn.Module")
    return net


def load_checkpoint(net, path) -> None:
    """Load ``path`` into ``net`` (strict: every tensor present, none extra, same shapes)."""
    import torch

    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block torch.load forever
        raise ModuleSpecError(f"{path}: not a regular file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModuleSpecError(f"{path}: no such file") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModuleSpecError(f"{path}: not a readable PyTorch weights-only checkpoint ({first})") \
            from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModuleSpecError(f"{path}: holds no state dict")
    own = list(net.state_dict())
    if obj and all(k.startswith("module.") for k in obj) and not any(k.startswith("module.") for k in own):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    try:
        net.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        raise ModuleSpecError(f"{path} does not fit the module: {_one_line(e)}") from None


def read_rename(path) -> dict:
    """A JSON object ``{"other prefix": "refbnn prefix"}`` (dotted module names)."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the read forever
        raise ModuleSpecError(f"{path}: not a readable JSON rename map (not a regular file)")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ModuleSpecError(f"{path}: not a readable JSON rename map ({_one_line(e)})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise ModuleSpecError(f"{path}: a rename map is a JSON object of strings")
    return value


def rename_layer(name: str, rename: Mapping | None) -> str:
    """``name`` with its longest prefix found in ``rename`` replaced (whole dotted components)."""
    if not rename:
        return name
    best = max((k for k in rename if name == k or name.startswith(k + ".")), key=len, default=None)
    return name if best is None else rename[best] + name[len(best):]
