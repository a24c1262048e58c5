"""The packed engine's runtime: a folded :class:`~refbnn.engine.network.Network` compiled to a fixed
sequence of Numba kernel calls, with every buffer allocated once per (batch size, threads).

Data flow (NHWC throughout; ``x`` NCHW float32 at the door):

1. ``stem``: the input is copied into a zero-bordered NHWC buffer; the real conv + BatchNorm runs
   as a direct convolution on float32 FMA micro-kernels (:func:`refbnn.kernels.realconv.conv_taps`:
   register tiles of 6 pixels x 64 channels, no im2col matrix); the 3x3/2 max-pool writes the
   residual stream and packs its signs into the first binary conv's padded input in the same pass;
2. per binary conv: :class:`refbnn.ops.BConv2DPlan` (``output="float"``: BN and alpha folded into
   ``float32(float32(acc) * mul) + bias``), then the *epilogue*
   (:func:`refbnn.kernels.elementwise.merge_pack`): ``post(pre(y) + shortcut)`` in place, the
   result kept as the residual stream and sign-packed into the next conv's padded input buffer,
   one read of the conv's output. :class:`_ConvStep` is the one place that pairs the conv with its
   epilogue, so an epilogue fused into the conv kernel replaces that pair only;
3. shortcuts of stride-2 blocks: 2x2/2 average pool fused with the 1x1 conv + BN
   (:func:`refbnn.kernels.realconv.pool2_conv1x1`), or the pool alone (cheap shortcut: the epilogue
   reads its channels repeated; binary shortcut: packed into the 1x1 binary conv's plan);
4. ``head``: global average pool, then the classifier on the same FMA micro-kernels.

Thread policy (the engine's own, documented here because a process beside us changes what is fast):

* every stage runs on the requested ``numba.get_num_threads()`` threads (``prange``), except stages
  whose work is below :data:`PARALLEL_MIN_WORK` (multiply-adds, binary MACs / 64 or values), which
  run on the calling thread: a parallel region costs a few microseconds to start and, when another
  process holds a core, waits for the OS to run its second thread (Numba's OpenMP layer schedules
  statically and its end barrier waits for every thread);
* :class:`ThreadPolicy` (``adaptive``, the default): with more than one thread requested, each
  (batch size, threads) plan times its forwards at the requested threads and, every
  :data:`PROBE_EVERY` calls, one forward on a single thread; it runs on whichever is faster by the
  recent median. With both cores free the requested threads win; with a CPU-bound process on the
  other core one thread wins (measured on weights/ftbnn18.h5 before this policy: 37-53 ms at batch
  1 with two threads vs 0.6-1.0 ms with one). ``Engine(..., adaptive_threads=False)`` always uses the
  requested threads. Results do not depend on the thread count (each output element is computed by
  one thread, in a fixed order).

A plan is built per (batch size, thread count) on first use and kept (at most :data:`MAX_PLANS`).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numba
import numpy as np

from refbnn.engine.network import EngineError, Network
from refbnn.kernels import elementwise as ew
from refbnn.kernels import realconv as rc
from refbnn.kernels import realpool as rp
from refbnn.ops import BConv2DPlan

MAX_PLANS = 4

#: The stem's conv output buffer holds at most this many bytes of images (at least one image).
STEM_CHUNK_BYTES = 8 << 20

#: With adaptive threads, every this many forwards of a plan one runs with the other setting.
PROBE_EVERY = 16

#: A stage with less work than this (multiply-adds, binary MACs / 64, or values touched) runs on
#: one thread. A parallel region costs a few microseconds to start and, when another process holds
#: a core, can wait a scheduler time slice (milliseconds) for its second thread; below this size the
#: second thread cannot save more than that start-up.
PARALLEL_MIN_WORK = 1 << 18

_EMPTY_U64 = np.zeros(0, np.uint64)
_EMPTY_F32 = np.zeros(0, np.float32)
STAGES = ("binary_convs", "stem", "shortcuts", "elementwise_glue")


def stage_threads(work: int, threads: int) -> int:
    """Threads for a stage of ``work`` units: 1 below :data:`PARALLEL_MIN_WORK`, else ``threads``.

    Why: with two threads and the other core busy (another process), every parallel region waits
    until the OS runs the second thread; at batch 1 of a small model that turned 0.5 ms into 20-50
    ms. Small stages on one thread avoid the wait where it costs most, big stages keep the speed-up.
    """
    return 1 if work < PARALLEL_MIN_WORK else threads


class ThreadPolicy:
    """Chooses, per plan, between the requested threads and one thread by measured forward time.

    Keeps the last :data:`PROBE_EVERY` times of each setting; runs the setting with the lower
    median and, every :data:`PROBE_EVERY` calls, the other one once (the first calls try both)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.times = {threads: [], 1: []}
        self.calls = 0

    def choose(self) -> int:
        if self.threads == 1:
            return 1
        self.calls += 1
        a, b = self.times[self.threads], self.times[1]
        if len(a) < 2:
            return self.threads
        if len(b) < 2:
            return 1
        best = self.threads if _median(a) <= _median(b) else 1
        if self.calls % PROBE_EVERY == 0:
            return 1 if best == self.threads else self.threads
        return best

    def record(self, threads: int, seconds: float) -> None:
        t = self.times[threads]
        t.append(seconds)
        if len(t) > PROBE_EVERY:
            del t[0]


def _median(values):
    s = sorted(values)  # a few values: cheaper than np.median per call
    return s[len(s) // 2]


class _Target:
    """Where an epilogue packs its output: a plan's padded input buffer (or nothing)."""

    def __init__(self, plan: BConv2DPlan | None, n: int):
        if plan is None:
            self.buf, self.geom = _EMPTY_U64, (1, 1, 0, 0, 1, 1)
            return
        self.buf = plan.padded_input(n).reshape(-1)
        hp, wp = plan.padded_hw
        pt, pl = plan.input_offset
        self.geom = (hp, wp, pt, pl, plan.groups, plan.wg)


class _Threads:
    """Sets Numba's thread count for each stage (:func:`stage_threads`), skipping repeats."""

    def __init__(self, threads):
        self.threads, self.current = threads, numba.get_num_threads()

    def __call__(self, work):
        t = 1 if work < PARALLEL_MIN_WORK else self.threads
        if t != self.current:
            numba.set_num_threads(t)
            self.current = t


class _ConvStep:
    """A binary conv and its epilogue (residual add, non-linearities, pack for the next conv).

    The one place that pairs them: a conv kernel that runs the epilogue in its tile replaces
    :meth:`run` and nothing else."""

    def __init__(self, name, plan: BConv2DPlan, n, pre, post, nonpos, short, sc, target: _Target):
        self.name, self.plan, self.n, self.buf = name, plan, n, plan.padded_input(n)
        oh, ow = plan.out_hw
        c = plan.out_channels
        self.work_conv = n * oh * ow * c * plan.k // 64
        self.work_ew = n * oh * ow * c
        self.short, self.target = short, target
        self.ip, self.slopes = ew.merge_params(sc, n, oh, ow, c, pre.code, post.code, target.geom,
                                               nonpos, (pre.pos, pre.neg), (post.pos, post.neg))

    def run(self, threads, timer, record=None):
        """Conv, then epilogue; returns the new residual stream (flat float32). ``record``: a
        dict receiving copies of the conv's output (``NAME.bn1``) and of the stream (``NAME``)."""
        threads(self.work_conv)
        y4 = self.plan.run_padded(self.buf)
        y = y4.reshape(-1)
        if timer.timer is not None:
            timer("binary_convs")
        if record is not None:
            record[self.name + ".bn1"] = y4.copy()
        threads(self.work_ew)
        ew.merge_pack(y, self.short, self.ip, self.slopes, self.target.buf)
        if timer.timer is not None:
            timer("elementwise_glue")
        if record is not None:
            record[self.name] = y4.copy()
        return y


class Engine:
    """A compiled network. ``forward(x)``: ``x`` (N, C, H, W) float32 normalised images -> logits
    ``(N, classes)`` float32 (a new array). Not for concurrent use from several Python threads."""

    def __init__(self, net: Network, adaptive_threads: bool = True):
        self.net = net
        self.adaptive_threads = bool(adaptive_threads)
        self.config = net.config
        self.input_shape = net.input_shape
        _c, h, w = net.input_shape
        st = net.stem
        k = st.w_hwio.shape[0]
        self._stem_k, self._stem_c = k, st.w_hwio.shape[3]
        self._stem_nv = rc.vectors_for(self._stem_c)
        self._stem_w = rc.weight_tiles(st.w_hwio.reshape(-1, self._stem_c), self._stem_nv)
        self._in_padded = (h + 2 * st.padding, w + 2 * st.padding)
        saz = net.blocks[0].conv.sign_at_zero
        self._nonpos = saz == -1
        # binary conv plans, shared by every batch size (each keeps its own buffers per n)
        hw0 = net.blocks[0].in_hw
        self._bridge = None
        if net.bridge is not None:
            bconv, act = net.bridge
            self._bridge = (BConv2DPlan(bconv.words, bconv.in_channels, hw0, 1, (1, 1, 1, 1),
                                        bconv.pad_value, 1, bconv.groups, output="float",
                                        multiplier=bconv.mul, bias=bconv.bn.shift,
                                        sign_at_zero=bconv.sign_at_zero), act)
        self._plans = []
        for blk in net.blocks:
            conv = blk.conv
            main = BConv2DPlan(conv.words, conv.in_channels, blk.in_hw, conv.stride,
                               (1, 1, 1, 1), conv.pad_value, 1, conv.groups, output="float",
                               multiplier=conv.mul, bias=conv.bn.shift, sign_at_zero=conv.sign_at_zero)
            short = None
            if blk.shortcut is not None:
                kind, op = blk.shortcut
                if kind == "real":
                    o = op.w_hwio.shape[3]
                    nv = rc.vectors_for(o)
                    short = ("real", rc.weight_tiles(op.w_hwio.reshape(-1, o), nv), nv, o, op.bn)
                elif kind == "binary":
                    short = ("binary", BConv2DPlan(op.words, op.in_channels, blk.out_hw, 1,
                                                   (0, 0, 0, 0), op.pad_value, 1, 1, output="float",
                                                   multiplier=op.mul, bias=op.bn.shift,
                                                   sign_at_zero=op.sign_at_zero), op.sign_at_zero)
                else:
                    short = ("repeat", op)
            self._plans.append((blk, main, short))
        self._fc_nv = rc.vectors_for(net.fc_w.shape[1])
        self._fc_w = rc.weight_tiles(net.fc_w, self._fc_nv)
        classes = net.fc_w.shape[1]
        self._fc_scale = np.ones(classes, np.float32)
        self._fc_shift = net.fc_b if net.fc_b is not None else np.zeros(classes, np.float32)
        self._batch_plans = OrderedDict()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_network(cls, net: Network, **options) -> Engine:
        return cls(net, **options)

    @classmethod
    def from_model(cls, model, **options) -> Engine:
        """From a :class:`refbnn.models.BNNResNet` (its config and state dict; eval-mode BN);
        ``options``: :class:`Engine`'s keywords."""
        from refbnn.engine.network import network_from_model

        return cls(network_from_model(model), **options)

    @classmethod
    def from_file(cls, path_or_loaded, **options) -> Engine:
        """From a refbnn ``.h5`` file of any kind (a packed-only file needs no float model) or a
        :class:`refbnn.fileformat.LoadedFile`."""
        from refbnn import fileformat
        from refbnn.engine.network import network_from_file

        f = path_or_loaded
        if not isinstance(f, fileformat.LoadedFile):
            f = fileformat.load(f)
        return cls(network_from_file(f), **options)

    # -- plans -----------------------------------------------------------------------------
    def _plan(self, n: int, threads: int | None = None):
        key = (n, numba.get_num_threads() if threads is None else threads)
        plan = self._batch_plans.get(key)
        if plan is None:
            if len(self._batch_plans) >= MAX_PLANS:
                self._batch_plans.popitem(last=False)
            plan = self._batch_plans[key] = _BatchPlan(self, n, key[1])
        return plan

    # -- running ---------------------------------------------------------------------------
    def _check(self, x):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input must be (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        if np.isnan(x).any():
            raise ValueError("input contains NaN")
        return x

    def features(self, x) -> np.ndarray:
        """The global average pool's output ``(N, C_last)`` float32 (a new array)."""
        x = self._check(x)
        if x.shape[0] == 0:
            return np.zeros((0, self.net.fc_w.shape[0]), np.float32)
        threads = numba.get_num_threads()
        try:
            return self._plan(x.shape[0]).run(x, features=True).copy()
        finally:
            numba.set_num_threads(threads)

    def forward(self, x) -> np.ndarray:
        x = self._check(x)
        if x.shape[0] == 0:
            return np.zeros((0, self.net.fc_w.shape[1]), np.float32)
        threads = numba.get_num_threads()
        plan = self._plan(x.shape[0], threads)
        try:
            if not self.adaptive_threads or threads == 1:
                return plan.run(x).copy()
            use = plan.policy.choose()
            t0 = time.perf_counter()
            out = plan.run(x, threads=use).copy()
            plan.policy.record(use, time.perf_counter() - t0)
            return out
        finally:
            if numba.get_num_threads() != threads:
                numba.set_num_threads(threads)

    __call__ = forward

    def layer_outputs(self, x) -> OrderedDict:
        """One forward of ``x``, keeping copies of the intermediate outputs, NHWC float32, named as
        refbnn's layers: ``bn1`` (stem conv + BN), ``maxpool``, ``bridge.bn1``, ``bridge``,
        ``layer{s}.{i}.bn1`` (the binary conv + BN), ``layer{s}.{i}.downsample.0`` (pool) or
        ``.downsample.2`` (real 1x1 + BN), ``layer{s}.{i}`` (the block's output), ``avgpool``,
        then ``logits``."""
        x = self._check(x)
        rec = OrderedDict()
        threads = numba.get_num_threads()
        try:
            rec["logits"] = self._plan(x.shape[0]).run(x, record=rec).copy()
        finally:
            numba.set_num_threads(threads)
        rec.move_to_end("logits")
        return rec

    def binary_plan(self, name: str) -> BConv2DPlan:
        """The :class:`BConv2DPlan` (output ``"float"``: conv + folded BN) of the binary layer
        ``name`` (``"bridge.binary_conv"``, ``"layer1.0.binary_conv"``, ``"layer2.0.downsample.1"``)."""
        if name == "bridge.binary_conv" and self._bridge is not None:
            return self._bridge[0]
        for blk, main, short in self._plans:
            if name == f"{blk.name}.binary_conv":
                return main
            if short is not None and short[0] == "binary" and name == f"{blk.name}.downsample.1":
                return short[1]
        raise KeyError(f"no binary layer {name!r}")

    def profile(self, x, runs: int = 5) -> dict:
        """Milliseconds per forward of ``x`` by stage (:data:`STAGES`, plus ``total``), the mean of
        ``runs`` timed runs after a warm-up; each step is timed on its own (a few us of timer
        overhead each go to that step's stage)."""
        x = self._check(x)
        threads = numba.get_num_threads()
        try:
            plan = self._plan(x.shape[0])
            plan.run(x)
            acc = dict.fromkeys(STAGES, 0.0)
            total = 0.0
            for _ in range(runs):
                t0 = time.perf_counter()
                plan.run(x, timer=acc)
                total += time.perf_counter() - t0
        finally:
            numba.set_num_threads(threads)
        out = {k: 1e3 * v / runs for k, v in acc.items()}
        out["total"] = 1e3 * total / runs
        return out


class _BatchPlan:
    """Every buffer and kernel argument of one forward at batch ``n`` on ``threads`` threads."""

    def __init__(self, eng: Engine, n: int, threads: int):
        net = eng.net
        self.eng, self.n, self.threads = eng, n, threads
        self.policy = ThreadPolicy(threads)
        c, _h, _w = net.input_shape
        hp, wp = eng._in_padded
        st = net.stem
        sh, sw = net.stem_hw
        sc = eng._stem_c
        nonpos = eng._nonpos
        self.xin = np.zeros((n, hp, wp, c), np.float32)  # zero border written once
        # with the max-pool, the stem runs on chunks of images so that its full-size output (3.2 MB
        # per 224x224 image) stays a bounded buffer; without it the output is the residual stream
        chunk = n
        if net.stem_pool:
            chunk = max(1, min(n, STEM_CHUNK_BYTES // (4 * sh * sw * sc)))
        self.stem_chunk = chunk
        self.stem_bases, self.stem_toff = rc.conv_geometry(chunk, hp, wp, c, eng._stem_k,
                                                           st.stride, sh, sw)
        self.stem_out = np.empty(chunk * sh * sw * sc, np.float32)
        self.stem_work = chunk * sh * sw * sc * self.stem_toff.shape[0]
        first = eng._bridge[0] if eng._bridge is not None else eng._plans[0][1]
        self.first_target = _Target(first, n)
        self.pool_ip = np.zeros(0, np.int64)
        if net.stem_pool:
            ph, pw = net.blocks[0].in_hw
            self.pooled = np.empty(n * ph * pw * sc, np.float32)
        else:  # the stem output itself is packed (no shortcut, no non-linearity)
            ones = (_ones(sc), _ones(sc))
            self.pool_ip, self.pool_slopes = ew.merge_params(0, n, sh, sw, sc, ew.NONE, ew.NONE,
                                                             self.first_target.geom, nonpos,
                                                             ones, ones)
        self.bridge = None
        if eng._bridge is not None:
            bplan, act = eng._bridge
            none = type(act)("none", ew.NONE, _ones(act.pos.shape[0]), _ones(act.pos.shape[0]))
            self.bridge = _ConvStep("bridge", bplan, n, none, act, nonpos, _EMPTY_F32, 0,
                                    _Target(eng._plans[0][1], n))
        self.steps = []
        for i, (blk, main, short) in enumerate(eng._plans):
            nxt = eng._plans[i + 1][1] if i + 1 < len(eng._plans) else None
            oh, ow = blk.out_hw
            cin = blk.conv.in_channels
            sbuf, sc_ = None, blk.conv.out_channels  # identity shortcut: the stream itself
            if short is not None:
                sbuf = np.empty(n * oh * ow * (short[3] if short[0] == "real" else cin), np.float32)
                sc_ = short[3] if short[0] == "real" else short[1].out_channels \
                    if short[0] == "binary" else cin
            # the identity shortcut's buffer is bound per call (the stream changes)
            step = _ConvStep(blk.name, main, n, blk.pre, blk.post, nonpos,
                             sbuf if sbuf is not None and short[0] != "binary" else _EMPTY_F32,
                             sc_, _Target(nxt, n))
            self.steps.append((blk, step, short, sbuf))
        cl = net.fc_w.shape[0]
        self.feat = np.empty(n * cl, np.float32)
        self.logits = np.empty((n, net.fc_w.shape[1]), np.float32)
        self.fc_bases = (np.arange(n) * cl).astype(np.int64)
        self.fc_toff = np.arange(cl).astype(np.int64)

    def run(self, x, features=False, timer=None, threads=None, record=None):
        """Logits ``(n, classes)`` (or features) in the plan's own buffer; ``threads``: override
        the plan's thread count for this call (1 .. the plan's); ``timer``: a dict receiving
        seconds per stage; ``record``: a dict receiving NHWC copies of intermediate outputs."""
        eng, net, n = self.eng, self.eng.net, self.n
        th = _Threads(self.threads if threads is None else min(threads, self.threads))
        lap = _Lap(timer)
        # stem: NCHW -> zero-bordered NHWC, direct conv + BN, max-pool + pack
        st = net.stem
        p = st.padding
        _c, h, w = net.input_shape
        self.xin[:, p:p + h, p:p + w, :] = x.transpose(0, 2, 3, 1)
        sh, sw = net.stem_hw
        sc = eng._stem_c
        tgt = self.first_target
        xin = self.xin.reshape(-1)
        if net.stem_pool:
            ph, pw = net.blocks[0].in_hw
            ch = self.stem_chunk
            img_in, img_pool = xin.shape[0] // n, ph * pw * sc
            img_words = tgt.buf.shape[0] // n
            stem_rec = []
            for i0 in range(0, n, ch):
                m = min(ch, n - i0)
                th(self.stem_work * m // ch)
                rc.conv_taps(xin[i0 * img_in:], self.stem_bases, m * sh * sw, self.stem_toff,
                             eng._stem_w, eng._stem_nv, sc, st.bn.scale, st.bn.shift,
                             self.stem_out)
                th(m * sh * sw * sc)
                rp.maxpool3s2_pack(self.stem_out, m, sh, sw, sc, ph, pw,
                                   self.pooled[i0 * img_pool:], tgt.buf[i0 * img_words:],
                                   *tgt.geom, eng._nonpos)
                if record is not None:
                    stem_rec.append(self.stem_out[:m * sh * sw * sc].reshape(m, sh, sw, sc).copy())
            stream = self.pooled
            if record is not None:
                record["bn1"] = np.concatenate(stem_rec)
                record["maxpool"] = self.pooled.reshape(n, ph, pw, sc).copy()
        else:
            th(self.stem_work)
            rc.conv_taps(xin, self.stem_bases, self.stem_bases.shape[0], self.stem_toff,
                         eng._stem_w, eng._stem_nv, sc, st.bn.scale, st.bn.shift, self.stem_out)
            th(n * sh * sw * sc)
            stream = self.stem_out
            ew.merge_pack(stream, _EMPTY_F32, self.pool_ip, self.pool_slopes, tgt.buf)
            if record is not None:
                record["bn1"] = self.stem_out.reshape(n, sh, sw, sc).copy()
        lap("stem")
        if self.bridge is not None:
            stream = self.bridge.run(th, lap, record)
        for blk, step, short, sbuf in self.steps:
            if short is None:
                step.short = stream
            else:
                hh, ww = blk.in_hw
                cin = blk.conv.in_channels
                oh, ow = blk.out_hw
                th(n * oh * ow * cin * 4)
                kind = short[0]
                if kind == "real":
                    _, wt, nv, o, bn = short
                    rc.pool2_conv1x1(stream, n, hh, ww, cin, oh, ow, wt, nv, o, bn.scale,
                                     bn.shift, sbuf)
                    lap("shortcuts")
                    if record is not None:
                        record[f"{blk.name}.downsample.2"] = sbuf.reshape(n, oh, ow, o).copy()
                else:
                    rp.avgpool2(stream, n, hh, ww, cin, oh, ow, sbuf)
                    lap("shortcuts")
                    if record is not None:
                        record[f"{blk.name}.downsample.0"] = sbuf.reshape(n, oh, ow, cin).copy()
                    if kind == "binary":
                        _, splan, saz = short
                        th(n * oh * ow * splan.out_channels * splan.k // 64)
                        step.short = splan(sbuf.reshape(n, oh, ow, cin), saz).reshape(-1)
                        lap("binary_convs")
            stream = step.run(th, lap, record)
        cl = net.fc_w.shape[0]
        hh, ww = net.blocks[-1].out_hw
        th(n * hh * ww * cl)
        rp.global_avgpool(stream, n, hh * ww, cl, self.feat)
        if record is not None:
            record["avgpool"] = self.feat.reshape(n, cl).copy()
        if features:
            lap("elementwise_glue")
            return self.feat.reshape(n, cl)
        classes = net.fc_w.shape[1]
        th(n * cl * classes)
        rc.conv_taps(self.feat, self.fc_bases, n, self.fc_toff, eng._fc_w, eng._fc_nv, classes,
                     eng._fc_scale, eng._fc_shift, self.logits.reshape(-1))
        lap("elementwise_glue")
        return self.logits


class _Lap:
    """``lap(stage)`` adds the time since the previous lap to ``timer[stage]`` (no-op without one)."""

    def __init__(self, timer):
        self.timer = timer
        self.t = time.perf_counter() if timer is not None else 0.0

    def __call__(self, stage):
        if self.timer is not None:
            now = time.perf_counter()
            self.timer[stage] += now - self.t
            self.t = now


def _ones(c):
    return np.ones(c, np.float32)


def compile_model(model, packed=None, scales=None) -> Engine:
    """Compile ``model`` (a BNNResNet with trained weights) for packed inference; ``packed`` /
    ``scales``: optional packed words / Bi-Real alphas by weight name (see
    :func:`refbnn.engine.network.network_from_tensors`)."""
    from refbnn.engine.network import network_from_tensors

    return Engine(network_from_tensors(model.config, model.state_dict(), packed, scales))


__all__ = ["Engine", "EngineError", "ThreadPolicy", "compile_model", "stage_threads"]
