"""Prepared binary conv layers: :class:`BConv2DPlan` validates once, lays out once, then dispatches.

A plan turns one layer's parameters into the records the Numba kernels read, once: weight tiles
and step offsets (fast path) or transposed weights (portable path), the padding correction
(:mod:`refbnn.kernels.padding`) and the output transform (:mod:`refbnn.kernels.epilogue`). A call
then costs the kernel plus a few microseconds of Python: shape checks, the output array and a
cached per-call table.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from .. import bits
from ..kernels import bconv_fast, bconv_portable
from ..kernels import epilogue as ep
from ..kernels import padding as pad
from ..kernels.dispatch import resolve_kernel
from ..kernels.packing import tap_sign_sums
from .args import (
    as_packable,
    check_activation,
    check_affine,
    check_groups,
    check_k,
    check_pair,
    check_tail_bits,
    resolve_padding,
)
from .packing import pack_channels_first, pack_last_axis

__all__ = ["OUTPUTS", "BConv2DPlan", "output_bases", "output_thresholds", "tile_table",
           "weight_tiles"]

OUTPUTS = tuple(ep.MODES)


def output_thresholds(multiplier, bias, k: int, sign_at_zero: int = 1):
    """Integer thresholds equal to ``sign(float32(float32(acc) * mul) + bias)`` for every acc.

    For each output channel returns ``(thr, direction)`` (int64 arrays) such that, for every
    integer ``acc`` in ``[-k, k]``, ``acc * direction < thr`` exactly when the float output is
    negative (``sign_at_zero=+1``) or non-positive (``-1``), i.e. when the packed bit is 1
    (:func:`refbnn.kernels.epilogue.thresholds`). ``multiplier``/``bias``: finite float32 per
    channel; ``0 <= k < 2**24``.
    """
    saz = bits.check_sign_at_zero(sign_at_zero)
    m, b = check_affine(multiplier, bias, None)
    return ep.thresholds(m, b, check_k(k), saz)


def weight_tiles(tap_words, groups: int):
    """Fast-path weight tiles of tap-major words ``tap_words`` ``(KH*KW, Wg, O)`` (any layout):
    ``(wt, nv, t)``.

    ``wt``: flat ``(G, T, KH*KW, Wg, 8*NV)`` ``uint64`` (see :mod:`refbnn.kernels.bconv_fast`),
    ``NV = 4`` (32-channel tiles) when a group has more than 8 output channels, else 1; ``T``
    tiles per group; zero words past a group's ``Og`` channels.
    """
    ntaps, wg, o = tap_words.shape
    og = o // groups
    nv = 4 if og > 8 else 1
    lanes = 8 * nv
    t = -(-og // lanes)
    tw = tap_words.reshape(ntaps, wg, groups, og)
    if og != t * lanes:
        padded = np.zeros((ntaps, wg, groups, t * lanes), np.uint64)
        padded[..., :og] = tw
        tw = padded
    # (ntaps, Wg, G, T, lanes) -> (G, T, ntaps, Wg, lanes): one tap-word step = NV vectors
    wt = tw.reshape(ntaps, wg, groups, t, lanes).transpose(2, 3, 0, 1, 4)
    return np.ascontiguousarray(wt).reshape(-1), nv, t


def output_bases(n, out_hw, out_channels, bits_out=None):
    """Flat index of each output pixel's first element, int64 ``(N*OH*OW,)``.

    ``bits_out = (OHp, OWp, OWords, opt, opl)``: into a (possibly padded) ``uint64``
    ``(N, OHp, OWp, OWords)`` buffer with the image at ``(opt, opl)``; ``None``: ``p * O``.
    """
    oh, ow = out_hw
    p = np.arange(n * oh * ow, dtype=np.int64)
    if bits_out is None:
        return p * out_channels
    ohp, owp, owords, opt, opl = bits_out
    img, rest = np.divmod(p, oh * ow)
    y, x = np.divmod(rest, ow)
    return ((img * ohp + y + opt) * owp + x + opl) * owords


def tile_table(n, out_hw, padded_hw, words_per_pixel, stride, rc, cc, ncc, out_channels,
               has_corr, nthreads, bits_out=None, fused=False):
    """The pixel table of :func:`refbnn.kernels.bconv_fast.bconv_fast` for a batch of ``n``.

    Pixels are cut into balanced tiles of at most ``MR`` (a multiple of the worker count when
    there are enough pixels). ``bits_out`` as for :func:`output_bases`: where ``tout`` points
    (``fused=False``) or, for the fused mode, where ``tbits`` points (``tout`` then indexes the
    float output). Returns ``(tpix, tout, tcor, tm, tborder, nchunks, tbits)``: int64
    ``(ntiles * MR,)`` arrays ``tpix``, ``tout``, ``tcor`` (slots past a tile's ``tm`` pixels hold
    0), int64 ``tm``, bool ``tborder``, the worker count, and ``tbits`` (``tout`` itself unless
    ``fused``).
    """
    mr = bconv_fast.MR
    oh, ow = out_hw
    hp, wp = padded_hw
    sh, sw = stride
    npix = n * oh * ow
    ntiles = -(-npix // mr)
    nchunks = min(nthreads, ntiles)
    ntiles = min(npix, -(-ntiles // nchunks) * nchunks)  # equal tile counts per worker
    q, r = divmod(npix, ntiles)
    ti = np.arange(ntiles)
    tm = np.where(ti < r, q + 1, q).astype(np.int64)
    slot = np.arange(mr)
    valid = slot[None, :] < tm[:, None]
    p = np.where(valid, (ti * q + np.minimum(ti, r))[:, None] + slot[None, :], 0)
    img, rest = np.divmod(p, oh * ow)
    y, x = np.divmod(rest, ow)
    tpix = ((img * hp + y * sh) * wp + x * sw) * words_per_pixel
    tcor = (np.asarray(rc)[y] * ncc + np.asarray(cc)[x]) * out_channels if has_corr else 0 * p
    tout = output_bases(n, out_hw, out_channels, None if fused else bits_out)[p]
    tbits = output_bases(n, out_hw, out_channels, bits_out)[p] if fused else tout
    tpix, tout, tcor, tbits = (np.where(valid, a, 0).astype(np.int64).reshape(-1)
                               for a in (tpix, tout, tcor, tbits))
    tborder = (tcor.reshape(-1, mr) != 0).any(axis=1)
    return (tpix, tout, tcor, tm, tborder, nchunks, tbits if fused else tout)


_NO_CORR = np.zeros(1, np.int64)


def _check_channels(in_channels, groups, out_channels) -> int:
    """``Cg`` after checking ``in_channels`` and that ``groups`` divides both channel counts."""
    if not isinstance(in_channels, (int, np.integer)) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    groups = check_groups(groups, int(in_channels), "input channels")
    check_groups(groups, out_channels, "output channels")
    return int(in_channels) // groups


def _readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


# Geometry-only tables are shared by every plan of the same geometry (read-only), so building a
# plan per call (refbnn.bconv2d) does not rebuild them.
@functools.lru_cache(maxsize=256)
def _border(n_in, n_out, k, s, d, p0):
    return _readonly(*pad.border_classes(n_in, n_out, k, s, d, p0))


@functools.lru_cache(maxsize=256)
def _step_offsets(kh, kw, dh, dw, wp, cw, wg):
    """``soff[(a*KW + b)*Wg + c] = (a*dh*Wp + b*dw) * CW + c`` (the fast kernel's step offsets)."""
    soff = ((np.arange(kh)[:, None, None] * dh * wp + np.arange(kw)[None, :, None] * dw) * cw
            + np.arange(wg)[None, None, :]).reshape(-1).astype(np.int64)
    return _readonly(soff)[0]


@functools.lru_cache(maxsize=256)
def _fast_table(geometry, has_corr, n, nthreads, bits_out, fused):
    in_hw, kernel_hw, stride, dilation, pads, padded_hw, cw, o = geometry
    out_hw = ((padded_hw[0] - (kernel_hw[0] - 1) * dilation[0] - 1) // stride[0] + 1,
              (padded_hw[1] - (kernel_hw[1] - 1) * dilation[1] - 1) // stride[1] + 1)
    rc, _ = _border(in_hw[0], out_hw[0], kernel_hw[0], stride[0], dilation[0], pads[0])
    cc, ckeys = _border(in_hw[1], out_hw[1], kernel_hw[1], stride[1], dilation[1], pads[2])
    return bconv_fast.make_table(*tile_table(n, out_hw, padded_hw, cw, stride, rc, cc,
                                             len(ckeys), o, has_corr, nthreads, bits_out, fused))


@functools.lru_cache(maxsize=256)
def _output_bases(n, out_hw, out_channels, bits_out):
    return _readonly(output_bases(n, out_hw, out_channels, bits_out))[0]


_NO_F32 = np.zeros(0, np.float32)
_NO_U64 = np.zeros(0, np.uint64)
_NO_I64 = np.zeros(0, np.int64)
_NOT_ALIGNED = np.full(1, -1, np.int64)


def sign_units(out_channels, groups, tiles, nv, out_groups):
    """Where each fast-path channel tile's packed signs go (``output="fused"``): ``(tunit, tzero)``.

    Tile ``j`` of conv group ``g`` holds channels ``o0 = g * Og + j * 8 * nv`` onwards (``nl`` of
    them). When, in the output's packed layout (``out_groups`` groups, each from bit 0 of its first
    word; :func:`refbnn.kernels.epilogue.bit_positions`), those channels are the consecutive bits
    from a multiple of ``8 * nv``, the tile stores them as one ``nv``-byte integer (bits past
    ``nl`` belong to no channel: 0): ``tunit[g * tiles + j]`` is its byte offset in a pixel's
    words. ``tzero``: ``(offset, count)`` pairs of the bytes no tile covers (zeroed per pixel).
    Otherwise ``([-1], [])``: the kernel packs whole pixels instead.
    """
    oword, obit, _, owords = ep.bit_positions(out_channels, out_groups)
    pos = oword * 64 + obit
    to = 8 * nv
    og = out_channels // groups
    units = []
    covered = np.zeros(owords * 8, bool)
    for g in range(groups):
        for j in range(tiles):
            o0 = g * og + j * to
            nl = min(to, og - j * to)
            b0 = pos[o0]
            if b0 % to or not np.array_equal(pos[o0:o0 + nl], b0 + np.arange(nl)):
                return _NOT_ALIGNED, _NO_I64
            units.append(b0 // 8)
            covered[b0 // 8:b0 // 8 + nv] = True
    edges = np.flatnonzero(np.diff(np.concatenate([[False], ~covered, [False]]).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    tzero = np.stack([starts, ends - starts], axis=1).reshape(-1).astype(np.int64)
    return np.array(units, np.int64), tzero


class BConv2DPlan:
    """One binary conv layer prepared for inputs of a fixed ``(H, W)``: low per-call overhead.

    ``w_packed``: ``uint64`` OHWI words ``(O, KH, KW, ceil(Cg / 64))`` (:func:`refbnn.pack_kernel`),
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
    Every call returns a new output array (or writes the caller's ``out``); the plan owns only its
    input buffers, so one plan must not run in two Python threads at once. The kernels themselves
    run on ``numba.get_num_threads()`` threads.
    """

    def __init__(self, w_packed, in_channels: int, input_hw, stride=1, padding="same",
                 pad_value: int = 0, dilation=1, groups: int = 1, *, output: str = "int32",
                 multiplier=None, bias=None, out_groups: int = 1, sign_at_zero: int = 1,
                 impl: str | None = None, pre=None, post=None):
        w = np.asarray(w_packed)
        if w.ndim != 4 or w.dtype != np.uint64:
            raise ValueError(f"w_packed must be uint64 (O, KH, KW, words), got {w.dtype} {w.shape}")
        o, kh, kw, wg = w.shape
        cg = _check_channels(in_channels, groups, o)
        if wg != bits.words_for(cg, 64):
            raise ValueError(f"w_packed has {wg} words per tap, {cg} channels per group need "
                             f"{bits.words_for(cg, 64)}")
        check_tail_bits(w, cg, "w_packed")
        tap_words = w.reshape(o, kh * kw, wg).transpose(1, 2, 0)  # (taps, Wg, O) view
        self._setup(tap_words, (kh, kw), in_channels, input_hw, stride, padding, pad_value,
                    dilation, groups, output, multiplier, bias, out_groups, sign_at_zero, impl,
                    pre, post)

    @classmethod
    def from_tap_words(cls, tap_words, kernel_hw, in_channels: int, input_hw, stride=1,
                       padding="same", pad_value: int = 0, dilation=1, groups: int = 1, *,
                       output: str = "int32", multiplier=None, bias=None, out_groups: int = 1,
                       sign_at_zero: int = 1, impl: str | None = None, pre=None, post=None):
        """A plan from tap-major words ``(KH*KW, Wg, O)`` as :func:`refbnn.ops.packing.pack_kernel_taps`
        returns them (trusted: no tail-bit check), saving the OHWI round trip."""
        plan = cls.__new__(cls)
        _check_channels(in_channels, groups, tap_words.shape[2])
        plan._setup(tap_words, kernel_hw, in_channels, input_hw, stride, padding, pad_value,
                    dilation, groups, output, multiplier, bias, out_groups, sign_at_zero, impl,
                    pre, post)
        return plan

    def _setup(self, tap_words, kernel_hw, in_channels, input_hw, stride, padding, pad_value,
               dilation, groups, output, multiplier, bias, out_groups, sign_at_zero, impl, pre,
               post):
        ntaps, wg, o = tap_words.shape
        kh, kw = kernel_hw
        groups = int(groups)
        cg = int(in_channels) // groups
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
        fast = self.impl == "fast"
        self.padded_hw = (hp, wp) if fast else (h, wd)
        self.input_offset = (pt, pl) if fast else (0, 0)
        self._buffers, self._tables = {}, {}
        self._mode = ep.MODES[output]
        self._epi = self._prepare_epilogue(multiplier, bias, out_groups, sign_at_zero, pre, post)
        self._geometry = (self.in_hw, self.kernel_hw, self.stride, self.dilation, self.pads,
                          self.padded_hw, groups * wg, o)
        rc, rkeys = _border(h, self.out_hw[0], kh, sh, dh, pt)
        cc, ckeys = _border(wd, self.out_hw[1], kw, sw, dw, pl)
        self._rc, self._cc, self._ncc = rc, cc, len(ckeys)
        read_as = 1 if fast else 0  # fast: zero pad words (+1); portable: skipped taps (0)
        self._has_corr = self.pad_value != read_as and (len(rkeys) > 1 or len(ckeys) > 1)
        corr = _NO_CORR
        if self._has_corr:
            tap_sums = np.empty((o, ntaps), np.int64)
            tap_sign_sums(tap_words, cg, tap_sums)
            corr = pad.correction(rkeys, ckeys, tap_sums.reshape(o, kh, kw), self.pad_value,
                                  read_as).reshape(-1)
        if fast:
            wt, nv, t = weight_tiles(tap_words, groups)
            soff = _step_offsets(kh, kw, dh, dw, wp, groups * wg, wg)
            tunit, tzero = sign_units(o, groups, t, nv, self.out_groups) if self._mode == ep.FUSED \
                else (_NOT_ALIGNED, _NO_I64)
            self._tunit_aligned = bool(tunit[0] >= 0)
            self._conv = bconv_fast.make_conv(wt, soff, nv, groups, wg, t, o, corr, self._epi,
                                              tunit, tzero)
        else:
            if not self._has_corr:  # the kernel adds row (rc, cc) unconditionally
                rc, cc, self._ncc = np.zeros_like(rc), np.zeros_like(cc), 1
                corr = np.zeros(o, np.int64)
            wt = np.ascontiguousarray(tap_words).reshape(-1)  # (KH, KW, Wg, O)
            self._conv = bconv_portable.make_conv(
                wt, h, wd, groups, wg, cg, o, kh, kw, sh, sw, dh, dw, pt, pl, *self.out_hw,
                rc, cc, self._ncc, corr)

    def _prepare_epilogue(self, multiplier, bias, out_groups, sign_at_zero, pre, post):
        o = self.out_channels
        self.out_groups, self.out_words = 1, 0
        if (pre is not None or post is not None) and self._mode != ep.FUSED:
            raise ValueError("pre= and post= need output='fused'")
        if self._mode == ep.INT32:
            return ep.prepare(ep.INT32, self.k, o)
        mul, b = check_affine(multiplier, bias, o)
        if self._mode in (ep.BITS, ep.FUSED):
            self.out_groups = check_groups(out_groups, o, "output channels (out_groups)")
            saz = bits.check_sign_at_zero(sign_at_zero)
            self.out_words = self.out_groups * bits.words_for(o // self.out_groups, 64)
            if self._mode == ep.FUSED:
                return ep.prepare(ep.FUSED, self.k, o, mul, b, self.out_groups, saz,
                                  check_activation(pre, o, "pre"),
                                  check_activation(post, o, "post"))
            return ep.prepare(ep.BITS, check_k(self.k), o, mul, b, self.out_groups, saz)
        return ep.prepare(self._mode, self.k, o, mul, b)

    def _table(self, n, bits_out):
        """This call's fast-path :class:`~refbnn.kernels.bconv_fast.TileTable` or portable output
        bases (read-only, shared by plans of the same geometry)."""
        nthreads = numba.get_num_threads() if self.impl == "fast" else 0
        key = (n, nthreads, bits_out)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 4:
                self._tables.pop(next(iter(self._tables)))
            fused = self._mode == ep.FUSED
            if self.impl == "fast":
                table = _fast_table(self._geometry, self._has_corr, n, nthreads, bits_out, fused)
            elif fused:
                table = (_output_bases(n, self.out_hw, self.out_channels, None),
                         _output_bases(n, self.out_hw, self.out_channels, bits_out))
            else:
                table = _output_bases(n, self.out_hw, self.out_channels, bits_out)
            self._tables[key] = table
        return table

    def fast_records(self, n: int, bits_out=None, nthreads: int = 1):
        """``(FastConv, TileTable)`` of the fast path for ``n`` images split for ``nthreads``
        workers: what :func:`refbnn.kernels.bconv_fast.bconv_fast` and
        :func:`~refbnn.kernels.bconv_fast.conv_items` read (the engine calls them itself).
        ``bits_out`` as for :func:`output_bases` (``"bits"``/``"fused"``; default: an unpadded
        ``(N, OH, OW, out_words)`` output)."""
        if self.impl != "fast":
            raise ValueError("fast_records needs the fast kernel (impl='fast')")
        if bits_out is None and self._mode in (ep.BITS, ep.FUSED):
            bits_out = (*self.out_hw, self.out_words, 0, 0)
        return self._conv, _fast_table(self._geometry, self._has_corr, n, nthreads, bits_out,
                                       self._mode == ep.FUSED)

    @property
    def fused_units_aligned(self) -> bool:
        """``output="fused"`` on the fast path: every channel tile stores its signs as one
        integer (:func:`sign_units`), so tiles of one pixel may run on different threads."""
        return self.impl == "fast" and self._mode == ep.FUSED and self._tunit_aligned

    # -- buffers -----------------------------------------------------------------------------
    def padded_input(self, n: int) -> np.ndarray:
        """A zero-bordered ``uint64`` input buffer ``(n, Hp, Wp, G*Wg)`` owned by this plan.

        The image goes at ``[:, top:top+H, left:left+W]`` (``input_offset``); the border is never
        written, so it stays zero (= +1) across calls. Reused between calls with the same ``n``:
        what a call packs into it is valid until the next call with that ``n``.
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

    def pack_input_nchw(self, x, sign_at_zero: int = 1, what: str = "x") -> np.ndarray:
        """:meth:`pack_input` of real NCHW ``x`` ``(N, C, H, W)``: the same words as for its NHWC
        transpose, packed straight from the channel planes (no transposed copy); returns the
        buffer. ``what`` names ``x`` in the NaN error."""
        saz = bits.check_sign_at_zero(sign_at_zero)
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"{what} must be NCHW (4-D), got shape {x.shape}")
        self._check_input_shape((x.shape[0], x.shape[2], x.shape[3], x.shape[1]),
                                self.in_channels, what + " (as NHWC)")
        x = as_packable(x, what)
        buf = self.padded_input(x.shape[0])
        pack_channels_first(x, self.groups, saz, buf, self.input_offset, what)
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
        check_tail_bits(x.reshape(x.shape[:3] + (self.groups, self.wg)), self.cg, "x_packed")
        buf = self.padded_input(x.shape[0])
        self._interior(buf)[...] = x
        return self.run_padded(buf, out=out)

    def output_shape(self, n: int) -> tuple:
        """Shape of the output of ``n`` images (for ``"fused"``: of its packed bits)."""
        oh, ow = self.out_hw
        if self.output in ("bits", "fused"):
            if self.out_groups == 1:
                return (n, oh, ow, self.out_words)
            return (n, oh, ow, self.out_groups, self.out_words // self.out_groups)
        return (n, oh, ow, self.out_channels)

    def _check_buffer(self, buf):
        if buf.shape[1:] != (*self.padded_hw, self.groups * self.wg) or buf.dtype != np.uint64 \
                or not buf.flags.c_contiguous:
            raise ValueError(f"input buffer must be C-contiguous uint64 "
                             f"{(buf.shape[0], *self.padded_hw, self.groups * self.wg)}, "
                             f"got {buf.shape}")

    def _bits_target(self, n, out, out_offset, what):
        """``(buffer, bits_out)``: a new packed output or the caller's ``out`` (checked)."""
        oh, ow = self.out_hw
        if out is None:
            return np.empty(self.output_shape(n), np.uint64), (oh, ow, self.out_words, 0, 0)
        opt, opl = out_offset
        if out.dtype != np.uint64 or not out.flags.c_contiguous or out.shape[0] != n \
                or out.shape[-1] != self.out_words or out.shape[1] < oh + opt \
                or out.shape[2] < ow + opl:
            raise ValueError(f"{what} must be a C-contiguous uint64 (N, OHp, OWp, words) buffer "
                             f"that holds the output at its offset")
        return out, (out.shape[1], out.shape[2], self.out_words, opt, opl)

    def run_padded(self, buf, out=None, out_offset=(0, 0)):
        """Run on a buffer laid out as :meth:`padded_input` (not checked beyond its shape).

        ``out`` (``output="bits"`` only): a contiguous ``uint64`` ``(N, OHp, OWp, out_words)``
        array, e.g. the next plan's :meth:`padded_input`, written at ``out_offset``; the words of
        the output pixels are overwritten, the rest is left alone. Returns the output array (a new
        one unless ``out`` is given). ``output="fused"`` runs with :meth:`run_fused`.
        """
        self._check_buffer(buf)
        n = buf.shape[0]
        mode = self._mode
        bits_out = None
        if mode == ep.FUSED:
            raise ValueError("output='fused' needs a residual: call run_fused")
        if mode == ep.BITS:
            out, bits_out = self._bits_target(n, out, out_offset, "out")
        elif out is not None:
            raise ValueError("out= is only supported for output='bits'")
        else:
            out = np.empty((n, *self.out_hw, self.out_channels),
                           np.int32 if mode == ep.INT32 else np.float32)
        if n:
            self._run(buf, out, bits_out, _NO_F32, _NO_U64)
        return out

    def run_fused(self, buf, residual, bits=None, bits_offset=(0, 0), out=None):
        """``output="fused"``: the tail of a residual block in the conv's epilogue.

        ``z = post(pre(float32(float32(acc) * multiplier) + bias) + r)`` per element (float32, one
        rounding per step; non-linearities as in :mod:`refbnn.kernels.elementwise`), written to
        ``out`` (float32 NHWC ``(N, OH, OW, O)``; new unless given, C-contiguous; it may be the
        residual array itself, updated in place, but must not overlap it otherwise), and
        ``sign(z)`` under ``sign_at_zero`` packed into ``bits`` (as ``out`` of :meth:`run_padded`:
        e.g. the next layer's :meth:`padded_input`, at ``bits_offset``; new unless given).
        ``residual``: float32 NHWC ``(N, OH, OW, Cr)`` with ``Cr`` dividing ``O``, ``r[..., o] =
        residual[..., o % Cr]`` (``Cr = O``: the plain residual add; fewer: its channels repeated,
        the cheap downsampling shortcut), or ``None`` (no add). ``buf`` as for :meth:`run_padded`.
        Returns ``(out, bits)``.
        """
        if self._mode != ep.FUSED:
            raise ValueError(f"run_fused needs output='fused', this plan has {self.output!r}")
        self._check_buffer(buf)
        n = buf.shape[0]
        shape = (n, *self.out_hw, self.out_channels)
        if residual is None:
            r = _NO_F32
            rsc = 0
        else:
            r = np.asarray(residual)
            if r.shape[:-1] != shape[:-1] or r.ndim != 4 or r.dtype != np.float32 or \
                    r.shape[-1] < 1 or self.out_channels % r.shape[-1]:
                raise ValueError(f"residual must be float32 {shape} (or with fewer channels that "
                                 f"divide {self.out_channels}), got {r.dtype} {r.shape}")
            r = np.ascontiguousarray(r)
            rsc = r.shape[-1]
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or (
                np.shares_memory(out, r) and not (out.shape == r.shape and
                                                  out.ctypes.data == r.ctypes.data)):
            raise ValueError(f"out must be a C-contiguous float32 {shape} array: the residual "
                             "itself or apart from the residual")
        bits, bits_out = self._bits_target(n, bits, bits_offset, "bits")
        if n:
            self._run(buf, out, bits_out, r.reshape(-1), bits.reshape(-1), rsc)
        return out, bits

    def _run(self, buf, out, bits_out, residual, bits_flat, rsc=0):
        n = buf.shape[0]
        flat = out.reshape(-1)
        mode = self._mode
        if self.impl == "fast":
            bconv_fast.bconv_fast(buf.reshape(-1), self._conv, self._table(n, bits_out),
                                  flat.view(np.uint8), residual, rsc, bits_flat)
        elif mode == ep.INT32:
            bconv_portable.bconv_portable(buf.reshape(-1), n, self._conv, flat)
        else:
            acc = np.empty(n * self.out_hw[0] * self.out_hw[1] * self.out_channels, np.int32)
            bconv_portable.bconv_portable(buf.reshape(-1), n, self._conv, acc)
            table = self._table(n, bits_out)
            pout, pbits = table if mode == ep.FUSED else (table, table)
            bconv_portable.epilogue_pass(acc, self.out_channels, self._epi, pout,
                                         flat.view(np.uint8), residual, rsc, bits_flat, pbits)
