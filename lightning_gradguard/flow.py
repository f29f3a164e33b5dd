"""The gradient-flow picture: per module, the gradient norm (and update ratio) across logged steps, as one image.

Rows are modules in model order (the keys of the ``norms="module"`` tags), columns are logged steps, the colour is
the value on a log scale (viridis: dark = small, yellow = large), so that a layer whose gradients vanish (a dark
row) or explode (a bright row) stands out. Cells say more than a colour where it matters: black = a gradient exactly
zero, grey = no gradient at all, red = NaN/Inf.

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
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FLOW_FILE", "FLOW_TAG", "PANEL_TITLES", "FlowHistory", "FlowPicture", "render_flow", "write_png"]

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

# viridis at 9 points (matplotlib's table), interpolated linearly: dark purple (small) to yellow (large).
_VIRIDIS = np.array(
    [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]],
    dtype=np.float64,
)  # fmt: skip
_ZERO_RGB = (0, 0, 0)
_NONE_RGB = (190, 190, 190)
_BAD_RGB = (228, 26, 28)
_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)


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


def _colours(t: np.ndarray) -> np.ndarray:
    """viridis of ``t`` in [0, 1] (any shape) as uint8 RGB."""
    x = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    return np.rint(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _label_strip(labels: tuple[str, ...], width: int, cell_h: int) -> np.ndarray:
    """The row labels, right-aligned, one per ``cell_h`` pixels (read-only: pasted into each picture)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11 if cell_h >= 14 else 9)
    image = Image.new("RGB", (width, max(1, len(labels)) * cell_h), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for r, label in enumerate(labels):
        draw.text((width - 5, r * cell_h + cell_h // 2), label, fill=_INK, font=font, anchor="rm")
    strip = np.asarray(image).copy()
    strip.flags.writeable = False
    return strip


def _fmt(v: float) -> str:
    return f"{v:.0e}" if v >= 1e4 or v < 1e-2 else f"{v:.3g}"


def render_flow(histories: Mapping[str, FlowHistory], keys: Sequence[str] | None = None) -> FlowPicture:
    """Draw the panels of ``histories`` (``"grad_norm"``, ``"update_ratio"``: see :data:`PANEL_TITLES`) one above
    the other, each with its steps, colour bar and legend.

    Args:
        histories: per panel, its values; panels without columns are left out.
        keys: the rows, top to bottom (default: the keys in the order first seen).
    """
    from PIL import Image, ImageDraw, ImageFont

    panels = [(name, h) for name, h in histories.items() if len(h)]
    if keys is None:
        keys = list(dict.fromkeys(k for _, h in panels for k in h.keys))
    keys = list(keys)
    font = ImageFont.load_default(size=11)
    title_font = ImageFont.load_default(size=13)
    n_rows = max(1, len(keys))
    cell_h = 14 if n_rows <= 40 else 11  # with a 9-pixel label font: every row keeps its label
    label_font = font if cell_h >= 14 else ImageFont.load_default(size=9)
    labels = [k if len(k) <= 40 else ".." + k[-38:] for k in keys]
    label_w = max([int(label_font.getlength(s)) for s in labels] + [40]) + 10
    ncols = max([len(h) for _, h in panels] + [1])
    cell_w = max(2, min(24, 640 // ncols))
    margin, title_h, axis_h, bar_h, legend_h = 10, 22, 16, 10, 34
    plot_w = max(ncols * cell_w, 240)
    panel_h = title_h + n_rows * cell_h + axis_h + bar_h + legend_h
    titles = {}
    for name, history in panels:
        spans = history.steps()
        titles[name] = f"{PANEL_TITLES.get(name, name)} (log scale), steps {spans[0][0]} to {spans[-1][1]}"
        if history.stride > 1:
            titles[name] += f", {history.stride} logged steps per column"
    title_w = max([int(title_font.getlength(t)) for t in titles.values()] + [0])
    width = margin + max(label_w + plot_w, title_w) + margin
    height = margin + max(1, len(panels)) * (panel_h + margin)
    canvas = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    picture = FlowPicture(canvas, keys=keys)
    text: list[tuple[tuple[int, int], str, object, str]] = []  # (xy, text, font, anchor)
    y = margin
    if not panels:
        text.append(((margin, margin), "no gradient norms logged yet", title_font, "la"))
    for name, history in panels:
        values, flags = history.matrix(keys)
        spans = history.steps()
        title = titles[name]
        text.append(((margin, y + 3), title, title_font, "la"))
        y0 = y + title_h
        x0 = margin + label_w
        hm_w = values.shape[1] * cell_w
        finite = np.log10(values[flags == 0]) if (flags == 0).any() else np.zeros(0)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        picture.scales[name] = (10.0**lo, 10.0**hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            rgb = _colours((np.log10(values) - lo) / (hi - lo))
        rgb[flags == 1] = _ZERO_RGB
        rgb[flags == 2] = _BAD_RGB
        rgb[flags == 3] = _NONE_RGB
        rgb[flags == 4] = _BACKGROUND
        block = np.repeat(np.repeat(rgb, cell_h, axis=0), cell_w, axis=1)
        canvas[y0 : y0 + block.shape[0], x0 : x0 + hm_w] = block
        picture.panels[name] = (x0, y0, x0 + hm_w, y0 + n_rows * cell_h)
        strip = _label_strip(tuple(labels), label_w, cell_h)  # drawn once per set of rows
        canvas[y0 : y0 + strip.shape[0], margin : margin + label_w] = strip
        ya = y0 + n_rows * cell_h + 2
        text.append(((x0, ya), f"step {spans[0][0]}", font, "la"))
        if len(spans) > 1:
            text.append(((x0 + hm_w, ya), f"{spans[-1][1]}", font, "ra"))
        yb = ya + axis_h
        bar = _colours(np.linspace(0.0, 1.0, plot_w))[None, :, :]
        canvas[yb : yb + bar_h, x0 : x0 + plot_w] = np.repeat(bar, bar_h, axis=0)
        text.append(((x0, yb + bar_h + 2), _fmt(10.0**lo), font, "la"))
        text.append(((x0 + plot_w, yb + bar_h + 2), _fmt(10.0**hi), font, "ra"))
        text.append(((x0 + plot_w // 2, yb + bar_h + 2), _fmt(10.0 ** ((lo + hi) / 2)), font, "ma"))
        yl = yb + bar_h + 18
        xl = x0
        for colour, what in ((_ZERO_RGB, "zero"), (_NONE_RGB, "no gradient"), (_BAD_RGB, "NaN/Inf")):
            canvas[yl + 2 : yl + 11, xl : xl + 9] = colour
            text.append(((xl + 12, yl), what, font, "la"))
            xl += 24 + int(font.getlength(what))
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
