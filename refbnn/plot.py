"""Small PNG charts drawn with pillow alone, in the look of matplotlib's defaults.

Functions: :func:`line_chart` (one axes), :func:`line_panels` (several axes side by side),
:func:`scatter` (2-D points coloured by class), :func:`stacked_bars`; each writes atomically
(:func:`save_png`) and returns the path.

The look, fixed so figures compare across runs:

* colours: the tab10 palette (:data:`PALETTE`), one colour per series *name* across all panels
  of a figure (first appearance order), so ``"test"`` has the same colour in every panel;
* axes: a dark frame, outward tick marks at "nice" values (:func:`nice_ticks`: steps of 1, 2 or
  5 times a power of ten, labels with the step's decimals, :func:`tick_labels`), a light grid at
  every tick, data limits plus a 5% margin on each side (bars start at 0), a title above the axes,
  an x label below and a rotated y label on the left;
* legends: in the corner of the axes that covers no data (upper right, upper left, lower left,
  lower right: matplotlib's ``loc="best"`` order); where every corner would cover data, outside
  the axes on the right;
* markers: line charts of up to 30 points per series mark each point; scatter points are discs of
  radius 3 px (``radius``) drawn with alpha 0.7, so dense clusters stay readable.

Everything is drawn at :data:`SUPERSAMPLE` times the requested size and reduced with a Lanczos
filter, which anti-aliases lines, markers and text. Sizes are in output pixels.
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from refbnn.cli_util import atomic_open

#: matplotlib's default colour cycle ("tab10")
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
SUPERSAMPLE = 3
MARGIN = 0.05            # of the data range, on each side of the axes
FRAME = "#262626"        # axes frame, ticks, text
GRID = "#e5e5e5"
LEGEND_EDGE = "#cccccc"
TICK_FONT, LABEL_FONT, TITLE_FONT, LEGEND_FONT = 12, 13, 14, 12
MAX_MARKED_POINTS = 30   # line charts mark every point of series up to this length
SCATTER_ALPHA = 0.7


def save_png(image: Image.Image, path) -> Path:
    """Write ``image`` to ``path`` atomically (:func:`refbnn.cli_util.atomic_open`: umask
    permissions, stale temps of the same target removed, nothing left behind on a full disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, binary=True) as f:
        image.save(f, format="PNG")
    return path


# --- ticks -----------------------------------------------------------------------------------------
def _steps(span: float):
    """1-2-5 steps (mantissa, exponent) from well below ``span`` upwards."""
    e = math.floor(math.log10(span)) - 3
    while True:
        for m in (1, 2, 5):
            yield m, e
        e += 1


def _nice(lo: float, hi: float, max_ticks: int, integer: bool = False):
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"nice_ticks needs finite lo < hi, got {lo!r}, {hi!r}")
    if max_ticks < 2:
        raise ValueError(f"max_ticks must be >= 2, got {max_ticks!r}")
    for m, e in _steps(hi - lo):
        step = m * 10.0 ** e
        if integer and step < 1:
            continue
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if last - first + 1 <= max_ticks:
            return [float(f"{k * m}e{e}") for k in range(first, last + 1)], m, e


def nice_ticks(lo: float, hi: float, max_ticks: int = 7, integer: bool = False) -> list[float]:
    """Tick values for an axis showing ``[lo, hi]``: every multiple of the step inside the range,
    the step being the smallest ``m * 10**e`` (``m`` in 1, 2, 5) that gives at most ``max_ticks``
    ticks. E.g. ``nice_ticks(0.55, 10.45, 6) == [2, 4, 6, 8, 10]``. Values are the floats nearest
    the decimal multiples (``0.3``, not ``0.30000000000000004``). ``integer``: steps of at least 1
    (an axis of epochs: ``nice_ticks(0.95, 2.05, 7, integer=True) == [1, 2]``)."""
    return _nice(lo, hi, max_ticks, integer)[0]


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels of evenly spaced ``ticks`` (as :func:`nice_ticks` makes them), all with the decimals
    of the step (``0.05, 0.10, 0.15``), ``0`` never signed; beyond 1e6 in magnitude, ``%g``."""
    if not ticks:
        return []
    big = max(abs(t) for t in ticks)
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else (abs(ticks[0]) or 1.0)
    if big >= 1e6:
        return ["0" if t == 0 else f"{t:g}" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    out = []
    for t in ticks:
        text = f"{t:.{decimals}f}"
        out.append(text[1:] if text.startswith("-") and float(text) == 0 else text)
    return out


def _limits(values, margin=MARGIN, zero=False) -> tuple[float, float]:
    """View limits: the data range (with 0 if ``zero``) widened by ``margin`` of it on each side."""
    lo, hi = min(values), max(values)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        d = abs(lo) * 0.05 or 0.5
        return lo - d, hi + d
    pad = (hi - lo) * margin
    return (lo if zero and lo == 0 else lo - pad), (hi if zero and hi == 0 else hi + pad)


def series_colours(names) -> dict:
    """``{name: colour}``: :data:`PALETTE` in order of first appearance (one colour per name)."""
    out = {}
    for name in names:
        if name not in out:
            out[name] = PALETTE[len(out) % len(PALETTE)]
    return out


# --- drawing ---------------------------------------------------------------------------------------
def _font(size: int):
    """``(font, scalable)``: pillow's built-in font at ``size`` pixels (FreeType, pillow >= 10.1);
    pillow 10.0's ``load_default`` takes no size and gives its fixed bitmap font (``scalable``
    false: its text is drawn at its own size and enlarged)."""
    return _load_font(ImageFont.load_default, size)


@functools.lru_cache(maxsize=32)
def _load_font(load_default, size: int):
    try:
        return load_default(size=size), True
    except TypeError:
        return load_default(), False


def _rgba(colour: str, alpha: float = 1.0) -> tuple:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16), round(255 * alpha)


class _Canvas:
    """A white image drawn at ``SUPERSAMPLE`` times its size; coordinates in output pixels."""

    def __init__(self, width: int, height: int):
        self.size = (int(width), int(height))
        self.s = SUPERSAMPLE
        self.img = Image.new("RGB", (self.size[0] * self.s, self.size[1] * self.s), "white")
        self.draw = ImageDraw.Draw(self.img, "RGBA")

    def _xy(self, points):
        return [(x * self.s, y * self.s) for x, y in points]

    def line(self, points, colour, width=1.0, alpha=1.0):
        if len(points) > 1:
            self.draw.line(self._xy(points), fill=_rgba(colour, alpha), width=max(1, round(width * self.s)),
                           joint="curve")

    def disc(self, x, y, r, colour, alpha=1.0, edge=None):
        s = self.s
        self.draw.ellipse([(x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s], fill=_rgba(colour, alpha),
                          outline=_rgba(edge) if edge else None, width=s if edge else 0)

    def rect(self, x0, y0, x1, y1, fill=None, outline=None, radius=0.0, alpha=1.0):
        s = self.s
        box = [min(x0, x1) * s, min(y0, y1) * s, max(x0, x1) * s, max(y0, y1) * s]
        kw = {"fill": _rgba(fill, alpha) if fill else None,
              "outline": _rgba(outline) if outline else None, "width": s if outline else 0}
        if radius:
            self.draw.rounded_rectangle(box, radius=radius * s, **kw)
        else:
            self.draw.rectangle(box, **kw)

    def _mask(self, text: str, size: int):
        """``(mask, top, middle, bottom)``: the text as an 'L' image at canvas scale and the rows of
        its digits' top, middle and baseline."""
        font, scalable = _font(size * self.s)
        height = font.getbbox("Ag|")[3] + 1
        width = max(1, font.getbbox(text)[2] if text else 1)
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
        top, base = font.getbbox("0")[1], font.getbbox("0")[3]
        if not scalable:  # the fixed bitmap font: enlarge to about the requested size
            k = self.s * max(1.0, size / 11)
            mask = mask.resize((round(width * k), round(height * k)), Image.Resampling.BICUBIC)
            top, base = top * k, base * k
        return mask, top, (top + base) / 2, base

    def text_size(self, text: str, size: int) -> tuple[float, float]:
        """Width and digit height (top to baseline) of ``text`` in output pixels."""
        mask, top, _, base = self._mask(text, size)
        return mask.width / self.s, (base - top) / self.s

    def text(self, x, y, text, size, anchor="lt", colour=FRAME, rotate=False):
        """Draw ``text`` with its anchor point at ``(x, y)``: ``anchor`` is horizontal (``l``, ``m``,
        ``r``) then vertical (``t`` digit top, ``m`` middle, ``b`` baseline). ``rotate``: reading
        upwards (a y label), anchored by its centre."""
        if not text:
            return
        mask, top, mid, base = self._mask(text, size)
        if rotate:
            mask = mask.transpose(Image.Transpose.ROTATE_90)
            px, py = x * self.s - mid, y * self.s - mask.height / 2
        else:
            px = x * self.s - {"l": 0, "m": mask.width / 2, "r": mask.width}[anchor[0]]
            py = y * self.s - {"t": top, "m": mid, "b": base}[anchor[1]]
        self.img.paste(_rgba(colour)[:3], (round(px), round(py)), mask)

    def image(self) -> Image.Image:
        return self.img.resize(self.size, Image.Resampling.LANCZOS)


class _Axes:
    """One axes box in a canvas region: limits, ticks, frame, grid, labels and the legend."""

    def __init__(self, canvas, box, xr, yr, title="", xlabel="", ylabel="", xticks=True, legend_width=0,
                 x_integer=False):
        """``box``: the region ``(left, top, right, bottom)`` the axes and their labels fill;
        ``legend_width`` > 0 keeps that much room right of the axes for a legend outside;
        ``x_integer``: x ticks on whole numbers only (the x values are all integers)."""
        self.c, self.xr, self.yr = canvas, xr, yr
        self.title, self.xlabel, self.ylabel, self.show_xticks = title, xlabel, ylabel, xticks
        x0, y0, x1, y1 = box
        th = canvas.text_size("0", TICK_FONT)[1]
        self.t = y0 + 12 + (canvas.text_size("0", TITLE_FONT)[1] + 14 if title else 0)
        self.b = y1 - 10 - (canvas.text_size("0", LABEL_FONT)[1] + 10 if xlabel else 0) - th - 12
        # at most one tick per 35 px of height and 45 px of width (about matplotlib's density)
        self.yticks = nice_ticks(*yr, max(3, min(10, int((self.b - self.t) // 35))))
        wmax = max(canvas.text_size(t, TICK_FONT)[0] for t in tick_labels(self.yticks))
        self.l = x0 + 10 + (canvas.text_size("0", LABEL_FONT)[1] + 12 if ylabel else 0) + wmax + 8
        self.r = x1 - 15 - (legend_width + 12 if legend_width else 0)
        self.xticks = nice_ticks(*xr, max(3, min(10, int((self.r - self.l) // 45))),
                                 integer=x_integer) if xticks else []
        self.box = box

    def px(self, x, y):
        fx = (x - self.xr[0]) / (self.xr[1] - self.xr[0])
        fy = (y - self.yr[0]) / (self.yr[1] - self.yr[0])
        return self.l + fx * (self.r - self.l), self.b - fy * (self.b - self.t)

    def inside(self, x, y) -> bool:
        return self.l <= x <= self.r and self.t <= y <= self.b

    def draw_background(self):
        c = self.c
        for v in self.yticks:
            _, y = self.px(self.xr[0], v)
            c.line([(self.l, y), (self.r, y)], GRID)
        for v in self.xticks:
            x, _ = self.px(v, self.yr[0])
            c.line([(x, self.t), (x, self.b)], GRID)

    def draw_frame(self):
        c = self.c
        c.rect(self.l, self.t, self.r, self.b, outline=FRAME)
        for v, text in zip(self.yticks, tick_labels(self.yticks)):
            _, y = self.px(self.xr[0], v)
            c.line([(self.l - 4, y), (self.l, y)], FRAME)
            c.text(self.l - 7, y, text, TICK_FONT, "rm")
        for v, text in zip(self.xticks, tick_labels(self.xticks)):
            x, _ = self.px(v, self.yr[0])
            c.line([(x, self.b), (x, self.b + 4)], FRAME)
            c.text(x, self.b + 8, text, TICK_FONT, "mt")
        if self.title:
            c.text((self.l + self.r) / 2, self.box[1] + 12, self.title, TITLE_FONT, "mt")
        if self.xlabel:
            c.text((self.l + self.r) / 2, self.box[3] - 10, self.xlabel, LABEL_FONT, "mb")
        if self.ylabel:
            c.text(self.box[0] + 10, (self.t + self.b) / 2, self.ylabel, LABEL_FONT, rotate=True)

    def draw_legend(self, entries, where):
        """``entries``: ``[(label, colour, kind)]``, kind ``line``, ``marker`` or ``patch``; ``where``:
        a corner name of :meth:`legend_boxes` or ``"outside"``."""
        c = self.c
        w, h = legend_size(c, entries)
        x0, y0 = (self.r + 12, self.t) if where == "outside" else self.legend_boxes(w, h)[where][:2]
        c.rect(x0, y0, x0 + w, y0 + h, fill="#ffffff", outline=LEGEND_EDGE, radius=3, alpha=0.8)
        for i, (label, colour, kind) in enumerate(entries):
            y = y0 + 7 + _LEGEND_ROW * i + _LEGEND_ROW / 2
            hx = x0 + 8
            if kind == "line":
                c.line([(hx, y), (hx + 22, y)], colour, 2)
                c.disc(hx + 11, y, 3, colour)
            elif kind == "marker":
                c.disc(hx + 11, y, 4, colour, SCATTER_ALPHA + 0.2)
            else:
                c.rect(hx + 3, y - 6, hx + 19, y + 6, fill=colour)
            c.text(hx + 30, y, str(label), LEGEND_FONT, "lm")

    def legend_boxes(self, w, h) -> dict:
        """The candidate legend rectangles inside the axes, in matplotlib's "best" order."""
        pad = 8
        return {"upper right": (self.r - pad - w, self.t + pad, self.r - pad, self.t + pad + h),
                "upper left": (self.l + pad, self.t + pad, self.l + pad + w, self.t + pad + h),
                "lower left": (self.l + pad, self.b - pad - h, self.l + pad + w, self.b - pad),
                "lower right": (self.r - pad - w, self.b - pad - h, self.r - pad, self.b - pad)}


_LEGEND_ROW = 18


def legend_size(canvas, entries) -> tuple[float, float]:
    width = max(canvas.text_size(str(label), LEGEND_FONT)[0] for label, _, _ in entries)
    return 8 + 30 + width + 10, 14 + _LEGEND_ROW * len(entries)


def best_corner(boxes: dict, points) -> str | None:
    """The first of ``boxes`` (``{name: (x0, y0, x1, y1)}``, in preference order) that holds none of
    ``points`` (output pixels), else ``None``."""
    for name, (x0, y0, x1, y1) in boxes.items():
        if not any(x0 - 3 <= x <= x1 + 3 and y0 - 3 <= y <= y1 + 3 for x, y in points):
            return name
    return None


def _sample_polyline(pts, every=3.0):
    """Points along a polyline every ``every`` pixels (the legend must not cover a line either)."""
    out = list(pts[:1])
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / every))
        out += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(1, n + 1)]
    return out


def _place_legend(make_axes, entries, obstacles):
    """``(axes, where)``: the axes from ``make_axes(legend_width)`` with the legend in a free corner,
    or, if none is free, axes narrowed to keep the legend outside on the right."""
    axes = make_axes(0)
    if not entries:
        return axes, None
    w, h = legend_size(axes.c, entries)
    corner = best_corner(axes.legend_boxes(w, h), obstacles(axes))
    if corner is not None:
        return axes, corner
    return make_axes(w), "outside"


def _finite(xs, ys):
    return [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]


# --- charts ----------------------------------------------------------------------------------------
def line_chart(path, series: dict, title="", xlabel="", ylabel="", size=(640, 400)) -> Path:
    """``series``: ``{label: (xs, ys)}``; one line per label (marked points up to 30 points)."""
    return save_png(_line_image(series, title, xlabel, ylabel, size, series_colours(series)), path)


def line_panels(path, panels: list, size=(520, 380)) -> Path:
    """Several line charts side by side, each ``size``: ``panels`` = ``[(series, title, xlabel,
    ylabel), ...]``; a series name has one colour in every panel."""
    colours = series_colours(name for series, *_ in panels for name in series)
    images = [_line_image(series, title, xlabel, ylabel, size, colours)
              for series, title, xlabel, ylabel in panels]
    canvas = Image.new("RGB", (size[0] * len(images), size[1]), "white")
    for i, im in enumerate(images):
        canvas.paste(im, (i * size[0], 0))
    return save_png(canvas, path)


def _line_image(series, title, xlabel, ylabel, size, colours):
    data = {name: _finite(xs, ys) for name, (xs, ys) in series.items()}
    pts = [p for v in data.values() for p in v] or [(0.0, 0.0)]
    xr, yr = _limits([x for x, _ in pts]), _limits([y for _, y in pts])
    x_integer = all(float(x).is_integer() for x, _ in pts)
    c = _Canvas(*size)

    def make(legend_width):
        return _Axes(c, (0, 0, *size), xr, yr, title, xlabel, ylabel, legend_width=legend_width,
                     x_integer=x_integer)

    def obstacles(ax):
        return [q for v in data.values() for q in _sample_polyline([ax.px(x, y) for x, y in v])]

    entries = [(name, colours[name], "line") for name in data]
    ax, where = _place_legend(make, entries, obstacles)
    ax.draw_background()
    for name, v in data.items():
        xy = [ax.px(x, y) for x, y in v]
        c.line(xy, colours[name], 2)
        if len(xy) <= MAX_MARKED_POINTS:
            for x, y in xy:
                c.disc(x, y, 3, colours[name])
    ax.draw_frame()
    if where:
        ax.draw_legend(entries, where)
    return c.image()


def scatter(path, xy, labels, title="", class_names=None, size=(520, 520), radius=None) -> Path:
    """2-D points ``xy`` (N, 2) coloured by integer ``labels`` (N,), as discs of ``radius`` output
    pixels (default 3) with alpha 0.7; ``class_names`` (by label) make the legend."""
    pts = [(float(a), float(b), int(k)) for (a, b), k in zip(xy, labels)
           if math.isfinite(a) and math.isfinite(b)]
    r = 3.0 if radius is None else float(radius)
    xr = _limits([p[0] for p in pts] or [0.0])
    yr = _limits([p[1] for p in pts] or [0.0])
    c = _Canvas(*size)

    def make(legend_width):
        return _Axes(c, (0, 0, *size), xr, yr, title, "feature 1", "feature 2", legend_width=legend_width)

    entries = [] if class_names is None else \
        [(name, PALETTE[i % len(PALETTE)], "marker") for i, name in enumerate(class_names)]
    ax, where = _place_legend(make, entries, lambda a: [a.px(x, y) for x, y, _ in pts])
    ax.draw_background()
    for x, y, k in pts:
        c.disc(*ax.px(x, y), r, PALETTE[k % len(PALETTE)], SCATTER_ALPHA)
    ax.draw_frame()
    if where:
        ax.draw_legend(entries, where)
    return save_png(c.image(), path)


def stacked_bars(path, bars: dict, parts: list, title="", ylabel="", size=(560, 420)) -> Path:
    """``bars``: ``{bar label: [value per part]}``, stacked bottom-up in the order of ``parts``;
    each segment shows its value, each bar its total above it."""
    totals = [sum(v) for v in bars.values()]
    n = len(bars)
    yr = _limits(totals + [max(totals) * 1.08], zero=True)   # room for the totals above the bars
    c = _Canvas(*size)
    width = 0.55

    def make(legend_width):
        ax = _Axes(c, (0, 0, *size), (0, n), yr, title, "", ylabel, xticks=False,
                   legend_width=legend_width)
        ax.b -= c.text_size("0", LABEL_FONT)[1] + 4    # room for the bar names
        return ax

    def obstacles(ax):
        out = []
        for i, total in enumerate(totals):
            x0, y0 = ax.px(i + 0.5 - width / 2, total)
            x1, y1 = ax.px(i + 0.5 + width / 2, 0)
            y0 -= 4 + c.text_size("0", LEGEND_FONT)[1]       # the total's label
            out += [(x, y) for x in _frange(x0, x1, 3) for y in _frange(y0, y1, 3)]
        return out

    entries = [(p, PALETTE[j % len(PALETTE)], "patch") for j, p in enumerate(parts)]
    ax, where = _place_legend(make, entries, obstacles)
    ax.draw_background()
    for i, (label, values) in enumerate(bars.items()):
        base = 0.0
        for j, v in enumerate(values):
            x0, y0 = ax.px(i + 0.5 - width / 2, base + v)
            x1, y1 = ax.px(i + 0.5 + width / 2, base)
            c.rect(x0, y0, x1, y1, fill=PALETTE[j % len(PALETTE)])
            if base:
                c.line([(x0, y1), (x1, y1)], "#ffffff")
            if abs(y1 - y0) > 2 * c.text_size("0", LEGEND_FONT)[1]:
                c.text((x0 + x1) / 2, (y0 + y1) / 2, f"{v:.3g}", LEGEND_FONT, "mm", "#ffffff")
            base += v
        x, y = ax.px(i + 0.5, base)
        c.text(x, y - 5, f"{base:.3g}", LEGEND_FONT, "mb")
        c.text(x, ax.b + 8, str(label), LABEL_FONT, "mt")
    ax.draw_frame()
    if where:
        ax.draw_legend(entries, where)
    return save_png(c.image(), path)


def _frange(a, b, step):
    lo, hi = min(a, b), max(a, b)
    n = max(1, int((hi - lo) / step))
    return [lo + (hi - lo) * i / n for i in range(n + 1)]
