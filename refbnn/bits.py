"""Bit semantics: the one meaning of sign, of a packed bit, and of a packed word.

Everything binary in refbnn rests on these definitions (``docs/semantics.md`` says the same in prose):

* ``sign(x) = +1`` for ``x >= 0`` and ``-1`` for ``x < 0``, under the default ``sign_at_zero=+1``
  (Larq, LCE). ``-0.0 >= 0`` is true in IEEE arithmetic, so ``-0.0`` maps to ``+1`` as well.
  ``sign_at_zero=-1`` is Caffe's ``x > 0 ? +1 : -1`` (the original Bi-Real Net): both ``0.0`` and
  ``-0.0`` map to ``-1``. NaN has no sign: every public op raises ``ValueError`` on it.
* Bit encoding (LCE compatible): bit ``1`` means ``-1``, bit ``0`` means ``+1``.
* Packing runs along the last axis: value ``c`` goes to word ``c // W``, bit ``c % W`` (least
  significant bit first), ``W`` = 64 (refbnn's own ``uint64`` word) or 32 (LCE's ``int32`` word).
  Unused high bits of the last word are 0.

This module holds only the definitions that every layer shares; the reference oracle
(``refbnn.reference``) re-derives all of them without importing this module.
"""

from __future__ import annotations

import numpy as np

SIGN_AT_ZERO_CHOICES = (1, -1)
#: ``sign_at_zero`` of the float training layers and model configs: also 0 (``torch.sign``, ternary)
SIGN_AT_ZERO_TRAINING = (1, -1, 0)
#: the value of a binary convolution's padded taps, after the sign: 0 (zero padding), +1 or -1
PAD_VALUES = (0, 1, -1)
#: the test that decides ``sign(0)`` per ``sign_at_zero``: ``x >= 0``, ``x > 0``, or ternary ``torch.sign``
SIGN_RULES = {1: "ge", -1: "gt", 0: "sign"}
WORD_BITS_CHOICES = (64, 32)


def check_sign_at_zero(sign_at_zero: int) -> int:
    """Return ``sign_at_zero`` as an int if it is ``+1`` or ``-1``; raise ``ValueError`` otherwise.

    ``0`` (PyTorch's ``torch.sign``) is a ternary value one bit cannot hold; it is accepted only by
    the float training layers, never by a packing or bit op.
    """
    if sign_at_zero not in SIGN_AT_ZERO_CHOICES:
        raise ValueError(
            f"sign_at_zero must be +1 (Larq/LCE) or -1 (Caffe) for a bit op, got {sign_at_zero!r}; "
            "0 (torch.sign) is ternary and cannot be packed into one bit")
    return int(sign_at_zero)


def check_word_bits(word_bits: int) -> int:
    if word_bits not in WORD_BITS_CHOICES:
        raise ValueError(f"word_bits must be 64 or 32, got {word_bits!r}")
    return int(word_bits)


def check_no_nan(x: np.ndarray, what: str = "input") -> None:
    """Raise ``ValueError`` if the float array ``x`` holds a NaN (NaN has no sign)."""
    if x.dtype.kind == "f" and x.size and np.isnan(x).any():
        raise ValueError(f"{what} contains NaN; sign(NaN) is undefined")


def words_for(n: int, word_bits: int = 64) -> int:
    """Number of ``word_bits``-bit words that hold ``n`` packed values: ``ceil(n / word_bits)``."""
    return -(-int(n) // int(word_bits))


def word_dtype(word_bits: int) -> np.dtype:
    """``uint64`` for refbnn's own words, ``int32`` for LCE's (same bits, LCE's signed type)."""
    return np.dtype(np.uint64) if check_word_bits(word_bits) == 64 else np.dtype(np.int32)


def sign(x, sign_at_zero: int = 1) -> np.ndarray:
    """Elementwise sign under refbnn semantics, as ``int8`` in ``{-1, +1}``, same shape as ``x``.

    ``x`` may be float or integer. NaN raises ``ValueError``.
    """
    x = np.asarray(x)
    check_no_nan(x)
    if check_sign_at_zero(sign_at_zero) == 1:
        return np.where(x < 0, np.int8(-1), np.int8(1))
    return np.where(x > 0, np.int8(1), np.int8(-1))


_BYTE_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def popcount(words) -> np.ndarray:
    """Number of 1 bits of each element of the unsigned or signed integer array ``words``, as
    ``uint8`` of the same shape (byte lookup table: the same on every NumPy >= 1.26; NumPy 2's
    ``np.bitwise_count`` does not exist there). Independent of byte order."""
    words = np.asarray(words)
    if words.dtype.kind not in "ui":
        raise ValueError(f"popcount needs an integer array, got {words.dtype}")
    flat = np.ascontiguousarray(words.reshape(-1))
    counts = _BYTE_POPCOUNT[flat.view(np.uint8)].reshape(flat.size, words.dtype.itemsize)
    return counts.sum(axis=-1, dtype=np.uint8).reshape(words.shape)


def words64_to_words32(packed: np.ndarray, n: int) -> np.ndarray:
    """Convert packed ``uint64`` words (last axis) to LCE's ``int32`` words for ``n`` values.

    Word ``k`` of the result holds values ``32k .. 32k+31``: the low half of 64-bit word ``k // 2``
    for even ``k``, the high half for odd ``k``. The result has ``ceil(n / 32)`` words; its bytes are
    exactly what LCE's ``LceQuantize`` writes. Computed with shifts, so independent of byte order.
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint64:
        raise ValueError(f"expected uint64 words, got {packed.dtype}")
    if packed.shape[-1] != words_for(n, 64):
        raise ValueError(f"{n} values need {words_for(n, 64)} uint64 words, got {packed.shape[-1]}")
    low = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    high = (packed >> np.uint64(32)).astype(np.uint32)
    out = np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return out[..., : words_for(n, 32)].view(np.int32)


def words32_to_words64(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`words64_to_words32`: LCE ``int32`` (or ``uint32``) words to ``uint64``."""
    packed = np.asarray(packed)
    if packed.dtype not in (np.int32, np.uint32):
        raise ValueError(f"expected int32 or uint32 words, got {packed.dtype}")
    if packed.shape[-1] != words_for(n, 32):
        raise ValueError(f"{n} values need {words_for(n, 32)} 32-bit words, got {packed.shape[-1]}")
    w = packed.view(np.uint32).astype(np.uint64)
    if w.shape[-1] % 2:
        w = np.concatenate([w, np.zeros(w.shape[:-1] + (1,), np.uint64)], axis=-1)
    return w[..., 0::2] | (w[..., 1::2] << np.uint64(32))
