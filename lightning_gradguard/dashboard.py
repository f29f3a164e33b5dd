"""The dashboard: GradGuard's gradient statistics and run report, written to every logger of a Trainer.

:class:`Dashboard` takes what :meth:`~lightning_gradguard.core.GuardCore.check` already measured (one
:class:`~lightning_gradguard.audit.GradStats` per optimizer step: per-parameter norms from the one fused pass) and
writes, on the steps it logs, only on rank zero:

* scalars, through ``logger.log_metrics`` of every logger (TensorBoard, CSV, W&B, MLflow, ...);
* histograms, the findings report as markdown text and a custom-scalars layout, to the loggers whose ``experiment``
  is a TensorBoard ``SummaryWriter``;
* the gradient-flow picture (:mod:`~lightning_gradguard.flow`: per module, gradient norm and update ratio across
  logged steps) to TensorBoard's Images tab on the first and every ``flow_every``-th logged step, and at the end of
  ``fit`` as ``gradguard_flow.png`` beside the JSON report;
* the run report as JSON at the end of ``fit``.

Steps are Lightning's own: the dashboards are written in the batches where Lightning logs ``self.log`` values
(``(step + 1) % log_every_n_steps == 0``, ``step``: the batches that stepped an optimizer so far), at that step.

For a ``torch.utils.tensorboard.SummaryWriter`` the scalars and histograms of a step go out as one event
(``add_scalar`` costs one hand-off to the writer thread per tag). Histograms use log-linear buckets (8 per octave:
the top 12 bits of a float32, exact, one integer shift per value); the values of every tag are bucketed together
(:func:`histograms_counts`: a bounded key buffer per device, one ``bincount`` per up to a million values), and their
counts and other statistics come back to the host in one transfer per step. The key buffer (4 MiB per device) is
kept between logged steps and dropped at the end of ``fit``.

Nothing here runs on steps that are not logged, except a running max/sum/count of the total norm (three Python
floats) for the epoch statistics.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from .flow import FLOW_FILE, FLOW_TAG, FlowHistory, FlowPicture, render_flow, write_png
from .measure import GradStats, l2_norms
from .params import ParamIndex, module_of, optimizer_layout
from .report import RunReport

__all__ = [
    "NORMS",
    "REPORT_FILE",
    "TAG",
    "TEXT_TAG",
    "Dashboard",
    "HistogramBuffers",
    "custom_scalars_layout",
    "group_keys",
    "own_keys",
    "histogram_counts",
    "histogram_proto_args",
    "histograms_counts",
    "use_fast_crc32c",
]

#: Every tag starts with this.
TAG = "gradguard"
#: The choices of ``norms``.
NORMS: tuple[str, ...] = ("param", "module", "total")
#: The name of the JSON run report.
REPORT_FILE = "gradguard_report.json"
#: The text tag of the findings report (``torch`` appends ``/text_summary``).
TEXT_TAG = f"{TAG}/report"

# Histogram buckets: the top 12 bits of a float32 (sign, exponent, 3 mantissa bits): 8 log-linear buckets per
# power of two, for either sign; `bits >> 20` is one integer op per value.
_SHIFT = 20
_HALF = 1 << (31 - _SHIFT)  # 2048 buckets per sign
_NBINS = 2 * _HALF


def _bucket_edges() -> tuple[list[float], list[float], list[int]]:
    """Per bin ``(bits >> 20) + 2048``: left and right edge of its values, and the finite bins in value order.

    TensorBoard reads bucket ``i`` as the values in ``(limit[i-1], limit[i]]``. A negative bin holds the float32
    values in ``(-hi, -lo]``: its edges are exact. A positive bin holds ``[lo, hi)``, which for float32 values is
    ``(prev(lo), prev(hi)]`` (``prev``: the next float32 towards zero): so its edges are those, and a value on a power
    of two or a multiple of 1/8 of one (common in bfloat16 gradients) is counted in the right bucket.
    """
    n = 255 << 3  # magnitude buckets below exponent 255 (inf, nan)
    bits = np.arange(n + 1, dtype=np.int64) << _SHIFT
    edges = bits.astype(np.uint32).view(np.float32).astype(np.float64)
    edges[-1] = float(np.finfo(np.float32).max)  # instead of inf
    below = np.maximum(bits - 1, 0).astype(np.uint32).view(np.float32).astype(np.float64)  # prev(edge); prev(inf)=max
    below[0] = -float(np.finfo(np.float32).smallest_subnormal)  # the bin of +0.0 starts below it
    lo, hi = edges[:-1], edges[1:]
    left = np.full(_NBINS, np.nan)
    right = np.full(_NBINS, np.nan)
    left[:n], right[:n] = -hi, -lo  # bins 0..2047: negative values, magnitude bucket = bin
    left[_HALF : _HALF + n], right[_HALF : _HALF + n] = below[:-1], below[1:]
    finite = [j for j in range(_NBINS) if not math.isnan(right[j])]
    order = sorted(finite, key=lambda j: (right[j], j))
    return left.tolist(), right.tolist(), order


_LEFT, _RIGHT, _ORDER = _bucket_edges()


def histogram_counts(
    tensors: Sequence[torch.Tensor], scale: float = 1.0, finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The histogram of the finite values of ``tensors`` (divided by ``scale``), on their device, without a sync.

    Args:
        tensors: the values (any shape; half precision is measured in float32).
        scale: divide the values by this.
        finite: the caller knows every value is finite (e.g. from a finite norm); otherwise non-finite values are
            masked out first (one more pass).

    Returns:
        ``(stats, counts)``: ``stats = [min, max, num, sum, sum_squares]`` (float64) and ``counts``, one int64 count
        per bucket (see :func:`histogram_proto_args`).
    """
    stats, counts = histograms_counts([list(tensors)], scale, finite=[finite])
    return stats[0], counts[0]


def _values(t: torch.Tensor, scale: float, finite: bool) -> torch.Tensor:
    """``t``'s values as a 1-D float32 tensor divided by ``scale`` (a view when nothing needs changing)."""
    if t.dtype == torch.float32 and scale == 1.0 and finite and t.layout == torch.strided:
        return t.detach().reshape(-1)  # the common case: a view
    v = t.detach()
    if v.layout != torch.strided:
        v = v.coalesce().values()
    if v.is_complex():  # real and imaginary parts are values alike (a cast to real would drop the imaginary ones)
        v = torch.view_as_real(v)
    v = v.reshape(-1)
    if v.dtype != torch.float32:
        v = v.float()
    if scale != 1.0:
        v = v / scale
    if not finite:
        v = v[torch.isfinite(v)]
    return v


#: Values bucketed per ``bincount``: their int32 keys (4 MiB) are written, tagged and counted while in the cache.
_CHUNK = 1 << 20
#: Tensors up to this many values are bucketed together with the others of their size (one 2-D pass, not one
#: Python round per tensor: most tensors of a model are small biases and norms).
_SMALL = 1 << 15
#: The most histograms counted by one ``bincount`` of large tensors' keys, and of small tensors' (its output has
#: 4096 counts per histogram).
_SLOTS = 4
_SMALL_SLOTS = 64


class HistogramBuffers:
    """What :func:`histograms_counts` keeps between calls: one bounded int32 key buffer per device (``_CHUNK``
    values, 4 MiB), so that a logged step reuses the last one's memory instead of faulting in fresh pages.
    ``clear()`` drops them. Holds no values of the tensors counted (only their bucket keys, overwritten each call).
    """

    def __init__(self) -> None:
        self._keys: dict[torch.device, torch.Tensor] = {}

    def keys(self, device: torch.device, n: int) -> torch.Tensor:
        """An int32 buffer of at least ``n`` values on ``device``."""
        buf = self._keys.get(device)
        if buf is None or buf.numel() < n:
            buf = self._keys[device] = torch.empty(n, dtype=torch.int32, device=device)
        return buf

    def clear(self) -> None:
        """Release the buffers."""
        self._keys.clear()


def _add_counts(keys: torch.Tensor, minlength: int) -> torch.Tensor:
    """``torch.bincount(keys, minlength=minlength)`` as an ``index_add_`` of ones: on an accelerator, where
    ``bincount`` reads the keys' minimum and maximum back to the host (two syncs per call), this one does not."""
    ones = torch.ones((), dtype=torch.int64, device=keys.device).expand(len(keys))
    return torch.zeros(minlength, dtype=torch.int64, device=keys.device).index_add_(0, keys, ones)


def _bincount(keys: torch.Tensor, minlength: int) -> torch.Tensor:
    """``torch.bincount(keys, minlength=minlength)`` on the CPU (a serial loop, the bulk of the bucketing); without a
    sync on other devices (:func:`_add_counts`)."""
    if keys.device.type != "cpu":
        return _add_counts(keys, minlength)
    return torch.bincount(keys, minlength=minlength)


def _on(values: list[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host ``values`` on ``device``, copied without waiting for the device (a blocking copy to an
    accelerator synchronises its stream)."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


class _Keys:
    """Writes bucket keys into a bounded buffer and counts them into ``counts`` (one row of ``4096`` per histogram).

    Each histogram with keys in the buffer has a slot; its keys are offset by ``slot * 4096``, so that one
    ``bincount`` counts them all when the buffer is full or holds ``max_slots`` histograms (its output, ``4096``
    counts per slot, stays bounded whatever the number of histograms).
    """

    def __init__(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        self.keys = keys
        self.counts = counts.view(-1, _NBINS)
        self.cap = keys.numel()
        self.fill = 0
        self.groups: list[int] = []  # the histogram of each slot
        self.slot: dict[int, int] = {}

    def room(self) -> int:
        return self.cap - self.fill

    def slots(self, ks: Sequence[int], max_slots: int) -> list[int]:
        """The slots of histograms ``ks`` (at most ``max_slots`` distinct ones), after a count if they do not fit."""
        new = [k for k in dict.fromkeys(ks) if k not in self.slot]
        if new and self.groups and len(self.groups) + len(new) > max_slots:
            self.flush()
            new = list(dict.fromkeys(ks))
        for k in new:
            self.slot[k] = len(self.groups)
            self.groups.append(k)
        return [self.slot[k] for k in ks]

    def add(self, bits: torch.Tensor, k: int) -> None:
        """The keys of 1-D float32 values viewed as int32 ``bits``, all of histogram ``k``."""
        done, n = 0, len(bits)
        while done < n:
            if not self.room():
                self.flush()
            take = min(n - done, self.room())
            slot = self.slot[k] if k in self.slot else self.slots([k], _SLOTS)[0]
            out = self._take(take)
            torch.bitwise_right_shift(bits[done : done + take], _SHIFT, out=out)
            out.add_(slot * _NBINS + _HALF)
            done += take

    def add_rows(self, bits: torch.Tensor, ks: Sequence[int]) -> None:
        """The keys of a 2-D ``bits`` whose row ``i`` belongs to histogram ``ks[i]`` (at most ``_SMALL_SLOTS``)."""
        rows, n = bits.shape
        if self.room() < rows * n:
            self.flush()
        slots = self.slots(ks, _SMALL_SLOTS)
        out = self._take(rows * n).view(rows, n)
        torch.bitwise_right_shift(bits, _SHIFT, out=out)
        out.add_(_on([s * _NBINS + _HALF for s in slots], torch.int32, out.device)[:, None])

    def _take(self, n: int) -> torch.Tensor:
        out = self.keys[self.fill : self.fill + n]
        self.fill += n
        return out

    def flush(self) -> None:
        if self.fill:
            groups = self.groups
            found = _bincount(self.keys[: self.fill], len(groups) * _NBINS).view(len(groups), _NBINS)
            if groups == list(range(groups[0], groups[0] + len(groups))):
                self.counts[groups[0] : groups[0] + len(groups)] += found
            else:
                self.counts.index_add_(0, _on(groups, torch.int64, found.device), found)
        self.fill, self.groups, self.slot = 0, [], {}


def histograms_counts(
    groups: Sequence[Sequence[torch.Tensor]],
    scale: float = 1.0,
    finite: Sequence[bool] | None = None,
    squares: Sequence[float] | None = None,
    buffers: HistogramBuffers | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`histogram_counts` of several groups of tensors (one histogram per group, the tensors of a device),
    without Python per value or per bucket and without a sync.

    Each value's bucket is one integer shift of its float32 bits (8 log-linear buckets per power of two), written
    into a bounded int32 buffer of keys and offset by ``4096 *`` its histogram's slot in the buffer, so that one
    ``bincount`` counts up to ``_CHUNK`` keys of several histograms at once (on an accelerator, an ``index_add_``
    that does not sync). Small tensors of the same size go through as
    one 2-D tensor. Minimum, maximum and sum are reduced per tensor (per row for the small ones).

    Args:
        groups: per histogram, its tensors.
        scale: divide the values by this.
        finite: per group, whether every value is known to be finite (default: all are).
        squares: per group, the sum of squares if the caller knows it (e.g. from gradient norms); else computed.
        buffers: the key buffers to reuse (:class:`HistogramBuffers`); ``None``: new ones for this call.

    Returns:
        ``(stats, counts)`` with one row per group: ``stats[k] = [min, max, num, sum, sum_squares]`` (float64) and
        ``counts[k]``, int64 counts per bucket. A group without values has ``min = max = nan`` and ``num = 0``.
    """
    device = next((t.device for g in groups for t in g), torch.device("cpu"))
    n_groups = len(groups)
    values = [[_values(t, scale, True if finite is None else finite[k]) for t in g] for k, g in enumerate(groups)]
    sizes = [[v.numel() for v in vs] for vs in values]
    nums = [float(sum(n)) for n in sizes]
    total = int(sum(nums))
    counts = torch.zeros(n_groups * _NBINS, dtype=torch.int64, device=device)
    f64 = torch.float64
    mins = torch.full((n_groups,), math.nan, dtype=f64, device=device)
    maxs, sums, sq = mins.clone(), torch.zeros_like(mins), torch.zeros_like(mins)
    if total:
        keys = (buffers or HistogramBuffers()).keys(device, min(total, _CHUNK))
        writer = _Keys(keys, counts)
        small: dict[int, list[tuple[int, torch.Tensor]]] = {}  # size -> (group, values), in group order
        large: list[list[Any]] = [[], [], [], [], []]  # group, min, max, sum, sum of squares (0-d) per large tensor
        blocks: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        for k, vs in enumerate(values):  # large tensors first, in group order
            for v, n in zip(vs, sizes[k], strict=True):
                if 0 < n <= _SMALL:
                    small.setdefault(n, []).append((k, v))
                elif n:
                    mn, mx = torch.aminmax(v)
                    large[0].append(k)
                    large[1].append(mn)
                    large[2].append(mx)
                    large[3].append(v.sum())
                    if squares is None:
                        large[4].append(torch.dot(v, v))
                    writer.add(v.view(torch.int32), k)
        writer.flush()
        for n, items in small.items():
            per = max(1, min(keys.numel() // n, _SMALL_SLOTS))  # rows that fit the buffer, and their slots
            for at in range(0, len(items), per):
                batch = items[at : at + per]
                ks = [k for k, _ in batch]
                block = torch.stack([v for _, v in batch])
                mn, mx = torch.aminmax(block, dim=1)
                blocks.append((ks, mn, mx, block.sum(dim=1),
                               torch.linalg.vecdot(block, block) if squares is None else None))  # fmt: skip
                writer.add_rows(block.view(torch.int32), ks)
        writer.flush()

        def column(j: int) -> torch.Tensor:  # one statistic of every tensor, large ones first
            pieces = ([torch.stack(large[j])] if large[j] else []) + [b[j] for b in blocks]  # type: ignore[misc]
            return torch.cat(pieces).to(f64)

        idx = _on(large[0] + [k for b in blocks for k in b[0]], torch.int64, device)
        mins.scatter_reduce_(0, idx, column(1), "amin", include_self=False)
        maxs.scatter_reduce_(0, idx, column(2), "amax", include_self=False)
        sums.index_add_(0, idx, column(3))
        if squares is None:
            sq.index_add_(0, idx, column(4))
    if squares is not None:
        sq = _on(list(squares), f64, device)
    num = _on(nums, f64, device)
    return torch.stack([mins, maxs, num, sums, sq], dim=1), counts.view(n_groups, _NBINS)


def histogram_proto_args(
    stats: Sequence[float], bins: Sequence[int], counts: Sequence[int], max_buckets: int = 64
) -> dict[str, Any] | None:
    """Keyword arguments of TensorBoard's ``HistogramProto`` from :func:`histogram_counts`' results.

    ``bins``/``counts`` are the non-empty bins. Buckets are put in value order with their right edges as limits; an
    empty bucket goes first so that TensorBoard knows the left edge of the first one. Runs of neighbouring buckets
    are merged so that there are at most ``max_buckets`` (TensorBoard draws about 30). ``None`` if there are no
    values.
    """
    bins_np = np.asarray(bins, dtype=np.int64)
    return _protos(np.asarray(stats, dtype=np.float64)[None], np.zeros_like(bins_np), bins_np,
                   np.asarray(counts, dtype=np.int64), max_buckets)[0]  # fmt: skip


_ORDER_NP = np.asarray(_ORDER, dtype=np.int64)
_RIGHT_ORDERED = np.asarray(_RIGHT)[_ORDER_NP]
_LEFT_ORDERED = np.asarray(_LEFT)[_ORDER_NP]
_NFINITE = len(_ORDER)
_RANK_NP = np.full(_NBINS, -1, dtype=np.int64)  # bin -> its place in value order; -1: a non-finite bin, dropped
_RANK_NP[_ORDER_NP] = np.arange(_NFINITE)
# -0.0 (and negative subnormals above -2**-126/8) counted with +0.0: the bin of -0.0 has the right edge -0.0, in
# which TensorBoard would count +0.0 too
_RANK_NP[0] = _RANK_NP[_HALF]


def _protos(
    stats: np.ndarray, rows: np.ndarray, bins: np.ndarray, heights: np.ndarray, max_buckets: int = 64
) -> list[dict[str, Any] | None]:
    """:func:`histogram_proto_args` of every histogram at once from its non-empty bins (``rows``: the histogram of
    each, ``bins``: which, ``heights``: the counts), vectorised over all histograms: the only Python per
    histogram is putting its lists into a dict."""
    rank = _RANK_NP[bins]
    keep = rank >= 0
    key = rows[keep] * _NFINITE + rank[keep]  # value order within each histogram
    order = np.argsort(key, kind="stable")
    key, start = np.unique(key[order], return_index=True)  # -0.0's bin and +0.0's: one bucket
    heights = np.add.reduceat(heights[keep][order], start) if len(key) else heights[:0]
    rows, cols = key // _NFINITE, key % _NFINITE
    n_rows = len(stats)
    per_row = np.bincount(rows, minlength=n_rows)
    first = np.concatenate(([0], np.cumsum(per_row)[:-1]))  # each row's first bucket in rows/cols
    lefts = _LEFT_ORDERED[cols[first[per_row > 0]]].tolist()
    if len(rows) and per_row.max() > max_buckets:  # merge runs of k neighbouring buckets, k per row
        k = np.maximum(-(-per_row // max_buckets), 1)
        bucket = (np.arange(len(rows)) - first[rows]) // k[rows]
        starts = np.flatnonzero(np.diff(rows * (max_buckets + 1) + bucket, prepend=-1))
        ends = np.append(starts[1:], len(rows)) - 1
        heights = np.add.reduceat(heights, starts)
        cols, rows = cols[ends], rows[starts]
        per_row = np.bincount(rows, minlength=n_rows)
        first = np.concatenate(([0], np.cumsum(per_row)[:-1]))
    limits = _RIGHT_ORDERED[cols].tolist()
    heights_l = heights.astype(np.float64).tolist()
    out: list[dict[str, Any] | None] = []
    j = 0  # the next non-empty row's left edge
    for (mn, mx, num, total, squares), start, n in zip(stats.tolist(), first.tolist(), per_row.tolist(), strict=True):
        if not n:
            out.append(None)
            continue
        left = lefts[j]
        j += 1
        if not num:
            out.append(None)
            continue
        end = start + n
        out.append({
            "min": mn,
            "max": mx,
            "num": num,
            "sum": total,
            "sum_squares": squares,
            "bucket_limit": [min(left, mn), *limits[start:end]],
            "bucket": [0.0, *heights_l[start:end]],
        })  # fmt: skip
    return out


def _fetch_histograms(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any] | None]:
    """Bring histograms to the host: one transfer per device, statistics and counts together.

    Each part is ``(stats, counts)`` of one histogram (1-D) or of several (2-D, one row each, from
    :func:`histograms_counts`); the result has one entry per histogram, in order.
    """
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for stats, counts in parts:
        if stats.dim() == 1:
            rows.append((stats[None], counts[None]))
        else:
            rows.append((stats, counts))
    sizes = [len(s) for s, _ in rows]
    out: list[dict[str, Any] | None] = [None] * sum(sizes)
    offsets = np.cumsum([0, *sizes]).tolist()
    by_device: dict[torch.device, list[int]] = {}
    for j, (stats, _) in enumerate(rows):
        by_device.setdefault(stats.device, []).append(j)
    for device, idx in by_device.items():
        stats = torch.cat([rows[j][0] for j in idx]).to(torch.float64)
        n = len(stats)
        if device.type == "cpu":  # already on the host: read the non-empty bins where they are
            found, counted, at = [], [], 0
            for j in idx:
                flat = rows[j][1].reshape(-1)
                nz = flat.nonzero().squeeze(1)
                counted.append(flat[nz])
                found.append(nz + at)
                at += flat.numel()
            bins, heights = torch.cat(found), torch.cat(counted).to(torch.int64).numpy()
            stats_np = stats.numpy()
        else:  # the one sync: the float64 statistics travel bit for bit as int64, beside the counts
            counts = torch.cat([rows[j][1] for j in idx]).to(torch.int64)
            host = torch.cat([stats.view(torch.int64).flatten(), counts.flatten()]).cpu()
            flat_host = host[n * 5 :]
            bins = flat_host.nonzero().squeeze(1)
            heights = flat_host[bins].numpy()
            stats_np = host[: n * 5].numpy().view(np.float64).reshape(n, 5)
        bins_np = bins.numpy()
        protos = _protos(stats_np, bins_np // _NBINS, bins_np % _NBINS, heights)
        r = 0
        for j in idx:
            for i in range(offsets[j], offsets[j + 1]):
                out[i] = protos[r]
                r += 1
    return out


def group_keys(names: Sequence[str | None], norms: str, max_tags: int) -> tuple[list[str | None], str]:
    """The tag key each parameter's norm is logged under, and a phrase saying how they were grouped.

    ``norms="param"``: the parameter's name; ``"module"``: the owning module's name (a parameter of the root module
    keeps its own name); ``"total"``: none. When there would be more than ``max_tags`` keys, modules are merged into
    their parents (``layers.0.attn.out_proj`` → ``layers.0.attn`` → ``layers.0`` ...) until they fit; if even the
    top-level modules do not, the first ``max_tags`` of them are logged. ``None``: not logged (a tensor that is not a
    parameter of the model, or cut off by the cap).

    Example::

        >>> group_keys(["enc.0.weight", "enc.0.bias", "head.weight", "scale"], "module", 10)[0]
        ['enc.0', 'enc.0', 'head', 'scale']
        >>> group_keys(["enc.0.weight", "enc.1.weight", "head.weight"], "param", 2)
        (['enc', 'enc', 'head'], 'per module at depth 1')
    """
    if norms == "total":
        return [None] * len(names), "total only"
    keys: list[str | None] = list(names)
    how = "per parameter"
    if norms == "module" or len({k for k in keys if k is not None}) > max_tags:
        modules = [None if n is None else module_of(n) for n in names]
        depth = max((len(m.split(".")) for m in modules if m), default=0)
        keys = [None if n is None else (m or n) for n, m in zip(names, modules, strict=True)]
        how = "per module"
        while len({k for k in keys if k is not None}) > max_tags and depth > 1:
            depth -= 1
            keys = [
                None if n is None else (".".join(m.split(".")[:depth]) if m else n)
                for n, m in zip(names, modules, strict=True)
            ]
            how = f"per module at depth {depth}"
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    if len(distinct) > max_tags:
        allowed = set(distinct[:max_tags])
        keys = [k if k in allowed else None for k in keys]
        how += f", the first {max_tags} of {len(distinct)}"
    return own_keys(keys), how


def own_keys(keys: Sequence[str | None]) -> list[str | None]:
    """Rename a key that is also the parent of another key to ``<key>.(own)``: a module's own parameters, apart
    from those of its children (so ``self_attn`` and ``self_attn.out_proj`` never both appear as tags, one of them
    silently a part of the other).

    Example::

        >>> own_keys(["attn", "attn.out_proj", "attn", "mlp.0", None])
        ['attn.(own)', 'attn.out_proj', 'attn.(own)', 'mlp.0', None]
    """
    distinct = {k for k in keys if k is not None}
    prefixes = set()
    for k in distinct:
        parts = k.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    parents = distinct & prefixes
    if not parents:
        return list(keys)
    return [f"{k}.(own)" if k in parents else k for k in keys]


def _chart_of(key: str) -> str:
    """The custom-scalars chart a key goes to: its top-level module, with the index of a ``ModuleList`` entry."""
    parts = key.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0] if len(parts) > 1 else key


@dataclass
class _View:
    """How one optimizer's parameters are logged: its tag suffix and the parameter indices of each key."""

    layout: tuple[Any, ...]
    suffix: str
    groups: list[tuple[str, list[int]]]
    how: str
    flow: list[tuple[str, list[int]]]  # the gradient-flow picture's rows: the `norms="module"` keys
    parts: _Parts  # the keys of `no_grad/<key>`


@dataclass
class _Parts:
    """The keys of one optimizer's ``no_grad/<key>`` tags (those of ``norms``; modules under ``norms="total"``) and,
    per key, whether it ever lacked a gradient (``tracked``) and ever had one (``fed``) at a logged step."""

    keys: list[str]
    owner: np.ndarray  # per parameter, the index of its key (-1: none, or an `ignore`d parameter)
    numels: np.ndarray  # per parameter, its number of elements (float64)
    sizes: np.ndarray  # per key, the elements of its parameters
    tracked: np.ndarray  # per key (bool)
    fed: np.ndarray  # per key (bool)

    @classmethod
    def of(
        cls, groups: list[tuple[str, list[int]]], params: Sequence[torch.Tensor], skip: Sequence[bool] | None = None
    ) -> _Parts:
        """The keys of ``groups``, leaving out the parameters ``skip`` marks (those ``ignore`` matches)."""
        owner = np.full(len(params), -1, dtype=np.int64)
        for j, (_, idx) in enumerate(groups):
            owner[idx] = j
        if skip is not None:
            owner[np.asarray(skip, dtype=bool)] = -1
        numels = np.array([p.numel() for p in params], dtype=np.float64)
        keep = owner >= 0
        sizes = np.bincount(owner[keep], weights=numels[keep], minlength=len(groups))
        n = len(groups)
        return cls([k for k, _ in groups], owner, numels, sizes, np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))

    def inherit(self, old: _Parts) -> None:
        """Take ``tracked`` and ``fed`` of the keys ``old`` had too."""
        at = {k: j for j, k in enumerate(old.keys)}
        for j, key in enumerate(self.keys):
            if key in at:
                self.tracked[j], self.fed[j] = old.tracked[at[key]], old.fed[at[key]]

    def shares(self, missing: Sequence[int]) -> np.ndarray:
        """Per key, the share of its parameters' elements among ``missing`` (0 for a key of ignored parameters)."""
        miss = np.asarray(missing, dtype=np.int64)
        miss = miss[self.owner[miss] >= 0]
        lost = np.bincount(self.owner[miss], weights=self.numels[miss], minlength=len(self.keys))
        return np.divide(lost, self.sizes, out=np.zeros(len(self.keys)), where=self.sizes > 0)


class _Layout(NamedTuple):
    """What the custom-scalars layout shows beyond the norms (written again when it changes)."""

    idle: bool = False
    findings: tuple[str, ...] = ()  # the kinds with a chart
    no_grad: bool = False  # some part lacked a gradient at a logged step
    dead: tuple[str, ...] = ()  # the charts whose every key lacked a gradient at every logged step


@dataclass
class _Snapshot:
    """The parameters of one logged optimizer step, copied before the step, for the update-to-weight ratio."""

    optimizer: int
    step: int
    view: _View
    idx: list[int]
    params: list[torch.Tensor]
    before: list[torch.Tensor]
    norms: list[torch.Tensor]  # of `before`, taken while the copy is still in the cache


@dataclass
class _Target:
    """One logger: where its scalars, histograms and text go."""

    logger: Any
    writer: Any  # a SummaryWriter-like `experiment` (histograms, text, custom scalars), or None
    fast: bool  # a torch SummaryWriter without tag prefix: one event per step through its file writer
    prefix: str


def _copy_flat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of 1-D ``tensors``, as views into one buffer per device and dtype (one allocation: about 3x faster
    than a clone per tensor)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    with torch.no_grad():
        for idx in groups.values():
            flat = torch.cat([tensors[i] for i in idx])
            for i, v in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
                out[i] = v
    return out  # type: ignore[return-value]


def _groups(keys: Sequence[str | None]) -> list[tuple[str, list[int]]]:
    """The indices of each key, keys in the order first seen (``None``: left out)."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return list(groups.items())


def _group_norm(norms: Sequence[float | None], idx: Sequence[int]) -> float | None:
    """The L2 norm over the tensors ``idx`` that have a gradient (``None``: none has)."""
    present = [norms[i] for i in idx if norms[i] is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else _root(math.fsum(n * n for n in present))  # type: ignore[operator,misc]


def _root(v: float) -> float:
    return math.sqrt(v) if v >= 0 else math.nan


class Dashboard:
    """Writes GradGuard's gradient dashboards and run report to a Trainer's loggers (see ``GradGuard``'s docstring
    for the options and the list of tags).

    Raises:
        ValueError: an option has a value it does not take (the message quotes ``owner(option=value)``).
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        norms: str = "module",
        max_norm_tags: int = 100,
        histograms: bool = True,
        value_histograms: bool = False,
        update_ratio: bool = False,
        write_report: bool = True,
        report_path: str | None = None,
        flow_every: int = 10,
        flow_columns: int = 200,
        owner: str = "GradGuard",
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 0
        ):
            raise ValueError(
                f"`{owner}(log_every_n_steps={log_every_n_steps!r})` must be None (the Trainer's) or an int >= 0 "
                "(0: no dashboards)."
            )
        if norms not in NORMS:
            raise ValueError(f"`{owner}(norms={norms!r})` must be one of 'param', 'module', 'total'.")
        if isinstance(max_norm_tags, bool) or not isinstance(max_norm_tags, int) or max_norm_tags < 1:
            raise ValueError(f"`{owner}(max_norm_tags={max_norm_tags!r})` must be an int >= 1.")
        for name, value in (("histograms", histograms), ("value_histograms", value_histograms),
                            ("update_ratio", update_ratio), ("write_report", write_report)):  # fmt: skip
            if not isinstance(value, bool):
                raise ValueError(f"`{owner}({name}={value!r})` must be True or False.")
        if report_path is not None and not isinstance(report_path, (str, os.PathLike)):
            raise ValueError(f"`{owner}(report_path={report_path!r})` must be a path or None.")
        if isinstance(flow_every, bool) or not isinstance(flow_every, int) or flow_every < 0:
            raise ValueError(f"`{owner}(flow_every={flow_every!r})` must be an int >= 0 (0: no gradient-flow picture).")
        if isinstance(flow_columns, bool) or not isinstance(flow_columns, int) or flow_columns < 2:
            raise ValueError(f"`{owner}(flow_columns={flow_columns!r})` must be an int >= 2.")
        self.log_every_n_steps = log_every_n_steps
        self.norms = norms
        self.max_norm_tags = max_norm_tags
        self.histograms = histograms
        self.value_histograms = value_histograms
        self.update_ratio = update_ratio
        self.write_report = write_report
        self.report_path = report_path
        self.flow_every = flow_every
        self.flow_columns = flow_columns
        self._reset()

    def _reset(self) -> None:
        self._targets: list[_Target] = []
        self._views: dict[int, _View] = {}
        self._layout: _Layout | None = None  # the custom-scalars layout written last
        self._reported = -1  # number of report entries last written as text
        self._snapshots: list[_Snapshot] = []
        self._buffers = HistogramBuffers()  # histograms_counts' key buffers, reused on logged steps
        self._epoch: dict[int, list[float]] = {}  # optimizer index -> [max, sum, count, last step]
        self._metrics: dict[int, tuple[Any, Any]] = {}
        self._finished = False
        self._started = False
        self._said: set[str] = set()
        self._stepping_batches: int | None = None  # batches so far in which an optimizer stepped
        self._stepped = False  # an optimizer stepped in the current batch
        self._dead: dict[str, None] = {}  # keys that lacked a gradient at every logged step so far
        self._dead_charts: tuple[str, ...] = ()  # the per-module charts made of such keys only
        self._lacked = False  # some key lacked a gradient at a logged step
        self._flow: dict[str, FlowHistory] = {}  # panel -> history (rank zero, while logging)
        self._flow_rank: dict[str, int] = {}  # row key -> position of its first parameter in the model
        self._flow_logged = 0  # logged batch steps so far
        self._flow_last = -1  # the last logged step counted
        self._flow_due: int | None = None  # a logged step whose picture is to be drawn at the end of its batch
        self._flow_drawn: int | None = None  # the step of the last picture written
        self.flow_path: str | None = None  # the PNG written at the end of fit

    # ------------------------------------------------------------------ setup
    def start(self, trainer: Trainer) -> None:
        """Find where to write (rank zero only) and say once what the loggers that are not TensorBoard skip."""
        self._reset()
        self._started = True
        if not trainer.is_global_zero:
            return
        scalars_only = []
        for logger in trainer.loggers:
            writer = getattr(logger, "experiment", None)
            if not all(hasattr(writer, a) for a in ("add_histogram_raw", "add_text", "add_custom_scalars")):
                writer = None
                scalars_only.append(type(logger).__name__)
            # Lightning's TensorBoardLogger prefixes the keys of `log_metrics` with `prefix-`; it keeps it private.
            prefix = getattr(logger, "_prefix", "") or ""
            fast = writer is not None and _is_torch_writer(writer) and not prefix
            self._targets.append(_Target(logger, writer, fast, f"{prefix}-" if prefix else ""))
            if writer is not None:
                use_fast_crc32c()
        if scalars_only:
            rank_zero_info(
                f"GradGuard: {', '.join(scalars_only)} take{'s' if len(scalars_only) == 1 else ''} the gradient "
                "scalars only; the histograms, the findings text and the custom-scalars layout go to TensorBoard "
                "loggers."
            )

    def every(self, trainer: Trainer) -> int:
        """Log every this many optimizer steps (0: never)."""
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    def should_log(self, trainer: Trainer) -> bool:
        """Whether the optimizer step about to happen is logged: every step of every n-th batch that steps an
        optimizer (with one optimizer, every n-th optimizer step; with several, the steps they take in the same
        batches, however often each steps)."""
        every = self.every(trainer)
        if not every or not self._targets:
            return False
        return (self.step_of(trainer) + 1) % every == 0 or bool(trainer.should_stop)

    def step_of(self, trainer: Trainer) -> int:
        """The step Lightning logs the current batch's metrics at: the number of earlier batches in which an
        optimizer stepped (Lightning's ``fit_loop.epoch_loop._batches_that_stepped``; with one optimizer, the
        ``global_step`` before the step). GradGuard logs at the same steps as ``self.log`` and
        ``LearningRateMonitor``: those of the batches where ``(step + 1) % log_every_n_steps == 0``."""
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        n = getattr(loop, "_batches_that_stepped", None)
        if isinstance(n, int):
            return n
        if self._stepping_batches is None:  # no fit loop (a stand-in Trainer): count stepping batches ourselves
            self._stepping_batches = trainer.global_step // max(1, len(trainer.optimizers))
        return self._stepping_batches

    def _view(self, trainer: Trainer, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
              index: ParamIndex, ignored: Sequence[str] = ()) -> _View:  # fmt: skip
        layout = optimizer_layout(optimizer)
        view = self._views.get(id(optimizer))
        if view is None or view.layout != layout:
            optimizers = list(trainer.optimizers)
            k = next((i for i, o in enumerate(optimizers) if o is optimizer), len(self._views))
            suffix = f"_opt{k}" if len(optimizers) > 1 else ""
            keys, how = group_keys([index.name_of(p) for p in params], self.norms, self.max_norm_tags)
            groups = _groups(keys)
            if self.norms == "module":
                flow = groups
            else:
                flow = _groups(group_keys([index.name_of(p) for p in params], "module", self.max_norm_tags)[0])
            for key, idx in flow:  # rows of the picture in model order
                first = min((index.index.get(id(params[i]), len(index)) for i in idx), default=len(index))
                self._flow_rank[key] = min(first, self._flow_rank.get(key, first))
            skip = set(ignored)
            unchecked = [index.name_of(p) in skip for p in params] if skip else None
            parts = _Parts.of(flow if self.norms == "total" else groups, params, unchecked)
            if view is not None:  # its param groups changed: what its keys went through so far carries over
                parts.inherit(view.parts)
            view = _View(layout, suffix, groups, how, flow, parts)
            self._views[id(optimizer)] = view
            if "depth" in how or "first" in how:
                self._say(f"GradGuard: {len(params)} parameter tensors are more than max_norm_tags="
                          f"{self.max_norm_tags}: their norms are logged {how}.")  # fmt: skip
        return view

    # ------------------------------------------------------------------ every step
    def log_step(
        self,
        trainer: Trainer,
        optimizer: torch.optim.Optimizer,
        stats: GradStats,
        index: ParamIndex,
        report: RunReport,
        scale: float = 1.0,
        idle: Mapping[str, float] | None = None,
    ) -> None:
        """Called after each check with its :class:`GradStats`: epoch statistics always, the dashboard when logged.

        Args:
            trainer: the Trainer.
            optimizer: the optimizer about to step.
            stats: what the check measured.
            index: the model's parameters.
            report: the run report (its counts per kind, and its text when it changed).
            scale: the loss scale the gradients are still multiplied by.
            idle: per module, the share of checked steps on which it got no gradient (logged as
                ``gradguard/idle/<module>``, one chart in the custom-scalars layout); ``None``: not logged.
        """
        self._stepped = True
        total = stats.total_norm
        k, step = self.slot_of(trainer, optimizer)
        self.record_total(k, step, total)
        if not self._targets:
            return
        if len(report) != self._reported:
            self._write_text(report, step)
        if not self.should_log(trainer):
            return
        view = self._view(trainer, optimizer, stats.params, index, report.ignored)
        counts = {kind: n for kind, n in report.counts().items() if n}  # only kinds seen: no flat-zero lines
        norms = stats.norms
        metrics: dict[str, float] = {f"{TAG}/total_norm{view.suffix}": total}
        if self.norms != "total":
            for key, idx in view.groups:
                value = _group_norm(norms, idx)
                if value is not None:
                    metrics[f"{TAG}/grad_norm/{key}"] = value
        for key, share in self._no_grad(view.parts, stats.missing).items():
            metrics[f"{TAG}/no_grad/{key}"] = share
        layout = _Layout(idle is not None or (self._layout is not None and self._layout.idle), tuple(counts),
                         self._lacked, self._dead_charts)  # fmt: skip
        if layout != self._layout:
            self._write_layout(trainer, index, layout)
        for kind, n in counts.items():
            metrics[f"{TAG}/findings/{kind}"] = float(n)
        if self.flow_every:
            self._add_flow("grad_norm", step, {key: _group_norm(norms, idx) for key, idx in view.flow})
        if idle:
            for module, share in idle.items():
                metrics[f"{TAG}/idle/{module or 'root'}"] = float(share)
        hists: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
        if self.histograms:
            finite = [n for n in norms if n is not None and math.isfinite(n)]
            if finite:
                s, c = histogram_counts([torch.tensor(finite, dtype=torch.float32)], finite=False)
                hists.append(([f"{TAG}/grad_norms{view.suffix}"], s[None], c[None]))
        if self.value_histograms:
            hists += self._value_histograms(view, stats, scale)
        self._write(metrics, hists, step)
        if self.update_ratio:
            self._snapshot(k, step, stats, view)

    def _no_grad(self, parts: _Parts, missing: Sequence[int]) -> dict[str, float]:
        """The ``no_grad/<key>`` values of a logged step: per key that lacks a gradient now or lacked one at an earlier
        logged step, the share of its parameters' elements without one (``{}`` while every part had one at every
        logged step: nothing but this check on a clean step). Keeps :attr:`_dead` (the keys that lacked a gradient
        at every logged step so far) and the per-module charts made of such keys only."""
        if not missing and not parts.tracked.any() and parts.fed.all():
            return {}
        share = parts.shares(missing) if missing else np.zeros(len(parts.keys))
        parts.fed |= share < 1
        parts.tracked |= share > 0
        tracked = np.flatnonzero(parts.tracked).tolist()
        if tracked:
            self._lacked = True
        dead = dict(self._dead)
        for j in tracked:
            if parts.fed[j]:
                dead.pop(parts.keys[j], None)
            else:
                dead.setdefault(parts.keys[j])
        if dead != self._dead:
            self._dead = dead
            charts: dict[str, list[str]] = {}
            for view in self._views.values():
                for key, _ in view.groups if self.norms != "total" else ():
                    charts.setdefault(_chart_of(key), []).append(key)
            self._dead_charts = tuple(c for c, keys in charts.items() if all(k in dead for k in keys))
        return {parts.keys[j]: float(share[j]) for j in tracked}

    def _value_histograms(
        self, view: _View, stats: GradStats, scale: float
    ) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
        """The gradient-value histograms of every tag, in one fused pass per device (see :func:`histograms_counts`)."""
        norms = stats.norms
        by_device: dict[torch.device, tuple[list[str], list[list[torch.Tensor]], list[bool], list[float]]] = {}
        for key, idx in self._value_groups(view, stats):
            grads = [g for g in (stats.params[i].grad for i in idx) if g is not None]
            if not grads:
                continue
            present = [n for n in (norms[i] for i in idx) if n is not None]
            tags, groups, finite, squares = by_device.setdefault(grads[0].device, ([], [], [], []))
            tags.append(f"{TAG}/grad_values/{key}")
            groups.append(grads)
            finite.append(all(math.isfinite(n) for n in present))
            squares.append(math.fsum(n * n for n in present))
        out = []
        for tags, groups, finite, squares in by_device.values():
            s, c = histograms_counts(groups, scale, finite, squares if all(finite) else None, buffers=self._buffers)
            out.append((tags, s, c))
        return out

    def _value_groups(self, view: _View, stats: GradStats) -> list[tuple[str, list[int]]]:
        if self.norms != "total":
            return view.groups
        return [(f"all{view.suffix}", list(range(len(stats.params))))]

    # ------------------------------------------------------------------ update-to-weight ratio
    def _snapshot(self, k: int, step: int, stats: GradStats, view: _View) -> None:
        """Copy the parameters about to be updated (only on logged steps; released at the end of the batch)."""
        self._flush_snapshots(only=k)
        idx = [i for i, p in enumerate(stats.params) if p.grad is not None]
        if idx:
            params = [stats.params[i].detach().reshape(-1) for i in idx]
            before = _copy_flat(params)
            with torch.no_grad():
                norms = l2_norms(before)
            self._snapshots.append(_Snapshot(k, step, view, idx, params, before, norms))

    def end_batch(self) -> None:
        """Log the update-to-weight ratios of this batch's logged steps and drop the parameter copies; draw the
        gradient-flow picture when due."""
        if self._snapshots:
            self._flush_snapshots()
        if self._flow_due is not None:
            self._write_flow(self._flow_due)
            self._flow_due = None
        if self._stepped:
            self._stepped = False
            if self._stepping_batches is not None:
                self._stepping_batches += 1

    # ------------------------------------------------------------------ gradient-flow picture
    def _add_flow(self, panel: str, step: int, values: Mapping[str, float | None]) -> None:
        """Record one logged step of a panel; a picture is due on the first logged step and every
        ``flow_every``-th after it."""
        history = self._flow.get(panel)
        if history is None:
            history = self._flow[panel] = FlowHistory(self.flow_columns)
        history.add(step, values)
        if panel == "grad_norm" and step != self._flow_last:
            self._flow_last = step
            self._flow_logged += 1
            if (self._flow_logged - 1) % self.flow_every == 0:
                self._flow_due = step

    def flow_picture(self) -> FlowPicture | None:
        """The gradient-flow picture of the run so far (rows in model order), or ``None`` before the first logged
        step."""
        if not any(len(h) for h in self._flow.values()):
            return None
        keys = list(dict.fromkeys(k for h in self._flow.values() for k in h.keys))
        keys.sort(key=lambda k: self._flow_rank.get(k, len(self._flow_rank)))
        return render_flow(self._flow, keys)

    def _write_flow(self, step: int) -> FlowPicture | None:
        picture = self.flow_picture()
        if picture is None:
            return None
        for t in self._targets:
            if t.writer is not None and hasattr(t.writer, "add_image"):
                t.writer.add_image(FLOW_TAG, picture.image, step, dataformats="HWC")
        self._flow_drawn = step
        return picture

    def _flush_snapshots(self, only: int | None = None) -> None:
        keep = []
        for snap in self._snapshots:
            if only is None or snap.optimizer == only:
                self._log_ratio(snap)
            else:
                keep.append(snap)
        self._snapshots = keep

    def _log_ratio(self, snap: _Snapshot) -> None:
        """``||w_after - w_before|| / ||w_before||`` per key, from the copies taken before the step (one sync)."""
        with torch.no_grad():
            w = snap.norms
            torch._foreach_sub_(snap.before, snap.params)  # before := -(update)
            d = l2_norms(snap.before)
            norms = [*w, *d]
            if len({x.dtype for x in norms}) > 1:
                norms = [x.to(torch.float64) for x in norms]
            values = torch.stack(norms).to(torch.float64).cpu().tolist()
        n = len(snap.params)
        w2 = {i: values[j] ** 2 for j, i in enumerate(snap.idx)}
        d2 = {i: values[n + j] ** 2 for j, i in enumerate(snap.idx)}
        view = snap.view
        metrics: dict[str, float] = {}
        den = math.fsum(w2.values())
        if den > 0:
            metrics[f"{TAG}/total_update_ratio{view.suffix}"] = math.sqrt(math.fsum(d2.values()) / den)
        if self.norms != "total":
            for key, idx in view.groups:
                den = math.fsum(w2.get(i, 0.0) for i in idx)
                if den > 0 and any(i in d2 for i in idx):
                    metrics[f"{TAG}/update_ratio/{key}"] = math.sqrt(math.fsum(d2.get(i, 0.0) for i in idx) / den)
        if self.flow_every:
            ratios: dict[str, float | None] = {}
            for key, idx in view.flow:
                den = math.fsum(w2.get(i, 0.0) for i in idx)
                ratios[key] = math.sqrt(math.fsum(d2.get(i, 0.0) for i in idx) / den) if den > 0 and any(
                    i in d2 for i in idx) else None  # fmt: skip
            self._add_flow("update_ratio", snap.step, ratios)
        snap.before.clear()
        snap.norms.clear()
        if metrics:
            self._write(metrics, [], snap.step)

    # ------------------------------------------------------------------ epoch
    def slot_of(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """``(k, step)``: where :meth:`record_total` files ``optimizer``'s total norm of the step about to happen
        (``k``: its index in ``trainer.optimizers``; ``step``: :meth:`step_of`)."""
        k = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        return k, self.step_of(trainer)

    def mark_stepped(self) -> None:
        """An optimizer stepped in this batch without :meth:`log_step` (its norms are read later, ``sync="late"``)."""
        self._stepped = True

    def record_total(self, k: int, step: int, total: float) -> None:
        """Add optimizer ``k``'s total norm of ``step`` to this epoch's running max, sum and count (finite only)."""
        if math.isfinite(total):
            acc = self._epoch.setdefault(k, [-math.inf, 0.0, 0.0, step])
            acc[0] = max(acc[0], total)
            acc[1] += total
            acc[2] += 1
            acc[3] = step

    def epoch_stats(self, n_optimizers: int, device: torch.device) -> tuple[dict[str, float], int]:
        """Max and mean of the total norm over the epoch's steps of every rank, and the epoch's last step; resets.

        A collective under distributed training: every rank calls it, with the same ``n_optimizers``. Each rank's
        running max and (mean, count) go into torchmetrics' ``MaxMetric`` and ``MeanMetric`` (weighted by the
        count), whose ``compute()`` syncs them across ranks.
        """
        from torchmetrics.aggregation import MaxMetric, MeanMetric

        out: dict[str, float] = {}
        step = 0
        for k in range(n_optimizers):
            acc = self._epoch.get(k, [-math.inf, 0.0, 0.0, 0])
            if k not in self._metrics:
                self._metrics[k] = (MaxMetric(nan_strategy="ignore").to(device),
                                    MeanMetric(nan_strategy="ignore").to(device))  # fmt: skip
            mx, mean = self._metrics[k]
            mx.update(torch.tensor(acc[0], dtype=torch.float32, device=device))
            mean.update(torch.tensor(acc[1] / acc[2] if acc[2] else 0.0, device=device), weight=acc[2])
            hi, avg = float(mx.compute()), float(mean.compute())
            mx.reset()
            mean.reset()
            step = max(step, int(acc[3]))
            if math.isfinite(hi) and math.isfinite(avg):
                suffix = f"_opt{k}" if n_optimizers > 1 else ""
                out[f"{TAG}/epoch/total_norm_max{suffix}"] = hi
                out[f"{TAG}/epoch/total_norm_mean{suffix}"] = avg
        self._epoch.clear()
        return out, step

    def end_epoch(self, trainer: Trainer, device: torch.device) -> None:
        """Log :meth:`epoch_stats` (every rank must call this)."""
        out, step = self.epoch_stats(max(1, len(trainer.optimizers)), device)
        if out and self._targets and self.every(trainer):
            self._write(out, [], step)

    # ------------------------------------------------------------------ end
    def finish(self, trainer: Trainer, report: RunReport) -> str | None:
        """The findings text (TensorBoard) and the JSON report, once per run; return the JSON's path."""
        self.release()
        if self._finished or not self._started or not trainer.is_global_zero:
            return None
        self._finished = True
        path = (
            os.fspath(self.report_path)
            if self.report_path is not None
            else os.path.join(_log_dir(trainer), REPORT_FILE)
        )
        last = self._flow_last
        picture = None
        if self._targets and self.flow_every and last >= 0:
            picture = self._write_flow(last) if self._flow_drawn != last else self.flow_picture()
        if picture is not None and self.write_report:
            self.flow_path = write_png(picture, os.path.join(os.path.dirname(path), FLOW_FILE))
            report.note(f"gradient-flow picture (gradient norm per module across logged steps): {self.flow_path}")
        if self._targets:
            self._write_text(report, self.step_of(trainer))
        if not self.write_report:
            return None
        return report.write_json(path)

    def release(self) -> None:
        """Drop parameter copies still held (after an exception, or at teardown), and the histograms' key buffer."""
        self._snapshots.clear()
        self._buffers.clear()

    # ------------------------------------------------------------------ writing
    def _say(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            rank_zero_info(text)

    def _write(
        self, metrics: dict[str, float], hists: list[tuple[list[str], torch.Tensor, torch.Tensor]], step: int
    ) -> None:
        protos = _fetch_histograms([(s, c) for _, s, c in hists])
        tags = [tag for group, _, _ in hists for tag in group]
        named = [(tag, p) for tag, p in zip(tags, protos, strict=True) if p is not None]
        summary = None
        for t in self._targets:
            file_writer = getattr(t.writer, "file_writer", None) if t.fast else None  # None once closed
            if file_writer is not None:
                if summary is None:
                    summary = _summary(metrics, named)
                file_writer.add_summary(summary, step)
                continue
            t.logger.log_metrics(metrics, step)
            if t.writer is not None:
                for tag, p in named:
                    t.writer.add_histogram_raw(tag, global_step=step, bucket_limits=p["bucket_limit"],
                                               bucket_counts=p["bucket"], **{k: p[k] for k in
                                               ("min", "max", "num", "sum", "sum_squares")})  # fmt: skip

    def _write_text(self, report: RunReport, step: int) -> None:
        self._reported = len(report)
        for t in self._targets:
            if t.writer is not None:
                t.writer.add_text(TEXT_TAG, report.markdown(), step)

    def _write_layout(self, trainer: Trainer, index: ParamIndex, layout: _Layout) -> None:
        """Write the custom-scalars layout; again (TensorBoard shows the last) when what it shows changes: a new kind
        of finding, the first part without a gradient, a module without any so far or one that got a gradient."""
        self._layout = layout
        keys: list[str] = []
        for opt in trainer.optimizers:
            params = [p for g in opt.param_groups for p in g["params"]]
            keys += [k for k in group_keys([index.name_of(p) for p in params], self.norms, self.max_norm_tags)[0]
                     if k is not None]  # fmt: skip
        charts = list(dict.fromkeys(_chart_of(k) for k in keys))
        extra = (layout.idle, layout.findings, layout.no_grad, layout.dead)
        for t in self._targets:
            if t.writer is not None:
                t.writer.add_custom_scalars(custom_scalars_layout(charts, t.prefix, self.update_ratio, *extra))


def custom_scalars_layout(
    charts: Sequence[str],
    prefix: str = "",
    update_ratio: bool = False,
    idle: bool = False,
    findings: Sequence[str] = (),
    no_grad: bool = False,
    dead: Collection[str] = (),
) -> dict[str, Any]:
    """The ``add_custom_scalars`` layout: one ``GradGuard`` section with, first, what needs attention (the shares of
    parameters without a gradient, ``no_grad``; one chart of finding counts per kind in ``findings``), then the total
    norm, one chart of gradient norms per top-level module (or ``ModuleList`` entry), the update ratios and the idle
    shares per module (``idle``).

    A module chart in ``dead`` (none of its parameters had a gradient at any logged step) shows the module's
    ``no_grad`` share under a title that says so, instead of an empty norm chart; it has no update-ratio chart.

    Example::

        >>> layout = custom_scalars_layout(["encoder", "head"])
        >>> list(layout["GradGuard"])[1:4]
        ['total gradient norm per epoch: max, mean', 'gradient norm: encoder', 'gradient norm: head']
        >>> list(custom_scalars_layout(["encoder", "head"], findings=["detached"], no_grad=True, dead=["encoder"])
        ...      ["GradGuard"])[:4]  # doctest: +NORMALIZE_WHITESPACE
        ['share of parameters without a gradient', 'findings so far: detached (parameter tensors)',
         'total gradient norm', 'total gradient norm per epoch: max, mean']
    """
    p = re.escape(prefix + TAG + "/")
    section: dict[str, list[Any]] = {}
    if no_grad:
        section["share of parameters without a gradient"] = ["Multiline", [rf"{p}no_grad/.*"]]
    for kind in findings:
        section[f"findings so far: {kind} (parameter tensors)"] = ["Multiline", [rf"{p}findings/{re.escape(kind)}$"]]
    section["total gradient norm"] = ["Multiline", [rf"{p}total_norm(_opt\d+)?$"]]
    section["total gradient norm per epoch: max, mean"] = ["Multiline", [rf"{p}epoch/total_norm_.*"]]
    many = len(charts) > 24
    if many:
        section["gradient norm per group"] = ["Multiline", [rf"{p}grad_norm/.*"]]
    else:
        for c in charts:
            if c in dead:
                section[f"NO GRADIENT: {c} (share of parameters)"] = ["Multiline", [rf"{p}no_grad/{_key(c)}"]]
            else:
                section[f"gradient norm: {c}"] = ["Multiline", [rf"{p}grad_norm/{_key(c)}"]]
    if update_ratio:
        section["update / weight: total"] = ["Multiline", [rf"{p}total_update_ratio.*"]]
        if many:
            section["update / weight per group"] = ["Multiline", [rf"{p}update_ratio/.*"]]
        else:
            for c in charts:
                if c not in dead:
                    section[f"update / weight: {c}"] = ["Multiline", [rf"{p}update_ratio/{_key(c)}"]]
    if idle:
        section["share of steps without a gradient, per module"] = ["Multiline", [rf"{p}idle/.*"]]
    return {"GradGuard": section}


def _key(chart: str) -> str:
    """A regex matching the keys of ``chart``: the chart's module and its submodules or parameters."""
    return rf"{re.escape(chart)}(\..*)?$"


def use_fast_crc32c() -> bool:
    """Make TensorBoard's event files checksummed by the C CRC32C of ``google-crc32c``, if it is installed.

    Without TensorFlow, TensorBoard's record writer (and reader) computes the masked CRC32C of every record in pure
    Python (about 12 MB/s, in the writer thread, holding the GIL the training loop needs). This replaces the one
    function they call, ``tensorboard.compat.tensorflow_stub.pywrap_tensorflow.crc32c``, by the C implementation:
    same values, same bytes on disk. Idempotent; returns whether the C implementation is in use.
    """
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    except ImportError:  # pragma: no cover - optional package, or tensorboard missing
        return False
    current = pywrap_tensorflow.crc32c
    if getattr(current, "python", None) is not None:
        return True
    if getattr(google_crc32c, "implementation", "c") != "c":  # pragma: no cover - its pure-Python fallback
        return False

    def crc32c(data: Any) -> int:
        if isinstance(data, (bytes, bytearray, memoryview)):
            return google_crc32c.value(bytes(data))
        return current(data)  # str or an iterable of ints: as TensorBoard does

    crc32c.python = current  # type: ignore[attr-defined]
    pywrap_tensorflow.crc32c = crc32c
    return True


def _is_torch_writer(writer: Any) -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard not installed
        return False
    return isinstance(writer, SummaryWriter)


def _summary(metrics: dict[str, float], hists: list[tuple[str, dict[str, Any]]]) -> Any:
    """One TensorBoard ``Summary`` holding every scalar and histogram of a step."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
    values += [Summary.Value(tag=tag, histo=HistogramProto(**p)) for tag, p in hists]
    return Summary(value=values)


def _log_dir(trainer: Trainer) -> str:
    """The first logger's ``log_dir`` (or ``save_dir``), else the Trainer's ``default_root_dir`` (no collectives)."""
    for logger in trainer.loggers[:1]:
        for attr in ("log_dir", "save_dir"):
            d = getattr(logger, attr, None)
            if d:
                return os.fspath(d)
    return os.fspath(trainer.default_root_dir)
