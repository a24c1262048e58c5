"""Argument checks of the public binary ops: one-line ``ValueError`` naming the problem.

Also resolves the user-facing padding spec to explicit ``(top, bottom, left, right)`` counts.
"""

from __future__ import annotations

import numpy as np

from ..kernels.elementwise import FPRELU, NONE, PRELU, RELU

_NATIVE_PACK_DTYPES = (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64)


def as_packable(x, what="input") -> np.ndarray:
    """``x`` as a C-contiguous array of a dtype the pack kernels read (NaN: the kernels count)."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        x = x.astype(np.float32)  # exact: every float16 (incl. -0.0) is a float32 of equal sign
    elif x.dtype.type not in _NATIVE_PACK_DTYPES:
        raise ValueError(f"{what} must be float16/32/64 or int8/16/32/64, got dtype {x.dtype}")
    return np.ascontiguousarray(x)


def check_groups(groups, channels: int, what: str) -> int:
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if channels % groups:
        raise ValueError(f"groups={groups} does not divide the {channels} {what}")
    return int(groups)


def check_pair(v, name: str, minimum: int = 1) -> tuple[int, int]:
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, (tuple, list)) \
        else None
    if t is None or len(t) != 2 or not all(isinstance(a, (int, np.integer)) and a >= minimum
                                           for a in t):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return int(t[0]), int(t[1])


def resolve_padding(padding, in_hw, kernel_hw, stride=1, dilation=1) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` for a padding spec (the same rules as the reference).

    ``"valid"``: none. ``"same"``: output ``ceil(in / stride)``, total padding
    ``max((out-1)*stride + (k-1)*dilation + 1 - in, 0)``, the odd row/column at the bottom/right
    (TensorFlow). ``int p``: ``p`` everywhere. ``(ph, pw)``: per axis. ``(t, b, l, r)``: as given.
    """
    stride, dilation = check_pair(stride, "stride"), check_pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'valid', 'same', an int or a tuple, got {padding!r}")
        pads = []
        for n, k, s, d in zip(in_hw, kernel_hw, stride, dilation):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if isinstance(padding, (int, np.integer)):
        padding = (padding,) * 4
    padding = tuple(padding) if isinstance(padding, (tuple, list)) else None
    if padding is None or len(padding) not in (2, 4) or not all(
            isinstance(p, (int, np.integer)) and p >= 0 for p in padding):
        raise ValueError("padding must be 'valid', 'same', an int >= 0, (ph, pw) or "
                         f"(top, bottom, left, right), got {padding!r}")
    if len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    return tuple(int(p) for p in padding)


def check_affine(multiplier, bias, channels):
    """``multiplier``, ``bias`` as C-contiguous float32 ``(channels,)`` (any count for ``None``),
    both finite."""
    if multiplier is None or bias is None:
        raise ValueError("this output needs both multiplier and bias (float32 per channel)")
    m = np.ascontiguousarray(multiplier, dtype=np.float32).reshape(-1)
    b = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
    if m.shape != b.shape or (channels is not None and m.shape[0] != channels):
        raise ValueError(f"multiplier and bias need one value per output channel "
                         f"({channels}), got shapes {np.shape(multiplier)} and {np.shape(bias)}")
    if not (np.isfinite(m).all() and np.isfinite(b).all()):
        raise ValueError("multiplier and bias must be finite")
    return m, b


def check_tail_bits(words, n: int, what: str) -> None:
    """Raise if a packed array has bits set above value ``n`` in its last word."""
    if n % 64 and words.size and (words[..., -1] >> np.uint64(n % 64)).any():
        raise ValueError(f"{what} has bits set above its {n} values in the last word")


def check_k(k) -> int:
    """``k`` (a layer's ``KH * KW * Cg``) as an int in ``[0, 2**24)``: every acc is an exact float32."""
    k = int(k)
    if not 0 <= k < 2 ** 24:
        raise ValueError(f"k must be in [0, 2**24) so every acc is an exact float32, got {k}")
    return k


def check_activation(spec, channels: int, what: str):
    """A non-linearity spec as ``(code, pos, neg)`` for the kernels (codes and formulas:
    :mod:`refbnn.kernels.elementwise`): ``None`` (none), ``"relu"``, ``("prelu", a)`` (``v`` if
    ``v > 0`` else ``a * v``) or ``("fprelu", pos, neg)`` (``pos * v`` if ``v >= 0`` else
    ``neg * v``); slopes are finite float32 scalars or one per channel."""
    def slope(v, name):
        a = np.ascontiguousarray(np.broadcast_to(np.asarray(v, np.float32), (channels,)))
        if not np.isfinite(a).all():
            raise ValueError(f"{what} {name} slopes must be finite")
        return a

    if spec is None or spec == "none":
        return NONE, None, None
    if spec == "relu":
        return RELU, None, None
    t = tuple(spec) if isinstance(spec, (tuple, list)) else ()
    try:
        if len(t) == 2 and t[0] == "prelu":
            return PRELU, None, slope(t[1], "prelu")
        if len(t) == 3 and t[0] == "fprelu":
            return FPRELU, slope(t[1], "fprelu pos"), slope(t[2], "fprelu neg")
    except (TypeError, ValueError) as e:
        if "finite" in str(e):
            raise
        raise ValueError(f"{what}: slopes must be a float or one per channel ({channels}), "
                         f"got {spec!r}") from None
    raise ValueError(f"{what} must be None, 'relu', ('prelu', a) or ('fprelu', pos, neg), "
                     f"got {spec!r}")
