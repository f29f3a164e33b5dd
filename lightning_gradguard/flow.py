"""The gradient-flow picture: per module, the gradient norm (and update ratio) across logged steps, as one image.

Rows are modules in model order (the keys of the ``norms="module"`` tags), columns are logged steps, the colour is
the value on a fixed log scale (:data:`SCALES`, the same in every run so that two runs compare; viridis from blue =
small to yellow = large), so that a layer whose gradients vanish (a dark row) or explode (a bright row) stands out. A
value outside the scale takes its end colour with a mark across the cell (white below, black above). Cells say more
than a colour where it matters: black = a gradient exactly zero, grey = no gradient at all (a row without any says
"no gradient"), red = NaN/Inf. The picture is :data:`WIDTH` pixels wide, its text sized to stay readable at the
350 pixels TensorBoard's Images tab shows it at.

:class:`FlowHistory` keeps the values of one panel in at most ``max_columns`` columns: when full, neighbouring
columns are merged pairwise (geometric mean) and each later column covers twice as many logged steps, so its
memory is bounded by ``rows x max_columns`` small records whatever the length of the run. :func:`render_flow` draws
the panels with numpy and Pillow (no matplotlib).

Example::

    >>> history = FlowHistory(max_columns=4)
    >>> for step in range(6):
    ...     history.add(step, {"enc": 1.0, "head": 10.0 ** -step})
    >>> history.steps()
    [(0, 1), (2, 3), (4, 5)]
    >>> picture = render_flow({"grad_norm": history})
    >>> picture.image.shape[2], picture.image.dtype.name
    (3, 'uint8')
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "FLOW_FILE",
    "FLOW_TAG",
    "PANEL_TITLES",
    "SCALES",
    "WIDTH",
    "FlowHistory",
    "FlowPicture",
    "render_flow",
    "write_png",
]

#: The image tag in TensorBoard's Images tab.
FLOW_TAG = "gradguard/gradient_flow"
#: The PNG written beside the JSON run report.
FLOW_FILE = "gradguard_flow.png"
#: The panels, top to bottom, and their titles.
PANEL_TITLES: dict[str, str] = {
    "grad_norm": "gradient norm per module",
    "update_ratio": "update / weight per module",
}

# A cell: [sum of log10 of the positive finite values, their count, zeros, non-finite, no gradient].
_LOG, _POS, _ZERO, _BAD, _NONE = range(5)

#: Each panel's colour scale, fixed (the same in every run, so that two runs compare): ``(low, high)``. Values
#: outside are drawn in the end colour with a mark across the cell (white below, black above).
SCALES: dict[str, tuple[float, float]] = {"grad_norm": (1e-6, 1e2), "update_ratio": (1e-6, 1.0)}
#: The picture's width in pixels. TensorBoard's Images tab shows every image 350 px wide until "Show actual image
#: size" is ticked (``tf-image-loader``: ``:host { width: 350px }``, ``img { width: 100% }``): the fonts are sized
#: for that scale (a 22 px label is 12 px there).
WIDTH = 640

# viridis at 9 points (matplotlib's table), interpolated linearly: blue (small) to yellow (large). The scale starts
# at a quarter of it: viridis' darkest purple is too close to the black of a gradient that is exactly zero.
_VIRIDIS = np.array(
    [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]],
    dtype=np.float64,
)  # fmt: skip
_VIRIDIS_FROM = 0.25
_ZERO_RGB = (0, 0, 0)
_NONE_RGB = (190, 190, 190)
_BAD_RGB = (228, 26, 28)
_BELOW_MARK = (255, 255, 255)
_ABOVE_MARK = (0, 0, 0)
_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)
# Font sizes (pixels of the picture; about half of that in TensorBoard's default view): title, row labels (up to 40
# rows, more rows), axis and legend.
_TITLE_PX, _LABEL_PX, _LABEL_MANY_PX, _SMALL_PX = 24, 22, 20, 20
_GAP = 2  # white pixels below each row


class FlowHistory:
    """One panel's values per key across logged steps, in at most ``max_columns`` columns.

    Each cell holds five numbers (the sum of log10 of the positive finite values, their count, and the counts of
    zeros, non-finite values and missing gradients) in one float64 array: a logged step costs a few numpy operations,
    merging columns is one vectorised sum.

    Args:
        max_columns: the most columns kept (>= 2); beyond, neighbouring columns merge pairwise.
    """

    def __init__(self, max_columns: int = 200) -> None:
        if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
            raise ValueError(f"`FlowHistory(max_columns={max_columns!r})` must be an int >= 2.")
        self.max_columns = max_columns
        self.keys: list[str] = []  # rows, in the order first seen
        self._row: dict[str, int] = {}
        self._cells = np.zeros((8, max_columns + 1, 5))  # rows grow by doubling; one spare column before merging
        self._seen = np.zeros((8, max_columns + 1), dtype=bool)  # recorded at all
        self._spans: list[list[int]] = []  # per column: [first step, last step, logged steps in it]
        self._stride = 1  # logged steps per column

    def __len__(self) -> int:
        """The number of columns."""
        return len(self._spans)

    def add(self, step: int, values: Mapping[str, float | None]) -> None:
        """Record one logged step: per key its value, ``None`` for no gradient (several calls with one step, e.g.
        one per optimizer, fill the same column)."""
        if not values:
            return
        span = self._spans[-1] if self._spans else None
        if span is not None and span[1] == step:
            pass
        elif span is not None and span[2] < self._stride and step > span[1]:
            span[1] = step
            span[2] += 1
        else:
            self._spans.append([step, step, 1])
        c = len(self._spans) - 1
        rows = np.fromiter((self._row_of(k) for k in values), dtype=np.int64, count=len(values))
        raw = list(values.values())
        none = np.fromiter((v is None for v in raw), dtype=bool, count=len(raw))
        v = np.fromiter((0.0 if x is None else x for x in raw), dtype=np.float64, count=len(raw))
        finite = np.isfinite(v)
        pos = finite & (v > 0) & ~none
        cells = self._cells
        np.add.at(cells[:, c, _LOG], rows[pos], np.log10(v[pos]))
        np.add.at(cells[:, c, _POS], rows[pos], 1)
        np.add.at(cells[:, c, _ZERO], rows[finite & (v <= 0) & ~none], 1)
        np.add.at(cells[:, c, _BAD], rows[~finite], 1)
        np.add.at(cells[:, c, _NONE], rows[none], 1)
        self._seen[rows, c] = True
        if len(self._spans) > self.max_columns:
            self._halve()

    def _row_of(self, key: str) -> int:
        r = self._row.get(key)
        if r is None:
            r = self._row[key] = len(self.keys)
            self.keys.append(key)
            if r >= len(self._cells):
                self._cells = np.concatenate([self._cells, np.zeros_like(self._cells)])
                self._seen = np.concatenate([self._seen, np.zeros_like(self._seen)])
        return r

    def _halve(self) -> None:
        n = len(self._spans)
        half = (n + 1) // 2
        cells, seen = self._cells, self._seen
        merged = cells[:, 0:n:2].copy()
        merged[:, : n // 2] += cells[:, 1:n:2]
        seen_merged = seen[:, 0:n:2].copy()
        seen_merged[:, : n // 2] |= seen[:, 1:n:2]
        cells[:] = 0.0
        seen[:] = False
        cells[:, :half] = merged
        seen[:, :half] = seen_merged
        spans = []
        for i in range(0, n, 2):
            a = self._spans[i]
            if i + 1 < n:
                b = self._spans[i + 1]
                spans.append([a[0], b[1], a[2] + b[2]])
            else:
                spans.append(list(a))
        self._spans = spans
        self._stride *= 2

    @property
    def stride(self) -> int:
        """Logged steps per column (doubles each time the columns are merged)."""
        return self._stride

    def steps(self) -> list[tuple[int, int]]:
        """Per column, the first and last logged step it covers."""
        return [(s[0], s[1]) for s in self._spans]

    def matrix(self, keys: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(values, flags)`` with one row per key (default :attr:`keys`) and one column per column.

        ``values``: the geometric mean of the positive finite values of a cell (``nan`` if none); ``flags``: per cell
        ``0`` value, ``1`` zero, ``2`` non-finite, ``3`` no gradient, ``4`` not recorded. Non-finite wins over a value,
        a value over zero, zero over no gradient.
        """
        keys = self.keys if keys is None else list(keys)
        n = len(self._spans)
        rows = np.array([self._row.get(k, -1) for k in keys], dtype=np.int64)
        known = rows >= 0
        cells = np.zeros((len(keys), n, 5))
        seen = np.zeros((len(keys), n), dtype=bool)
        cells[known] = self._cells[rows[known], :n]
        seen[known] = self._seen[rows[known], :n]
        flags = np.full((len(keys), n), 4, dtype=np.int8)
        flags[seen & (cells[..., _NONE] > 0)] = 3
        flags[seen & (cells[..., _ZERO] > 0)] = 1
        flags[seen & (cells[..., _POS] > 0)] = 0
        flags[seen & (cells[..., _BAD] > 0)] = 2
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(flags == 0, 10.0 ** (cells[..., _LOG] / cells[..., _POS]), np.nan)
        return values, flags


@dataclass
class FlowPicture:
    """A rendered picture: the RGB image (``H x W x 3``, uint8) and where each panel and row is in it."""

    image: np.ndarray
    #: per panel: ``(x0, y0, x1, y1)`` of its heatmap (pixels, end exclusive).
    panels: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    #: the keys of the rows, top to bottom (every panel has the same rows).
    keys: list[str] = field(default_factory=list)
    #: per panel: the colour scale's ends, ``(low, high)`` values.
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)

    def row_box(self, panel: str, key: str) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of ``key``'s row in ``panel``'s heatmap."""
        x0, y0, x1, y1 = self.panels[panel]
        h = (y1 - y0) // max(1, len(self.keys))
        r = self.keys.index(key)
        return x0, y0 + r * h, x1, y0 + (r + 1) * h


def _to_rgb(t: np.ndarray) -> np.ndarray:
    """The colour scale at ``t`` in [0, 1] (any shape; clipped, NaN as 0) as uint8 RGB."""
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0)
    x = (_VIRIDIS_FROM + (1.0 - _VIRIDIS_FROM) * t) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    return np.rint(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _load_font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _shorten(label: str, font: Any, width: int) -> str:
    """``label`` in at most ``width`` pixels of ``font``: else its last dotted parts after "…" (module names differ at
    the end), or its last characters."""
    if font.getlength(label) <= width:
        return label
    parts = label.split(".")
    for i in range(1, len(parts)):
        tail = "…" + ".".join(parts[i:])
        if font.getlength(tail) <= width:
            return tail
    n = len(parts[-1])
    while n > 1 and font.getlength("…" + label[-n:]) > width:
        n -= 1
    return "…" + label[-n:]


@functools.lru_cache(maxsize=4)
def _draw_labels(labels: tuple[str, ...], width: int, cell_h: int, size: int) -> np.ndarray:
    """The row labels, right-aligned, one per ``cell_h`` pixels (read-only: pasted into each picture)."""
    from PIL import Image, ImageDraw

    font = _load_font(size)
    image = Image.new("RGB", (width, max(1, len(labels)) * cell_h), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for r, label in enumerate(labels):
        draw.text((width - 6, r * cell_h + (cell_h - _GAP) // 2), _shorten(label, font, width - 8), fill=_INK,
                  font=font, anchor="rm")  # fmt: skip
    strip = np.asarray(image).copy()
    strip.flags.writeable = False
    return strip


def _format_power(v: float) -> str:
    """A power of ten as ``1e-6``, ``0.01``, ``1``, ``100``, ``1e3``."""
    e = round(np.log10(v))
    return f"{10.0**e:g}" if -2 <= e <= 2 else f"1e{e}"


def _place_ticks(lo: float, hi: float, x0: int, width: int, font: Any) -> list[tuple[int, int, str]]:
    """The colour bar's ticks, one per power of ten from ``10**lo`` to ``10**hi``: ``(x, label's left, label)``, the
    label ``""`` on ticks left unlabelled so that the labels (every first, second, ... decade) do not touch."""
    decades = list(range(math.ceil(lo), math.floor(hi) + 1))
    xs = [x0 + round((e - lo) / (hi - lo) * (width - 1)) for e in decades]
    labels = [_format_power(10.0**e) for e in decades]
    lefts = []
    for x, label in zip(xs, labels, strict=True):
        w = int(font.getlength(label))
        lefts.append(min(max(x - w // 2, x0), x0 + width - w))
    for step in range(1, len(decades) + 1):
        shown = list(range(0, len(decades), step))
        ends = [(lefts[i], lefts[i] + int(font.getlength(labels[i]))) for i in shown]
        if all(b[0] - a[1] >= 10 for a, b in zip(ends, ends[1:], strict=False)):
            break
    return [(x, left, label if i in shown else "") for i, (x, left, label) in enumerate(zip(xs, lefts, labels,
                                                                                           strict=True))]  # fmt: skip


def render_flow(histories: Mapping[str, FlowHistory], keys: Sequence[str] | None = None) -> FlowPicture:
    """Draw the panels of ``histories`` (``"grad_norm"``, ``"update_ratio"``: see :data:`PANEL_TITLES`) one above
    the other, each with its steps, colour bar (the fixed range of :data:`SCALES`) and legend, :data:`WIDTH` pixels
    wide.

    Args:
        histories: per panel, its values; panels without columns are left out.
        keys: the rows, top to bottom (default: the keys in the order first seen).
    """
    from PIL import Image, ImageDraw

    panels = [(name, h) for name, h in histories.items() if len(h)]
    if keys is None:
        keys = list(dict.fromkeys(k for _, h in panels for k in h.keys))
    keys = list(keys)
    title_font, small = _load_font(_TITLE_PX), _load_font(_SMALL_PX)
    n_rows = max(1, len(keys))
    label_px = _LABEL_PX if n_rows <= 40 else _LABEL_MANY_PX
    cell_h = label_px + 6
    label_font = _load_font(label_px)
    margin, title_h, axis_h, bar_h, tick_h, legend_h = 12, 34, 28, 14, 30, 30
    label_w = min(max([int(label_font.getlength(k)) for k in keys] + [40]) + 14, int(WIDTH * 0.4))
    x0 = margin + label_w
    plot_w = WIDTH - margin - x0
    legend = [("zero", _ZERO_RGB, None), ("no gradient", _NONE_RGB, None), ("NaN/Inf", _BAD_RGB, None),
              ("below scale", tuple(_to_rgb(np.zeros(1))[0]), _BELOW_MARK),
              ("above scale", tuple(_to_rgb(np.ones(1))[0]), _ABOVE_MARK)]  # fmt: skip
    legend_rows, x = 1, x0
    for what, _, _ in legend:
        w = 26 + int(small.getlength(what))
        if x + w > WIDTH - margin and x > x0:
            legend_rows, x = legend_rows + 1, x0
        x += w
    panel_h = title_h + n_rows * cell_h + axis_h + bar_h + tick_h + legend_rows * legend_h
    height = margin + max(1, len(panels)) * (panel_h + margin)
    canvas = np.full((height, WIDTH, 3), _BACKGROUND, dtype=np.uint8)
    picture = FlowPicture(canvas, keys=keys)
    text: list[tuple[tuple[int, int], str, object, str]] = []  # (xy, text, font, anchor)
    y = margin
    if not panels:
        text.append(((margin, margin), "no gradient norms logged yet", title_font, "la"))
    for name, history in panels:
        values, flags = history.matrix(keys)
        spans = history.steps()
        text.append(((margin, y + 4), f"{PANEL_TITLES.get(name, name)} (log scale)", title_font, "la"))
        y0 = y + title_h
        low, high = SCALES.get(name, SCALES["grad_norm"])
        lo, hi = np.log10(low), np.log10(high)
        picture.scales[name] = (low, high)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (np.log10(values) - lo) / (hi - lo)
        rgb = _to_rgb(t)
        rgb[flags == 1] = _ZERO_RGB
        rgb[flags == 2] = _BAD_RGB
        rgb[flags == 3] = _NONE_RGB
        rgb[flags == 4] = _BACKGROUND
        column = np.arange(plot_w) * values.shape[1] // plot_w  # each pixel column's logged-step column
        block = np.repeat(rgb[:, column], cell_h, axis=0)
        mark = np.repeat(((t > 1).astype(np.int8) - (t < 0))[:, column], cell_h, axis=0)  # above: 1, below: -1
        band = (np.arange(n_rows * cell_h) % cell_h - (cell_h - _GAP) // 2)[:, None]
        band = (band >= -1) & (band <= 1)  # 3 pixels across the middle of each row
        block[band & (mark < 0)] = _BELOW_MARK
        block[band & (mark > 0)] = _ABOVE_MARK
        block[(np.arange(n_rows * cell_h) % cell_h >= cell_h - _GAP)] = _BACKGROUND  # rows apart
        canvas[y0 : y0 + block.shape[0], x0 : x0 + plot_w] = block
        for r in np.flatnonzero(((flags == 3) | (flags == 4)).all(axis=1) & (flags == 3).any(axis=1)).tolist():
            text.append(((x0 + plot_w // 2, y0 + r * cell_h + (cell_h - _GAP) // 2), "no gradient", small, "mm"))
        picture.panels[name] = (x0, y0, x0 + plot_w, y0 + n_rows * cell_h)
        strip = _draw_labels(tuple(keys), label_w, cell_h, label_px)  # drawn once per set of rows
        canvas[y0 : y0 + strip.shape[0], margin : margin + label_w] = strip
        ya = y0 + n_rows * cell_h + 4
        text.append(((x0, ya), f"step {spans[0][0]}", small, "la"))
        if len(spans) > 1:
            text.append(((x0 + plot_w, ya), f"{spans[-1][1]}", small, "ra"))
        if history.stride > 1:
            text.append(((x0 + plot_w // 2, ya), f"{history.stride} logged steps per column", small, "ma"))
        yb = ya + axis_h
        canvas[yb : yb + bar_h, x0 : x0 + plot_w] = _to_rgb(np.linspace(0.0, 1.0, plot_w))[None, :, :]
        ticks = _place_ticks(lo, hi, x0, plot_w, small)
        for xt, _, _ in ticks:
            canvas[yb + bar_h : yb + bar_h + 4, max(x0, xt - 1) : xt + 1] = _INK
        text += [((left, yb + bar_h + 4), label, small, "la") for _, left, label in ticks if label]
        yl, xl = yb + bar_h + tick_h, x0
        for what, colour, marker in legend:
            w = 26 + int(small.getlength(what))
            if xl + w > WIDTH - margin and xl > x0:
                yl, xl = yl + legend_h, x0
            canvas[yl + 4 : yl + 20, xl : xl + 16] = colour
            if marker is not None:
                canvas[yl + 11 : yl + 14, xl : xl + 16] = marker
            text.append(((xl + 21, yl), what, small, "la"))
            xl += w
        y += panel_h + margin
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for xy, s, f, anchor in text:
        draw.text(xy, s, fill=_INK, font=f, anchor=anchor)
    picture.image = np.asarray(image).copy()
    return picture


def write_png(picture: FlowPicture, path: str | os.PathLike[str]) -> str:
    """Write ``picture`` as a PNG (folders created); return the path."""
    from PIL import Image

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(picture.image).save(path, format="PNG")
    return path
