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

import math
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

    Args:
        max_columns: the most columns kept (>= 2); beyond, neighbouring columns merge pairwise.
    """

    def __init__(self, max_columns: int = 200) -> None:
        if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
            raise ValueError(f"`FlowHistory(max_columns={max_columns!r})` must be an int >= 2.")
        self.max_columns = max_columns
        self.keys: list[str] = []  # rows, in the order first seen
        self._known: set[str] = set()
        self._columns: list[dict[str, list[float]]] = []
        self._spans: list[list[int]] = []  # per column: [first step, last step, logged steps in it]
        self._stride = 1  # logged steps per column

    def __len__(self) -> int:
        """The number of columns."""
        return len(self._columns)

    def add(self, step: int, values: Mapping[str, float | None]) -> None:
        """Record one logged step: per key its value, ``None`` for no gradient (several calls with one step, e.g.
        one per optimizer, fill the same column)."""
        if not values:
            return
        span = self._spans[-1] if self._spans else None
        if span is not None and span[1] == step:
            column = self._columns[-1]
        elif span is not None and span[2] < self._stride and step > span[1]:
            column = self._columns[-1]
            span[1] = step
            span[2] += 1
        else:
            column = {}
            self._columns.append(column)
            self._spans.append([step, step, 1])
        for key, value in values.items():
            cell = column.get(key)
            if cell is None:
                if key not in self._known:
                    self._known.add(key)
                    self.keys.append(key)
                cell = column[key] = [0.0, 0, 0, 0, 0]
            if value is None:
                cell[_NONE] += 1
            elif not math.isfinite(value):
                cell[_BAD] += 1
            elif value > 0:
                cell[_LOG] += math.log10(value)
                cell[_POS] += 1
            else:
                cell[_ZERO] += 1
        if len(self._columns) > self.max_columns:
            self._halve()

    def _halve(self) -> None:
        columns, spans = [], []
        for i in range(0, len(self._columns), 2):
            column, span = self._columns[i], list(self._spans[i])
            if i + 1 < len(self._columns):
                for key, cell in self._columns[i + 1].items():
                    mine = column.setdefault(key, [0.0, 0, 0, 0, 0])
                    for j in range(5):
                        mine[j] += cell[j]
                nxt = self._spans[i + 1]
                span = [span[0], nxt[1], span[2] + nxt[2]]
            columns.append(column)
            spans.append(span)
        self._columns, self._spans = columns, spans
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
        values = np.full((len(keys), len(self._columns)), np.nan)
        flags = np.full(values.shape, 4, dtype=np.int8)
        for c, column in enumerate(self._columns):
            for r, key in enumerate(keys):
                cell = column.get(key)
                if cell is None:
                    continue
                if cell[_BAD]:
                    flags[r, c] = 2
                elif cell[_POS]:
                    flags[r, c] = 0
                    values[r, c] = 10.0 ** (cell[_LOG] / cell[_POS])
                elif cell[_ZERO]:
                    flags[r, c] = 1
                else:
                    flags[r, c] = 3
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
    labels = [k if len(k) <= 40 else ".." + k[-38:] for k in keys]
    label_w = max([int(font.getlength(s)) for s in labels] + [40]) + 10
    n_rows = max(1, len(keys))
    cell_h = 14 if n_rows <= 60 else 8
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
        for r, label in enumerate(labels):
            text.append(((x0 - 5, y0 + r * cell_h + cell_h // 2), label, font, "rm"))
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
