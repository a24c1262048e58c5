"""Public binary ops: validated wrappers around the Numba kernels in :mod:`refbnn.kernels`.

Every op equals its NumPy oracle in :mod:`refbnn.reference` exactly (tests check it). Semantics
of sign and of a packed bit are those of :mod:`refbnn.bits`: ``sign(x) = +1`` for ``x >= 0``
(``sign_at_zero=+1``; ``-0.0`` included) or for ``x > 0`` (``sign_at_zero=-1``); bit 1 = -1; value
``c`` goes to word ``c // W`` bit ``c % W``; unused high bits are 0. NaN raises ``ValueError``.
"""

from __future__ import annotations

import numpy as np

from . import bits
from .bits import sign
from .kernels.packing import pack_rows_into, unpack_rows

__all__ = ["pack_bits", "pack_groups", "sign", "unpack_bits"]

_NATIVE_PACK_DTYPES = (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64)


def _as_packable(x, what="input") -> np.ndarray:
    """``x`` as a C-contiguous array of a dtype the pack kernel reads directly; NaN rejected."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        x = x.astype(np.float32)  # exact: every float16 (incl. -0.0) is a float32 of equal sign
    elif x.dtype.type not in _NATIVE_PACK_DTYPES:
        raise ValueError(f"{what} must be float16/32/64 or int8/16/32/64, got dtype {x.dtype}")
    bits.check_no_nan(x, what)
    return np.ascontiguousarray(x)


def _pack_last_axis(x: np.ndarray, groups: int, sign_at_zero: int, out=None) -> np.ndarray:
    """Pack ``x`` (validated, contiguous) along its last axis in ``groups`` groups into ``out``.

    ``out``: ``None`` (allocate) or a ``uint64`` view shaped ``x.shape[:-1] + (groups * Wg,)``.
    """
    c = x.shape[-1]
    lead = x.shape[:-1]
    wg = bits.words_for(c // groups, 64)
    if out is None:
        out = np.empty(lead + (groups * wg,), np.uint64)
    rows = int(np.prod(lead, dtype=np.int64))
    out4 = out.reshape((1, 1, rows, groups * wg)) if out.ndim != 4 else out
    if rows and c:
        pack_rows_into(x.reshape(-1), rows, c, groups, out4, sign_at_zero == -1)
    elif c == 0:
        out[...] = 0
    return out


def pack_bits(x, axis: int = -1, word_bits: int = 64, sign_at_zero: int = 1) -> np.ndarray:
    """Binarize ``x`` with :func:`sign` and pack ``axis`` into words.

    ``x``: float16/32/64 or int8/16/32/64, any shape. The result has ``x``'s shape with ``axis``
    (of length ``C``) replaced by ``ceil(C / word_bits)`` words, the words along that same axis.
    ``word_bits=64``: ``uint64`` words (refbnn's layout). ``word_bits=32``: LCE's ``int32`` words,
    byte for byte what ``LceQuantize`` writes (value ``c`` in word ``c // 32``, bit ``c % 32``).
    """
    bits.check_word_bits(word_bits)
    saz = bits.check_sign_at_zero(sign_at_zero)
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("pack_bits needs at least a 1-D array")
    axis = _check_axis(axis, x.ndim)
    x = _as_packable(np.moveaxis(x, axis, -1))
    packed = _pack_last_axis(x, 1, saz)
    if word_bits == 32:
        packed = bits.words64_to_words32(packed, x.shape[-1])
    return np.moveaxis(packed, -1, axis)


def unpack_bits(packed, n: int, axis: int = -1, word_bits: int = 64, dtype=np.int8) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` values ``+-1`` per word run along ``axis``.

    ``packed``: ``uint64`` words (``word_bits=64``) or ``int32``/``uint32`` words (``word_bits=32``),
    ``ceil(n / word_bits)`` of them along ``axis``. ``dtype``: ``int8`` or ``float32``. Bits above
    ``n`` are ignored.
    """
    bits.check_word_bits(word_bits)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.int8), np.dtype(np.float32)):
        raise ValueError(f"unpack_bits dtype must be int8 or float32, got {dtype}")
    packed = np.asarray(packed)
    if packed.ndim == 0:
        raise ValueError("unpack_bits needs at least a 1-D array of words")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    n = int(n)
    axis = _check_axis(axis, packed.ndim)
    words = np.moveaxis(packed, axis, -1)
    if word_bits == 32:
        words = bits.words32_to_words64(words, n)
    elif words.dtype != np.uint64:
        raise ValueError(f"word_bits=64 needs uint64 words, got {words.dtype}")
    nwords = bits.words_for(n, 64)
    if words.shape[-1] != nwords:
        raise ValueError(f"{n} values need {nwords} uint64 words along axis, got {words.shape[-1]}")
    words = np.ascontiguousarray(words)
    lead = words.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    out = np.empty((rows, n), dtype)
    if rows and n:
        unpack_rows(words.reshape(-1), rows, nwords, n, out)
    return np.moveaxis(out.reshape(lead + (n,)), -1, axis)


def pack_groups(x_nhwc, groups: int, sign_at_zero: int = 1) -> np.ndarray:
    """Group-aware packing for grouped binary convolutions.

    ``x_nhwc``: ``(N, H, W, C)`` real, ``C`` divisible by ``groups``; ``Cg = C / groups`` may be any
    size (LCE needs a multiple of 32). Returns ``uint64`` ``(N, H, W, groups, ceil(Cg / 64))``: group
    ``g``'s channel ``c`` is bit ``c % 64`` of word ``[..., g, c // 64]``. For ``Cg % 64 == 0`` the
    words equal plain :func:`pack_bits` (reshaped).
    """
    saz = bits.check_sign_at_zero(sign_at_zero)
    x = np.asarray(x_nhwc)
    if x.ndim != 4:
        raise ValueError(f"pack_groups expects NHWC (4-D) input, got shape {x.shape}")
    groups = _check_groups(groups, x.shape[3], "input channels")
    x = _as_packable(x)
    wg = bits.words_for(x.shape[3] // groups, 64)
    out = np.empty(x.shape[:3] + (groups * wg,), np.uint64)
    _pack_last_axis(x, groups, saz, out)
    return out.reshape(x.shape[:3] + (groups, wg))


def _check_axis(axis, ndim: int) -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} is out of range for a {ndim}-D array")
    return int(axis) % ndim


def _check_groups(groups, channels: int, what: str) -> int:
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if channels % groups:
        raise ValueError(f"groups={groups} does not divide the {channels} {what}")
    return int(groups)
