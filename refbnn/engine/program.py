"""The packed engine's executor: a whole forward as one compiled call over a list of ops.

A :class:`Program` is the network as a typed list of :class:`Op` records (one Numba structref type
for every kind of op: integer parameters ``ip``, real-conv weights, the binary conv's
:class:`~refbnn.kernels.bconv_fast.FastConv` and :class:`~refbnn.kernels.bconv_fast.TileTable` for
one image) plus arenas: every buffer one image needs, allocated once, zero-bordered where a conv
reads padding. No Python runs between layers.

Ops (``K_*``), each a range of work items of one image on the calling thread:

* ``K_INPUT``: NCHW image -> zero-bordered planar ``(C, Hp, Wp)`` input of the stem (items:
  rows);
* ``K_STEM_POOL``: stem conv + BN, 3x3/2 max-pool, sign-pack for the first binary conv, band by
  band through a ring of conv rows (:func:`refbnn.kernels.realconv.stem_pool_rows`; items: pooled
  rows); ``K_STEM_CONV`` + ``K_PACK`` without the max-pool; in a program of groups with small
  stem maps ``K_STEM_CONV`` for the whole group + ``K_MAXPOOL`` (3x3/2 max-pool and pack,
  :func:`refbnn.kernels.realpool.maxpool3s2_pack_rows`; items: pooled rows);
* ``K_INPUT_BF16``, ``K_STEM_POOL_BF16``, ``K_STEM_CONV_BF16``: the same with the opt-in bf16
  stem (``Engine(stem="bf16")``): the planar input as bfloat16 bits in the float arena's memory,
  the weights as bfloat16 pairs (``Op.wt`` holds their ``uint32`` bits), tap pairs in ``Op.toff``
  (:mod:`refbnn.kernels.realconv`'s bf16 section);
* ``K_BCONV``: a binary conv with its fused epilogue (folded BN, pre-activation, residual add,
  post-activation; float32 residual stream and the next conv's packed input;
  :func:`refbnn.kernels.bconv_fast.conv_items`); ``K_BCONV_FLOAT``: conv + BN only (binary
  shortcut);
* ``K_POOL_CONV`` (2x2/2 average pool + real 1x1 conv + BN), ``K_AVGPOOL`` (the pool alone);
* ``K_HEAD``: global average pool and classifier, into the caller's features and logits.

Two ways to run a batch (:func:`run_images`, :func:`run_layers`; :func:`run_serial` on one thread):
*image-parallel*, each worker claims the next group of images (``ip[IP_GROUP]`` of them) from an
atomic counter and runs every op on it with its own arena row (no barrier between layers; a worker
slowed down by another process takes fewer groups): the ops before the first *grouped* one
(``ip[IP_GROUPED]``: one call for the whole group, tables built for the group's images) image by
image, the rest op by op, each grouped op once, the others once per image; *layer-parallel*
(one image, several threads), each op's work items split evenly over the workers, one parallel
region per op, ops below ``min_work`` on the calling thread.
Both compute the same values: every op writes the same elements from the same inputs however its
items are split (the stem's row ranges recompute the conv row above them).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.experimental import structref

from refbnn.kernels import bconv_fast as bf
from refbnn.kernels import elementwise as ew
from refbnn.kernels import realconv as rc
from refbnn.kernels import realpool as rp
from refbnn.kernels.sync import cycles, fetch_add

# Numba's cache does not notice edits to imported kernels; this digest of the modules this one
# imports, transitively (written by ``python refbnn/kernels/_codegen.py``), forces a recompile.
DEPS_DIGEST = "ae28a8426c1c4944"

K_INPUT, K_STEM_POOL, K_STEM_CONV, K_PACK, K_BCONV, K_BCONV_FLOAT, K_POOL_CONV, K_AVGPOOL, \
    K_HEAD, K_MAXPOOL, K_INPUT_BF16, K_STEM_POOL_BF16, K_STEM_CONV_BF16 = range(13)

#: ``Op.ip`` slots: work items, work (for the threading choice), channel-major flag, then
#: (offset, size) of the float input / output / residual in the float arena, residual channels,
#: (offset, size) of the packed input / output in the word arena and of the private scratch,
#: then ``A0 ..`` per kind.
IP_ITEMS, IP_WORK, IP_CM, IP_FIN, IP_FIN_N, IP_FOUT, IP_FOUT_N, IP_FRES, IP_FRES_N, IP_RSC, \
    IP_UIN, IP_UIN_N, IP_UOUT, IP_UOUT_N, IP_PS, IP_PS_N, IP_GROUP, IP_GROUPED, IP_SLOTS, \
    A0, A1, A2, A3, A4, A5, A6 = range(26)
IP_SIZE = 26

#: ``Op.ip[IP_SLOTS]`` bits: which of the op's regions hold one slot per image of the group (the
#: others one slot, shared by the images of a group in turn).
S_FIN, S_FOUT, S_FRES, S_UIN, S_UOUT = 1, 2, 4, 8, 16


@structref.register
class OpType(types.StructRef):
    pass


class Op(structref.StructRefProxy):
    """One op of a :class:`Program` (opaque in Python; module docstring)."""


structref.define_boxing(OpType, Op)
_I64A = types.Array(types.int64, 1, "C")
_F32A = types.Array(types.float32, 1, "C")
OP = OpType([("kind", types.int64), ("ip", _I64A), ("sg", _I64A), ("conv", bf.FAST_CONV),
             ("table", bf.TILE_TABLE), ("wt", _F32A), ("scale", _F32A), ("shift", _F32A),
             ("bases", _I64A), ("toff", _I64A), ("slopes", types.Array(types.float32, 2, "C"))])


@njit(cache=True)
def make_op(kind, ip, sg, conv, table, wt, scale, shift, bases, toff, slopes):
    """An :class:`Op` of the module docstring's kinds and fields."""
    op = structref.new(OP)
    op.kind, op.ip, op.sg, op.conv, op.table = kind, ip, sg, conv, table
    op.wt, op.scale, op.shift, op.bases, op.toff, op.slopes = wt, scale, shift, bases, toff, slopes
    return op


@njit(cache=True)
def _f(a, ip, slot):
    return a[ip[slot]:ip[slot] + ip[slot + 1]]


@njit(cache=True)
def _r(a, ip, slot, bit, gi):
    """Region ``slot`` (``(offset, per-image size)``) of image ``gi`` of the group; a grouped op:
    the whole group's slots."""
    size = ip[slot + 1]
    if ip[IP_GROUPED] != 0:
        return a[ip[slot]:ip[slot] + ip[IP_GROUP] * size]
    off = ip[slot] + (gi * size if ip[IP_SLOTS] & bit else 0)
    return a[off:off + size]


@njit(cache=True)
def run_op(op, x, img, gi, lo, hi, af, au, ps, logits, feats, acc, rtmp, pixel_major):
    """Work items ``lo .. hi - 1`` of ``op`` for image ``img`` of the batch, image ``gi`` of the
    worker's group (a grouped op: the group from image ``img`` on, ``gi`` unused): ``af``/``au``
    the arena rows (float32, uint64) holding the group's buffers, ``ps`` the worker's private float
    scratch;
    ``pixel_major``: a binary conv's items are its pixel tiles (:func:`op_items`) even where the op
    is channel-major. Callers pass every scalar as a plain ``int64``/``bool`` (``np.int64(0)``, not
    ``0``: a constant is a Numba literal type, and each combination of them would be another
    compilation of this whole tree of kernels)."""
    k = op.kind
    ip = op.ip
    if k == K_BCONV or k == K_BCONV_FLOAT:
        bf.conv_items(_r(au, ip, IP_UIN, S_UIN, gi), op.conv, op.table, lo, hi,
                      ip[IP_CM] != 0 and not pixel_major,
                      _r(af, ip, IP_FOUT, S_FOUT, gi).view(np.uint8),
                      _r(af, ip, IP_FRES, S_FRES, gi), ip[IP_RSC],
                      _r(au, ip, IP_UOUT, S_UOUT, gi), acc, rtmp, np.bool_(True),
                      np.int64(bf.BAND))
    elif k == K_INPUT:
        rc.to_padded_planar(x, img, ip[A0], ip[A1], ip[A2], _r(af, ip, IP_FOUT, S_FOUT, gi), ip[A6],
                            ip[A3], ip[A4], ip[A5], lo, hi)
    elif k == K_STEM_POOL:
        rc.stem_pool_rows(_r(af, ip, IP_FIN, S_FIN, gi), op.sg, op.toff, op.wt, ip[A0], op.scale,
                          op.shift, _f(ps, ip, IP_PS), _r(af, ip, IP_FOUT, S_FOUT, gi),
                          _r(au, ip, IP_UOUT, S_UOUT, gi), lo, hi)
    elif k == K_STEM_CONV:
        rc.conv_taps_tiles(_r(af, ip, IP_FIN, S_FIN, gi), op.bases, ip[A1], op.toff, op.wt,
                           ip[A0], ip[A2], op.scale, op.shift, _r(af, ip, IP_FOUT, S_FOUT, gi),
                           lo, hi)
    elif k == K_INPUT_BF16:
        rc.to_padded_planar_bf16(x, img, ip[A0], ip[A1], ip[A2],
                                 _r(af, ip, IP_FOUT, S_FOUT, gi).view(np.uint16), ip[A6], ip[A3],
                                 ip[A4], ip[A5], lo, hi)
    elif k == K_STEM_POOL_BF16:
        rc.stem_pool_rows(_r(af, ip, IP_FIN, S_FIN, gi).view(np.uint16), op.sg, op.toff,
                          op.wt.view(np.uint32), ip[A0], op.scale, op.shift, _f(ps, ip, IP_PS),
                          _r(af, ip, IP_FOUT, S_FOUT, gi), _r(au, ip, IP_UOUT, S_UOUT, gi), lo, hi)
    elif k == K_STEM_CONV_BF16:
        rc.conv_taps_tiles(_r(af, ip, IP_FIN, S_FIN, gi).view(np.uint16), op.bases, ip[A1],
                           op.toff, op.wt.view(np.uint32), ip[A0], ip[A2], op.scale, op.shift,
                           _r(af, ip, IP_FOUT, S_FOUT, gi), lo, hi)
    elif k == K_PACK:
        ew.merge_pack_rows(_r(af, ip, IP_FIN, S_FIN, gi), _r(af, ip, IP_FRES, S_FRES, gi), op.sg,
                           op.slopes, _r(au, ip, IP_UOUT, S_UOUT, gi), lo, hi)
    elif k == K_POOL_CONV:
        rc.pool2_conv1x1_tiles(_r(af, ip, IP_FIN, S_FIN, gi), ip[IP_GROUP] if ip[IP_GROUPED] else 1,
                               ip[A0], ip[A1], ip[A2], ip[A3], ip[A4], op.wt, ip[A5], ip[A6],
                               op.scale, op.shift, _r(af, ip, IP_FOUT, S_FOUT, gi), lo, hi)
    elif k == K_AVGPOOL:
        rp.avgpool2_rows(_r(af, ip, IP_FIN, S_FIN, gi), ip[IP_GROUP] if ip[IP_GROUPED] else 1,
                         ip[A0], ip[A1], ip[A2], ip[A3], ip[A4], _r(af, ip, IP_FOUT, S_FOUT, gi),
                         lo, hi)
    elif k == K_MAXPOOL:
        rp.maxpool3s2_pack_rows(_r(af, ip, IP_FIN, S_FIN, gi), op.sg,
                                _r(af, ip, IP_FOUT, S_FOUT, gi), _r(au, ip, IP_UOUT, S_UOUT, gi),
                                lo, hi)
    elif k == K_HEAD:
        cl, classes = ip[A1], ip[A2]
        f = feats[img * cl:(img + 1) * cl]
        rp.global_avgpool_image(_r(af, ip, IP_FIN, S_FIN, gi), 0, ip[A0], cl, f)
        rc.conv_taps_tiles(f, op.bases, np.int64(1), op.toff, op.wt, ip[A3], classes, op.scale,
                           op.shift, logits[img * classes:(img + 1) * classes], np.int64(0),
                           np.int64(1))


@njit(cache=True)
def op_items(op, pixel_major):
    """How many work items ``op`` has (``pixel_major``: as :func:`run_op` counts them)."""
    if pixel_major and (op.kind == K_BCONV or op.kind == K_BCONV_FLOAT):
        return op.table.tm.shape[0]
    return op.ip[IP_ITEMS]


@njit(cache=True, inline="always")
def _images(ops, x, n, af, au, ps, logits, feats, counter, op_lo, op_hi, timer, timing):
    acc = np.empty(bf.MR * 32 + 16, np.int64)
    rtmp = np.empty(16, np.float32)
    zero, no = np.int64(0), np.bool_(False)  # not literals (run_op)
    group = ops[0].ip[IP_GROUP]
    split = op_hi
    for j in range(op_lo, op_hi):
        if ops[j].ip[IP_GROUPED] != 0:
            split = j
            break
    while True:
        g0 = fetch_add(counter, 0, 1) * group
        if g0 >= n:
            break
        m = min(group, n - g0)
        # before the first grouped op: image by image (each image's buffers stay in cache)
        for gi in range(m):
            for j in range(op_lo, split):
                op = ops[j]
                c0 = cycles() if timing else 0
                run_op(op, x, g0 + gi, gi, zero, op.ip[IP_ITEMS], af, au, ps, logits, feats, acc,
                       rtmp, no)
                if timing:
                    timer[j] += cycles() - c0
        # from there on op by op: a grouped op once for the whole group (its tiles span images;
        # a short last group computes the stale slots too and nobody reads them), the others
        # image by image
        for j in range(split, op_hi):
            op = ops[j]
            c0 = cycles() if timing else 0
            if op.ip[IP_GROUPED] != 0:
                run_op(op, x, g0, zero, zero, op.ip[IP_ITEMS], af, au, ps, logits, feats, acc,
                       rtmp, no)
            else:
                for gi in range(m):
                    run_op(op, x, g0 + gi, gi, zero, op.ip[IP_ITEMS], af, au, ps, logits, feats,
                           acc, rtmp, no)
            if timing:
                timer[j] += cycles() - c0


@njit(cache=True)
def run_serial(ops, x, n, af, au, ps, logits, feats, counter, op_lo, op_hi, timer, timing):
    """Groups of images (``ops[0].ip[IP_GROUP]`` each) from group ``counter[0]`` on
    (``counter`` advances) up to image ``n - 1``, ops ``op_lo .. op_hi - 1``, on the calling
    thread with arena rows 0; ``timing``: add each op's cycles to ``timer[op]``."""
    _images(ops, x, n, af[0], au[0], ps[0], logits, feats, counter, op_lo, op_hi, timer, timing)


@njit(cache=True, parallel=True)
def run_images(ops, x, n, af, au, ps, logits, feats, counter, nworkers, op_lo, op_hi, timer,
               timing):
    """:func:`run_serial` image-parallel: ``nworkers`` workers (``<= numba.get_num_threads()``,
    one arena row each) claim groups of images from ``counter``."""
    for t in prange(nworkers):
        _images(ops, x, n, af[t], au[t], ps[t], logits, feats, counter, op_lo, op_hi, timer,
                timing)


@njit(cache=True, parallel=True)
def run_layers(ops, x, af, au, ps, logits, feats, nworkers, min_work, op_lo, op_hi, timer,
               timing):
    """Image 0 layer-parallel on arena row 0 (a program of groups of one image): each op's items
    split evenly over ``nworkers`` workers (private scratch row ``t`` each), or on the calling
    thread when its work is below ``min_work`` or it has one item. Split over workers, a binary
    conv runs pixel-major: each worker writes whole output pixels (channel-major ranges would
    have two workers write the sign bits of one 64-bit word, a cache line shared between
    cores)."""
    acc = np.empty(bf.MR * 32 + 16, np.int64)
    rtmp = np.empty(16, np.float32)
    zero = np.int64(0)  # not a literal (run_op)
    for j in range(op_lo, op_hi):
        op = ops[j]
        items = op.ip[IP_ITEMS]
        c0 = cycles() if timing else 0
        if op.ip[IP_WORK] < min_work or items < 2 or nworkers < 2:
            run_op(op, x, zero, zero, zero, items, af[0], au[0], ps[0], logits, feats, acc, rtmp,
                   np.bool_(False))
        else:
            items = op_items(op, True)
            nw = min(nworkers, items)
            for t in prange(nw):
                acc_t = np.empty(bf.MR * 32 + 16, np.int64)
                rtmp_t = np.empty(16, np.float32)
                run_op(op, x, zero, zero, t * items // nw, (t + 1) * items // nw, af[0], au[0],
                       ps[t], logits, feats, acc_t, rtmp_t, np.bool_(True))
        if timing:
            timer[j] += cycles() - c0
