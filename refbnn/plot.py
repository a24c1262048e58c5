"""Small PNG charts drawn with pillow alone: line charts, stacked bars, scatter plots.

Every function writes atomically (:func:`save_png`: a temporary file in the same folder, then
``os.replace``) and returns the path. Colours come from one fixed palette so figures are
comparable across runs.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from refbnn.cli_util import atomic_open

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def _font(size=14):
    """pillow's built-in font at ``size`` pixels (FreeType, pillow >= 10.1); pillow 10.0's
    ``load_default`` takes no size and gives its fixed bitmap font, which draws smaller labels."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def save_png(image: Image.Image, path) -> Path:
    """Write ``image`` to ``path`` atomically (:func:`refbnn.cli_util.atomic_open`: umask
    permissions, stale temps of the same target removed, nothing left behind on a full disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, binary=True) as f:
        image.save(f, format="PNG")
    return path


def _nice_range(lo, hi):
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


class _Frame:
    """Axes box inside a ``width x height`` canvas with a title and axis labels."""

    def __init__(self, width, height, title, xlabel, ylabel, xr, yr, xticks=True):
        self.img = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.img)
        self.l, self.t, self.r, self.b = 70, 40, width - 20, height - 50
        self.xr, self.yr = xr, yr
        d, f = self.draw, _font(14)
        d.text((width / 2, 12), title, fill="black", font=_font(16), anchor="mt")
        d.rectangle([self.l, self.t, self.r, self.b], outline="black")
        d.text(((self.l + self.r) / 2, height - 10), xlabel, fill="black", font=f, anchor="mb")
        d.text((8, self.t - 6), ylabel, fill="black", font=f, anchor="lb")
        for i in range(5):
            xv = xr[0] + (xr[1] - xr[0]) * i / 4
            yv = yr[0] + (yr[1] - yr[0]) * i / 4
            x, y = self.px(xv, yr[0])
            if xticks:
                d.text((x, self.b + 4), f"{xv:.3g}", fill="black", font=_font(11), anchor="mt")
            x, y = self.px(xr[0], yv)
            d.text((self.l - 4, y), f"{yv:.3g}", fill="black", font=_font(11), anchor="rm")
            d.line([self.l, y, self.r, y], fill="#e0e0e0")

    def px(self, x, y):
        fx = (x - self.xr[0]) / (self.xr[1] - self.xr[0])
        fy = (y - self.yr[0]) / (self.yr[1] - self.yr[0])
        return self.l + fx * (self.r - self.l), self.b - fy * (self.b - self.t)

    def legend(self, labels):
        for i, label in enumerate(labels):
            y = self.t + 8 + 16 * i
            self.draw.rectangle([self.r - 150, y, self.r - 140, y + 10], fill=PALETTE[i % len(PALETTE)])
            self.draw.text((self.r - 135, y - 2), str(label), fill="black", font=_font(12))


def line_chart(path, series: dict, title="", xlabel="", ylabel="", size=(640, 400)) -> Path:
    """``series``: ``{label: (xs, ys)}``; one polyline (with dots) per label."""
    return save_png(_line_image(series, title, xlabel, ylabel, size), path)


def line_panels(path, panels: list, size=(520, 380)) -> Path:
    """Several line charts side by side: ``panels`` = ``[(series, title, xlabel, ylabel), ...]``."""
    images = [_line_image(series, title, xlabel, ylabel, size) for series, title, xlabel, ylabel in panels]
    canvas = Image.new("RGB", (size[0] * len(images), size[1]), "white")
    for i, im in enumerate(images):
        canvas.paste(im, (i * size[0], 0))
    return save_png(canvas, path)


def _line_image(series, title, xlabel, ylabel, size):
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [y for _, yv in series.values() for y in yv]
    fr = _Frame(*size, title, xlabel, ylabel, _nice_range(min(xs), max(xs)), _nice_range(min(ys), max(ys)))
    for i, (xv, yv) in enumerate(series.values()):
        pts = [fr.px(x, y) for x, y in zip(xv, yv)]
        colour = PALETTE[i % len(PALETTE)]
        if len(pts) > 1:
            fr.draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            fr.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    fr.legend(series)
    return fr.img


def scatter(path, xy, labels, title="", class_names=None, size=(520, 520), radius=1.5) -> Path:
    """2-D points ``xy`` (N, 2) coloured by integer ``labels`` (N,)."""
    x, y = [float(v) for v in xy[:, 0]], [float(v) for v in xy[:, 1]]
    fr = _Frame(*size, title, "feature 1", "feature 2",
                _nice_range(min(x), max(x)), _nice_range(min(y), max(y)))
    for xi, yi, lab in zip(x, y, labels):
        px, py = fr.px(xi, yi)
        fr.draw.ellipse([px - radius, py - radius, px + radius, py + radius],
                        fill=PALETTE[int(lab) % len(PALETTE)])
    if class_names is not None:
        fr.legend(class_names)
    return save_png(fr.img, path)


def stacked_bars(path, bars: dict, parts: list, title="", ylabel="", size=(560, 420)) -> Path:
    """``bars``: ``{bar label: [value per part]}``, stacked bottom-up in the order of ``parts``."""
    top = max(sum(v) for v in bars.values()) * 1.15
    n = len(bars)
    fr = _Frame(*size, title, "", ylabel, (0, n), (0, top), xticks=False)
    width = 0.5
    for i, (label, values) in enumerate(bars.items()):
        base = 0.0
        for j, v in enumerate(values):
            x0, y0 = fr.px(i + 0.5 - width / 2, base + v)
            x1, y1 = fr.px(i + 0.5 + width / 2, base)
            fr.draw.rectangle([x0, y0, x1, y1], fill=PALETTE[j % len(PALETTE)], outline="black")
            if v > top * 0.04:
                fr.draw.text(((x0 + x1) / 2, (y0 + y1) / 2), f"{v:.3g}", fill="white",
                             font=_font(12), anchor="mm")
            base += v
        x, y = fr.px(i + 0.5, base)
        fr.draw.text((x, y - 4), f"{base:.3g}", fill="black", font=_font(12), anchor="mb")
        fr.draw.text((x, fr.b + 18), label, fill="black", font=_font(13), anchor="mt")
    fr.legend(parts)
    return save_png(fr.img, path)
