"""The engine's real-valued kernels against their NumPy oracles (refbnn/kernels/real_oracle.py).

Exact where the kernel does the oracle's float32 operations in the same order (average pool, max-pool,
epilogue, packing); within the oracle's stated bound where it sums in another order (the FMA
convolutions: float32 summation of T products is within T * eps * sum |x w| of the exact sum; the
global pool: hw * eps * sum |x| / hw).
"""


import re

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refbnn import nn
from refbnn.kernels import dispatch, real_oracle
from refbnn.kernels import elementwise as ew
from refbnn.kernels import realconv as rc
from refbnn.kernels import realpool as rp
from refbnn.ops import pack_groups

KINDS = {"none": ew.NONE, "relu": ew.RELU, "prelu": ew.PRELU, "fprelu": ew.FPRELU}


def _rand(rng, shape, zeros=True):
    x = rng.standard_normal(shape).astype(np.float32)
    if zeros:
        x[rng.random(shape) < 0.05] = 0.0  # exact zeros: sign(0) and the FPReLU branch
        x[rng.random(shape) < 0.02] = -0.0
    return x


@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 5),
       k=st.sampled_from([1, 3, 5, 7]), stride=st.integers(1, 2), o=st.integers(1, 70),
       narrow=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_conv_taps_matches_oracle(n, h, w, c, k, stride, o, narrow, seed):
    """Every tile shape (``narrow``: the 6 x 16 tiles of hosts without AVX-512, for any ``o``)."""
    rng = np.random.default_rng(seed)
    pad = k // 2
    x = _rand(rng, (n, h, w, c))
    wt = rng.standard_normal((k, k, c, o)).astype(np.float32)
    scale = rng.normal(0, 1, o).astype(np.float32)
    shift = rng.normal(0, 1, o).astype(np.float32)
    want, bound = real_oracle.conv_bn(x, wt, stride, pad, scale, shift)
    oh, ow = want.shape[1:3]
    xp = np.zeros((n, h + 2 * pad, w + 2 * pad, c), np.float32)
    xp[:, pad:pad + h, pad:pad + w] = x
    bases, toff = rc.conv_geometry(n, h + 2 * pad, w + 2 * pad, c, k, stride, oh, ow)
    nv = 1 if narrow else rc.vectors_for(o)
    guard = np.full(n * oh * ow * o + 40, 7.0, np.float32)  # masked stores leave the rest alone
    rc.conv_taps(xp.reshape(-1), bases, bases.shape[0], toff, rc.weight_tiles(wt.reshape(-1, o), nv),
                 nv, o, scale, shift, guard)
    got = guard[:-40].reshape(want.shape)
    assert (guard[-40:] == 7.0).all()
    assert (np.abs(got.astype(np.float64) - want) <= bound + 1e-30).all()


@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 4),
       k=st.sampled_from([1, 3, 7]), stride=st.integers(1, 2), o=st.integers(1, 70),
       seed=st.integers(0, 2 ** 16))
def test_planar_input_gives_the_nhwc_convs_bits(n, h, w, c, k, stride, o, seed):
    """The stem's planar input (:func:`to_padded_planar`, :func:`planar_geometry`): an exact copy
    into the zero border, and a conv on it sums in the NHWC geometry's order, bit for bit."""
    rng = np.random.default_rng(seed)
    pad = k // 2
    hp, wp = h + 2 * pad, w + 2 * pad
    x = _rand(rng, (n, c, h, w))
    planar = np.full((n, c, hp, wp), 5.0, np.float32)
    planar[:, :, pad:pad + h, pad:pad + w] = 0.0
    border = planar.copy()
    flat = planar.reshape(n, -1)
    for img in range(n):
        rc.to_padded_planar(x.reshape(-1), img, c, h, w, flat[img], hp, wp, pad, pad, 0, h)
    np.testing.assert_array_equal(planar[:, :, pad:pad + h, pad:pad + w], x)
    inner = np.zeros(planar.shape, bool)
    inner[:, :, pad:pad + h, pad:pad + w] = True
    np.testing.assert_array_equal(planar[~inner], border[~inner])  # the border is never written
    planar[~inner] = 0.0
    nhwc = np.ascontiguousarray(planar.transpose(0, 2, 3, 1))
    oh, ow = (hp - k) // stride + 1, (wp - k) // stride + 1
    wt = rng.standard_normal((k, k, c, o)).astype(np.float32)
    scale, shift = rng.normal(0, 1, o).astype(np.float32), rng.normal(0, 1, o).astype(np.float32)
    nv = rc.vectors_for(o)
    tiles = rc.weight_tiles(wt.reshape(-1, o), nv)
    got = {}
    for name, src, (bases, toff) in (
            ("nhwc", nhwc, rc.conv_geometry(n, hp, wp, c, k, stride, oh, ow)),
            ("planar", planar, rc.planar_geometry(n, c, hp, wp, k, stride, oh, ow))):
        got[name] = np.empty(n * oh * ow * o, np.float32)
        rc.conv_taps(src.reshape(-1), bases, bases.shape[0], toff, tiles, nv, o, scale, shift,
                     got[name])
    np.testing.assert_array_equal(got["planar"].view(np.uint32), got["nhwc"].view(np.uint32))


@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 40),
       seed=st.integers(0, 2 ** 16))
def test_avgpool2_is_exactly_the_float_paths(n, h, w, c, seed):
    x = _rand(np.random.default_rng(seed), (n, h, w, c))
    want = real_oracle.avgpool2(x)
    layer = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    np.testing.assert_array_equal(layer.forward(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1), want)
    out = np.empty(want.size, np.float32)
    rp.avgpool2(x.reshape(-1), n, h, w, c, *want.shape[1:3], out)
    np.testing.assert_array_equal(out.reshape(want.shape), want)


@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 40),
       o=st.integers(1, 40), narrow=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_pool2_conv1x1_matches_oracle(n, h, w, c, o, narrow, seed):
    rng = np.random.default_rng(seed)
    x = _rand(rng, (n, h, w, c))
    wt = rng.standard_normal((1, 1, c, o)).astype(np.float32)
    scale, shift = rng.normal(0, 1, o).astype(np.float32), rng.normal(0, 1, o).astype(np.float32)
    want, bound = real_oracle.conv_bn(real_oracle.avgpool2(x), wt, 1, 0, scale, shift)
    nv = 1 if narrow else rc.vectors_for(o)
    out = np.empty(want.size, np.float32)
    rc.pool2_conv1x1(x.reshape(-1), n, h, w, c, *want.shape[1:3], rc.weight_tiles(wt.reshape(c, o), nv),
                     nv, o, scale, shift, out)
    assert (np.abs(out.reshape(want.shape).astype(np.float64) - want) <= bound + 1e-30).all()


def _target(rng, n, h, w, groups, cg):
    """A padded packed buffer with a random border (which must stay untouched) and its geometry."""
    wg = -(-cg // 64)
    pt, pl = rng.integers(0, 2, 2)
    hp, wp = h + pt + rng.integers(0, 2), w + pl + rng.integers(0, 2)
    buf = rng.integers(0, 2 ** 63, (n, hp, wp, groups * wg), dtype=np.uint64)
    return buf, (hp, wp, pt, pl, groups, wg)


def _check_packed(buf, before, geom, values, saz):
    _hp, _wp, pt, pl, groups, _wg = geom
    n, h, w, _ = values.shape
    want = pack_groups(values, groups, saz).reshape(n, h, w, -1)
    np.testing.assert_array_equal(buf[:, pt:pt + h, pl:pl + w], want)
    mask = np.ones(buf.shape[:3], bool)
    mask[:, pt:pt + h, pl:pl + w] = False
    np.testing.assert_array_equal(buf[mask], before[mask])


@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 80),
       groups=st.sampled_from([1, 2]), saz=st.sampled_from([1, -1]), seed=st.integers(0, 2 ** 16))
def test_maxpool3s2_pack_matches_float_path_and_packs(n, h, w, c, groups, saz, seed):
    rng = np.random.default_rng(seed)
    c = c * groups
    x = _rand(rng, (n, h, w, c))
    want = real_oracle.maxpool3s2(x)
    np.testing.assert_array_equal(nn.MaxPool2d(3, 2, 1).forward(x.transpose(0, 3, 1, 2))
                                  .transpose(0, 2, 3, 1), want)
    oh, ow = want.shape[1:3]
    buf, geom = _target(rng, n, oh, ow, groups, c // groups)
    before = buf.copy()
    out = np.empty(want.size, np.float32)
    rp.maxpool3s2_pack(x.reshape(-1), n, h, w, c, oh, ow, out, buf.reshape(-1), *geom, saz == -1)
    np.testing.assert_array_equal(out.reshape(want.shape), want)
    _check_packed(buf, before, geom, want, saz)


@given(n=st.integers(1, 3), hw=st.integers(1, 60), c=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_global_avgpool_within_bound(n, hw, c, seed):
    x = _rand(np.random.default_rng(seed), (n, hw, 1, c))
    want, bound = real_oracle.global_avgpool(x)
    out = np.empty(n * c, np.float32)
    rp.global_avgpool(x.reshape(-1), n, hw, c, out)
    assert (np.abs(out.reshape(n, c).astype(np.float64) - want) <= bound + 1e-30).all()


@given(n=st.integers(1, 2), h=st.integers(1, 6), w=st.integers(1, 6), cs=st.integers(1, 40),
       rep=st.sampled_from([0, 1, 2]), groups=st.sampled_from([1, 2]),
       pre=st.sampled_from(list(KINDS)), post=st.sampled_from(list(KINDS)),
       saz=st.sampled_from([1, -1]), pack=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_merge_pack_is_exact(n, h, w, cs, rep, groups, pre, post, saz, pack, seed):
    """rep 0: no shortcut; 1: same channels; 2: the shortcut's channels repeated twice."""
    rng = np.random.default_rng(seed)
    c = cs * max(rep, 1) * groups
    cs = c // max(rep, 1)
    y = _rand(rng, (n, h, w, c))
    short = _rand(rng, (n, h, w, cs)) if rep else None
    slopes = [(rng.uniform(0.5, 1.5, c).astype(np.float32), rng.uniform(-0.5, 1, c).astype(np.float32))
              for _ in range(2)]
    want = real_oracle.merge(y, short, (pre, *slopes[0]), (post, *slopes[1]))
    buf, geom = _target(rng, n, h, w, groups, c // groups)
    before = buf.copy()
    ip, sl = ew.merge_params(cs if rep else 0, n, h, w, c, KINDS[pre], KINDS[post], geom, saz == -1,
                             *slopes)
    got = y.reshape(-1).copy()
    ew.merge_pack(got, short.reshape(-1) if rep else np.zeros(0, np.float32), ip, sl,
                  buf.reshape(-1) if pack else np.zeros(0, np.uint64))
    np.testing.assert_array_equal(got.reshape(y.shape), want)
    if pack:
        _check_packed(buf, before, geom, want, saz)
    else:
        np.testing.assert_array_equal(buf, before)


def test_vectors_for_takes_the_narrow_tile_without_full_width_avx512(monkeypatch):
    wide = dispatch.host_has_wide_vectors() and dispatch.host_cpu_name() != "znver4"
    assert [rc.vectors_for(o) for o in (1, 16, 17, 32, 33, 512)] == (
        [1, 1, 2, 2, 4, 4] if wide else [1] * 6)
    monkeypatch.setattr(rc, "host_prefers_wide_float_tiles", lambda: False)
    assert [rc.vectors_for(o) for o in (1, 16, 17, 32, 33, 512)] == [1] * 6
    monkeypatch.setattr(rc, "host_prefers_wide_float_tiles", lambda: True)
    assert [rc.vectors_for(o) for o in (1, 16, 17, 32, 33, 512)] == [1, 1, 2, 2, 4, 4]
    # the bf16 stem's tiles: wide wherever there is AVX-512F (Zen 4 included)
    monkeypatch.setattr(rc, "host_prefers_wide_float_tiles", lambda: False)
    monkeypatch.setattr(rc, "host_has_wide_vectors", lambda: True)
    assert [rc.vectors_for(o, bf16=True) for o in (1, 16, 17, 32, 33, 512)] == [1, 1, 2, 2, 4, 4]
    monkeypatch.setattr(rc, "host_has_wide_vectors", lambda: False)
    assert [rc.vectors_for(o, bf16=True) for o in (1, 16, 17, 32, 33, 512)] == [1] * 6


def test_wide_float_tiles_need_avx512_on_full_width_units(monkeypatch):
    """AVX-512F picks the wide float tiles except on CPUs whose 512-bit units are two halves
    (Zen 4); ``NUMBA_CPU_NAME`` (Numba's target CPU) overrides the host's name."""
    monkeypatch.setattr(dispatch, "host_has_wide_vectors", lambda: True)
    for name, wide in (("znver4", False), ("sapphirerapids", True), ("icelake-server", True)):
        monkeypatch.setenv("NUMBA_CPU_NAME", name)
        dispatch.host_cpu_name.cache_clear()
        assert dispatch.host_cpu_name() == name
        assert dispatch.host_prefers_wide_float_tiles() is wide
    monkeypatch.setattr(dispatch, "host_has_wide_vectors", lambda: False)
    assert not dispatch.host_prefers_wide_float_tiles()
    monkeypatch.setenv("NUMBA_CPU_NAME", "host")
    dispatch.host_cpu_name.cache_clear()
    from llvmlite import binding
    assert dispatch.host_cpu_name() == binding.get_host_cpu_name()
    monkeypatch.undo()
    dispatch.host_cpu_name.cache_clear()


def _float_tile_asm(tile, lanes: int) -> str:
    """The assembly of a fresh, uncached compile of float tile ``tile`` (``lanes`` channels;
    cached code cannot be inspected), called once on zeros."""
    from numba import njit

    fn = njit(tile.py_func)
    x = np.zeros(200, np.float32)
    b = np.zeros(6, np.int64)
    fn(x, b, np.zeros(1, np.int64), 1, np.zeros(lanes, np.float32), 0, np.zeros(200, np.float32),
       b, np.ones(lanes, np.float32), np.zeros(lanes, np.float32), 0, lanes)
    return fn.inspect_asm(fn.signatures[0])


def _fmas(asm: str, operand: str) -> int:
    return len(re.findall(r"vfmadd\w+\s+[^\n]*" + operand, asm))


def test_narrow_tile_keeps_its_accumulators_in_registers():
    """The 6 x 16 tile (every float conv on AVX2 hosts): 6 zmm FMAs per tap with AVX-512F, else
    12 ymm FMAs, none reading a spilled accumulator from the stack."""
    from refbnn.kernels.ftiles import MR, tile_nv1

    assert MR[1] == 6
    asm = _float_tile_asm(tile_nv1, 16)
    reg, count = ("zmm", 6) if dispatch.host_has_wide_vectors() else ("ymm", 12)
    assert _fmas(asm, reg) >= count
    assert _fmas(asm, r"\(%rsp\)") == 0


def test_stem_tile_is_512_bit_fma():
    """The 6x64 tile keeps 24 zmm accumulators: 24 vfmadd on zmm registers in its loop (on a
    host without AVX-512F, LLVM splits each into two ymm: 48 vfmadd on ymm, none on zmm)."""
    from refbnn.kernels.ftiles import tile_nv4

    asm = _float_tile_asm(tile_nv4, 64)
    wide, narrow = ("zmm", "ymm") if dispatch.host_has_wide_vectors() else ("ymm", "zmm")
    assert _fmas(asm, wide) >= (24 if wide == "zmm" else 48)
    assert _fmas(asm, narrow) == 0
