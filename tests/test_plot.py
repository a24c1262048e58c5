"""refbnn.plot on every pillow the project allows: pillow 10.0's ``load_default`` takes no size."""

import numpy as np
from PIL import Image, ImageFont

from refbnn import plot


def _draw_all(tmp_path):
    paths = [plot.line_chart(tmp_path / "a.png", {"loss": ([1, 2, 3], [0.5, 0.3, 0.2])}, "t", "x", "y"),
             plot.scatter(tmp_path / "b.png", np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 1], "s",
                          class_names=["a", "b"]),
             plot.stacked_bars(tmp_path / "c.png", {"m": [3.0, 1.0]}, ["p", "q"], "bars", "ops")]
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
