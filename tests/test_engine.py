"""The packed engine against the float training path (eval mode).

Bound: for FTBNN models (no weight scale) every binary layer's float output equals the float path's
exactly (same integer accumulator, same two float32 roundings), and so do the residual adds,
non-linearities and pools (same float32 operations, same order); the real convolutions and the
global pool differ only in summation order (a few float32 ulp). With logits of magnitude up to ~100
here (float32 ulp ~1e-5) that keeps |engine - float| below 1e-4 unless a binary input within
rounding of 0 flips sign; on these inputs none does, so the test holds every preset to 1e-4
absolute and identical predictions.
"""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from refbnn import fileformat, models, nn
from refbnn.engine import Engine, EngineError, compile_model, network_from_model, runtime, stage_threads
from refbnn.golden.model import randomize_state
from refbnn.models.trace import trace


def trained_looking(name, seed=0, **overrides):
    """A model with non-trivial BatchNorm statistics and slopes, as after training (some negative
    scales; :func:`refbnn.golden.model.randomize_state`)."""
    model = models.build(name, seed=seed, width_multiplier=0.25, input_shape=[1, 28, 28], num_classes=10,
                         **overrides)
    randomize_state(model, seed, scale_mean=0.5)  # logits below ~100 (see the module docstring)
    return model.eval()


@pytest.mark.parametrize("name", models.list_models())
def test_engine_matches_float_path(name):
    model = trained_looking(name)
    x = np.random.default_rng(1).standard_normal((16, 1, 28, 28)).astype(np.float32)
    want = model.forward(x)
    got = compile_model(model).forward(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("name", ["ftbnn18_g2", "ftbnn18_purified", "ftbnn18"])
def test_binary_layers_are_exact_for_unscaled_models(name):
    """Each binary layer's plan, fed the float path's own input, gives its BN output bit for bit."""
    model = trained_looking(name)
    x = np.random.default_rng(2).standard_normal((4, 1, 28, 28)).astype(np.float32)
    engine = Engine.from_model(model)
    records = {n: (inp, out) for n, _, inp, out in trace(model, x)}
    layers = [n for n in records if n.endswith("binary_conv") or (n.endswith("downsample.1")
              and isinstance(dict(model.named_modules())[n], nn.BinaryConv2d))]
    assert len(layers) >= 16
    for layer in layers:
        conv_in, _ = records[layer]
        _, bn_out = records[layer.rsplit(".", 1)[0] + (".bn1" if layer.endswith("conv")
                                                       else ".2")]
        got = engine.binary_plan(layer)(np.ascontiguousarray(conv_in.transpose(0, 2, 3, 1)))
        np.testing.assert_array_equal(got, bn_out.transpose(0, 2, 3, 1), err_msg=layer)


def _float_records(model, x):
    return OrderedDict((n, out) for n, _, _, out in trace(model, x))


@pytest.mark.parametrize("name", ["ftbnn18_g2", "ftbnn18", "birealnet18"])
def test_layer_outputs_follow_the_float_path(name):
    """Whole chain: every recorded layer within a few ulp of the float path's (relative 1e-5 of the
    layer's largest value), the block outputs of FTBNN models mostly bit-identical."""
    model = trained_looking(name)
    x = np.random.default_rng(4).standard_normal((3, 1, 28, 28)).astype(np.float32)
    rec = Engine.from_model(model).layer_outputs(x)
    ref = _float_records(model, x)
    ref["logits"] = model.forward(x)
    checked = 0
    for key, got in rec.items():
        want = ref.get(key)
        if want is None:  # a block's output is no leaf layer: the next layer's input
            continue
        want = want.transpose(0, 2, 3, 1) if want.ndim == 4 else want
        scale = float(np.abs(want).max()) or 1.0
        assert np.abs(got - want).max() <= 1e-5 * scale, key
        checked += 1
    assert checked >= 20
    assert list(rec)[-1] == "logits"


def test_stage_threads_policy():
    assert stage_threads(10, 2) == 1
    assert stage_threads(runtime.PARALLEL_MIN_WORK, 2) == 2
    assert stage_threads(10 ** 9, 1) == 1


def test_thread_policy_picks_the_faster_setting_and_probes():
    pol = runtime.ThreadPolicy(2)
    seq = []
    for _ in range(4 * runtime.PROBE_EVERY):
        t = pol.choose()
        seq.append(t)
        pol.record(t, 1.0 if t == 2 else 0.1)  # one thread is faster (a busy core)
    # each setting tried for PROBE_RUNS calls in a row (the first of them untimed)
    r = runtime.PROBE_RUNS
    assert seq[:2 * r] == [2] * r + [1] * r
    tail = seq[2 * r:]
    assert tail.count(1) > tail.count(2) >= 2  # mostly 1, the other setting probed now and then
    assert "2, 1, 2" not in str(tail)  # probes are runs, not single calls
    pol = runtime.ThreadPolicy(1)
    assert {pol.choose() for _ in range(5)} == {1}


def test_thread_policy_ignores_the_first_forward_after_a_switch():
    # every switch costs a slow first forward (the buffers move between the cores' caches); timing
    # those made single probes of the other setting look slow for good. Here a process beside us
    # makes two threads slower than one for a while, then stops.
    p = runtime.PROBE_EVERY
    pol = runtime.ThreadPolicy(2)
    seq, prev = [], None
    for i in range(16 * p):
        t = pol.choose()
        seq.append(t)
        warm = 0.1 if t == 1 else 0.2 if i < 6 * p else 0.05
        pol.record(t, 1.0 if t != prev else warm)
        prev = t
    assert seq[3 * p:6 * p].count(1) > 4 * seq[3 * p:6 * p].count(2)  # moved to one thread
    assert seq[12 * p:].count(2) > 4 * seq[12 * p:].count(1)  # and back


def test_batches_always_run_on_the_requested_threads(monkeypatch):
    """The adaptive policy is for one image (layer-parallel, where every op waits for its slowest
    worker); a batch's image-parallel workers never wait for each other, so probing one thread there
    would only cost time."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs Numba with at least 2 threads")
    engine = Engine.from_model(trained_looking("ftbnn18"))
    used = []
    real_run = runtime.Program.run
    monkeypatch.setattr(runtime.Program, "run",
                        lambda self, x, use, timer=None: used.append((x.shape[0], use))
                        or real_run(self, x, use, timer))
    x = np.random.default_rng(2).standard_normal((4, 1, 28, 28)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        for _ in range(2 * runtime.PROBE_EVERY):
            engine.forward(x)
        for _ in range(2 * runtime.PROBE_EVERY):
            engine.forward(x[:1])
    finally:
        numba.set_num_threads(before)
    assert {u for n, u in used if n == 4} == {2}
    assert {u for n, u in used if n == 1} == {1, 2}  # one image: both settings tried


def test_results_do_not_depend_on_threads_or_batch_plan():
    import numba

    engine = Engine.from_model(trained_looking("ftbnn18_g2"))
    x = np.random.default_rng(5).standard_normal((5, 1, 28, 28)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = engine.forward(x)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = engine.forward(x)
        again = engine.forward(x)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(many, again)
    np.testing.assert_array_equal(engine.forward(x[:2]), one[:2])  # another batch plan
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("name", ["birealnet18", "ftbnn18_g2"])
def test_one_image_split_over_threads_op_by_op_gives_the_same_logits(monkeypatch, name):
    """Batch 1 on several threads runs each op's work items split over the workers (binary convs
    by pixel tiles, the stem by pooled rows): with every op split (no minimum work), the same
    logits as one thread."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs Numba with at least 2 threads")
    engine = Engine.from_model(trained_looking(name), adaptive_threads=False)
    x = np.random.default_rng(11).standard_normal((2, 1, 28, 28)).astype(np.float32)
    want = engine.forward(x)  # image-parallel or serial
    monkeypatch.setattr(runtime, "PARALLEL_MIN_WORK", 0)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        for i in range(2):
            np.testing.assert_array_equal(engine.forward(x[i:i + 1]), want[i:i + 1])
    finally:
        numba.set_num_threads(before)


def test_profile_splits_by_stage():
    engine = Engine.from_model(trained_looking("birealnet18"))
    x = np.zeros((2, 1, 28, 28), np.float32)
    split = engine.profile(x, runs=2)
    assert set(split) == {"binary_convs", "stem", "shortcuts", "elementwise_glue", "total"}
    assert all(v > 0 for v in split.values())
    assert sum(split[k] for k in runtime.STAGES) <= split["total"] * 1.05


def test_engine_from_tensors_needs_no_float_model(tmp_path):
    """A packed-only file: the network comes from the config and the named tensors alone."""
    model = trained_looking("birealnet18")
    full, packed = tmp_path / "full.h5", tmp_path / "packed.h5"
    fileformat.save_model(full, model.state_dict(), config=model.config,
                          binary_weights=model.binary_weights())
    fileformat.export_packed(full, packed)
    f = fileformat.load(packed)
    assert not any(n in f.state_dict for n in f.packed)  # no latent binary weights in the file
    x = np.random.default_rng(6).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(Engine.from_file(packed).forward(x), model.forward(x), rtol=0,
                               atol=1e-4)
    net = network_from_model(model)
    assert [b.name for b in net.blocks][:2] == ["layer1.0", "layer1.1"]
    del f.state_dict["layer2.0.bn1.running_var"]
    with pytest.raises(EngineError, match=r"layer2\.0\.bn1\.running_var"):
        Engine.from_file(f)


def test_engine_refuses_ternary_sign():
    model = models.build("ftbnn18", width_multiplier=0.125, input_shape=[1, 28, 28], num_classes=10,
                         sign_at_zero=0)
    with pytest.raises(EngineError, match="ternary"):
        compile_model(model)


def test_engine_rejects_bad_input():
    engine = compile_model(trained_looking("ftbnn18"))
    assert engine.forward(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)
    with pytest.raises(ValueError, match="input must be"):
        engine.forward(np.zeros((2, 3, 28, 28), np.float32))
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        engine.forward(x)


@pytest.mark.parametrize("name", ["birealnet18", "ftbnn18_g1"])
def test_packed_only_file_runs_like_the_full_file(name, tmp_path):
    from refbnn.infer import load_runner

    model = trained_looking(name)
    spec = {"shape": [1, 28, 28], "layout": "NCHW", "channel_order": "L", "mean": [0.1307],
            "std": [0.3081]}
    full, packed = tmp_path / "full.h5", tmp_path / "packed.h5"
    fileformat.save_model(full, model.state_dict(), config=model.config,
                          binary_weights=model.binary_weights(), input_spec=spec, dataset="mnist")
    fileformat.export_packed(full, packed)
    assert packed.stat().st_size < full.stat().st_size
    x = np.random.default_rng(3).standard_normal((8, 1, 28, 28)).astype(np.float32)
    want = model.forward(x)
    for kind in ("packed", "reference"):
        a, _ = load_runner(str(full), kind)
        b, _ = load_runner(str(packed), kind)
        np.testing.assert_allclose(a(x), want, rtol=0, atol=1e-4)
        # scale-free models are exact from the bits; Bi-Real's alpha * sign round-trips within 1 ulp
        np.testing.assert_allclose(b(x), a(x), rtol=0, atol=0 if name.startswith("ftbnn") else 1e-5)


@pytest.mark.parametrize("band", [1, 2])
def test_stem_in_row_bands_gives_the_same_logits(monkeypatch, band):
    """The stem's conv rows go through a small ring, band by band, and the pooled rows may be split
    over threads (each range recomputes a conv row): the same max-pool and logits as one band."""
    import numba

    from refbnn.kernels import realconv

    model = trained_looking("birealnet18", stem_pool=True)
    x = np.random.default_rng(7).standard_normal((3, 1, 28, 28)).astype(np.float32)
    whole = Engine.from_model(model)
    want, want_pool = whole.forward(x), whole.layer_outputs(x)["maxpool"]
    monkeypatch.setattr(realconv, "STEM_BAND", band)
    banded = Engine.from_model(model, adaptive_threads=False)
    before = numba.get_num_threads()
    try:
        np.testing.assert_array_equal(banded.forward(x), want)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        for i in range(3):  # one image: layer-parallel
            np.testing.assert_array_equal(banded.forward(x[i:i + 1]), want[i:i + 1])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(banded.layer_outputs(x)["maxpool"], want_pool)


@pytest.mark.parametrize("name, overrides, stem_bytes, stem", [
    ("birealnet18", {"stem_pool": True}, 1 << 30, "float32"),  # the stem's conv over the group
    ("birealnet18", {"stem_pool": True}, 0, "float32"),  # the stem image by image, convs grouped
    ("birealnet18", {"stem_pool": True}, 1 << 30, "bf16"),
    ("birealnet18", {"stem_pool": True}, 0, "bf16"),
    ("ftbnn18_g2", {}, 1 << 30, "float32"),
    ("ftbnn18_purified", {}, 1 << 30, "float32"),
])
def test_batch_in_image_groups_gives_the_same_logits_as_one_image_at_a_time(monkeypatch, name,
                                                                          overrides, stem_bytes,
                                                                          stem):
    """A batch runs in groups of images (small-map binary convs once per group, tiles spanning
    images; a short last group computes stale slots nobody reads): batch sizes that are no multiple
    of the group, on 1 and 2 threads, give the logits of one image at a time bit for bit."""
    import numba

    monkeypatch.setattr(runtime, "GROUP_MAX", 4)
    monkeypatch.setattr(runtime, "GROUP_PIXELS", 49)  # 14x14 maps image by image, 7x7 on grouped
    monkeypatch.setattr(runtime, "GROUP_STEM_BYTES", stem_bytes)
    engine = Engine.from_model(trained_looking(name, **overrides), adaptive_threads=False,
                               stem=stem)
    x = np.random.default_rng(11).standard_normal((11, 1, 28, 28)).astype(np.float32)
    want = np.concatenate([engine.forward(x[i:i + 1]) for i in range(len(x))])
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for n in (11, 9, 10):  # groups of 4 or 2, the last one short (2 threads: of 2)
                assert runtime.group_size(n, threads) > 1
                np.testing.assert_array_equal(engine.forward(x[:n]), want[:n])
                prog = engine._program(threads, group=runtime.group_size(n, threads))
                assert any(prog.grouped) and not all(prog.grouped)
                # grouped binary convs with the fused epilogue in registers (each records the
                # block's output; 32-lane tiles, a last partial one masked: ftbnn18_g2's 152-channel
                # groups too), not conv + a merge pass
                fused = [prog.meta[j][0][0][0] for j, s in enumerate(prog.stages)
                         if prog.grouped[j] and s == "binary_convs" and prog.meta[j][0]]
                assert "layer3.1" in fused and "layer4.1" in fused, fused
    finally:
        numba.set_num_threads(before)


def test_split_path_convs_run_once_per_group_only_while_their_float_output_fits(monkeypatch):
    """A grouped binary conv whose epilogue cannot run in registers (a repeated residual: the cheap
    shortcut of the reduction blocks, ``downsample="cheap"``) writes conv + BN as float32 for the
    whole group, then a merge pass: that only while the group's float output takes at most
    GROUP_SPLIT_BYTES; larger maps run image by image with the fused epilogue. The other block
    convs (ftbnn18_g2's 19- to 152-channel groups: partial 32-lane tiles) keep the fused epilogue
    in registers, under the same size limit. Either way the logits of one image at a time, bit for
    bit."""
    import numba

    monkeypatch.setattr(runtime, "GROUP_MAX", 4)

    def build():
        return Engine.from_model(trained_looking("ftbnn18_g2", downsample="cheap"),
                                 adaptive_threads=False)

    engine = build()
    x = np.random.default_rng(12).standard_normal((9, 1, 28, 28)).astype(np.float32)
    want = np.concatenate([engine.forward(x[i:i + 1]) for i in range(len(x))])

    def split(name):
        """The convs that cannot finish in registers: the reduction blocks (the cheap shortcut
        repeats the input's channels), and two whose tiles' signs are no aligned 32-bit unit: the
        bridge (38 channels in one group, read by layer1.0 as two groups of 19) and layer4.3 (two
        groups of 152 channels packed as one)."""
        return name in ("layer2.0.binary_conv", "layer3.0.binary_conv", "layer4.0.binary_conv",
                        "bridge.binary_conv", "layer4.3.binary_conv")

    def conv_bytes(prog):
        """(conv name, group float bytes, grouped, fused record) of each block conv of ``prog``."""
        return [(before[1], prog.group * p.out_hw[0] * p.out_hw[1] * p.out_channels * 4,
                 prog.grouped[j], bool(prog.meta[j][0]))
                for j, (_, before) in enumerate(prog.meta) if before is not None
                for p in [before[3]]]

    sizes = sorted({b for n, b, _, _ in conv_bytes(engine._program(1, group=4)) if split(n)})
    assert len(sizes) == 4
    before = numba.get_num_threads()
    try:
        for limit in (0, sizes[1], 1 << 40):
            monkeypatch.setattr(runtime, "GROUP_SPLIT_BYTES", limit)
            engine = build()
            for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
                numba.set_num_threads(threads)
                np.testing.assert_array_equal(engine.forward(x), want)
                prog = engine._program(threads, group=runtime.group_size(len(x), threads))
                assert prog.group > 1
                got = conv_bytes(prog)
                assert [g for _, _, g, _ in got] == [b <= limit for _, b, _, _ in got], (limit, got)
                # grouped split convs record nothing (the merge pass after them does), the
                # others record the block's output themselves
                assert not any(r for n, _, g, r in got if split(n) and g), (limit, got)
                assert all(r for n, _, _, r in got if not split(n)), (limit, got)
    finally:
        numba.set_num_threads(before)


def test_warm_up_runs_every_compiled_path_and_changes_nothing(monkeypatch):
    """``warm_up`` runs one thread, one image on all threads (layer-parallel) and a batch
    (image-parallel): a first timed call (``refbnn.infer``'s throughput and latency, the thread
    policy's probes) would otherwise pay for loading or compiling its path. Cold, the CLI's first
    run reported 561 images/s and a 3.4 s p90 latency for weights/ftbnn18.h5 (17,000 and 0.2 ms
    warm)."""
    import numba

    from refbnn import predictor

    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    model = trained_looking("ftbnn18")
    engine = Engine.from_model(model)
    x = np.random.default_rng(7).standard_normal((3, 1, 28, 28)).astype(np.float32)
    want = engine.forward(x)
    used = []
    real_run = runtime.Program.run
    monkeypatch.setattr(runtime.Program, "run",
                        lambda self, xx, use, timer=None: used.append((xx.shape[0], use))
                        or real_run(self, xx, use, timer))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        engine.warm_up(batch=4)
    finally:
        numba.set_num_threads(before)
    assert used == [(1, 1)] + ([(1, threads), (4, threads)] if threads > 1 else [])
    np.testing.assert_array_equal(engine.forward(x), want)
    shipped = Path(__file__).resolve().parents[1] / "weights" / "ftbnn18.h5"
    loaded = predictor.load(shipped)
    used.clear()
    loaded.warm_up()
    assert used and used[0] == (1, 1)
    assert predictor.load(shipped, engine="reference").warm_up() is None


def _imagenet_like(seed=0):
    """Bi-Real-18's ImageNet stem (7x7/2, 3 channels, max-pool) on a small image."""
    model = models.build("birealnet18", seed=seed, width_multiplier=0.25, input_shape=[3, 40, 40],
                         num_classes=10, stem_kernel=7, stem_stride=2, stem_pool=True)
    randomize_state(model, seed, scale_mean=0.5)
    return model.eval()


@pytest.mark.parametrize("make, pooled", [
    (_imagenet_like, True),                                                  # K_STEM_POOL_BF16
    (lambda: trained_looking("ftbnn18"), False),                             # K_STEM_CONV_BF16
    (lambda: trained_looking("birealnet18", stem_pool=True, stem_kernel=5), True),  # 5x5/1
])
def test_bf16_stem_gives_the_oracles_bits(make, pooled):
    """``Engine(stem="bf16")``: the stem's output (``bn1``) is real_oracle.conv_bn_bf16's bits
    (image and weights rounded to bfloat16, the documented order of float32 sums), its max-pool the
    pool of those; one image or a batch, one thread or two."""
    import numba

    from refbnn.kernels import real_oracle

    model = make()
    engine = Engine.from_model(model, stem="bf16", adaptive_threads=False)
    c, h, w = engine.input_shape
    x = np.random.default_rng(5).standard_normal((3, c, h, w)).astype(np.float32)
    st = engine.net.stem
    want = real_oracle.conv_bn_bf16(x.transpose(0, 2, 3, 1), st.w_hwio, st.stride, st.padding,
                                    st.bn.scale, st.bn.shift)
    rec = engine.layer_outputs(x)
    np.testing.assert_array_equal(rec["bn1"].view(np.uint32), want.view(np.uint32))
    if pooled:
        np.testing.assert_array_equal(rec["maxpool"], real_oracle.maxpool3s2(want))
    # and the float32 stem differs (it does not round): the option is not ignored
    assert not np.array_equal(Engine.from_model(model).layer_outputs(x)["bn1"], rec["bn1"])
    logits = engine.forward(x)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        np.testing.assert_array_equal(engine.forward(x), logits)
        np.testing.assert_array_equal(engine.forward(x[1:2]), logits[1:2])
    finally:
        numba.set_num_threads(before)


def test_bf16_stem_refuses_what_bfloat16_cannot_hold():
    engine = Engine.from_model(trained_looking("ftbnn18"), stem="bf16")
    x = np.zeros((1, 1, 28, 28), np.float32)
    for bad in (np.inf, -np.inf, 3.4e38, -3.3961776e38):
        x[0, 0, 3, 4] = bad
        with pytest.raises(ValueError, match="bf16 stem"):
            engine.forward(x)
    x[0, 0, 3, 4] = 3.3895e38  # bfloat16's largest value: fine
    assert engine.forward(x).shape == (1, 10)
    with pytest.raises(ValueError, match="stem must be one of"):
        Engine.from_model(trained_looking("ftbnn18"), stem="fp16")


@pytest.mark.parametrize("name, stem", [("birealnet18", "float32"), ("ftbnn18_g2", "float32"),
                                        ("birealnet18", "bf16")])
def test_narrow_float_tiles_give_the_same_logits(monkeypatch, name, stem):
    """On hosts without AVX-512 (and on Zen 4) the stem, the real shortcuts and the classifier run
    on 6 x 16 tiles (:func:`refbnn.kernels.realconv.vectors_for`); each output still sums its taps in the same
    order, so the logits and every layer output are bit for bit those of the wide tiles."""
    from refbnn.kernels import realconv

    extra = {"stem_pool": True} if name == "birealnet18" else {}
    model = models.build(name, seed=0, width_multiplier=0.5, input_shape=[1, 28, 28],
                         num_classes=40, **extra)
    randomize_state(model, 0, scale_mean=0.5)
    model.eval()
    x = np.random.default_rng(5).standard_normal((3, 1, 28, 28)).astype(np.float32)
    for query in ("host_prefers_wide_float_tiles", "host_has_wide_vectors"):
        monkeypatch.setattr(realconv, query, lambda: True)
    wide = Engine.from_model(model, stem=stem)
    assert wide._fc_nv > 1 and (wide._stem_nv > 1 or name != "birealnet18")  # 40 classes
    want, want_layers = wide.forward(x), wide.layer_outputs(x[:1])
    for query in ("host_prefers_wide_float_tiles", "host_has_wide_vectors"):
        monkeypatch.setattr(realconv, query, lambda: False)
    narrow = Engine.from_model(model, stem=stem)
    assert narrow._stem_nv == 1 and narrow._fc_nv == 1
    np.testing.assert_array_equal(narrow.forward(x), want)
    for key, value in narrow.layer_outputs(x[:1]).items():
        np.testing.assert_array_equal(value, want_layers[key], err_msg=key)
