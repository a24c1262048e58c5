"""Public packing ops: sign-pack real arrays into words, unpack them, pack kernels.

Semantics of :mod:`refbnn.bits`: ``sign(x) = +1`` for ``x >= 0`` (``sign_at_zero=+1``; ``-0.0``
included) or for ``x > 0`` (``sign_at_zero=-1``); bit 1 = -1; value ``c`` goes to word ``c // W``
bit ``c % W``; unused high bits are 0. NaN raises ``ValueError``.
"""

from __future__ import annotations

import numba
import numpy as np

from .. import bits
from ..kernels.packing import (
    pack_hwio,
    pack_hwio_serial,
    pack_nchw_into,
    pack_nchw_into_serial,
    pack_rows_into,
    pack_rows_into_serial,
    unpack_rows,
)
from .args import as_packable, check_groups

# Below this many input values packing runs on the calling thread: the parallel region's start-up
# costs more than the second thread saves. Measured at 2 threads (kernel only, median of 7 x 2000
# calls, full-word path): 14x14x256 (50k values) 2.6 us serial / 2.9 us parallel; 28x28x128 (100k)
# 5.3 / 4.1 us; 56x56x64 (200k) 11.4 / 6.5 us.
PACK_PARALLEL_MIN_VALUES = 1 << 16


def _serial(n_values: int) -> bool:
    return n_values < PACK_PARALLEL_MIN_VALUES or numba.get_num_threads() == 1


def pack_last_axis(x: np.ndarray, groups: int, sign_at_zero: int, out=None, offset=(0, 0),
                   what: str = "input") -> np.ndarray:
    """Pack ``x`` (validated, contiguous) along its last axis in ``groups`` groups.

    ``out``: ``None`` (allocate ``x.shape[:-1] + (groups * Wg,)``) or, for 4-D ``x``, a
    C-contiguous ``uint64`` ``(N, Hp, Wp, groups * Wg)`` buffer receiving the image at ``offset``.
    Raises ``ValueError`` naming ``what`` if ``x`` holds a NaN.
    """
    c = x.shape[-1]
    wg = bits.words_for(c // groups, 64)
    if out is None:
        out = np.empty(x.shape[:-1] + (groups * wg,), np.uint64)
        if c == 0:
            return out
    if x.ndim == 4:
        d0, d1, d2 = x.shape[:3]
        p1, p2 = out.shape[1:3]
    else:  # threads over rows
        d0, d1, d2, p1, p2 = 1, x.size // c, 1, x.size // c, 1
    pack = pack_rows_into_serial if _serial(x.size) else pack_rows_into
    if d0 * d1 * d2 and pack(x.reshape(-1), d0, d1, d2, c, groups, out.reshape(-1),
                             p1, p2, offset[0], offset[1], sign_at_zero == -1):
        raise ValueError(f"{what} contains NaN; sign(NaN) is undefined")
    return out


def pack_channels_first(x: np.ndarray, groups: int, sign_at_zero: int, out, offset=(0, 0),
                        what: str = "input") -> np.ndarray:
    """:func:`pack_last_axis` of the NHWC transpose of NCHW ``x`` (validated, contiguous) into the
    ``uint64`` ``(N, Hp, Wp, groups * Wg)`` buffer ``out`` at ``offset``, without building the
    transpose. Raises ``ValueError`` naming ``what`` if ``x`` holds a NaN."""
    n, c, h, w = x.shape
    if n * c * h * w == 0:
        return out
    pack = pack_nchw_into_serial if _serial(x.size) else pack_nchw_into
    if pack(x.reshape(-1), n, c, h, w, groups, out.reshape(-1), out.shape[1], out.shape[2],
            offset[0], offset[1], sign_at_zero == -1):
        raise ValueError(f"{what} contains NaN; sign(NaN) is undefined")
    return out


def pack_bits(x, axis: int = -1, word_bits: int = 64, sign_at_zero: int = 1) -> np.ndarray:
    """Binarize ``x`` with :func:`refbnn.sign` and pack ``axis`` into words.

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
    x = as_packable(np.moveaxis(x, axis, -1))
    packed = pack_last_axis(x, 1, saz)
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
    groups = check_groups(groups, x.shape[3], "input channels")
    x = as_packable(x)
    wg = bits.words_for(x.shape[3] // groups, 64)
    out = np.empty(x.shape[:3] + (groups * wg,), np.uint64)
    pack_last_axis(x, groups, saz, out)
    return out.reshape(x.shape[:3] + (groups, wg))


def _check_axis(axis, ndim: int) -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} is out of range for a {ndim}-D array")
    return int(axis) % ndim


def pack_kernel_taps(kernel_hwio, sign_at_zero: int = 1) -> np.ndarray:
    """Tap-major words of a real HWIO kernel: ``uint64`` ``(KH*KW, ceil(I / 64), O)``, word
    ``[t, j, o]`` holding input channels ``64*j ..`` of output ``o`` at tap ``t = a*KW + b``.

    :func:`pack_kernel` transposed (``words[t, j, o] == pack_kernel(k)[o, a, b, j]``). The floats
    are read in place (:func:`refbnn.kernels.packing.pack_hwio`), never transposed.
    """
    saz = bits.check_sign_at_zero(sign_at_zero)
    k = np.asarray(kernel_hwio)
    if k.ndim != 4:
        raise ValueError(f"kernel must be 4-D HWIO, got shape {k.shape}")
    k = as_packable(k, "kernel")
    kh, kw, ci, o = k.shape
    words = np.empty((kh * kw, bits.words_for(ci, 64), o), np.uint64)
    if words.size:
        pack = pack_hwio_serial if _serial(k.size) else pack_hwio
        below = np.zeros((), k.dtype)
        if saz == -1:  # v < smallest positive  <=>  not v > 0 (NaN is reported, not packed)
            below = np.nextafter(below, 1) if k.dtype.kind == "f" else np.ones((), k.dtype)
        if pack(k.reshape(-1), kh * kw, ci, o, below[()], words.reshape(-1)):
            raise ValueError("kernel contains NaN; sign(NaN) is undefined")
    return words


def pack_kernel(kernel_hwio, sign_at_zero: int = 1) -> np.ndarray:
    """Pack a real HWIO kernel (Keras/Larq; ``I = C_in / groups``) to OHWI words, as LCE does.

    Returns ``uint64`` ``(O, KH, KW, ceil(I / 64))`` = ``pack_bits(kernel.transpose(3, 0, 1, 2))``;
    for ``groups > 1`` output channel ``o`` belongs to group ``o // (O / groups)``. The floats are
    read in place (:func:`pack_kernel_taps`); only the 64x smaller words are transposed.
    """
    words = pack_kernel_taps(kernel_hwio, sign_at_zero)
    kh, kw = np.shape(kernel_hwio)[:2]
    o = words.shape[2]
    return np.ascontiguousarray(words.transpose(2, 0, 1)).reshape(o, kh, kw, words.shape[1])
