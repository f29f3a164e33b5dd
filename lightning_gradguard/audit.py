"""The auditor: pure torch. What :func:`~lightning_gradguard.measure.measure_grads` measured + facts about the step
→ findings.

:func:`classify` turns the parameters the measurement flagged (no gradient, a non-finite or an all-zero one, frozen)
into :class:`~lightning_gradguard.findings.Finding` objects using what is known about the step: which parameters the
losses' autograd graphs reach (:func:`walk_graph`) and, on traced steps, the tracer's dataflow facts
(:class:`StepFacts`); :func:`explain_missing` and :func:`explain_zero` say why in words. :func:`audit_layout` and
:func:`find_orphans` check the optimizers against the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import _compat
from .findings import HINTS, Finding
from .params import ParamIndex, module_of
from .trace import CutSite, Tracer

if TYPE_CHECKING:
    from .measure import GradStats

__all__ = [
    "StepFacts",
    "audit_layout",
    "classify",
    "explain_missing",
    "explain_zero",
    "find_orphans",
    "reached_params",
    "walk_graph",
]

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
