"""The measurement: per-parameter gradient norms of an optimizer step in one fused pass, read with one host sync.

:func:`measure_grads` is the pass the guard runs on every step: which parameters have no gradient, a non-finite one
or an all-zero one, and every norm (a :class:`GradStats`). How to group a parameter list is planned once and reused
(:class:`_Plan`), so a clean step does no per-tensor Python beyond reading ``.grad``. :func:`start_late_read` is the
same pass without the sync (``sync="late"``): a :class:`LateRead` read one step later. :func:`to_host` is the one
way any of it reads device values. :func:`~lightning_gradguard.audit.classify` turns the outcome into findings.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any

import numpy as np
import torch

from . import _compat
from ._compat import flatten_dense, foreach_norm, scale_tensor

__all__ = [
    "GradStats",
    "LateRead",
    "amp_scale",
    "l2_norms",
    "measure_grads",
    "start_late_read",
    "to_host",
]


@dataclass
class GradStats:
    """The outcome of the fused pass over one optimizer's parameters.

    Attributes:
        params: the optimizer's parameters, in ``param_groups`` order.
        norms: per parameter, the L2 norm of its (unscaled) gradient, or ``None`` when it has none.
        missing: indices (into ``params``) with ``grad is None``.
        nonfinite: indices whose gradient has a NaN or Inf element (confirmed element-wise).
        zero: indices whose gradient is exactly zero everywhere (confirmed element-wise; an empty gradient is not).
        frozen: indices with ``requires_grad=False``.
        syncs: device→host transfers the measurement took (1 on a clean step; 2 when a candidate was confirmed).
        scale: the loss scale the norms were divided by (read in the same transfer when given as a tensor).
        late: no value was read yet (``sync="late"``): ``missing`` and ``frozen`` are known, the norms (``None``) and
            ``nonfinite``/``zero`` come with a :class:`LateRead` one step later.
        skipped: the step was not judged: no backward fed it and no parameter has a usable gradient (a batch for
            which ``training_step`` returned ``None``).
    """

    params: list[torch.Tensor]
    norms: list[float | None]
    missing: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    zero: list[int] = field(default_factory=list)
    frozen: list[int] = field(default_factory=list)
    syncs: int = 0
    scale: float = 1.0
    late: bool = False
    skipped: bool = False
    _total: float | None = field(default=None, repr=False, compare=False)

    @property
    def total_norm(self) -> float:
        """The L2 norm of all gradients together (``inf``/``nan`` if any is not finite)."""
        if self._total is not None:
            return self._total
        return math.sqrt(math.fsum(n * n for n in self.norms if n is not None))

    @property
    def clean(self) -> bool:
        """No parameter needs a closer look."""
        return not (self.missing or self.nonfinite or self.zero or self.frozen)


def to_host(t: torch.Tensor) -> np.ndarray:
    """The one way :func:`measure_grads` reads device values: a *synchronising* copy to the host.

    ``.cpu()`` on a CUDA tensor waits for the kernels that produce it and for the copy itself, so the values read are
    the finished ones (an asynchronous ``non_blocking=True`` copy read without waiting can see stale memory: a NaN
    norm read as 0). Every device→host read of the fused pass goes through here, so a test can count them.
    """
    return t.detach().cpu().numpy()


def amp_scale(scaler: Any, optimizer: torch.optim.Optimizer | None) -> tuple[Any, float | torch.Tensor]:
    """``(the AMP grad scaler if it is enabled, else None; what the gradients' norms are to be divided by)``: the one
    way both adapters read the loss scale of a step.

    ``optimizer``'s gradients at its step are unscaled (``scaler.step`` ran ``unscale_``), unless it unscales inside
    its own ``step()`` (fused optimizers): then the scale is the scaler's scale tensor, for :func:`measure_grads` to
    read in the same transfer as the norms (``scaler.get_scale()`` would copy it to the host on its own: a second sync
    per step on CUDA), or a float before the scaler's first ``scale()``. ``optimizer=None``: gradients that no
    ``scaler.step`` has unscaled.
    """
    if scaler is None or (hasattr(scaler, "is_enabled") and not scaler.is_enabled()):
        return None, 1.0
    if optimizer is not None and not _compat.optimizer_unscales(optimizer):
        return scaler, 1.0
    scale = scale_tensor(scaler)
    return scaler, scale if isinstance(scale, torch.Tensor) else float(scaler.get_scale())


_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")
_FLAT_VIEW = operator.methodcaller("view", -1)
_HALF = (torch.float16, torch.bfloat16)
_BLAS = (torch.float32, torch.float64)  # the dtypes of `torch.dot` on the CPU

#: On the CPU, gradients with fewer elements than this are measured together, through one flattened copy.
_FLAT_MAX = 16384

#: Small CPU gradients of one shape are concatenated (one copy, one row-wise norm) when at least this many share it.
_STACK_MIN = 4

#: ATen's grain size: a CPU op on fewer elements runs on the calling thread. Blocks of small gradients are cut to
#: stay under it, because ``torch.cat`` over thousands of inputs is several times slower on its parallel path, and
#: a parallel region waits for every intra-op thread (long on a busy machine) for a few microseconds of work.
_GRAIN = 32768


class LateRead:
    """The per-parameter gradient norms of one optimizer step, on their way to the host without a sync
    (``sync="late"``): read by :meth:`result` at a later step. Made by :func:`start_late_read`.

    What the host knows without reading a value is in :attr:`host`, a :class:`GradStats` with the parameters that
    have no gradient (``missing``) or ``requires_grad=False`` (``frozen``), judged at once. The norms of the others
    are taken in float64 (``torch._foreach_norm(..., dtype=torch.float64)``), in which the square of no float32,
    bfloat16 or float16 value overflows or underflows: a norm is not finite exactly when an element is not, and zero
    exactly when every element is, so nothing has to be looked at element-wise later (the gradients are gone by
    then). On an accelerator they are copied into pinned host memory with ``non_blocking=True`` and an event is
    recorded after the copy; :meth:`result` waits on that event only (by then, normally, long passed), never on the
    whole device. On the CPU the values are simply there.

    Holds the parameter list and one float64 value per gradient (pinned memory on an accelerator), never a gradient.
    """

    def __init__(self, host: GradStats, present: list[torch.Tensor], step: int, tag: Any = None) -> None:
        self.host = host
        self.step = step
        self.tag = tag
        self.event: Any = None
        self.values: torch.Tensor | None = None
        if not present:
            return
        norms = torch.stack(foreach_norm(present, torch.float64))
        if norms.device.type == "cpu":
            self.values = norms
        else:
            self.values = torch.empty(norms.shape, dtype=torch.float64, pin_memory=True)
            self.values.copy_(norms, non_blocking=True)
            self.event = torch.cuda.Event() if norms.device.type == "cuda" else torch.Event(norms.device)
            self.event.record()

    def result(self) -> GradStats:
        """The step's :class:`GradStats` (waits for the copy's event, not for the device)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        host = self.host
        stats = GradStats(host.params, host.norms, list(host.missing), frozen=list(host.frozen), scale=host.scale)
        if self.values is None:
            stats._total = 0.0
            return stats
        values = self.values.numpy()
        n = len(host.params)
        order = np.setdiff1d(np.arange(n), host.missing, assume_unique=True) if host.missing else np.arange(n)
        finite = np.isfinite(values)
        if not (finite.all() and values.all()):
            stats.nonfinite = order[~finite].tolist()
            stats.zero = [i for i in order[values == 0.0].tolist() if host.params[i].numel() > 0]
        present = values / host.scale
        norms = np.full(n, np.nan)
        norms[order] = present
        _set_norms(stats, norms, present, host.missing)
        return stats


def start_late_read(params: Sequence[torch.Tensor], step: int, scale: float = 1.0, tag: Any = None) -> LateRead | None:
    """Start a :class:`LateRead` of ``params``' gradients, or ``None`` when the step must be read now: the
    gradients are sparse, complex, in float64 (whose squares can overflow), or on several devices."""
    if not params:
        return None
    grads, missing, frozen = _host_facts(params)
    present = [g for g in grads if g is not None] if missing else grads
    if present:
        dtypes = set(map(_DTYPE, present))
        if (len(set(map(_DEVICE, present))) != 1 or set(map(_LAYOUT, present)) != {torch.strided}
                or torch.float64 in dtypes or any(d.is_complex for d in dtypes)):  # fmt: skip
            return None
    host = GradStats(list(params), [None] * len(params), missing, frozen=frozen, scale=scale, late=True)
    with torch.no_grad(), _compat.torch_function_disabled():
        return LateRead(host, present, step, tag)  # type: ignore[arg-type]


def _host_facts(params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor | None], list[int], list[int]]:
    """``(grads, missing, frozen)``: each parameter's ``.grad``, the indices without one, and those with
    ``requires_grad=False``, read at C level (no Python per parameter when none is frozen)."""
    grads = list(map(_GRAD, params))
    missing = list(compress(range(len(params)), map(operator.is_, grads, repeat(None))))
    frozen = [] if all(map(_REQUIRES_GRAD, params)) else [i for i, p in enumerate(params) if not p.requires_grad]
    return grads, missing, frozen


def _set_norms(stats: GradStats, norms: np.ndarray, present: np.ndarray, missing: Sequence[int]) -> None:
    """``stats.norms`` from ``norms`` (one per parameter, ``None`` for ``missing``) and the total norm from those
    ``present``."""
    stats._total = float(np.sqrt(np.dot(present, present)))
    out = norms.tolist()
    for i in missing:
        out[i] = None
    stats.norms = out


def _make_getter(indices: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A C-level getter of ``indices`` from a sequence, returning a sequence (a tuple, or a one-item list)."""
    if not indices:
        return lambda seq: []
    if len(indices) == 1:
        i = indices[0]
        return lambda seq: [seq[i]]
    return operator.itemgetter(*indices)


@dataclass
class _Plan:
    """How to measure one parameter list's gradients, given which of them are ``None``: computed once, reused while
    the list and its ``None`` pattern stay the same (a clean step then does no per-tensor Python work beyond
    reading ``.grad``).

    The grouping comes from the gradients seen when the plan was made; every step re-checks what can change under
    it cheaply (the device and dtype of each group's copy; a changed layout or device raises), and
    :func:`measure_grads` makes a new plan when a check fails.
    """

    blocks: list[tuple[Callable[[Sequence[Any]], Sequence[Any]], int, int, bool]]  # small CPU gradients of one shape
    flat: Callable[[Sequence[Any]], Sequence[Any]]  # the other small CPU gradients: one flattened copy, a segment sum
    lengths: torch.Tensor | None
    foreach: list[tuple[Callable[[Sequence[Any]], Sequence[Any]], torch.dtype | None]]  # off the CPU, per dtype
    dots: list[Callable[[Sequence[Any]], Sequence[Any]]]  # large float32/float64 CPU gradients, per dtype: a dot each
    single: list[list[int]]  # measured one by one, per device: sparse, complex, or odd gradients
    order: np.ndarray  # the parameter index of each value, in the order they are transferred
    device: torch.device | None


@dataclass
class _Layout:
    """What each gradient of a parameter list looked like when it was last planned (its group), so that the plan for
    a new pattern of missing gradients (MoE routing, LayerDrop: a new one on most steps) is made with array
    operations over the list, looking only at gradients not seen before."""

    group: np.ndarray  # per parameter, the index of its group in `keys`; -1: no gradient seen yet
    numel: np.ndarray  # per parameter, its gradient's number of elements
    #: ``("small", dtype, shape)``, ``("dot", dtype)`` (CPU), ``("foreach", device, dtype)`` (off the CPU) or
    #: ``("single", device)``
    keys: list[tuple[Any, ...]] = field(default_factory=list)
    ids: dict[tuple[Any, ...], int] = field(default_factory=dict)  # key -> its index in `keys`
    device: torch.device | None = None  # the one device of the small CPU gradients

    @classmethod
    def empty(cls, n: int) -> _Layout:
        return cls(np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64))

    def learn(self, i: int, g: torch.Tensor) -> None:
        """Record the group of gradient ``g`` of parameter ``i``."""
        dense_float = g.layout == torch.strided and g.dtype.is_floating_point
        numel = g.numel()
        if dense_float and g.device.type == "cpu" and numel < _FLAT_MAX and self.device in (None, g.device):
            self.device = g.device
            key: tuple[Any, ...] = ("small", g.dtype, tuple(g.shape))
        elif dense_float and g.device.type == "cpu" and g.dtype in _BLAS and g.is_contiguous():
            key = ("dot", g.dtype)
        elif dense_float and g.device.type != "cpu":
            key = ("foreach", g.device, g.dtype)
        else:
            key = ("single", g.device)
        gid = self.ids.get(key)
        if gid is None:
            gid = self.ids[key] = len(self.keys)
            self.keys.append(key)
        self.group[i] = gid
        self.numel[i] = numel


def _make_plan(
    grads: Sequence[torch.Tensor | None], layout: _Layout | None = None, missing: Sequence[int] | None = None
) -> _Plan:
    """The plan for ``grads`` (those that are not ``None``); ``layout`` remembers the groups of gradients seen
    before, so that only new ones are looked at."""
    n = len(grads)
    if layout is None:
        layout = _Layout.empty(n)
    present = np.ones(n, dtype=bool)
    if missing is None:
        missing = [i for i, g in enumerate(grads) if g is None]
    present[list(missing)] = False
    for i in np.flatnonzero(present & (layout.group < 0)).tolist():
        layout.learn(i, grads[i])  # type: ignore[arg-type]
    sel = np.flatnonzero(present)
    by_group = np.argsort(layout.group[sel], kind="stable")
    sel = sel[by_group]
    cuts = np.flatnonzero(np.diff(layout.group[sel])) + 1
    blocks = []
    stacked: list[int] = []
    flat: list[int] = []
    foreach: list[tuple[Callable[[Sequence[Any]], Sequence[Any]], torch.dtype | None]] = []
    foreach_idx: list[int] = []
    dots: list[Callable[[Sequence[Any]], Sequence[Any]]] = []
    dot_idx: list[int] = []
    single: list[list[int]] = []
    for chunk in np.split(sel, cuts) if len(sel) else []:
        idx = chunk.tolist()
        kind, *key = layout.keys[layout.group[idx[0]]]
        if kind == "small" and len(idx) >= _STACK_MIN:
            shape = key[1]
            numel = math.prod(shape)
            rows = max(_STACK_MIN, (_GRAIN - 1) // max(numel, 1))  # each block under the grain size (or 4 of them)
            for k in range(0, len(idx), rows):
                part = idx[k : k + rows]
                blocks.append((_make_getter(part), len(part), numel, len(shape) > 0))
            stacked += idx
        elif kind == "small":
            flat += idx
        elif kind == "foreach":
            foreach.append((_make_getter(idx), torch.float32 if key[1] != torch.float64 else None))
            foreach_idx += idx
        elif kind == "dot":
            dots.append(_make_getter(idx))
            dot_idx += idx
        else:
            single.append(idx)
    order = stacked + flat + foreach_idx + dot_idx + [i for idx in single for i in idx]
    return _Plan(
        blocks,
        _make_getter(flat),
        torch.tensor(layout.numel[flat], dtype=torch.int64) if flat else None,
        foreach,
        dots,
        single,
        np.asarray(order, dtype=np.int64),
        layout.device,
    )


def _run_plan(plan: _Plan, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor] | None:
    """The plan's norms as 1-D float32/float64 tensors (no sync), or ``None`` when the gradients no longer fit the plan.

    A block of same-shape gradients is concatenated along its first dimension (no per-tensor view, unlike
    ``torch.stack``) and viewed as one row per gradient.
    """
    parts: list[torch.Tensor] = []
    for take, rows, numel, cat in plan.blocks:
        x = torch.cat(take(grads)) if cat else torch.stack(take(grads))  # type: ignore[arg-type]
        if x.device != plan.device or not x.dtype.is_floating_point:
            return None
        x = x.view(rows, numel)
        parts.append(torch.linalg.vector_norm(x, dim=1, dtype=torch.float32 if x.dtype in _HALF else None))
    if plan.lengths is not None:
        flat = flatten_dense(plan.flat(grads))
        if flat.device != plan.device or not flat.dtype.is_floating_point:
            return None
        if flat.dtype in _HALF:
            flat = flat.float()
        parts.append(torch.segment_reduce(flat * flat, "sum", lengths=plan.lengths).sqrt_())
    for take, dtype in plan.foreach:
        parts.append(torch.stack(foreach_norm(take(grads), dtype)))  # type: ignore[arg-type]
    for take in plan.dots:  # `view(-1)` raises on a gradient that is no longer flat in memory: a new plan then
        norms = _dot_norms(list(map(_FLAT_VIEW, take(grads))))
        if norms.device.type != "cpu":
            return None
        parts.append(norms)
    for idx in plan.single:
        parts.append(torch.stack([n.double() for n in l2_norms([grads[i] for i in idx])]))  # type: ignore[misc]
    return parts


_PLANS: dict[tuple[tuple[int, ...], tuple[int, ...]], _Plan] = {}
_MAX_PLANS = 32
#: Plans kept per :class:`~lightning_gradguard.params.ParamList` (one per pattern of missing gradients).
_MAX_LIST_PLANS = 8


def _plan_cache(params: Sequence[torch.Tensor], missing: list[int]) -> tuple[dict[Any, _Plan], Any, int]:
    """Where the plan of ``params`` with gradients ``missing`` is kept, its key there, and the cache's bound.

    A :class:`~lightning_gradguard.params.ParamList` (what the guard passes: immutable, made once per optimizer
    layout) keeps its own plans, keyed by the missing pattern alone; any other sequence is looked up by the
    identities of its tensors in a small module-level cache that holds no tensor.
    """
    own = getattr(params, "plans", None)
    if isinstance(own, dict):
        return own, tuple(missing), _MAX_LIST_PLANS
    return _PLANS, (tuple(map(id, params)), tuple(missing)), _MAX_PLANS


def _new_plan(
    params: Sequence[torch.Tensor], grads: list[torch.Tensor | None], missing: list[int]
) -> tuple[_Plan, list[torch.Tensor]]:
    """A plan for this step's gradients and its norms: from the list's remembered layout when it has one (a new
    pattern of missing gradients), else, or when the gradients no longer fit it, from every gradient."""
    layout = getattr(params, "layout", None)
    if isinstance(layout, _Layout) and len(layout.group) == len(grads):
        try:
            plan = _make_plan(grads, layout, missing)
            parts = _run_plan(plan, grads)
        except RuntimeError:
            parts = None
        if parts is not None:
            return plan, parts
    layout = _Layout.empty(len(grads))
    plan = _make_plan(grads, layout, missing)
    parts = _run_plan(plan, grads)
    assert parts is not None
    if hasattr(params, "layout"):  # a ParamList: the plans made from the old layout go with it
        params.layout = layout  # type: ignore[attr-defined]
        params.plans.clear()  # type: ignore[attr-defined]
    return plan, parts


def measure_grads(params: Sequence[torch.Tensor], scale: float | torch.Tensor = 1.0) -> GradStats:
    """Per-parameter gradient norms in one fused pass, read with one synchronising device→host transfer.

    On the CPU the small gradients are measured together (same-shape ones concatenated into blocks under ATen's
    grain size, one row-wise norm each; the odd ones through one flattened copy and a segment sum of squares), the
    large ones with a BLAS dot product each; off the CPU with ``torch._foreach_norm`` per device and dtype (half
    precision in float32). How to group a parameter list is computed once and reused while the list and the set of
    gradients that are ``None`` stay the same, so a clean step costs a few C-level passes over ``.grad``.

    GPU: every value comes back through :func:`to_host`, a synchronising copy, once per call on a clean step. Only a
    parameter whose norm is not finite or is zero is then looked at element-wise (one more transfer, on such steps
    only): every such candidate goes through the same confirmation, which tells a NaN/Inf element (``nonfinite``)
    from a finite gradient whose norm overflows, an all-zero gradient (``zero``) from tiny values whose squares
    underflow, and re-measures the others in float64. So a non-finite gradient is reported whatever the first read
    said of its norm (zero, NaN or Inf). The design implies that the guard waits, once per optimizer step, for the
    backward pass to finish (the optimizer step and any gradient clipping wait for it anyway): ``raise`` happens
    before the optimizer step it concerns.

    Args:
        params: the tensors to measure (an optimizer's parameters). A
            :class:`~lightning_gradguard.params.ParamList` keeps its measurement plans itself (the fastest path).
        scale: divide every norm by this (for gradients still multiplied by an AMP loss scale). A tensor (the grad
            scaler's scale, on its device) is read in the same transfer as the norms, not by a sync of its own; the
            value read is :attr:`GradStats.scale`.

    The pass runs with ``__torch_function__`` handling off (``torch._C.DisableTorchFunction``): a function mode
    still on the stack (the tracer, when a mode pushed after it kept it from leaving; a mode of the user's, such as
    a FLOP counter) neither sees nor pays for the guard's own ops (several microseconds per tensor otherwise);
    tensor subclasses that work through ``__torch_dispatch__`` (``DTensor``) are unaffected.
    """
    with _compat.torch_function_disabled():
        return _measure(params, scale)


def _measure(params: Sequence[torch.Tensor], scale: float | torch.Tensor) -> GradStats:
    n = len(params)
    grads, missing, frozen = _host_facts(params)
    stats = GradStats(list(params), [None] * n, missing, frozen=frozen)
    if len(missing) == n:
        stats._total = 0.0
        if isinstance(scale, torch.Tensor):  # nothing else to read
            stats.syncs += 1
            stats.scale = float(to_host(scale.detach().double().reshape(1))[0])
        else:
            stats.scale = float(scale)
        return stats
    cache, key, bound = _plan_cache(params, missing)
    plan = cache.get(key)
    try:
        parts = _run_plan(plan, grads) if plan is not None else None
    except RuntimeError:  # a gradient changed device or layout under the plan
        parts = None
    if parts is None:
        plan, parts = _new_plan(params, grads, missing)
        if len(cache) >= bound:
            del cache[next(iter(cache))]
        cache[key] = plan
    if isinstance(scale, torch.Tensor):  # the loss scale comes back with the norms: no transfer of its own
        parts.append(scale.detach().double().reshape(1))
        values = _fetch(parts, stats)
        scale = stats.scale = float(values[-1])
        values = values[:-1]
    else:
        values = _fetch(parts, stats)  # the one sync of a clean step (one per device when gradients span several)
        stats.scale = float(scale)
    norms = np.full(n, np.nan)
    norms[plan.order] = values
    finite = np.isfinite(values)
    if not (finite.all() and values.all()):  # a norm read zero or not finite: look closer
        _confirm(stats, grads, sorted(plan.order[~finite | (values == 0.0)].tolist()), norms)
    if scale != 1.0:
        norms /= scale
    _set_norms(stats, norms, norms[plan.order], missing)
    return stats


def _fetch(parts: list[torch.Tensor], stats: GradStats) -> np.ndarray:
    """``torch.cat(parts)`` on the host, in float64: one :func:`to_host` per device (``torch.cat`` promotes float32
    parts to float64 when one is, exactly)."""
    device = parts[0].device
    if all(map(operator.eq, map(_DEVICE, parts), repeat(device))):  # at C level: no Python per part
        stats.syncs += 1
        return to_host(torch.cat(parts) if len(parts) > 1 else parts[0]).astype(np.float64, copy=False)
    stats.syncs += len({p.device for p in parts})
    by_device: dict[torch.device, list[int]] = {}
    for j, p in enumerate(parts):
        by_device.setdefault(p.device, []).append(j)
    host: list[np.ndarray | None] = [None] * len(parts)
    for idx in by_device.values():
        values = to_host(torch.cat([parts[j] for j in idx]))
        for j, chunk in zip(idx, np.split(values, np.cumsum([len(parts[j]) for j in idx])[:-1]), strict=True):
            host[j] = chunk
    return np.concatenate(host).astype(np.float64, copy=False)  # type: ignore[arg-type]


def _confirm(stats: GradStats, grads: Sequence[torch.Tensor | None], candidates: list[int], norms: np.ndarray) -> None:
    """Look element-wise at the gradients whose norm read zero or not finite (one more transfer, for all of them).

    Each gets ``[all finite, any non-zero, float64 norm]``: a NaN/Inf element makes it ``nonfinite`` (checked first,
    whatever the norm read); otherwise no non-zero element makes it ``zero``; otherwise the float64 norm replaces the
    one that overflowed or underflowed. An empty gradient is neither.
    """
    rows = []
    for i in candidates:
        g = grads[i]
        assert g is not None
        v = (g.coalesce().values() if g.layout != torch.strided else g).reshape(-1)
        rows.append(torch.stack([torch.isfinite(v).all().double(), v.ne(0).any().double(),
                                 torch.linalg.vector_norm(v, dtype=torch.float64)]))  # fmt: skip
    host = _fetch(rows, stats).reshape(-1, 3)
    for i, g, (finite, nonzero, norm) in zip(candidates, (grads[i] for i in candidates), host.tolist(), strict=True):
        norms[i] = norm
        if not finite:
            stats.nonfinite.append(i)
        elif not nonzero and g is not None and g.numel() > 0:
            stats.zero.append(i)


#: On the CPU, tensors with at least this many elements are reduced with a BLAS dot product.
_DOT_MIN = 16384


def _dot_norms(flat: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norms of 1-D tensors of one dtype (float32/float64, on the CPU) as one 1-D tensor: a BLAS dot product
    each (through ``map``: no Python per tensor), one stack, one square root."""
    return torch.stack(list(map(torch.dot, flat, flat))).sqrt_()


def l2_norms(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The L2 norm of each of ``tensors``, as 0-dim tensors on their devices, without a sync.

    Any device, dtype and layout: half precision (float16, bfloat16) is measured in float32, a sparse (COO) tensor
    by its stored values, a complex one by its elements' moduli (in its own precision). The tensors of one device and
    dtype go through one fused ``torch._foreach_norm``; on the CPU, where that is a loop of ``vector_norm``, a large
    contiguous tensor goes through a BLAS dot product instead (about twice as fast on a transformer's gradients, and
    as accurate). A sum of squares that overflows gives ``inf``, as ``torch.linalg.vector_norm`` does.

    Args:
        tensors: the tensors.
        dtype: measure in this floating dtype instead (``torch.float64``: the square of no float32, bfloat16 or
            float16 value overflows or underflows in it).

    Example::

        >>> [float(n) for n in l2_norms([torch.tensor([3.0, 4.0]), torch.ones(4, dtype=torch.bfloat16)])]
        [5.0, 2.0]
        >>> l2_norms([torch.tensor([3.0, 4.0])], torch.float64)[0].dtype
        torch.float64
    """
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[torch.Tensor]]] = {}
    dots: dict[torch.dtype, tuple[list[int], list[torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        v = t.detach()
        if v.layout != torch.strided:
            v = v.coalesce().values()
        if v.is_complex() or not v.dtype.is_floating_point:
            out[i] = torch.linalg.vector_norm(v)
            continue
        if dtype is None and v.dtype in _BLAS and v.numel() >= _DOT_MIN and v.is_contiguous() and v.is_cpu:
            idx, group = dots.setdefault(v.dtype, ([], []))
            v = v.view(-1)
        else:
            idx, group = groups.setdefault((v.device, v.dtype), ([], []))
        idx.append(i)
        group.append(v)
    for idx, group in dots.values():
        for i, n in zip(idx, _dot_norms(group).unbind(), strict=True):
            out[i] = n
    for (_, kind), (idx, group) in groups.items():
        norms = foreach_norm(group, dtype if dtype is not None else torch.float32 if kind in _HALF else None)
        for i, n in zip(idx, norms, strict=True):
            out[i] = n
    return out  # type: ignore[return-value]
