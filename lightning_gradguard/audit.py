"""The auditor: pure torch. Gradients of an optimizer's parameters + facts about the step → findings.

Two stages, so that the cheap one runs every step and the expensive one only when it is needed:

* :func:`measure_grads` is the one fused pass over the gradients (grouped once per parameter list; one
  synchronising host transfer). It says which parameters have no gradient, a non-finite one or an all-zero one.
* :func:`classify` turns those candidates into :class:`~lightning_gradguard.findings.Finding` objects using
  what is known about the step: which parameters the losses' autograd graphs reach (:func:`reached_params`)
  and, on traced steps, the tracer's dataflow facts (:class:`StepFacts`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any

import numpy as np
import torch

from . import _compat
from .findings import HINTS, Finding
from .params import ParamIndex, module_of
from .trace import CutSite, Tracer

__all__ = [
    "GradStats",
    "LateRead",
    "StepFacts",
    "audit_layout",
    "classify",
    "find_orphans",
    "loss_scale",
    "measure_grads",
    "reached_params",
    "start_late_read",
    "to_host",
    "walk_graph",
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


def loss_scale(scaler: Any) -> float | torch.Tensor:
    """A grad scaler's current loss scale without a device sync: its scale tensor, for :func:`measure_grads` to read
    in the same transfer as the norms, or a float when it has none yet (before its first ``scale()``) or is not a
    :class:`torch.amp.GradScaler`.

    ``scaler.get_scale()`` would copy the scale to the host on its own (a second sync per step on CUDA).
    ``_get_scale_async`` is what torch's fused optimizers read the scale with.
    """
    get = getattr(scaler, "_get_scale_async", None)
    scale = get() if callable(get) else None
    if isinstance(scale, torch.Tensor):
        return scale
    return float(scaler.get_scale())


_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")
_HALF = (torch.float16, torch.bfloat16)

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
        norms = torch.stack(torch._foreach_norm(present, 2, dtype=torch.float64))  # type: ignore[arg-type]
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
    with torch.no_grad(), torch._C.DisableTorchFunction():
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


def _take(indices: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
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
    single: list[list[int]]  # measured one by one, per device: large, sparse, complex, or odd gradients
    order: np.ndarray  # the parameter index of each value, in the order they are transferred
    device: torch.device | None


@dataclass
class _Layout:
    """What each gradient of a parameter list looked like when it was last planned (its group), so that the plan for
    a new pattern of missing gradients (MoE routing, LayerDrop: a new one on most steps) is made with array
    operations over the list, looking only at gradients not seen before."""

    group: np.ndarray  # per parameter, the index of its group in `keys`; -1: no gradient seen yet
    numel: np.ndarray  # per parameter, its gradient's number of elements
    #: ``("small", dtype, shape)`` (CPU), ``("foreach", device, dtype)`` (off the CPU) or ``("single", device)``
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
                blocks.append((_take(part), len(part), numel, len(shape) > 0))
            stacked += idx
        elif kind == "small":
            flat += idx
        elif kind == "foreach":
            foreach.append((_take(idx), torch.float32 if key[1] != torch.float64 else None))
            foreach_idx += idx
        else:
            single.append(idx)
    order = stacked + flat + foreach_idx + [i for idx in single for i in idx]
    return _Plan(
        blocks,
        _take(flat),
        torch.tensor(layout.numel[flat], dtype=torch.int64) if flat else None,
        foreach,
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
        flat = torch._C._nn.flatten_dense_tensors(plan.flat(grads))
        if flat.device != plan.device or not flat.dtype.is_floating_point:
            return None
        if flat.dtype in _HALF:
            flat = flat.float()
        parts.append(torch.segment_reduce(flat * flat, "sum", lengths=plan.lengths).sqrt_())
    for take, dtype in plan.foreach:
        parts.append(torch.stack(torch._foreach_norm(take(grads), 2, dtype=dtype)))
    for idx in plan.single:
        parts.append(torch.stack([_norm(grads[i]).double().reshape(()) for i in idx]))  # type: ignore[arg-type]
    return parts


def _norm(g: torch.Tensor) -> torch.Tensor:
    """The L2 norm of one gradient of any layout and dtype, as a 0-dim tensor on its device (no sync)."""
    if g.layout != torch.strided:
        g = g.coalesce().values()
    if g.dtype in _HALF:
        return torch.linalg.vector_norm(g, dtype=torch.float32)
    if g.device.type == "cpu" and g.numel() >= _DOT_MIN and g.is_contiguous() and g.dtype.is_floating_point:
        v = g.view(-1)
        return torch.dot(v, v).sqrt_()
    return torch.linalg.vector_norm(g)


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
    with torch._C.DisableTorchFunction():
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
    if all(p.device == device for p in parts):
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


#: On the CPU, gradients with at least this many elements are reduced with a BLAS dot product.
_DOT_MIN = 16384


def _l2_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norms of float32/float64 tensors of one device and dtype, as 0-dim tensors (no sync).

    Off the CPU one fused ``torch._foreach_norm``. On the CPU, where ``_foreach_norm`` reduces each tensor with a
    slower generic kernel, the large contiguous tensors go through ``torch.dot(g, g)`` (BLAS: about twice as fast on
    a transformer's gradients, and no less accurate) and the small ones through one ``_foreach_norm``. A sum of
    squares that overflows gives ``inf`` either way, which :func:`measure_grads` re-measures in float64.
    """
    if grads[0].device.type != "cpu":
        return list(torch._foreach_norm(grads, 2))
    out: list[torch.Tensor | None] = [None] * len(grads)
    small = []
    for i, g in enumerate(grads):
        if g.numel() >= _DOT_MIN and g.is_contiguous():
            v = g.view(-1)
            out[i] = torch.dot(v, v).sqrt_()
        else:
            small.append(i)
    if small:
        for i, n in zip(small, torch._foreach_norm([grads[i] for i in small], 2), strict=True):
            out[i] = n
    return out  # type: ignore[return-value]


#: Backward nodes of ``torch.utils.checkpoint(..., use_reentrant=True)``: the parameters inside get their
#: ``AccumulateGrad`` nodes only during the backward recompute, so a walk from the loss cannot see them.
_OPAQUE_NODES = _compat.REENTRANT_CHECKPOINT_NODES


def walk_graph(grad_fns: Iterable[object]) -> tuple[set[int], bool]:
    """``(reached, complete)``: the ``id()`` of every leaf tensor whose ``AccumulateGrad`` node the autograd graphs
    of ``grad_fns`` reach, and whether that is every leaf that gets a gradient.

    ``complete`` is ``False`` when the graphs pass through a reentrant activation checkpoint, whose parameters are
    linked to the graph only while ``backward()`` recomputes the checkpointed function.
    """
    out: set[int] = set()
    seen: set[int] = set()
    complete = True
    stack = [fn for fn in grad_fns if fn is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:
            out.add(id(var))
            continue
        if complete and type(fn).__name__ in _OPAQUE_NODES:
            complete = False
        for nxt, _ in fn.next_functions:  # type: ignore[attr-defined]
            if nxt is not None:
                stack.append(nxt)
    return out, complete


def reached_params(grad_fns: Iterable[object]) -> set[int]:
    """``id()`` of every leaf tensor whose ``AccumulateGrad`` node the autograd graphs of ``grad_fns`` reach.

    In eager mode these are exactly the parameters that receive a gradient from those losses, except those inside
    a reentrant activation checkpoint (see :func:`walk_graph`). The walk works before and after ``backward()``
    (saved tensors are freed, the structure is not).
    """
    return walk_graph(grad_fns)[0]


@dataclass
class StepFacts:
    """What is known about a step besides its gradients.

    Attributes:
        received: ``id()`` of the parameters the step's losses reach through autograd, or ``None`` if unknown.
        dep: on a traced step, the mask of parameters the losses' values depend on; ``None`` if not traced.
        cuts: on a traced step, the mask of cut sites that flowed into the losses.
        seen: on a traced step, the mask of parameters that took part in any op.
        tracer: the tracer that recorded the step (for its cut sites).
        compiled: the forward ran under ``torch.compile`` where the tracer cannot follow it (torch < 2.6, which
            cannot run compiled code eagerly for a traced step; the graph walk over-approximates).
        opaque: the graph walk passed through a reentrant activation checkpoint, so ``received`` misses the
            parameters inside it (a parameter outside ``received`` may still have received a gradient).
    """

    received: set[int] | None = None
    dep: int | None = None
    cuts: int = 0
    seen: int = 0
    tracer: Tracer | None = None
    compiled: bool = False
    opaque: bool = False

    @property
    def traced(self) -> bool:
        return self.dep is not None


def _finding(
    kind: str, name: str, message: str, step: int, where: str | None = None, hint: str | None = None
) -> Finding:
    return Finding(kind, name, message, where, step, hint or HINTS[kind], module_of(name))


def _culprit(facts: StepFacts, bit: int, *, zero: bool = False) -> CutSite | None:
    if facts.tracer is None:
        return None
    site = facts.tracer.culprit(bit, facts.cuts)
    if site is not None and (site.kind == "zero_derivative") != zero:
        return None
    return site


#: The fix of a parameter without a gradient on a step that was not traced: unused or detached, it cannot be told.
_UNTRACED_HINT = (
    "if the loss uses it, remove what cuts its gradient path (`.detach()`, `.data`, `no_grad`, numpy, `.item()`); "
    "if not, use it in the loss, delete it, or leave it out of the optimizer"
)


def explain_missing(name: str, bit: int, facts: StepFacts, step: int) -> Finding:
    """An ``unused`` or ``detached`` finding for trainable parameter ``name`` (bit ``bit``) that got no gradient."""
    if facts.dep is None:
        if facts.compiled:
            why = (
                "the forward ran under torch.compile, which torch < 2.6 cannot run eagerly for GradGuard's tracer, so "
                "it cannot tell an unused parameter from a detached one; with torch >= 2.6 it can, and so can "
                "`check_step` on the model uncompiled"
            )
        else:
            why = (
                "the step was not traced, so GradGuard cannot tell an unused parameter from a detached one; trace it "
                "for the cause: `GradGuard(diagnose='always')`, `check_step(..., trace=True)`"
            )
        return _finding("unused", name, f"`{name}` received no gradient ({why}).", step, hint=_UNTRACED_HINT)
    if facts.dep >> bit & 1:
        site = _culprit(facts, bit)
        if site is None:
            return _finding("detached", name, f"The loss depends on `{name}`, but no gradient path reaches it.", step)
        return _finding(
            "detached",
            name,
            f"The loss depends on `{name}`, but {site.describe(bit)} cuts its gradient path: {site.fix(bit)}.",
            step,
            site.where,
            site.fix(bit),
        )
    tracer = facts.tracer
    exits = tracer.escapes_of(bit) if tracer is not None else []
    used = tracer.used_at(bit) if tracer is not None and facts.seen >> bit & 1 else None
    ran = f" at {used}" if used else ""
    if exits:  # its value left torch: the loss may use it through a value the tracer could not follow
        left = ", ".join(site.describe() for site in exits[:3]) + (" and elsewhere" if len(exits) > 3 else "")
        msg = f"`{name}` took part in the forward pass{ran}, but no torch operation carried its value to the loss, "
        msg += f"and it received no gradient; its value left torch this step through {left}. If the loss uses that "
        msg += "value (re-wrapped after Python or numpy arithmetic, `torch.Tensor(...)`, `torch.from_numpy`), that is "
        msg += "where its gradient path is cut: keep it a tensor. Otherwise its output was discarded."
    elif facts.seen >> bit & 1:
        msg = f"`{name}` took part in the forward pass{ran}, but nothing it computed reached the loss"
        drops = tracer.dropped_at(bit) if tracer is not None else []
        if drops:
            taken = " and ".join(site.describe() for site in drops[:2]) + (" and elsewhere" if len(drops) > 2 else "")
            msg += f": it was taken out of the graph by {taken} (to be logged or measured, say)."
        else:
            msg += " (its output was discarded)."
    else:
        msg = f"`{name}` never took part in the forward pass: its module was not called, or a branch skipped it."
        return _finding("unused", name, msg, step)
    return _finding("unused", name, msg, step, used)


def explain_zero(name: str, bit: int, facts: StepFacts, step: int) -> Finding:
    """A ``zero`` finding, naming the zero-derivative op on a traced step."""
    site = _culprit(facts, bit, zero=True)
    if site is None:
        return _finding("zero", name, f"`{name}` received a gradient that is exactly zero everywhere.", step)
    return _finding(
        "zero",
        name,
        f"`{name}` received a gradient that is exactly zero everywhere, because of {site.describe()}: {site.fix()}.",
        step,
        site.where,
        site.fix(),
    )


def _stale_zero(facts: StepFacts, bit: int) -> bool:
    """An all-zero gradient of a parameter the loss's graph does not reach is left from an earlier step, unless
    the walk could not see every parameter (a reentrant checkpoint): then only a traced step that shows the
    parameter took no part in the forward pass says so."""
    if not facts.opaque:
        return True
    return facts.traced and not facts.seen >> bit & 1


def classify(
    index: ParamIndex,
    stats: GradStats,
    facts: StepFacts,
    step: int,
    *,
    overflow_ok: bool = False,
    defer: bool = False,
    skip_empty: bool = True,
) -> tuple[list[Finding], list[tuple[int, str]]]:
    """Findings for one optimizer step.

    Args:
        index: the model's parameters (those not in it are stale and judged by :func:`audit_layout`).
        stats: the fused pass over the stepping optimizer's parameters.
        facts: what is known about the step.
        step: the step number findings carry.
        overflow_ok: non-finite gradients are an AMP overflow the grad scaler skips: not findings.
        defer: on an untraced step, return parameters that lack a gradient (or whose gradient is zero) as
            *pending* instead of classifying them, so that a traced step can explain them.
        skip_empty: parameters with no elements have nothing to learn: never findings. Pass ``False`` where a
            parameter is a rank's local view of a sharded one (FSDP1 ``use_orig_params``), which may be empty.

    Returns:
        ``(findings, pending)``: ``pending`` holds ``(index bit, "missing" | "zero")`` left for a traced step.
    """
    findings: list[Finding] = []
    pending: list[tuple[int, str]] = []
    if stats.clean:
        return findings, pending
    params = stats.params
    received = facts.received
    missing = set(stats.missing)
    zero = set(stats.zero)
    nothing = (  # an optimizer that trains nothing (built before `get_peft_model` froze what it holds, say)
        " Nothing this optimizer holds is trainable: it updates nothing; build it over the trainable parameters."
        if len(stats.frozen) == len(params) > 0
        else ""
    )
    for i in sorted(missing | zero | set(stats.frozen)):  # the others have a usable gradient: nothing to say
        p = params[i]
        bit = index.index.get(id(p))
        if bit is None:
            continue  # stale: not a parameter of the model
        name = index.names[bit]
        if not p.requires_grad:
            findings.append(
                _finding(
                    "frozen",
                    name,
                    f"`{name}` is in the optimizer but has `requires_grad=False`: it is never updated.{nothing}",
                    step,
                )
            )
            continue
        if skip_empty and p.numel() == 0:
            continue  # nothing to learn: its gradient, if any, is empty (all zero, trivially)
        if i in zero and received is not None and id(p) not in received and _stale_zero(facts, bit):
            missing.add(i)  # a zeroed gradient left from an earlier step (`zero_grad(set_to_none=False)`)
            zero.discard(i)
        if i in missing:
            if defer and not facts.traced:
                pending.append((bit, "missing"))
            else:
                findings.append(explain_missing(name, bit, facts, step))
        elif i in zero:
            if defer and not facts.traced:
                pending.append((bit, "zero"))
            else:
                findings.append(explain_zero(name, bit, facts, step))
    if not overflow_ok:
        for i in stats.nonfinite:
            bit = index.index.get(id(params[i]))
            if bit is None:
                continue
            name = index.names[bit]
            findings.append(_finding("nonfinite", name, f"`{name}` has a NaN or Inf in its gradient.", step))
    return findings, pending


def audit_layout(
    index: ParamIndex, optimizers: Sequence[torch.optim.Optimizer], step: int
) -> tuple[list[Finding], list[int]]:
    """What only changes with the optimizers' layout: ``(stale findings, bits of the parameters no optimizer holds)``.

    Run it when a layout changes; run :func:`find_orphans` over the returned bits on every step (cheap: it looks
    at those parameters only).
    """
    findings = []
    held: set[int] = set()
    for k, opt in enumerate(optimizers):
        for g, group in enumerate(opt.param_groups):
            for i, t in enumerate(group["params"]):
                held.add(id(t))
                if id(t) in index.index:
                    continue
                label = f"optimizer{k if len(optimizers) > 1 else ''}.param_groups[{g}][{i}]"
                twin = _twin(index, opt, t)
                looks = f"; it looks like a copy of `{twin}`" if twin else ""
                findings.append(
                    _finding(
                        "stale",
                        twin or label,
                        f"The optimizer holds a tensor of shape {tuple(t.shape)} ({label}) that is not a parameter "
                        f"of the model{looks}: was the optimizer built over a copy of the model? Updating it "
                        "changes nothing the model computes.",
                        step,
                    )
                )
    outside = [bit for bit, p in enumerate(index.params) if id(p) not in held]
    return findings, outside


def find_orphans(index: ParamIndex, outside: Sequence[int], step: int) -> list[Finding]:
    """``orphan`` findings for the trainable parameters among ``outside`` (bits of parameters no optimizer holds)
    that have a gradient (they take part in the loss; an EMA copy, which gets none, stays silent).

    Args:
        index: the model's parameters.
        outside: from :func:`audit_layout`.
        step: the step number findings carry.
    """
    findings = []
    for bit in outside:
        p = index.params[bit]
        if not p.requires_grad or p.grad is None:
            continue
        name = index.names[bit]
        message = f"`{name}` receives gradients, but no optimizer holds it: it is never updated."
        findings.append(_finding("orphan", name, message, step))
    return findings


def _twin(index: ParamIndex, opt: torch.optim.Optimizer, t: torch.Tensor) -> str | None:
    """The model parameter a stale optimizer tensor copies: same position and shape, else the only same shape."""
    flat = [p for group in opt.param_groups for p in group["params"]]
    pos = next(i for i, p in enumerate(flat) if p is t)
    if len(flat) == len(index.params) and index.params[pos].shape == t.shape:
        return index.names[pos]
    same = [n for n, p in zip(index.names, index.params, strict=True) if p.shape == t.shape]
    return same[0] if len(same) == 1 else None
