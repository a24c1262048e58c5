"""The packed engine's runtime: a folded :class:`~refbnn.engine.network.Network` compiled to a
:class:`~refbnn.engine.program.Program` (ops + buffers allocated once), run as one Numba call per
forward.

Data flow per image (NHWC after the stem's input; ``x`` NCHW float32 at the door):

1. ``stem``: the image is copied row by row into a zero-bordered planar (CHW) buffer (no
   transpose: the conv's taps index it directly); the real conv + BatchNorm runs
   as a direct convolution on float32 FMA micro-kernels (register tiles of 6 pixels x 64
   channels with AVX-512 on full-width units, 6 x 16 on AVX2 and Zen 4:
   :func:`refbnn.kernels.realconv.vectors_for`; no im2col matrix), six conv rows at a time into
   a ring buffer that stays in cache, and the 3x3/2 max-pool of each finished pooled row writes
   the residual stream and packs its signs into the first binary conv's padded input
   (:func:`refbnn.kernels.realconv.stem_pool_rows`);
2. per binary conv: :func:`refbnn.kernels.bconv_fast.conv_items` with the fused epilogue on each
   register tile's popcounts: folded BN (and alpha) ``float32(float32(acc) * mul) + bias``, the
   pre-activation, the residual add (the stream itself, updated in place, or the shortcut), the
   post-activation, the float32 result as the new residual stream and its sign bits straight into
   the next conv's padded input (one 32-bit store per 32 channels), no second pass;
3. shortcuts of stride-2 blocks: 2x2/2 average pool fused with the 1x1 conv + BN
   (:func:`refbnn.kernels.realconv.pool2_conv1x1_tiles`), or the pool alone (cheap shortcut: the
   epilogue reads its channels repeated; binary shortcut: packed for a 1x1 binary conv);
4. ``head``: global average pool, then the classifier on the same FMA micro-kernels.

Threads (the engine's own policy, documented here because a process beside us changes what is
fast). A batch of several images runs *image-parallel*: each worker claims the next group of
images (:func:`group_size`) from an atomic counter and runs the whole network on it in its own
buffers (no barrier between layers, and a worker held back by another process simply takes fewer
groups; :class:`Program` says which ops run once per group). One image with several
threads runs *layer-parallel*: each op's work items split over the workers, one parallel region
per op; ops with less work than :data:`PARALLEL_MIN_WORK` (multiply-adds, binary MACs / 64 or
values) run on the calling thread, since a region costs a few microseconds to start and, with a
busy core, waits for the OS to run its second thread. On top, for one image only (the
layer-parallel mode, where every op waits for its slowest worker), :class:`ThreadPolicy`
(``adaptive_threads``, the default): with more than one thread requested, the forwards are timed
at the requested threads and, every :data:`PROBE_EVERY` calls, for a few calls on a single thread
(the first forward after a switch untimed: it pays for moving the buffers between the cores'
caches); whichever has the lower recent median runs (measured on weights/ftbnn18.h5 before this
policy: 37-53 ms at batch 1 with two threads and a CPU-bound process beside it, vs 0.6-1.0 ms with
one). Batches always run on the requested threads: image-parallel workers never wait for each
other, and probing one thread there only cost time (ftbnn18_g2 224x224, batch 32, 2 threads on the
2-core AMD EPYC: 421 ms per batch with the probes in the first calls, 273 ms without; 1 thread:
465 ms). Results do not depend on the thread count or the batch (every output element is computed
by one worker, in a fixed order).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict

import numba
import numpy as np
from numba.typed import List

from refbnn.engine import program as pg
from refbnn.engine.network import EngineError, Network
from refbnn.kernels import bconv_fast as bf
from refbnn.kernels import elementwise as ew
from refbnn.kernels import epilogue as ep
from refbnn.kernels import realconv as rc
from refbnn.kernels.sync import read_cycles
from refbnn.ops import BConv2DPlan

MAX_PLANS = 8

#: ``Engine(stem=...)``: ``"float32"`` (the default: bit for bit the float path's stem) or
#: ``"bf16"`` (opt-in: image and stem weights rounded to bfloat16, tap pairs by VDPBF16PS;
#: docs/semantics.md "bf16 stem"; 1.7x faster stem conv on AVX512-BF16 CPUs, other numbers).
STEM_PRECISIONS = ("float32", "bf16")
#: The bf16 stem's inputs must stay finite after rounding: magnitudes from this one on round to
#: infinity (bfloat16's largest value plus half its last place, a tie to the even infinity).
BF16_OVERFLOW = float(np.uint32(0x7F7F8000).view(np.float32))

#: With adaptive threads, every this many forwards of a plan one runs with the other setting.
PROBE_EVERY = 32
#: A probe of the other setting runs this many forwards in a row; the first one is not timed.
PROBE_RUNS = 3
#: The policy compares the medians of the last this many timed forwards of each setting.
HISTORY = 8

#: A stage with less work than this (multiply-adds, binary MACs / 64, or values touched) runs on
#: one thread. A parallel region costs a few microseconds to start and, when another process holds
#: a core, can wait a scheduler time slice (milliseconds) for its second thread; below this size the
#: second thread cannot save more than that start-up.
PARALLEL_MIN_WORK = 1 << 18

#: A batch runs in groups of up to this many images (:func:`group_size`); binary convs whose output
#: has at most :data:`GROUP_PIXELS` pixels per image run once per group (:class:`Program`).
#: Measured on a 2-core AMD EPYC (Zen 4), 1 thread: weights/ftbnn18.h5 at batch 256, groups of 4 to
#: 64 within noise of each other; FTBNN-18 224x224 at batch 32, every conv grouped (56x56 maps
#: included) 213 ms vs 225 ms with only 14x14 and smaller grouped.
GROUP_MAX = 8
GROUP_PIXELS = 56 * 56
#: Grouped binary convs whose fused epilogue would not run in the micro-kernel's registers
#: (:func:`refbnn.kernels.bconv_fast.fused_in_registers`: sign units not aligned, at most 8
#: channels per group, a repeated residual) write conv + BN as float32, then one separate pass
#: adds the residual, applies the non-linearities and packs (measured faster there than the
#: scratch-buffer fused epilogue: weights/ftbnn18.h5 layer1 convs, 24 channels, 8 vs 12.7 us per
#: image plus about 3 for the pass, before partial tiles ran in registers); the others (all of
#: them at batch 1) keep the fused epilogue (2-core AMD EPYC, 1 thread, batch 32, interleaved:
#: Bi-Real-18 190 -> 167-169 ms, FTBNN-18 193 -> 166-175 ms per batch with every grouped conv
#: fused). Partial 32-lane tiles in registers (masked) took weights/ftbnn18.h5 at batch 32 from
#: 2.81-3.08 to 2.33-2.53 ms (the merge passes, 0.73-1.2 ms, gone).
GROUP_SPLIT_EPILOGUE = True
#: ... and such a conv runs once per group only while the group's float32 conv output takes at
#: most this many bytes (the merge pass then reads it from cache); larger ones run image by image
#: with the fused epilogue, as at batch 1. Measured on the 2-core AMD EPYC, 1 thread, batch 32:
#: ftbnn18_g2 (77- to 616-channel groups) 12.7-14.0 ms per image with every map up to 56x56 on
#: the split path, 9.3-10.4 with only its 7x7 maps there (<= 1 MiB at 8 images; batch 1: about
#: 10); weights/ftbnn18.h5 at batch 256 unchanged (0.079 ms per image: its maps are small).
#: The same limit holds for fused convs whose groups end in a partial 32-lane tile, in registers
#: since cad717a: grouped regardless of size, ftbnn18_g2's layer1-3 convs (154-616 channels, 8
#: images: 15 MB of float output at 56x56) ran 1.3-1.6x slower per image than image by image
#: (per-op cycles, batch 32, 1 thread: 15.1-16.4 vs 11.6-12.7 ms per image in all).
GROUP_SPLIT_BYTES = 1 << 20
#: A group's stem runs as one conv over the group, then the max-pool, when the group's conv output
#: takes at most this many bytes (else image by image through a ring of rows, as at batch 1).
GROUP_STEM_BYTES = 1 << 20

STAGES = ("binary_convs", "stem", "shortcuts", "elementwise_glue")


def stage_threads(work: int, threads: int) -> int:
    """Threads for a stage of ``work`` units: 1 below :data:`PARALLEL_MIN_WORK`, else ``threads``.

    Why: with two threads and the other core busy (another process), every parallel region waits
    until the OS runs the second thread; at batch 1 of a small model that turned 0.5 ms into 20-50
    ms. Small stages on one thread avoid the wait where it costs most, big stages keep the speed-up.
    """
    return 1 if work < PARALLEL_MIN_WORK else threads


def group_size(n: int, threads: int) -> int:
    """Images per group for a batch of ``n`` on ``threads`` workers: :data:`GROUP_MAX`, fewer
    where that would leave a worker fewer than two groups (1 for one image)."""
    return max(1, min(GROUP_MAX, n // (2 * threads)))


class ThreadPolicy:
    """Chooses, per plan, between the requested threads and one thread by measured forward time.

    Keeps the last :data:`HISTORY` *warm* times of each setting and runs the one with the lower
    median; every :data:`PROBE_EVERY` calls it runs the other one for :data:`PROBE_RUNS`
    consecutive calls (the first calls try both the same way). The first forward after a switch
    is not recorded: it pays for the switch itself (the buffers move between the cores' caches,
    the idle worker wakes up), and counting it made the minority setting look slow for good
    (measured on Bi-Real-18 224x224, batch 1, 2 threads on a 2-core AMD EPYC: a 2-thread median
    of 11.0 ms from single probes after runs of 1-thread calls, 6.7-7.8 ms run back to back, so
    the policy stayed on 1 thread at 8.7-9.0 ms)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.times = {threads: [], 1: []}
        self.calls = 0
        self.last = None
        self.burst = (None, 0)

    def choose(self) -> int:
        if self.threads == 1:
            return 1
        self.calls += 1
        setting, left = self.burst
        if left > 0:
            self.burst = (setting, left - 1)
            return setting
        a, b = self.times[self.threads], self.times[1]
        if len(a) < 2:
            return self._start(self.threads)
        if len(b) < 2:
            return self._start(1)
        best = self.threads if _median(a) <= _median(b) else 1
        if self.calls % PROBE_EVERY == 0:
            return self._start(1 if best == self.threads else self.threads)
        return best

    def _start(self, setting: int) -> int:
        """Run ``setting`` for :data:`PROBE_RUNS` calls in a row (this one included)."""
        self.burst = (setting, PROBE_RUNS - 1)
        return setting

    def record(self, threads: int, seconds: float) -> None:
        warm = threads == self.last
        self.last = threads
        if not warm:
            return
        t = self.times[threads]
        t.append(seconds)
        if len(t) > HISTORY:
            del t[0]


def _median(values):
    s = sorted(values)  # a few values: cheaper than np.median per call
    return s[len(s) // 2]


def _spec(act):
    """A network :class:`~refbnn.engine.network.Act` as a ``pre=``/``post=`` spec of the plans."""
    if act.code == ew.NONE:
        return None
    if act.code == ew.RELU:
        return "relu"
    if act.code == ew.PRELU:
        return ("prelu", act.neg)
    return ("fprelu", act.pos, act.neg)


def _geom(plan: BConv2DPlan):
    """``(hp, wp, pt, pl, groups, wg)`` of a plan's padded input (where a producer packs)."""
    return (*plan.padded_hw, *plan.input_offset, plan.groups, plan.wg)


def _bits_out(plan: BConv2DPlan):
    """A plan's padded input as a ``bits_out`` target ``(hp, wp, words, pt, pl)``."""
    return (*plan.padded_hw, plan.groups * plan.wg, *plan.input_offset)


class Engine:
    """A compiled network. ``forward(x)``: ``x`` (N, C, H, W) float32 normalised images -> logits
    ``(N, classes)`` float32 (a new array). Not for concurrent use from several Python threads."""

    def __init__(self, net: Network, adaptive_threads: bool = True, stem: str = "float32"):
        if stem not in STEM_PRECISIONS:
            raise ValueError(f"stem must be one of {STEM_PRECISIONS}, got {stem!r}")
        self.net = net
        self.adaptive_threads = bool(adaptive_threads)
        self.stem = stem
        self.config = net.config
        self.input_shape = net.input_shape
        _c, h, w = net.input_shape
        st = net.stem
        k = st.w_hwio.shape[0]
        self._stem_k, self._stem_c = k, st.w_hwio.shape[3]
        self._stem_nv = rc.vectors_for(self._stem_c, bf16=stem == "bf16")
        self._in_padded = (h + 2 * st.padding, w + 2 * st.padding)
        if stem == "bf16":
            # bfloat16 pairs (uint32 bits, carried in the ops' float32 weight field)
            self._stem_w = rc.weight_tiles(rc.weight_pairs_bf16(st.w_hwio),
                                           self._stem_nv).view(np.float32)
            self._stem_wp = rc.bf16_planar_width(self._in_padded[1], k)
        else:
            self._stem_w = rc.weight_tiles(st.w_hwio.reshape(-1, self._stem_c), self._stem_nv)
            self._stem_wp = self._in_padded[1]
        saz = net.blocks[0].conv.sign_at_zero
        self._saz = saz
        self._nonpos = saz == -1
        self._float_plans = {}
        # the fused binary conv of each block: its output packed for the next binary conv
        convs = ([net.bridge[0]] if net.bridge is not None else []) + [b.conv for b in net.blocks]
        nxt = {id(a): b for a, b in itertools.pairwise(convs)}
        self._fused = {}
        for conv, pre, post in ([(net.bridge[0], None, net.bridge[1])] if net.bridge else []) + \
                [(b.conv, b.pre, b.post) for b in net.blocks]:
            following = nxt.get(id(conv))
            self._fused[id(conv)] = BConv2DPlan(
                conv.words, conv.in_channels, self._in_hw(conv), conv.stride,
                (conv.padding,) * 4, conv.pad_value, 1, conv.groups, output="fused",
                multiplier=conv.mul, bias=conv.bn.shift, sign_at_zero=saz, impl="fast",
                out_groups=following.groups if following is not None else 1,
                pre=_spec(pre) if pre is not None else None, post=_spec(post))
        self._fc_nv = rc.vectors_for(net.fc_w.shape[1])
        self._fc_w = rc.weight_tiles(net.fc_w, self._fc_nv)
        classes = net.fc_w.shape[1]
        self._fc_scale = np.ones(classes, np.float32)
        self._fc_shift = net.fc_b if net.fc_b is not None else np.zeros(classes, np.float32)
        self._programs = OrderedDict()
        self._policies: dict[int, ThreadPolicy] = {}

    def _in_hw(self, conv):
        if self.net.bridge is not None and conv is self.net.bridge[0]:
            return self.net.blocks[0].in_hw
        for b in self.net.blocks:
            if b.conv is conv:
                return b.in_hw
            if b.shortcut is not None and b.shortcut[0] == "binary" and b.shortcut[1] is conv:
                return b.out_hw
        raise KeyError(conv.name)  # pragma: no cover - every conv is in the network

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

    # -- programs ---------------------------------------------------------------------------
    def _program(self, threads: int, record: bool = False, group: int = 1) -> Program:
        key = (threads, record, group)
        prog = self._programs.get(key)
        if prog is None:
            if len(self._programs) >= MAX_PLANS:
                self._programs.popitem(last=False)
            prog = self._programs[key] = Program(self, threads, record, group)
        return prog

    def _policy(self, threads: int) -> ThreadPolicy:
        """The one-image thread policy for ``threads`` requested threads."""
        pol = self._policies.get(threads)
        if pol is None:
            pol = self._policies[threads] = ThreadPolicy(threads)
        return pol

    # -- running ---------------------------------------------------------------------------
    def _check(self, x):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input must be (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        if np.isnan(x).any():
            raise ValueError("input contains NaN")
        if self.stem == "bf16" and x.size and not float(np.abs(x).max()) < BF16_OVERFLOW:
            raise ValueError("input has values the bf16 stem cannot take (infinite, or at least "
                             f"{BF16_OVERFLOW:.6g} in magnitude: infinite in bfloat16)")
        return np.ascontiguousarray(x)

    def _run(self, x, threads=None, timer=None):
        """``(logits, features)`` of checked ``x`` on ``threads`` (default: Numba's current count,
        with the adaptive policy)."""
        n = x.shape[0]
        requested = numba.get_num_threads()
        use = requested if threads is None else threads
        pol = None
        if threads is None and self.adaptive_threads and requested > 1 and n == 1:
            pol = self._policy(requested)
            use = pol.choose()
        t = requested if threads is None else threads
        prog = self._program(t, group=group_size(n, t))
        t0 = time.perf_counter()
        try:
            out = prog.run(x, use, timer)
        finally:
            if numba.get_num_threads() != requested:
                numba.set_num_threads(requested)
        if pol is not None:
            pol.record(use, time.perf_counter() - t0)
        return out

    def warm_up(self, batch: int = 2) -> None:
        """Load (or, the first time on a machine, compile) every compiled path a forward can take,
        so that no later call pays for it: one thread, one image on Numba's threads
        (layer-parallel) and a batch of ``batch`` (image-parallel), on zero images. Each path is
        one Numba function, loaded from the on-disk cache the first time the process uses it
        (tens of milliseconds; a cold cache compiles it, tens of seconds): a timed call, or the
        adaptive thread policy's probes, would otherwise measure that."""
        x = np.zeros((max(2, int(batch)), *self.input_shape), np.float32)
        threads = numba.get_num_threads()
        self._run(x[:1], threads=1)
        if threads > 1:
            self._run(x[:1], threads=threads)
            self._run(x, threads=threads)

    def features(self, x) -> np.ndarray:
        """The global average pool's output ``(N, C_last)`` float32 (a new array)."""
        x = self._check(x)
        if x.shape[0] == 0:
            return np.zeros((0, self.net.fc_w.shape[0]), np.float32)
        return self._run(x)[1]

    def forward(self, x) -> np.ndarray:
        x = self._check(x)
        if x.shape[0] == 0:
            return np.zeros((0, self.net.fc_w.shape[1]), np.float32)
        return self._run(x)[0]

    __call__ = forward

    def layer_outputs(self, x) -> OrderedDict:
        """One forward of ``x``, keeping copies of the intermediate outputs, NHWC float32, named as
        refbnn's layers: ``bn1`` (stem conv + BN), ``maxpool``, ``bridge.bn1``, ``bridge``,
        ``layer{s}.{i}.bn1`` (the binary conv + BN), ``layer{s}.{i}.downsample.0`` (pool) or
        ``.downsample.2`` (real 1x1 + BN), ``layer{s}.{i}`` (the block's output), ``avgpool``,
        then ``logits``. Runs op by op on one thread (a debugging path); ``.bn1`` of a binary conv
        comes from its ``"float"`` plan (:meth:`binary_plan`) on the same packed input, the rest
        from the buffers of the forward itself."""
        x = self._check(x)
        return self._program(1, record=True).record(x)

    def binary_plan(self, name: str) -> BConv2DPlan:
        """A :class:`BConv2DPlan` (output ``"float"``: conv + folded BN) of the binary layer
        ``name`` (``"bridge.binary_conv"``, ``"layer1.0.binary_conv"``, ``"layer2.0.downsample.1"``),
        on the fast path, sharing the geometry of the engine's own plan."""
        plan = self._float_plans.get(name)
        if plan is None:
            conv = next((c for c in self.net.binary_convs() if c.name == name), None)
            if conv is None:
                raise KeyError(f"no binary layer {name!r}")
            plan = self._float_plans[name] = BConv2DPlan(
                conv.words, conv.in_channels, self._in_hw(conv), conv.stride, (conv.padding,) * 4,
                conv.pad_value, 1, conv.groups, output="float", multiplier=conv.mul,
                bias=conv.bn.shift, sign_at_zero=conv.sign_at_zero, impl="fast")
        return plan

    def profile(self, x, runs: int = 5) -> dict:
        """Milliseconds per forward of ``x`` by stage (:data:`STAGES`, plus ``total``) on one
        thread, the mean of ``runs`` timed runs after a warm-up. Each op is timed inside the
        compiled call by the CPU's cycle counter; ``elementwise_glue`` also holds what no op
        accounts for (the call itself, the input check, the output copy)."""
        x = self._check(x)
        prog = self._program(1, group=group_size(x.shape[0], 1))
        self._run(x, threads=1)
        timer = np.zeros(len(prog.stages), np.int64)
        total = 0.0
        for _ in range(runs):
            t0 = time.perf_counter()
            self._run(x, threads=1, timer=timer)
            total += time.perf_counter() - t0
        per = timer / cycles_per_second() / runs
        out = dict.fromkeys(STAGES, 0.0)
        for stage, s in zip(prog.stages, per):
            out[stage] += 1e3 * s
        total_ms = 1e3 * total / runs
        out["elementwise_glue"] += max(total_ms - sum(out.values()), 0.0)
        out["total"] = total_ms
        return out


_CPS = []


def cycles_per_second() -> float:
    """The rate of :func:`refbnn.kernels.sync.cycles`, measured once against ``perf_counter``."""
    if not _CPS:
        read_cycles()
        c0, t0 = read_cycles(), time.perf_counter()
        time.sleep(0.05)
        c1, t1 = read_cycles(), time.perf_counter()
        _CPS.append((c1 - c0) / (t1 - t0))
    return _CPS[0]


class _Arena:
    """The float32 and uint64 regions one image needs (handles ``(kind, index)``); where they lie
    is fixed once the ops are known (:meth:`Program._finish`)."""

    def __init__(self):
        self.sizes = {"f": [], "u": []}

    def f(self, size):
        self.sizes["f"].append(int(size))
        return ("f", len(self.sizes["f"]) - 1)

    def u(self, size):
        self.sizes["u"].append(int(size))
        return ("u", len(self.sizes["u"]) - 1)


_NO = None
_E_I64 = np.zeros(1, np.int64)
_E_F32 = np.zeros(1, np.float32)
_E_F32_2D = np.zeros((1, 1), np.float32)
_REGION_SLOTS = ((pg.IP_FIN, pg.S_FIN, "fin"), (pg.IP_FOUT, pg.S_FOUT, "fout"),
                 (pg.IP_FRES, pg.S_FRES, "fres"), (pg.IP_UIN, pg.S_UIN, "uin"),
                 (pg.IP_UOUT, pg.S_UOUT, "uout"))


class Program:
    """The ops of one forward (:mod:`refbnn.engine.program`) and their buffers for ``threads``
    workers, each running ``group`` images at a time: per worker one row of a float32 and a uint64
    arena (the buffers of one group, zeroed once: the padded borders stay zero) and a private
    float32 scratch row. Binary convs whose output has at most :data:`GROUP_PIXELS` pixels per
    image (and, on the split epilogue path, a group output within :data:`GROUP_SPLIT_BYTES`) are
    *grouped*: one call, tiles built for the ``group`` images (small maps fill whole
    register tiles, and a weight tile serves more pixels); the buffers they and the ops after the
    first of them touch hold one slot per image, the others one slot that the images of a group
    use in turn. ``record``: a program whose stem keeps its whole conv output (for
    :meth:`Engine.layer_outputs`; one image per group)."""

    def __init__(self, eng: Engine, threads: int, record: bool = False, group: int = 1):
        self.eng, self.threads, self.record_mode = eng, threads, record
        self.group = int(group)
        net = eng.net
        self.ops, self.stages, self.meta, self._specs = List(), [], [], []
        self._ybufs = {}
        a = _Arena()
        self._ps = 0
        dummy_conv, dummy_table = _dummy_records()
        self._dummy = (dummy_conv, dummy_table)
        c, h, w = net.input_shape
        st = net.stem
        hp, wp = eng._in_padded
        p = st.padding
        sh, sw = net.stem_hw
        sc = eng._stem_c
        ntaps = eng._stem_k * eng._stem_k * c
        convs = ([net.bridge[0]] if net.bridge is not None else []) + [b.conv for b in net.blocks]
        bits = {id(cv): a.u(self._padded_words(eng._fused[id(cv)])) for cv in convs}
        first = eng._fused[id(convs[0])]
        bf16 = eng.stem == "bf16"
        k_input, k_pool, k_conv = (pg.K_INPUT_BF16, pg.K_STEM_POOL_BF16, pg.K_STEM_CONV_BF16) \
            if bf16 else (pg.K_INPUT, pg.K_STEM_POOL, pg.K_STEM_CONV)
        geometry = rc.planar_geometry_bf16 if bf16 else rc.planar_geometry
        wp = eng._stem_wp
        # bf16: the planar image's bfloat16 bits, two per float32 of the arena
        xin = a.f(-(-hp * wp * c // 2) if bf16 else hp * wp * c)
        # the image stays planar (a row-by-row copy into the zero border; the stem's taps read
        # it in the weights' (a, b, channel) order, the bf16 stem's pairs in (channel, a, b))
        self._add(k_input, "stem", items=h, work=c * h * w, fout=xin,
                  args=(c, h, w, wp, p, p, hp))
        _, stem_toff = geometry(1, c, hp, wp, eng._stem_k, st.stride, sh, sw)
        if net.stem_pool and self.group > 1 and self.group * sh * sw * sc * 4 <= GROUP_STEM_BYTES:
            # the whole group's conv output, then the max-pool (tiles span the group's images)
            ph, pw = net.blocks[0].in_hw
            pooled = a.f(ph * pw * sc)
            out = a.f(sh * sw * sc)
            bases, _ = geometry(self.group, c, hp, wp, eng._stem_k, st.stride, sh, sw)
            npix = self.group * sh * sw
            self._add(k_conv, "stem", items=rc.conv_tiles_count(npix, eng._stem_nv),
                      work=sh * sw * sc * ntaps, fin=xin, fout=out, args=(eng._stem_nv, npix, sc),
                      wt=eng._stem_w, scale=st.bn.scale, shift=st.bn.shift, bases=bases,
                      toff=stem_toff, grouped=True)
            xp = np.array([sh, sw, sc, ph, pw, *_geom(first), int(eng._nonpos)], np.int64)
            self._add(pg.K_MAXPOOL, "stem", items=self.group * ph, work=ph * pw * sc * 9, fin=out,
                      fout=pooled, uout=bits[id(convs[0])], sg=xp, grouped=True)
            stream, shw = pooled, (ph, pw)
        elif net.stem_pool:
            ph, pw = net.blocks[0].in_hw
            pooled = a.f(ph * pw * sc)
            sg = rc.stem_geometry(1, wp, st.stride, sh, sw, sc, ph, pw, _geom(first), eng._nonpos,
                                  True, sh if record else None)
            ring = int(sg[rc.SG_RB]) * sw * sc
            self._ps = max(self._ps, ring)
            self._add(k_pool, "stem", items=ph, work=sh * sw * sc * ntaps, fin=xin,
                      fout=pooled, uout=bits[id(convs[0])], ps=(0, ring), args=(eng._stem_nv,),
                      sg=sg, wt=eng._stem_w, scale=st.bn.scale, shift=st.bn.shift, toff=stem_toff,
                      record=[("bn1", "ring", (sh, sw, sc)), ("maxpool", pooled, (ph, pw, sc))])
            stream, shw = pooled, (ph, pw)
        else:
            out = a.f(sh * sw * sc)
            bases, _ = geometry(1, c, hp, wp, eng._stem_k, st.stride, sh, sw)
            self._add(k_conv, "stem", items=rc.conv_tiles_count(sh * sw, eng._stem_nv),
                      work=sh * sw * sc * ntaps, fin=xin, fout=out,
                      args=(eng._stem_nv, sh * sw, sc), wt=eng._stem_w, scale=st.bn.scale,
                      shift=st.bn.shift, bases=bases, toff=stem_toff,
                      record=[("bn1", out, (sh, sw, sc))])
            self._pack("stem", out, sh, sw, sc, bits[id(convs[0])], _geom(first))
            stream, shw = out, (sh, sw)
        last = a.u(0)
        if net.bridge is not None:
            bconv = net.bridge[0]
            out = a.f(shw[0] * shw[1] * bconv.out_channels)
            stream = self._conv("bridge", bconv, bits, convs, a, fout=out, fres=_NO, rsc=0,
                                acts=(None, net.bridge[1]))
        for blk in net.blocks:
            cin, cout = blk.conv.in_channels, blk.conv.out_channels
            (hh, ww), (oh, ow) = blk.in_hw, blk.out_hw
            if blk.shortcut is None:
                out, res, rsc = stream, stream, cout
            else:
                kind, op = blk.shortcut
                out = a.f(oh * ow * cout)
                res, rsc = out, cout
                # with a grouped conv after it, the shortcut runs once for the whole group too
                gs = self._grouped(eng._fused[id(blk.conv)], cin if kind == "repeat" else cout)
                ng = self.group if gs else 1
                if kind == "real":
                    nv = rc.vectors_for(cout)
                    self._add(pg.K_POOL_CONV, "shortcuts", grouped=gs,
                              items=rc.conv_tiles_count(ng * oh * ow, nv),
                              work=oh * ow * cin * cout,
                              fin=stream, fout=out, args=(hh, ww, cin, oh, ow, nv, cout),
                              wt=rc.weight_tiles(op.w_hwio.reshape(-1, cout), nv),
                              scale=op.bn.scale, shift=op.bn.shift,
                              record=[(f"{blk.name}.downsample.2", out, (oh, ow, cout))])
                else:
                    pooled = a.f(oh * ow * cin)
                    self._add(pg.K_AVGPOOL, "shortcuts", items=ng * oh, work=oh * ow * cin * 4,
                              grouped=gs,
                              fin=stream, fout=pooled, args=(hh, ww, cin, oh, ow),
                              record=[(f"{blk.name}.downsample.0", pooled, (oh, ow, cin))])
                    if kind == "repeat":
                        res, rsc = pooled, cin
                    else:
                        splan = eng.binary_plan(op.name)
                        sbits = a.u(self._padded_words(splan))
                        self._pack("shortcuts", pooled, oh, ow, cin, sbits, _geom(splan))
                        grouped = self._grouped(splan)
                        sconv, stable = splan.fast_records(self.group if grouped else 1)
                        self._add(pg.K_BCONV_FLOAT, "binary_convs",
                                  items=bf.items(sconv, stable, True),
                                  work=oh * ow * cout * splan.k // 64, cm=1, uin=sbits, fout=out,
                                  conv=sconv, table=stable, grouped=grouped)
            if blk is net.blocks[-1]:
                last = a.u(oh * ow * eng._fused[id(blk.conv)].out_words)
            stream = self._conv(blk.name, blk.conv, bits, convs, a, fout=out, fres=res, rsc=rsc,
                                last=last, acts=(blk.pre, blk.post))
        cl, classes = net.fc_w.shape
        hh, ww = net.blocks[-1].out_hw
        self._add(pg.K_HEAD, "elementwise_glue", items=1, work=hh * ww * cl + cl * classes,
                  fin=stream, args=(hh * ww, cl, classes, eng._fc_nv), wt=eng._fc_w,
                  scale=eng._fc_scale, shift=eng._fc_shift, bases=np.zeros(1, np.int64),
                  toff=np.arange(cl, dtype=np.int64), record=[("avgpool", "feats", None)])
        nf, nu = self._finish(a)
        rows = threads
        self.af = np.zeros((rows, max(nf, 1)), np.float32)
        self.au = np.zeros((rows, max(nu, 1)), np.uint64)
        self.ps = np.zeros((rows, max(self._ps, 1)), np.float32)
        self.counter = np.zeros(1, np.int64)
        self._no_timer = np.zeros(1, np.int64)

    @staticmethod
    def _padded_words(plan):
        return plan.padded_hw[0] * plan.padded_hw[1] * plan.groups * plan.wg

    def _grouped(self, plan, rsc=None) -> bool:
        """Whether ``plan`` runs once per group: its map has at most :data:`GROUP_PIXELS` pixels
        and, for a fused block conv with a residual of ``rsc`` channels whose epilogue would take
        the split path (:meth:`_split_epilogue`) or whose groups end in a partial 32-lane tile,
        the group's float output fits :data:`GROUP_SPLIT_BYTES`."""
        oh, ow = plan.out_hw
        if self.group <= 1 or oh * ow > GROUP_PIXELS:
            return False
        if rsc is not None and (self._split_epilogue(plan, rsc)
                                or (plan.out_channels // plan.groups) % 32):
            return self.group * oh * ow * plan.out_channels * 4 <= GROUP_SPLIT_BYTES
        return True

    @staticmethod
    def _split_epilogue(plan, rsc) -> bool:
        """Whether grouped, ``plan`` writes conv + BN as float32 and a separate pass merges."""
        return GROUP_SPLIT_EPILOGUE and not bf.fused_in_registers(
            plan.out_channels, plan.groups, plan.fused_units_aligned, rsc)

    def _add(self, kind, stage, items, work, fin=_NO, fout=_NO, fres=_NO, rsc=0, uin=_NO,
             uout=_NO, ps=(0, 0), cm=0, args=(), sg=None, conv=None, table=None, wt=None,
             scale=None, shift=None, bases=None, toff=None, slopes=None, record=(), before=None,
             grouped=False):
        ip = np.zeros(pg.IP_SIZE, np.int64)
        ip[[pg.IP_ITEMS, pg.IP_WORK, pg.IP_CM, pg.IP_RSC]] = items, work, cm, rsc
        ip[[pg.IP_GROUP, pg.IP_GROUPED]] = self.group, int(grouped)
        ip[pg.IP_PS:pg.IP_PS + 2] = ps
        ip[pg.A0:pg.A0 + len(args)] = args
        dc, dt = self._dummy
        regions = dict(fin=fin, fout=fout, fres=fres, uin=uin, uout=uout)
        self._specs.append((ip, regions, (
            kind, ip, _E_I64 if sg is None else sg, dc if conv is None else conv,
            dt if table is None else table, _E_F32 if wt is None else wt,
            _E_F32 if scale is None else scale, _E_F32 if shift is None else shift,
            _E_I64 if bases is None else bases, _E_I64 if toff is None else toff,
            _E_F32_2D if slopes is None else slopes)))
        self.stages.append(stage)
        self.meta.append((list(record), before))

    def _finish(self, a: _Arena):
        """Lay out the regions (one slot per image of the group for those a grouped op or any op
        after the first grouped one touches, else one), fill the ops' offsets, build the ops;
        returns the float and word arena sizes."""
        split = next((j for j, (ip, _, _) in enumerate(self._specs) if ip[pg.IP_GROUPED]),
                     len(self._specs))
        multi = {h for ip, regions, _ in self._specs[split:] for h in regions.values()
                 if h is not None}
        self.grouped = [bool(ip[pg.IP_GROUPED]) for ip, _, _ in self._specs]
        ends = {"f": 0, "u": 0}
        self._where = {}
        for kind in ("f", "u"):
            for i, size in enumerate(a.sizes[kind]):
                h = (kind, i)
                self._where[h] = (ends[kind], size)
                ends[kind] += size * (self.group if h in multi else 1)
        for ip, regions, args in self._specs:
            for slot, bit, name in _REGION_SLOTS:
                h = regions[name]
                if h is not None:
                    ip[slot:slot + 2] = self._where[h]
                    if h in multi:
                        ip[pg.IP_SLOTS] |= bit
            self.ops.append(pg.make_op(*args))
        del self._specs
        return ends["f"], ends["u"]

    def _pack(self, stage, src, oh, ow, c, dst, geom):
        ones = (np.ones(c, np.float32), np.ones(c, np.float32))
        ipm, sl = ew.merge_params(0, 1, oh, ow, c, ew.NONE, ew.NONE, geom, self.eng._nonpos,
                                  ones, ones)
        self._add(pg.K_PACK, stage, items=oh, work=oh * ow * c, fin=src, uout=dst, sg=ipm,
                  slopes=sl)

    def _conv(self, name, conv, bits, convs, a, fout, fres, rsc, acts, last=_NO):
        """A binary conv and its epilogue; returns the region of the new residual stream."""
        eng = self.eng
        plan = eng._fused[id(conv)]
        i = next(j for j, cv in enumerate(convs) if cv is conv)
        if i + 1 < len(convs):
            target = eng._fused[id(convs[i + 1])]
            uout, bits_out = bits[id(convs[i + 1])], _bits_out(target)
        else:
            target, uout, bits_out = None, last, (*plan.out_hw, plan.out_words, 0, 0)
        grouped = self._grouped(plan, rsc)
        oh, ow = plan.out_hw
        c = plan.out_channels
        if grouped and self._split_epilogue(plan, rsc):
            # conv + BN into a float buffer, then one pass of residual add, activations and packing
            fplan = eng.binary_plan(conv.name)
            cv, table = fplan.fast_records(self.group)
            # two float buffers per size, alternating (the new stream is never the residual it
            # adds), so that a forward touches few distinct cache lines
            pair = self._ybufs.setdefault(oh * ow * c, [a.f(oh * ow * c), a.f(oh * ow * c)])
            y = pair[0] if pair[0] != fres else pair[1]
            self._add(pg.K_BCONV_FLOAT, "binary_convs", items=bf.items(cv, table, True),
                      work=oh * ow * c * plan.k // 64, cm=1, uin=bits[id(conv)], fout=y, conv=cv,
                      table=table, grouped=True,
                      before=(f"{name}.bn1", conv.name, bits[id(conv)], plan))
            ones = np.ones(c, np.float32)
            pre, post = acts
            slopes = [(ones, ones) if act is None else (act.pos, act.neg) for act in acts]
            geom = _geom(target) if target is not None else (oh, ow, 0, 0, 1, 1)
            ipm, sl = ew.merge_params(rsc, self.group, oh, ow, c,
                                      ew.NONE if pre is None else pre.code,
                                      ew.NONE if post is None else post.code, geom, eng._nonpos,
                                      *slopes)
            self._add(pg.K_PACK, "elementwise_glue", items=self.group * oh,
                      work=oh * ow * c, fin=y, fres=fres, uout=uout if target is not None else _NO,
                      sg=ipm, slopes=sl, grouped=True, record=[(name, y, (oh, ow, c))])
            return y
        cv, table = plan.fast_records(self.group if grouped else 1, bits_out)
        cm = plan.fused_units_aligned
        oh, ow = plan.out_hw
        self._add(pg.K_BCONV, "binary_convs", items=bf.items(cv, table, cm),
                  work=oh * ow * plan.out_channels * plan.k // 64, fout=fout, fres=fres, rsc=rsc,
                  uin=bits[id(conv)], uout=uout, cm=int(cm), conv=cv, table=table, grouped=grouped,
                  record=[(name, fout, (oh, ow, plan.out_channels))],
                  before=(f"{name}.bn1", conv.name, bits[id(conv)], plan))
        return fout

    # -- running ---------------------------------------------------------------------------
    def run(self, x, use, timer=None):
        """``(logits, features)`` of ``n`` checked images on ``use`` threads (``<=
        self.threads``)."""
        n = x.shape[0]
        net = self.eng.net
        logits = np.empty(n * net.fc_w.shape[1], np.float32)
        feats = np.empty(n * net.fc_w.shape[0], np.float32)
        timing = timer is not None
        tm = timer if timing else self._no_timer
        xf = x.reshape(-1)
        nops = len(self.stages)
        if timing and timer.shape != (nops,):
            raise ValueError(f"timer must be int64 ({nops},), one slot per op of this program")
        use = max(1, min(use, self.threads))
        if use == 1:
            self.counter[0] = 0
            pg.run_serial(self.ops, xf, n, self.af, self.au, self.ps, logits, feats, self.counter,
                          0, nops, tm, timing)
        elif n == 1 and self.group == 1:
            if numba.get_num_threads() != use:
                numba.set_num_threads(use)
            pg.run_layers(self.ops, xf, self.af, self.au, self.ps, logits, feats, use,
                          PARALLEL_MIN_WORK, 0, nops, tm, timing)
        else:
            workers = min(use, -(-n // self.group))
            if numba.get_num_threads() != workers:
                numba.set_num_threads(workers)
            self.counter[0] = 0
            pg.run_images(self.ops, xf, n, self.af, self.au, self.ps, logits, feats, self.counter,
                          workers, 0, nops, tm, timing)
        return logits.reshape(n, -1), feats.reshape(n, -1)

    def record(self, x):
        """:meth:`Engine.layer_outputs` of checked ``x``: the ops one at a time on one thread."""
        n = x.shape[0]
        net = self.eng.net
        logits = np.empty(n * net.fc_w.shape[1], np.float32)
        feats = np.empty(n * net.fc_w.shape[0], np.float32)
        xf = x.reshape(-1)
        per = OrderedDict()
        for img in range(n):
            for j, (record, before) in enumerate(self.meta):
                if before is not None:
                    name, layer, where, plan = before
                    off, size = self._where[where]
                    buf = self.au[0, off:off + size].reshape(1, *plan.padded_hw, -1).copy()
                    per.setdefault(name, []).append(self.eng.binary_plan(layer).run_padded(buf)[0])
                self.counter[0] = img
                pg.run_serial(self.ops, xf, img + 1, self.af, self.au, self.ps, logits, feats,
                              self.counter, j, j + 1, self._no_timer, False)
                for name, where, shape in record:
                    if where == "feats":
                        cl = net.fc_w.shape[0]
                        val = feats[img * cl:(img + 1) * cl].copy()
                    elif where == "ring":
                        val = self.ps[0, :int(np.prod(shape))].reshape(shape).copy()
                    else:
                        off, size = self._where[where]
                        val = self.af[0, off:off + size].reshape(shape).copy()
                    per.setdefault(name, []).append(val)
        rec = OrderedDict((k, np.stack(v)) for k, v in per.items())
        rec["logits"] = logits.reshape(n, -1)
        return rec


def _dummy_records():
    """A one-channel FastConv and a one-tile TileTable for ops that read none."""
    z1 = np.zeros(1, np.int64)
    epi = ep.prepare(ep.INT32, 0, 1)
    conv = bf.make_conv(np.zeros(8, np.uint64), z1, 1, 1, 1, 1, 1, z1, epi,
                        np.full(1, -1, np.int64), np.zeros(0, np.int64))
    table = bf.make_table(np.zeros(bf.MR, np.int64), np.zeros(bf.MR, np.int64),
                          np.zeros(bf.MR, np.int64), np.ones(1, np.int64), np.zeros(1, bool), 1,
                          np.zeros(bf.MR, np.int64))
    return conv, table


def compile_model(model, packed=None, scales=None) -> Engine:
    """Compile ``model`` (a BNNResNet with trained weights) for packed inference; ``packed`` /
    ``scales``: optional packed words / Bi-Real alphas by weight name (see
    :func:`refbnn.engine.network.network_from_tensors`)."""
    from refbnn.engine.network import network_from_tensors

    return Engine(network_from_tensors(model.config, model.state_dict(), packed, scales))


__all__ = ["Engine", "EngineError", "Program", "ThreadPolicy", "compile_model", "group_size",
           "stage_threads"]
