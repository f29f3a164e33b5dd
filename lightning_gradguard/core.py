"""The guard's step logic, shared by the Lightning callback and ``check_step``.

:class:`GuardCore` owns one straight data path per optimizer step::

    tracer (forward facts) ─┐
    losses (graph walk) ────┼─> auditor (findings) ─> policy (keep / raise / warn once) ─> report
    gradients (fused pass) ─┘

Adapters call :meth:`GuardCore.begin_batch` / :meth:`GuardCore.end_batch` around forward passes,
:meth:`GuardCore.record_loss` before each backward and :meth:`GuardCore.check` before each optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .audit import (
    GradStats,
    StepFacts,
    audit_optimizers,
    classify,
    explain_missing,
    explain_zero,
    measure_grads,
    reached_params,
)
from .findings import HINTS, Finding, GradGuardError
from .params import ParamIndex, module_of, optimizer_layout, optimizer_params
from .policy import Policy
from .report import RunReport
from .trace import LossFacts, Tracer

if TYPE_CHECKING:
    from .distributed import RankSync

__all__ = ["DIAGNOSE", "Diagnose", "GuardCore", "is_compiled"]

Diagnose = Literal["first", "on_finding", "always", "never"]
DIAGNOSE: tuple[str, ...] = ("first", "on_finding", "always", "never")


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules is wrapped by ``torch.compile``."""
    if getattr(model, "_compiler_ctx", None):  # Lightning's `trainer.fit(torch.compile(model))`
        return True
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(model, OptimizedModule) or any(isinstance(m, OptimizedModule) for m in model.modules())


def module_view(index: ParamIndex, findings: Sequence[Finding]) -> list[str]:
    """One line per module all of whose trainable parameters are unused (or detached) alike.

    Example: ``"module `pooler` ran, but its output never reached the loss"``.
    """
    by_module: dict[str, list[Finding]] = {}
    for f in findings:
        if f.kind in ("unused", "detached"):
            by_module.setdefault(f.module, []).append(f)
    lines = []
    for module, group in by_module.items():
        trainable = [
            n for n, p in zip(index.names, index.params, strict=True) if module_of(n) == module and p.requires_grad
        ]
        if {f.param for f in group} != set(trainable) or len({f.kind for f in group}) != 1:
            continue
        label = f"module `{module}`" if module else "the root module"
        f = group[0]
        if f.kind == "detached":
            lines.append(f"{label}: the loss depends on its output, but every gradient path to it is cut" +
                         (f" at {f.where}" if f.where else ""))  # fmt: skip
        elif "never took part" in f.message:
            lines.append(f"{label} was never called")
        else:
            lines.append(f"{label} ran, but its output never reached the loss")
    return lines


@dataclass
class _Loss:
    grad_fn: Any
    facts: LossFacts | None


class GuardCore:
    """Per-run state of a guard: the parameter index, the tracer, the losses of the current step, the report.

    Args:
        policy: what to do with findings.
        diagnose: which steps to trace: ``"first"`` (the first optimizer step), ``"on_finding"`` (the first, and
            the step after a parameter newly lacks a usable gradient on an untraced step), ``"always"``, ``"never"``.
    """

    def __init__(self, policy: Policy, diagnose: str = "on_finding") -> None:
        self.policy = policy
        self.diagnose = diagnose
        self.report = RunReport()
        self.index: ParamIndex | None = None
        self.tracer: Tracer | None = None
        self.compiled = False
        self.checks = 0
        self._armed = diagnose != "never"
        self._losses: list[_Loss] = []
        self._pending: dict[int, tuple[int, str]] = {}
        self._known: dict[int, Finding] = {}  # what a traced step found for a parameter lacking a gradient
        self._consistency_key: tuple[Any, ...] | None = None
        self._params_cache: dict[int, tuple[Any, list[torch.Tensor]]] = {}
        #: Under distributed training, agrees facts and decisions with the other ranks (see distributed.py);
        #: ``None`` in a single process, which then runs no collective.
        self.dist: RankSync | None = None

    # ------------------------------------------------------------------ setup
    def bind(self, model: nn.Module, *, on_backward: Any = None) -> None:
        """Index ``model``'s parameters (again, if they changed) and make a tracer for them."""
        self.compiled = is_compiled(model)
        index = ParamIndex.of(model)
        if self.index is not None and self.index.params == index.params:
            return
        if self.tracer is not None:
            self.tracer.stop()
        self.index = index
        self.tracer = Tracer(index, on_backward=on_backward)
        self.report.set_model(index.names, [p.numel() for p in index.params], self.policy)  # to group findings

    def params_of(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """``optimizer``'s parameters in order, recomputed only when its param groups change."""
        layout = optimizer_layout(optimizer)
        hit = self._params_cache.get(id(optimizer))
        if hit is None or hit[0] != layout:
            hit = (layout, optimizer_params(optimizer))
            self._params_cache[id(optimizer)] = hit
        return hit[1]

    @property
    def has_losses(self) -> bool:
        """A backward happened since the last check."""
        return bool(self._losses)

    @property
    def can_trace(self) -> bool:
        """The tracer can follow the model's parameters (not under torch.compile, nor when FSDP swaps them)."""
        return not self.compiled and (self.dist is None or self.dist.traceable)

    @property
    def tracing(self) -> bool:
        """The tracer is recording right now."""
        return self.tracer is not None and self.tracer.active and not self.tracer.paused

    # ------------------------------------------------------------------ forward
    def begin_batch(self) -> None:
        """Start tracing if this step is to be diagnosed."""
        if self._armed and self.tracer is not None and self.can_trace:
            self.tracer.paused = False
            self.tracer.start()

    def pause(self) -> None:
        """Stop recording until the next :meth:`begin_batch` (the rest of the batch is backward and step)."""
        if self.tracer is not None:
            self.tracer.paused = True

    def end_batch(self) -> None:
        """Stop tracing; forget the trace once no loss of a pending step refers to it."""
        if self.tracer is not None:
            self.tracer.stop()
            if not self._losses and self.tracer.recorded:
                self.tracer.reset()

    def abort(self) -> None:
        """Leave no mode active and hold nothing (after an exception, or at teardown)."""
        if self.tracer is not None:
            self.tracer.stop()
            self.tracer.reset()
        self._losses.clear()

    # ------------------------------------------------------------------ backward
    def record_loss(self, loss: torch.Tensor, step: int) -> None:
        """Remember ``loss`` (its graph, and the tracer's facts) for the coming optimizer step.

        Raises:
            GradGuardError: the loss has no autograd graph, so ``backward()`` is about to fail with torch's
                "element 0 of tensors does not require grad": the error names the parameters whose gradient
                path was cut, and where.
        """
        facts = self.tracer.facts(loss) if self.tracing and self.tracer is not None else None
        self._losses.append(_Loss(loss.grad_fn, facts))
        error = self._detached_loss_error(facts, step) if loss.grad_fn is None and not loss.requires_grad else None
        if self.dist is not None:  # before any rank enters backward: decide with the others, raise together
            self.dist.before_backward(self, loss, facts, step, error)
        if error is not None:
            raise error

    def _detached_loss_error(self, facts: LossFacts | None, step: int) -> GradGuardError:
        index = self.index
        findings: list[Finding] = []
        if facts is not None and index is not None:
            sf = StepFacts(dep=facts.dep, cuts=facts.cuts, seen=self.tracer.seen if self.tracer else 0,
                           tracer=self.tracer)  # fmt: skip
            for bit in index.bits(facts.dep):
                if index.params[bit].requires_grad:
                    findings.append(explain_missing(index.names[bit], bit, sf, step))
        head = (
            'The loss does not require grad, so `backward()` would fail with "element 0 of tensors does '
            'not require grad and does not have a grad_fn".'
        )
        if facts is None:
            detail = (
                " This step was not traced, so GradGuard cannot name the line that cut the graph; set "
                "diagnose='always' to find it. Look for `.detach()`, `.data`, `torch.no_grad()`, `.item()` or numpy "
                "between the model's output and the loss."
            )
        elif not findings:
            detail = " Its value does not depend on any trainable parameter."
        else:
            n = len(findings)
            detail = f" Its value depends on {n} trainable parameter{'s' if n != 1 else ''}, but the graph was cut"
        kept = self.policy.keep(findings)
        self.report.add(kept)
        if kept:
            return GradGuardError.from_findings(kept, step, head + detail, self.policy.sizes)
        return GradGuardError(head + detail, [])

    # ------------------------------------------------------------------ step
    def step_facts(self, *, need_received: bool) -> StepFacts:
        """Facts for the step whose losses were recorded since the last check."""
        losses = self._losses
        received = reached_params(loss.grad_fn for loss in losses) if need_received else None
        if losses and all(loss.facts is not None for loss in losses) and self.tracer is not None:
            dep = cuts = 0
            for loss in losses:
                assert loss.facts is not None
                dep |= loss.facts.dep
                cuts |= loss.facts.cuts
            return StepFacts(received, dep, cuts, self.tracer.seen, self.tracer, self.compiled)
        return StepFacts(received, compiled=self.compiled)

    def check(
        self,
        params: Sequence[torch.Tensor],
        step: int,
        *,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        scaler: Any = None,
        scale: float = 1.0,
        context: str = "",
    ) -> GradStats:
        """Judge the gradients of ``params`` (the stepping optimizer's) and enforce the policy.

        Args:
            params: the stepping optimizer's parameters.
            step: the step number findings carry.
            optimizers: every optimizer of the run, for the stale/orphan consistency check.
            scaler: the AMP grad scaler, if any: non-finite gradients are then an overflow that it skips, unless
                the scale has fallen to 1 or below.
            scale: divide gradient norms by this (gradients that are still scaled).
            context: first line of the error message.

        Raises:
            GradGuardError: a finding whose action is ``"raise"``.
        """
        index = self.index
        assert index is not None, "GuardCore.bind() first"
        self.checks += 1
        stats = measure_grads(params, scale) if self.dist is None else self.dist.measure_grads(params, scale)
        findings: list[Finding] = []
        traced_step = bool(self._losses) and all(loss.facts is not None for loss in self._losses)
        key = tuple(optimizer_layout(opt) for opt in optimizers)
        if optimizers and (key != self._consistency_key or traced_step):
            self._consistency_key = key
            findings += audit_optimizers(index, optimizers, step)
        if not stats.clean or self._pending:
            facts = self.step_facts(need_received=bool(stats.zero))
            if self.dist is not None:
                facts = self.dist.merge_facts(facts)
            overflow_ok = bool(stats.nonfinite) and scaler is not None and float(scaler.get_scale()) > 1.0
            defer = self.diagnose in ("on_finding", "always") and self.can_trace
            found, pending = classify(index, stats, facts, step, overflow_ok=overflow_ok, defer=defer)
            findings += self._settle_pending(found, pending, facts, step)
        self._losses.clear()
        if self.dist is not None:
            findings = self.dist.combine(findings, step)
        kept = self.policy.keep(findings)
        new = self.report.add(kept)
        if new and traced_step:
            for line in module_view(index, new):
                self.report.note(line)
        self._arm_after_check(new, traced_step)
        self.policy.enforce(kept, step, context)
        return stats

    def _settle_pending(
        self, found: list[Finding], pending: list[tuple[int, str]], facts: StepFacts, step: int
    ) -> list[Finding]:
        """Keep untraced candidates for the next (traced) step; explain earlier ones now that it came."""
        index = self.index
        assert index is not None
        out = list(found)
        if facts.traced and self._pending:
            explained = {f.param for f in found}
            for bit, (first, reason) in self._pending.items():
                name = index.names[bit]
                if name in explained:  # the traced step shows the same problem: date it back to its first step
                    out = [replace(f, step=first) if f.param == name else f for f in out]
                elif reason == "zero":
                    out.append(replace(explain_zero(name, bit, StepFacts(), first), message=(
                        f"`{name}` received an all-zero gradient at step {first}, but not at the next (traced) step."
                    )))  # fmt: skip
                else:
                    out.append(replace(explain_missing(name, bit, facts, first), where=None, message=(
                        f"`{name}` received no gradient at step {first}, but did at the next (traced) step: something "
                        f"on step {first} only left it out (a data-dependent branch that skipped it, or a cut taken on "
                        "that step only); set diagnose='always' to name the line."
                    ), kind="unused", hint=HINTS["unused"]))  # fmt: skip
            self._pending.clear()
        if facts.traced:
            for f in found:
                if f.kind in ("unused", "detached", "zero"):
                    self._known[index.bit_of[f.param]] = f
        for bit, reason in pending:
            known = self._known.get(bit)
            if known is not None and (known.kind == "zero") == (reason == "zero"):
                out.append(replace(known, step=step))  # seen and explained before: no need to trace again
            else:
                self._pending.setdefault(bit, (step, reason))
        return out

    def _arm_after_check(self, new: list[Finding], traced_step: bool) -> None:
        if self.diagnose == "always":
            self._armed = True
        elif self.diagnose == "never" or self.diagnose == "first":
            self._armed = False
        else:  # on_finding: trace the next step when something new turned up that a trace can explain
            self._armed = bool(self._pending) or (bool(new) and not traced_step)

    def finish(self, step: int) -> None:
        """End of the run: report candidates still waiting for a traced step as they are."""
        if not self._pending or self.index is None:
            return
        facts = StepFacts(compiled=self.compiled)
        explain = {"missing": explain_missing, "zero": explain_zero}
        findings = [
            explain[reason](self.index.names[bit], bit, facts, first) for bit, (first, reason) in self._pending.items()
        ]
        findings = [replace(self._known.get(self.index.bit_of[f.param], f), step=f.step) for f in findings]
        self._pending.clear()
        kept = self.policy.keep(findings)
        self.report.add(kept)
        self.policy.enforce(kept, step)

    @property
    def findings(self) -> list[Finding]:
        return self.report.findings
