"""Histograms of tensor values on their device, and TensorBoard's ``HistogramProto`` arguments from them: pure torch
and numpy, usable without Lightning (with ``check_step``, say).

Buckets are log-linear, 8 per power of two, for either sign: a value's bucket is the top 12 bits of its float32
(sign, exponent, 3 mantissa bits), one integer shift. :func:`histograms_counts` counts the values of several groups
of tensors at once (a bounded key buffer per device, :class:`HistogramBuffers`, one ``bincount`` per up to a million
values) without a sync; :func:`fetch_histograms` brings the counts and statistics to the host in one transfer per
device, as the keyword arguments of TensorBoard's ``HistogramProto`` (for ``SummaryWriter.add_histogram_raw``).

Example::

    >>> import torch
    >>> stats, counts = histograms_counts([[torch.tensor([0.5, 1.0, 1.0, -3.0])]])
    >>> proto = fetch_histograms([(stats, counts)])[0]
    >>> proto["min"], proto["max"], proto["num"], sum(proto["bucket"])
    (-3.0, 1.0, 4.0, 4.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "HistogramBuffers",
    "fetch_histograms",
    "histogram_counts",
    "histogram_proto_args",
    "histograms_counts",
]

# Histogram buckets: the top 12 bits of a float32 (sign, exponent, 3 mantissa bits): 8 log-linear buckets per
# power of two, for either sign; `bits >> 20` is one integer op per value.
_SHIFT = 20
_PER_SIGN = 1 << (31 - _SHIFT)  # 2048 buckets per sign
_NBINS = 2 * _PER_SIGN


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
    left[_PER_SIGN : _PER_SIGN + n], right[_PER_SIGN : _PER_SIGN + n] = below[:-1], below[1:]
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


def _to_device(values: list[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host ``values`` on ``device``, copied without waiting for the device (a blocking copy to an
    accelerator synchronises its stream)."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


class _KeyBuffer:
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

    def assign_slots(self, ks: Sequence[int], max_slots: int) -> list[int]:
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
            slot = self.slot[k] if k in self.slot else self.assign_slots([k], _SLOTS)[0]
            out = self._reserve(take)
            torch.bitwise_right_shift(bits[done : done + take], _SHIFT, out=out)
            out.add_(slot * _NBINS + _PER_SIGN)
            done += take

    def add_rows(self, bits: torch.Tensor, ks: Sequence[int]) -> None:
        """The keys of a 2-D ``bits`` whose row ``i`` belongs to histogram ``ks[i]`` (at most ``_SMALL_SLOTS``)."""
        rows, n = bits.shape
        if self.room() < rows * n:
            self.flush()
        slots = self.assign_slots(ks, _SMALL_SLOTS)
        out = self._reserve(rows * n).view(rows, n)
        torch.bitwise_right_shift(bits, _SHIFT, out=out)
        out.add_(_to_device([s * _NBINS + _PER_SIGN for s in slots], torch.int32, out.device)[:, None])

    def _reserve(self, n: int) -> torch.Tensor:
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
                self.counts.index_add_(0, _to_device(groups, torch.int64, found.device), found)
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
        writer = _KeyBuffer(keys, counts)
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

        idx = _to_device(large[0] + [k for b in blocks for k in b[0]], torch.int64, device)
        mins.scatter_reduce_(0, idx, column(1), "amin", include_self=False)
        maxs.scatter_reduce_(0, idx, column(2), "amax", include_self=False)
        sums.index_add_(0, idx, column(3))
        if squares is None:
            sq.index_add_(0, idx, column(4))
    if squares is not None:
        sq = _to_device(list(squares), f64, device)
    num = _to_device(nums, f64, device)
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
_RANK_NP[0] = _RANK_NP[_PER_SIGN]


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


def fetch_histograms(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any] | None]:
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
