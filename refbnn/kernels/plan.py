"""Prepared binary conv layers (:class:`BConv2DPlan`) and the numpy-level helpers around the kernels.

A plan turns one layer's parameters into what the Numba kernels read (weight tiles, tap offsets,
padding-correction tables, thresholds) once, so a call costs only the kernel plus a few
microseconds of Python. :mod:`refbnn.ops` holds the public, validating entry points.
"""

from __future__ import annotations

import numba
import numpy as np

from .. import bits
from .bconv_fast import bconv_fast, tile_table
from .bconv_portable import bconv_portable, epilogue_pass
from .dispatch import resolve_kernel
from .packing import pack_rows_into, pack_rows_into_serial

__all__ = ["OUTPUTS", "BConv2DPlan", "as_packable", "check_groups", "check_pair",
           "output_thresholds", "pack_last_axis", "resolve_padding"]


_NATIVE_PACK_DTYPES = (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64)


def as_packable(x, what="input") -> np.ndarray:
    """``x`` as a C-contiguous array of a dtype the pack kernel reads (NaN: the kernel counts)."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        x = x.astype(np.float32)  # exact: every float16 (incl. -0.0) is a float32 of equal sign
    elif x.dtype.type not in _NATIVE_PACK_DTYPES:
        raise ValueError(f"{what} must be float16/32/64 or int8/16/32/64, got dtype {x.dtype}")
    return np.ascontiguousarray(x)


# Below this many input values packing runs on the calling thread: the parallel region's start-up
# costs more than the second thread saves. Measured at 2 threads (kernel only, median of 7 x 2000
# calls, full-word path): 14x14x256 (50k values) 2.6 us serial / 2.9 us parallel; 28x28x128 (100k)
# 5.3 / 4.1 us; 56x56x64 (200k) 11.4 / 6.5 us.
PACK_PARALLEL_MIN_VALUES = 1 << 16


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
    serial = x.size < PACK_PARALLEL_MIN_VALUES or numba.get_num_threads() == 1
    pack = pack_rows_into_serial if serial else pack_rows_into
    if d0 * d1 * d2 and pack(x.reshape(-1), d0, d1, d2, c, groups, out.reshape(-1),
                             p1, p2, offset[0], offset[1], sign_at_zero == -1):
        raise ValueError(f"{what} contains NaN; sign(NaN) is undefined")
    return out


def check_groups(groups, channels: int, what: str) -> int:
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if channels % groups:
        raise ValueError(f"groups={groups} does not divide the {channels} {what}")
    return int(groups)


OUTPUTS = ("int32", "float", "float_lce", "bits")
_MODE = {"int32": 0, "float": 1, "float_lce": 2, "bits": 3}


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


def output_thresholds(multiplier, bias, k: int, sign_at_zero: int = 1):
    """Integer thresholds equal to ``sign(float32(float32(acc) * mul) + bias)`` for every acc.

    For each output channel returns ``(thr, direction)`` (int64 arrays) such that, for every
    integer ``acc`` in ``[-k, k]``, ``acc * direction < thr`` exactly when the float output is
    negative (``sign_at_zero=+1``) or non-positive (``-1``), i.e. when the packed bit is 1. Built by
    evaluating the float32 transform on every integer in ``[-k, k]``; it is monotone in ``acc``
    (non-decreasing for ``mul > 0``, non-increasing for ``mul < 0``, constant for ``mul == 0``), so
    the bits form one run. ``multiplier``/``bias``: finite float32 per channel.
    """
    saz = bits.check_sign_at_zero(sign_at_zero)
    m, b = _check_affine(multiplier, bias, None)
    k = int(k)
    if not 0 <= k < 2 ** 24:
        raise ValueError(f"k must be in [0, 2**24) so every acc is an exact float32, got {k}")
    acc = np.arange(-k, k + 1, dtype=np.float32)[:, None]
    with np.errstate(over="ignore"):  # a huge multiplier may round the product to +-inf: fine
        y = (acc * m).astype(np.float32) + b
    neg = (y < 0) if saz == 1 else (y <= 0)  # (2k+1, O): the packed bit for each acc
    ones = neg.sum(axis=0).astype(np.int64)
    prefix = np.arange(2 * k + 1)[:, None] < ones  # ones first, then zeros
    suffix = np.arange(2 * k + 1)[:, None] >= (2 * k + 1 - ones)
    is_prefix = (neg == prefix).all(axis=0)
    if not (is_prefix | (neg == suffix).all(axis=0)).all():  # pragma: no cover - monotone
        raise AssertionError("float output transform is not monotone in acc")
    direction = np.where(is_prefix, 1, -1).astype(np.int64)
    # prefix: bit iff acc < ones - k; suffix: bit iff acc > k - ones, i.e. -acc < ones - k
    return ones - k, direction


def _check_affine(multiplier, bias, channels):
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


def _check_tail_bits(words, n: int, what: str) -> None:
    """Raise if a packed array has bits set above value ``n`` in its last word."""
    if n % 64 and words.size and (words[..., -1] >> np.uint64(n % 64)).any():
        raise ValueError(f"{what} has bits set above its {n} values in the last word")


_I64 = np.zeros(1, np.int64)
_F32 = np.zeros(1, np.float32)
_I32 = np.zeros(1, np.int32)
_U64 = np.zeros(1, np.uint64)


class BConv2DPlan:
    """One binary conv layer prepared for inputs of a fixed ``(H, W)``: low per-call overhead.

    ``w_packed``: ``uint64`` OHWI words ``(O, KH, KW, ceil(Cg / 64))`` (:func:`pack_kernel`),
    ``Cg = in_channels / groups``. Accumulators are ``acc = sum over taps that take part of
    (Cg - 2 * popcount(x XOR w))``, int32; ``pad_value`` 0 (zero padding: padded taps add 0), +1
    or -1 (padded taps hold that value and count). ``output``:

    * ``"int32"``: ``acc``, ``(N, OH, OW, O)``;
    * ``"float"``: ``float32(float32(acc) * multiplier) + bias`` (= ``reference.output_transform``);
    * ``"float_lce"``: LCE's ``float32(2*pc) * (-multiplier) + float32(bias + K*multiplier)`` with
      ``pc = (K - acc) // 2``, ``K = KH*KW*Cg`` (= ``reference.output_transform_lce``);
    * ``"bits"``: ``sign(float output)`` under ``sign_at_zero``, packed NHWC ``uint64``
      ``(N, OH, OW, out_groups, ceil(O / out_groups / 64))`` (4-D for ``out_groups=1``): exactly
      the input the next binary layer consumes, without unpacking.

    The fast path (``impl="fast"``) reads a physically padded input ``(N, Hp, Wp, G*Wg)`` with
    all-zero pad words; :meth:`padded_input` hands out such a buffer and ``input_offset`` says where
    the image starts in it. The portable path reads the unpadded input (offset ``(0, 0)``).
    A plan owns that buffer, so one plan must not run in two Python threads at once; the kernels
    themselves run on ``numba.get_num_threads()`` threads.
    """

    def __init__(self, w_packed, in_channels: int, input_hw, stride=1, padding="same",
                 pad_value: int = 0, dilation=1, groups: int = 1, *, output: str = "int32",
                 multiplier=None, bias=None, out_groups: int = 1, sign_at_zero: int = 1,
                 impl: str | None = None):
        w = np.asarray(w_packed)
        if w.ndim != 4 or w.dtype != np.uint64:
            raise ValueError(f"w_packed must be uint64 (O, KH, KW, words), got {w.dtype} {w.shape}")
        o, kh, kw, wg = w.shape
        if not isinstance(in_channels, (int, np.integer)) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        groups = check_groups(groups, int(in_channels), "input channels")
        check_groups(groups, o, "output channels")
        cg = int(in_channels) // groups
        if wg != bits.words_for(cg, 64):
            raise ValueError(f"w_packed has {wg} words per tap, {cg} channels per group need "
                             f"{bits.words_for(cg, 64)}")
        _check_tail_bits(w, cg, "w_packed")
        h, wd = check_pair(input_hw, "input_hw")
        sh, sw = self.stride = check_pair(stride, "stride")
        dh, dw = self.dilation = check_pair(dilation, "dilation")
        if pad_value not in (0, 1, -1):
            raise ValueError(f"pad_value must be 0, +1 or -1, got {pad_value!r}")
        pt, pb, pl, pr = self.pads = resolve_padding(padding, (h, wd), (kh, kw), stride, dilation)
        hp, wp = h + pt + pb, wd + pl + pr
        if hp < (kh - 1) * dh + 1 or wp < (kw - 1) * dw + 1:
            raise ValueError(f"dilated kernel {(kh - 1) * dh + 1}x{(kw - 1) * dw + 1} is larger "
                             f"than the padded input {hp}x{wp}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.impl = resolve_kernel(impl)
        self.in_hw, self.groups, self.cg, self.wg = (h, wd), groups, cg, wg
        self.in_channels, self.out_channels, self.kernel_hw = int(in_channels), o, (kh, kw)
        self.pad_value, self.output = int(pad_value), output
        self.k = kh * kw * cg
        self.out_hw = ((hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1)
        self.padded_hw = (hp, wp) if self.impl == "fast" else (h, wd)
        self.input_offset = (pt, pl) if self.impl == "fast" else (0, 0)
        self._buffers = {}
        self._tables = {}
        wsum = cg - 2 * bits.popcount(w).sum(axis=-1, dtype=np.int64)  # (O, KH, KW)
        self._setup_epilogue(output, multiplier, bias, out_groups, sign_at_zero)
        if self.impl == "fast":
            self._setup_fast(w, wsum)
        else:
            self._w_flat = np.ascontiguousarray(w.transpose(1, 2, 3, 0)).reshape(-1)
            self._wsum = np.ascontiguousarray(wsum.transpose(1, 2, 0)).reshape(-1)

    # -- setup -----------------------------------------------------------------------------
    def _setup_epilogue(self, output, multiplier, bias, out_groups, sign_at_zero):
        o = self.out_channels
        self._mul = self._bias = self._off = _F32
        self._thr = self._dirn = self._oword = self._obit = self._run8 = _I64
        self._pcflip = self._pcthr = _I64
        self.out_groups, self.out_words = 1, 0
        if output == "int32":
            return
        self._mul, self._bias = _check_affine(multiplier, bias, o)
        if output == "float_lce":
            self._off = (self._bias.astype(np.float64)
                         + self.k * self._mul.astype(np.float64)).astype(np.float32)
        elif output == "bits":
            og2 = o // check_groups(out_groups, o, "output channels (out_groups)")
            wg2 = bits.words_for(og2, 64)
            self.out_groups, self.out_words = int(out_groups), int(out_groups) * wg2
            self._thr, self._dirn = output_thresholds(self._mul, self._bias, self.k, sign_at_zero)
            # the same test on pc = (K - acc) / 2: acc < thr  <=>  pc > (K - thr) // 2, and
            # -acc < thr  <=>  pc <= h = ceil((K + thr) / 2) - 1  <=>  ~pc > -h - 2
            k, thr, up = self.k, self._thr, self._dirn > 0
            h = -((-(k + thr)) // 2) - 1
            self._pcflip = np.where(up, 0, -1).astype(np.int64)
            self._pcthr = np.where(up, (k - thr) // 2, -h - 2).astype(np.int64)
            ch = np.arange(o)
            self._oword = ((ch // og2) * wg2 + (ch % og2) // 64).astype(np.int64)
            self._obit = ((ch % og2) % 64).astype(np.int64)
            last = np.minimum(ch + 7, o - 1)
            self._run8 = ((ch + 7 < o) & (self._oword[last] == self._oword)
                          & (self._obit[last] == self._obit + 7)).astype(np.int64)

    def _setup_fast(self, w, wsum):
        o, kh, kw, wg = w.shape
        g = self.groups
        og = o // g
        nv = 4 if og > 8 else 1
        lanes = 8 * nv
        t = -(-og // lanes)
        ntaps = kh * kw
        wt = np.zeros((g, t * lanes, ntaps, wg), np.uint64)
        wt[:, :og] = w.reshape(g, og, ntaps, wg)
        # (G, T, lanes, ntaps, Wg) -> (G, T, ntaps, Wg, lanes): one tap-word step = NV vectors
        self._wt = np.ascontiguousarray(
            wt.reshape(g, t, lanes, ntaps, wg).transpose(0, 1, 3, 4, 2)).reshape(-1)
        self._nv, self._t = nv, t
        wp = self.padded_hw[1]
        dh, dw = self.dilation
        cw = g * wg
        # one step per (tap, word): the micro-kernel walks them in the weight tiles' order
        self._soff = np.array([(a * dh * wp + b * dw) * cw + c
                               for a in range(kh) for b in range(kw) for c in range(wg)], np.int64)
        rows = self._oob(self.in_hw[0], self.out_hw[0], kh, self.stride[0], dh, self.pads[0])
        cols = self._oob(self.in_hw[1], self.out_hw[1], kw, self.stride[1], dw, self.pads[2])
        (self._rc, rkeys), (self._cc, ckeys) = rows, cols
        self._has_corr = self.pad_value != 1 and (len(rkeys) > 1 or len(ckeys) > 1)
        self._corr, self._ncc = _I64, len(ckeys)
        if self._has_corr:
            mask = rkeys[:, None, :, None] | ckeys[None, :, None, :]  # (nr, nc, KH, KW)
            corr = (self.pad_value - 1) * np.einsum("rcab,oab->rco", mask.astype(np.int64), wsum)
            self._corr = np.ascontiguousarray(corr).reshape(-1)

    @staticmethod
    def _oob(n_in, n_out, k, s, d, p0):
        """Per output row: class id of its set of out-of-bounds taps; class 0 = none."""
        idx = np.arange(n_out)[:, None] * s + np.arange(k)[None, :] * d - p0
        oob = (idx < 0) | (idx >= n_in)
        keys = [np.zeros(k, bool)]
        ids = np.empty(n_out, np.int64)
        for i, row in enumerate(oob):
            for j, key in enumerate(keys):
                if (key == row).all():
                    ids[i] = j
                    break
            else:
                ids[i] = len(keys)
                keys.append(row)
        return ids, np.array(keys)

    def _tile_table(self, n, nthreads, bits_out):
        """:func:`tile_table` for this call's batch, threads and output geometry (a few kept)."""
        key = (n, nthreads, bits_out)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 4:
                self._tables.pop(next(iter(self._tables)))
            table = self._tables[key] = tile_table(
                n, self.out_hw, self.padded_hw, self.groups * self.wg, self.stride, self._rc,
                self._cc, self._ncc, self.out_channels, self._has_corr, nthreads, bits_out)
        return table

    # -- buffers -----------------------------------------------------------------------------
    def padded_input(self, n: int) -> np.ndarray:
        """A zero-bordered ``uint64`` input buffer ``(n, Hp, Wp, G*Wg)`` owned by this plan.

        The image goes at ``[:, top:top+H, left:left+W]`` (``input_offset``); the border is never
        written, so it stays zero (= +1) across calls. Reused between calls with the same ``n``.
        """
        buf = self._buffers.get(n)
        if buf is None:
            buf = np.zeros((n, *self.padded_hw, self.groups * self.wg), np.uint64)
            self._buffers[n] = buf
        return buf

    def _interior(self, buf):
        (t, l), (h, w) = self.input_offset, self.in_hw
        return buf[:, t:t + h, l:l + w, :]

    def pack_input(self, x, sign_at_zero: int = 1) -> np.ndarray:
        """Sign-pack real NHWC ``x`` (group-aware) into :meth:`padded_input`; returns the buffer."""
        saz = bits.check_sign_at_zero(sign_at_zero)
        x = np.asarray(x)
        self._check_input_shape(x.shape, self.in_channels, "x")
        x = as_packable(x, "x")
        buf = self.padded_input(x.shape[0])
        pack_last_axis(x, self.groups, saz, buf, self.input_offset, "x")
        return buf

    def _check_input_shape(self, shape, channels, what):
        if len(shape) != 4 or tuple(shape[1:3]) != self.in_hw or shape[3] != channels:
            raise ValueError(f"{what} must be (N, {self.in_hw[0]}, {self.in_hw[1]}, {channels}), "
                             f"got {tuple(shape)}")

    # -- running -----------------------------------------------------------------------------
    def __call__(self, x, sign_at_zero: int = 1, out=None):
        """Run on real NHWC ``x`` (binarized with ``sign_at_zero``)."""
        return self.run_padded(self.pack_input(x, sign_at_zero), out=out)

    def run_packed(self, x_packed, out=None):
        """Run on packed input ``(N, H, W, G, Wg)`` or ``(N, H, W, G*Wg)`` (uint64, unpadded)."""
        x = np.asarray(x_packed)
        if x.dtype != np.uint64:
            raise ValueError(f"x_packed must be uint64 words, got {x.dtype}")
        cw = self.groups * self.wg
        if x.ndim == 5 and x.shape[3:] == (self.groups, self.wg):
            x = x.reshape(x.shape[:3] + (cw,))
        self._check_input_shape(x.shape, cw, "x_packed (words)")
        _check_tail_bits(x.reshape(x.shape[:3] + (self.groups, self.wg)), self.cg, "x_packed")
        buf = self.padded_input(x.shape[0])
        self._interior(buf)[...] = x
        return self.run_padded(buf, out=out)

    def output_shape(self, n: int) -> tuple:
        oh, ow = self.out_hw
        if self.output == "bits":
            if self.out_groups == 1:
                return (n, oh, ow, self.out_words)
            return (n, oh, ow, self.out_groups, self.out_words // self.out_groups)
        return (n, oh, ow, self.out_channels)

    def run_padded(self, buf, out=None, out_offset=(0, 0)):
        """Run on a buffer laid out as :meth:`padded_input` (not checked beyond its shape).

        ``out`` (``output="bits"`` only): a contiguous ``uint64`` ``(N, OHp, OWp, out_words)``
        array, e.g. the next plan's :meth:`padded_input`, written at ``out_offset``; the words of
        the output pixels are overwritten, the rest is left alone. Returns the output array.
        """
        n = buf.shape[0]
        if buf.shape[1:] != (*self.padded_hw, self.groups * self.wg) or buf.dtype != np.uint64 \
                or not buf.flags.c_contiguous:
            raise ValueError(f"input buffer must be C-contiguous uint64 "
                             f"{(n, *self.padded_hw, self.groups * self.wg)}, got {buf.shape}")
        oh, ow = self.out_hw
        o = self.out_channels
        mode = _MODE[self.output]
        out_i32, out_f32, out_bits = _I32, _F32, _U64
        ohp, owp, opt, opl = oh, ow, 0, 0
        if mode == 3:
            if out is None:
                out = np.empty(self.output_shape(n), np.uint64)
            else:
                opt, opl = out_offset
                if out.dtype != np.uint64 or not out.flags.c_contiguous or out.shape[0] != n \
                        or out.shape[-1] != self.out_words or out.shape[1] < oh + opt \
                        or out.shape[2] < ow + opl:
                    raise ValueError("out must be a C-contiguous uint64 (N, OHp, OWp, words) "
                                     "buffer that holds the output at out_offset")
                ohp, owp = out.shape[1], out.shape[2]
            out_bits = out.reshape(-1)
        else:
            if out is not None:
                raise ValueError("out= is only supported for output='bits'")
            if mode == 0:
                out = np.empty((n, oh, ow, o), np.int32)
                out_i32 = out.reshape(-1)
            else:
                out = np.empty((n, oh, ow, o), np.float32)
                out_f32 = out.reshape(-1)
        if n == 0:
            return out
        xf = buf.reshape(-1)
        if self.impl == "fast":
            bits_out = (ohp, owp, self.out_words, opt, opl) if mode == 3 else None
            table = self._tile_table(n, numba.get_num_threads(), bits_out)
            bconv_fast(xf, self._wt, self._nv, self.groups, self.wg, self._t, self._soff, self.k,
                       o, *table, self._corr, mode, self._mul, self._bias, self._off, self._thr,
                       self._dirn, self._pcflip, self._pcthr, self._oword, self._obit,
                       self._run8, out_i32, out_f32, out_bits, self.out_words)
            return out
        acc = out_i32 if mode == 0 else np.empty(n * oh * ow * o, np.int32)
        h, w = self.in_hw
        kh, kw = self.kernel_hw
        bconv_portable(xf, n, h, w, self.groups, self.wg, self.cg, self._w_flat, self._wsum, o,
                       kh, kw, *self.stride, *self.dilation, self.pads[0], self.pads[2], oh, ow,
                       self.pad_value, acc)
        if mode:
            epilogue_pass(acc, n * oh * ow, o, self.k, mode, self._mul, self._bias, self._off,
                          self._thr, self._dirn, self._oword, self._obit, out_f32, out_bits,
                          oh, ow, ohp, owp, self.out_words, opt, opl)
        return out
