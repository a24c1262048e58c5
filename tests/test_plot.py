"""refbnn.plot: nice tick values (hand-computed cases), one colour per series name, legend
placement, visible markers, and drawing on every pillow the project allows (pillow 10.0's
``load_default`` takes no size)."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageFont

from refbnn import plot


def _draw_all(tmp_path):
    paths = [plot.line_chart(tmp_path / "a.png", {"loss": ([1, 2, 3], [0.5, 0.3, 0.2])}, "t", "x", "y"),
             plot.scatter(tmp_path / "b.png", np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 1], "s",
                          class_names=["a", "b"]),
             plot.stacked_bars(tmp_path / "c.png", {"m": [3.0, 1.0]}, ["p", "q"], "bars", "ops"),
             plot.line_panels(tmp_path / "d.png", [({"train": ([1, 2], [1.0, 0.5])}, "p1", "e", "l"),
                                                   ({"train": ([1, 2], [90.0, 95.0])}, "p2", "e", "%")])]
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] > 100 and len(np.unique(np.asarray(im.convert("L")))) > 2  # something drawn


def test_charts_draw(tmp_path):
    _draw_all(tmp_path)


def test_charts_draw_with_a_pillow_10_0_style_load_default(tmp_path, monkeypatch):
    """The fallback: a ``load_default`` without ``size`` (pillow < 10.1) gives the bitmap font."""
    original = ImageFont.load_default
    calls = []

    def old_load_default():
        calls.append(1)
        return original()

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    _draw_all(tmp_path)
    assert calls


@pytest.mark.skipif(not hasattr(ImageFont, "load_default_imagefont"), reason="pillow < 10.1")
def test_charts_draw_with_the_bitmap_font(tmp_path, monkeypatch):
    """pillow 10.0's actual fallback font, the fixed-size bitmap one, enlarged to the label sizes."""
    monkeypatch.setattr(ImageFont, "load_default", lambda: ImageFont.load_default_imagefont())
    _draw_all(tmp_path)


# --- ticks: worked by hand ---------------------------------------------------------------------------
@pytest.mark.parametrize("lo, hi, most, want", [
    (0.0, 1.0, 6, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),            # step 0.1 gives 11 > 6, 0.2 gives 6
    (0.55, 10.45, 6, [2, 4, 6, 8, 10]),                        # epochs 1..10 with 5% margins
    (0.55, 10.45, 10, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    (-1.94, 1.73, 8, [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]),  # step 0.2: 18 ticks; 0.5: 7
    (0.00366, 0.267, 6, [0.05, 0.1, 0.15, 0.2, 0.25]),         # 0.02: 13 ticks; 0.05: 5
    (91.3, 99.9, 7, [92, 94, 96, 98]),                         # 1: 8 ticks; 2: 4
    (91.3, 99.9, 8, [92, 93, 94, 95, 96, 97, 98, 99]),
    (0.0, 189.0, 6, [0, 50, 100, 150]),                        # 20: 10 ticks; 50: 4
    (-0.1, 0.1, 5, [-0.1, -0.05, 0.0, 0.05, 0.1]),
    (1.0, 1.0004, 5, [1.0, 1.0001, 1.0002, 1.0003, 1.0004]),
    (0.0, 3e6, 4, [0.0, 1e6, 2e6, 3e6]),
    (-7.0, -3.0, 3, [-6.0, -4.0]),                             # 1: 5 ticks; 2: -6, -4
])
def test_nice_ticks_by_hand(lo, hi, most, want):
    got = plot.nice_ticks(lo, hi, most)
    assert got == want  # exact: the floats nearest the decimal values, not accumulated sums


@pytest.mark.parametrize("ticks, want", [
    ([0.05, 0.1, 0.15, 0.2, 0.25], ["0.05", "0.10", "0.15", "0.20", "0.25"]),
    ([-0.1, -0.05, 0.0, 0.05, 0.1], ["-0.10", "-0.05", "0.00", "0.05", "0.10"]),
    ([2, 4, 6, 8, 10], ["2", "4", "6", "8", "10"]),
    ([-1.5, -1.0, -0.5, 0.0, 0.5], ["-1.5", "-1.0", "-0.5", "0.0", "0.5"]),
    ([0, 50, 100, 150], ["0", "50", "100", "150"]),
    ([1.0, 1.0001, 1.0002], ["1.0000", "1.0001", "1.0002"]),
    ([0.0, 1e6, 2e6], ["0", "1e+06", "2e+06"]),
])
def test_tick_labels_by_hand(ticks, want):
    assert plot.tick_labels(ticks) == want


def _is_125(step):
    e = math.floor(math.log10(step) + 1e-9)
    return any(math.isclose(step, m * 10.0 ** e, rel_tol=1e-9) for m in (1, 2, 5, 10))


@given(st.floats(-1000, 1000), st.floats(1e-6, 1e6), st.integers(2, 12))
def test_nice_ticks_are_the_finest_1_2_5_step_within_the_budget(offset, span, most):
    lo = offset * span  # |lo| / span <= 1000 keeps tick differences exact to ~1e-12
    hi = lo + span
    ticks = plot.nice_ticks(lo, hi, most)
    assert 1 <= len(ticks) <= most
    assert all(lo - 1e-9 * span <= t <= hi + 1e-9 * span for t in ticks)
    if len(ticks) > 1:
        step = ticks[1] - ticks[0]
        assert _is_125(step)
        assert all(math.isclose(b - a, step, rel_tol=1e-6) for a, b in itertools.pairwise(ticks))
        finer = {1: 0.5, 2: 0.5, 5: 0.4}[round(step / 10.0 ** math.floor(math.log10(step) + 1e-9))]
        f = step * finer  # the next finer 1-2-5 step would give more than `most` ticks
        assert math.floor(hi / f + 1e-9) - math.ceil(lo / f - 1e-9) + 1 > most


@pytest.mark.parametrize("lo, hi, most", [(1.0, 1.0, 5), (2.0, 1.0, 5), (0.0, math.inf, 5), (0.0, 1.0, 1)])
def test_nice_ticks_refuse_an_empty_range(lo, hi, most):
    with pytest.raises(ValueError):
        plot.nice_ticks(lo, hi, most)


# --- colours, legends, markers -------------------------------------------------------------------------
def _colour(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _count(img, hex_colour, tol=6, alpha=1.0):
    """Pixels of ``img`` within ``tol`` of ``hex_colour`` drawn with ``alpha`` over white."""
    a = np.asarray(img.convert("RGB")).astype(int)
    want = 255 + alpha * (np.array(_colour(hex_colour)) - 255)
    return int((np.abs(a - want).max(axis=2) <= tol).sum())


def test_one_colour_per_series_name_across_panels(tmp_path):
    """"test" comes first in the second panel, yet keeps the colour it had in the first."""
    assert plot.series_colours(["train", "test", "train", "val"]) == \
        {"train": plot.PALETTE[0], "test": plot.PALETTE[1], "val": plot.PALETTE[2]}
    path = plot.line_panels(tmp_path / "p.png", [
        ({"train": ([1, 2, 3], [3.0, 2.0, 1.0])}, "a", "x", "y"),
        ({"test": ([1, 2, 3], [1.0, 2.0, 3.0]), "train": ([1, 2, 3], [1.0, 1.5, 2.5])}, "b", "x", "y")],
        size=(300, 240))
    with Image.open(path) as im:
        left, right = im.crop((0, 0, 300, 240)), im.crop((300, 0, 600, 240))
        assert _count(left, plot.PALETTE[0]) > 50 and _count(left, plot.PALETTE[1]) == 0
        assert _count(right, plot.PALETTE[0]) > 50 and _count(right, plot.PALETTE[1]) > 50


def test_best_corner_takes_the_first_free_one():
    boxes = {"upper right": (80, 0, 100, 20), "upper left": (0, 0, 20, 20), "lower left": (0, 80, 20, 100)}
    assert plot.best_corner(boxes, [(90, 10), (50, 50)]) == "upper left"
    assert plot.best_corner(boxes, [(50, 50)]) == "upper right"
    assert plot.best_corner(boxes, [(90, 10), (10, 10), (10, 90)]) is None


def test_legend_goes_outside_when_every_corner_holds_points(tmp_path):
    """Points in all four corners: the axes narrow and the legend's markers sit right of them."""
    xy = np.array([[x, y] for x in np.linspace(0, 1, 21) for y in np.linspace(0, 1, 21)])
    labels = np.zeros(len(xy), int)
    labels[0] = 1
    with_legend = plot.scatter(tmp_path / "in.png", xy, labels, class_names=["a", "b"], size=(400, 400))
    without = plot.scatter(tmp_path / "out.png", xy, labels, size=(400, 400))
    with Image.open(with_legend) as a, Image.open(without) as b:
        # without a legend the plot reaches to ~15 px of the right edge; with it, that strip holds
        # only the legend (class 1's colour, drawn once there as a marker, is absent from the data
        # region's right part)
        strip_a, strip_b = a.crop((330, 0, 400, 400)), b.crop((330, 0, 400, 400))
        data_a, data_b = (_count(s, plot.PALETTE[0], 12, plot.SCATTER_ALPHA) for s in (strip_a, strip_b))
        assert data_b > 100 and data_a < data_b / 4
        assert _count(strip_a, plot.PALETTE[1], 12, plot.SCATTER_ALPHA + 0.2) > 10  # the legend marker


def test_scatter_markers_are_discs_not_dots(tmp_path):
    """Default radius 3 px: one point covers about pi * 3**2 ~ 28 pixels (alpha 0.7 over white)."""
    path = plot.scatter(tmp_path / "one.png", np.array([[0.0, 0.0]]), [3], size=(200, 200))
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    blended = 255 + plot.SCATTER_ALPHA * (np.array(_colour(plot.PALETTE[3])) - 255)  # over white
    covered = int((np.abs(a - blended).max(axis=2) <= 40).sum())
    assert 15 <= covered <= 45, covered


def test_non_finite_points_are_left_out(tmp_path):
    path = plot.line_chart(tmp_path / "n.png", {"loss": ([1, 2, 3, 4], [0.5, float("nan"), 0.3, 0.2])})
    with Image.open(path) as im:
        assert _count(im, plot.PALETTE[0]) > 50



@pytest.mark.parametrize(("lo", "hi", "most", "want", "fractional"), [
    (0.95, 2.05, 7, [1.0, 2.0], [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]),   # an axis of 2 epochs
    (0.5, 4.5, 9, [1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]),
    (0.55, 10.45, 6, [2.0, 4.0, 6.0, 8.0, 10.0], [2.0, 4.0, 6.0, 8.0, 10.0]),
])
def test_integer_ticks_are_whole_numbers(lo, hi, most, want, fractional):
    assert plot.nice_ticks(lo, hi, most, integer=True) == want
    assert plot.nice_ticks(lo, hi, most) == fractional
