"""Foreign PyTorch checkpoints -> refbnn state dicts: the official Bi-Real Net layout and plain
state dicts of refbnn's PyTorch twin.

Reading a ``.pth``/``.pt`` file needs PyTorch and always uses ``torch.load(..., weights_only=True)``:
only tensors, containers and plain numbers are unpickled, nothing in the file runs. The mapping itself
is NumPy only.

The official Bi-Real Net code (github liuzechun/Bi-Real-net, ``pytorch_implementation/BiReal18_34``)
saves ``{"epoch", "state_dict", "best_top1_acc", "optimizer"}`` from ``nn.DataParallel``, so every
key starts with ``module.``; its binary convs keep their latent weights flat as
``layerS.B.binary_conv.weights`` of shape ``(O*I*3*3, 1)``; every other name is refbnn's own
(``conv1``, ``bn1``, ``layerS.B.bn1``, ``layerS.0.downsample.{1,2}``, ``fc``). Its network: a 7x7/2
stem conv, BatchNorm and 3x3/2 max-pool at any input size, Bi-Real blocks with ``torch.sign``
(sign(0) = 0), the per-channel scale ``mean |W|``, and a 2x2/2 average pool (no ceil mode) before
each 1x1 downsampling conv. refbnn's pool uses ceil mode over in-bounds pixels, which equals the
official pool wherever the official network runs at all (even sizes; odd ones break its residual add).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

OFFICIAL_MODELS = ("birealnet18", "birealnet34")
BLOCKS = {"birealnet18": [4, 4, 4, 4], "birealnet34": [6, 8, 12, 6]}


class ConversionError(ValueError):
    """A checkpoint that does not fit the requested network; the message is one line."""


def read_torch_file(path) -> tuple[OrderedDict, dict]:
    """``(state, meta)`` from a PyTorch file: ``state`` name -> NumPy array (float tensors as float32,
    integer ones as int64) of the file's ``state_dict`` (or of the file itself when it is a plain
    state dict); ``meta`` the other top-level entries that are plain numbers or strings (e.g.
    ``epoch``, ``best_top1_acc``). Raises ``ConversionError`` (one line) for files that are not such
    a checkpoint, ``ImportError`` without PyTorch."""
    import torch

    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block torch.load forever
        raise ConversionError(f"{path}: not a regular file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as e:  # pickle, zip and torch errors alike
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"{path}: not a readable PyTorch weights-only checkpoint ({first})") \
            from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        meta = {k: _plain(v) for k, v in obj.items() if k != "state_dict" and _plain(v) is not None}
        obj = obj["state_dict"]
    else:
        meta = {}
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{path}: holds no state dict (a mapping of names to tensors)")
    state = OrderedDict()
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} of its state dict is not a tensor")
        t = value.detach().cpu()
        if t.is_floating_point():
            state[key] = t.to(torch.float32).numpy().copy()
        elif t.dtype == torch.bool or t.is_complex():
            raise ConversionError(f"{path}: tensor {key} has dtype {t.dtype}")
        else:
            state[key] = t.to(torch.int64).numpy().copy()
    return state, meta


def _plain(v):
    if isinstance(v, bool | int | float | str):
        return v
    if hasattr(v, "numel") and v.numel() == 1:  # a 0-d tensor such as best_top1_acc
        return v.item()
    return None


def strip_prefix(state: Mapping, prefix: str = "module.") -> OrderedDict:
    """``state`` with ``prefix`` removed from every key that has it (``nn.DataParallel``)."""
    return OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v) for k, v in state.items())


def official_config(model: str, state: Mapping, input_shape=(3, 224, 224), sign_at_zero: int = 0
                    ) -> dict:
    """The refbnn config of the official ``model`` (``birealnet18``/``birealnet34``) whose tensors
    are ``state`` (prefixes stripped): the official 7x7/2 stem and max-pool set explicitly (not the
    small-input default), widths, classes and input channels read from the tensors, ``blocks`` from
    the model name, ``sign_at_zero`` as given (0: ``torch.sign``, as the official code)."""
    from refbnn.models import get_config

    if model not in OFFICIAL_MODELS:
        raise ConversionError(f"unknown official model {model!r}; known: {', '.join(OFFICIAL_MODELS)}")
    need = ["conv1.weight", "fc.weight"] + [f"layer{s}.0.bn1.weight" for s in range(1, 5)]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"the checkpoint lacks {missing[0]} (not the official {model} layout)")
    stem = np.shape(state["conv1.weight"])
    if len(stem) != 4:
        raise ConversionError(f"conv1.weight: shape {stem} in the checkpoint, the official {model} "
                              "needs (C_out, C_in, 7, 7)")
    if int(input_shape[0]) != stem[1]:
        raise ConversionError(f"conv1.weight: shape {stem} takes {stem[1]} input channels, "
                              f"--input-shape gives {input_shape[0]}")
    widths = [int(np.shape(state[f"layer{s}.0.bn1.weight"])[0]) for s in range(1, 5)]
    try:
        return get_config(model, input_shape=[int(v) for v in input_shape],
                          num_classes=int(np.shape(state["fc.weight"])[0]), stem_channels=int(stem[0]),
                          widths=widths, stem_kernel=7, stem_stride=2, stem_pool=True,
                          sign_at_zero=int(sign_at_zero))
    except ValueError as e:
        raise ConversionError(f"the checkpoint's tensors give no valid {model}: {e}") from None


def map_state(state: Mapping, config: dict, what: str = "the checkpoint") -> OrderedDict:
    """``state`` (prefixes stripped; official or twin names) -> refbnn state dict for ``config``.

    ``*.binary_conv.weights`` (official, flat) becomes ``*.binary_conv.weight`` reshaped to the
    layer's ``(O, I, KH, KW)``; every tensor must have refbnn's shape, or the same number of values
    for a flat official binary weight. Missing BatchNorm ``num_batches_tracked`` counters (older
    PyTorch) become 0. Raises ``ConversionError`` naming the first unexpected, missing or misshapen
    tensor with both shapes."""
    from refbnn.models import BNNResNet

    expected = BNNResNet(config).state_dict()
    out = OrderedDict()
    for key, value in state.items():
        name, flat = key, False
        if key.endswith(".binary_conv.weights"):
            name, flat = key[: -len("weights")] + "weight", True
        if name not in expected:
            raise ConversionError(f"unexpected tensor {key} in {what} (no such tensor in refbnn's "
                                  f"{config['name']})")
        want = expected[name]
        arr = np.asarray(value)
        if arr.shape != want.shape and not (flat and arr.size == want.size and arr.ndim <= 2):
            raise ConversionError(f"{key}: shape {tuple(arr.shape)} in {what}, refbnn's "
                                  f"{config['name']} needs {tuple(want.shape)}"
                                  + (f" ({want.size} values)" if flat else ""))
        out[name] = arr.reshape(want.shape).astype(want.dtype)
    for name, want in expected.items():
        if name not in out:
            if name.endswith("num_batches_tracked"):
                out[name] = np.zeros_like(want)
            else:
                raise ConversionError(f"{what} lacks {name} (refbnn's {config['name']} needs "
                                      f"{tuple(want.shape)})")
    return OrderedDict((k, out[k]) for k in expected)


def exact_zero_weights(state: Mapping, config: dict) -> int:
    """How many latent binary weights in the refbnn ``state`` for ``config`` are exactly 0 (+0.0 or
    -0.0): ``torch.sign`` maps them to 0, refbnn's sign_at_zero +1 / -1 to +1 / -1."""
    from refbnn.models import BNNResNet

    model = BNNResNet(config)
    return sum(int((np.asarray(state[n]) == 0).sum()) for n in model.binary_weights())
