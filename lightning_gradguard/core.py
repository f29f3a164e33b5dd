"""The guard's step logic, shared by the Lightning callback and ``check_step``.

:class:`GuardCore` owns one straight data path per optimizer step::

    tracer (forward facts) ─┐
    losses (graph walk) ────┼─> auditor (findings) ─> policy (keep / raise / warn once) ─> report
    gradients (fused pass) ─┘

Adapters call :meth:`GuardCore.begin_batch` / :meth:`GuardCore.end_batch` around forward passes,
:meth:`GuardCore.record_loss` before each backward and :meth:`GuardCore.check` before each optimizer step.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ._frames import user_stacklevel
from .audit import StepFacts, audit_layout, classify, explain_missing, explain_zero, find_orphans, walk_graph
from .findings import HINTS, Finding, GradGuardError, group_findings
from .history import MAX_TRACED_STEPS, History
from .measure import GradStats, LateRead, measure_grads, start_late_read
from .params import ParamIndex, ParamList, alike_items, module_of, optimizer_layout, optimizer_params
from .policy import GradGuardWarning, Policy
from .report import RunReport
from .trace import EagerStance, LossFacts, Tracer

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


def _current_scale(scaler: Any, stats: GradStats, scale: float | torch.Tensor) -> float:
    """The scaler's loss scale now: read with the norms when ``scale`` was its tensor, else asked for (a sync, on the
    rare steps with non-finite gradients only)."""
    return stats.scale if isinstance(scale, torch.Tensor) else float(scaler.get_scale())


@dataclass
class _Loss:
    """A loss of the coming optimizer step: its graph (held until an optimizer judged it; then only through a weak
    reference to the loss, so that the graph is freed where it would be without the guard) and the tracer's facts."""

    grad_fn: Any
    facts: LossFacts | None
    ref: weakref.ref
    released: bool = False

    def graph(self) -> tuple[Any, bool]:
        """``(the loss's grad_fn, whether it is known)``: not known once the guard released it and the loss is gone."""
        if not self.released:
            return self.grad_fn, True
        loss = self.ref()
        return (None, False) if loss is None else (loss.grad_fn, True)

    def release(self) -> None:
        """Hold the graph no longer (the user's code, or Lightning, still does while it keeps the loss)."""
        self.grad_fn = None
        self.released = True


#: Kinds a traced step can say more about (the cut line, the zero-derivative op); a new finding of another kind on an
#: untraced step does not make the next step traced under ``diagnose="on_finding"``.
_TRACE_EXPLAINS = frozenset({"unused", "detached", "zero"})

#: Kinds of finding about a run of checked steps without a usable gradient (see :class:`History`): the run report
#: counts every step of the run.
_RUN_KINDS = frozenset({"unused", "detached", "zero"})


class GuardCore:
    """Per-run state of a guard: the parameter index, the tracer, the losses of the current step, the report.

    Args:
        policy: what to do with findings.
        diagnose: which steps to trace: ``"first"`` (the first optimizer step), ``"on_finding"`` (the first, and
            the step after a parameter never explained before newly lacks a usable gradient on an untraced step;
            at most :data:`~lightning_gradguard.history.MAX_TRACED_STEPS` steps in a run), ``"always"``,
            ``"never"``.
        idle_window: a parameter without a usable gradient on fewer than this many checked steps in a row is idle
            (counted in :meth:`History.idle_shares`), not a finding; ``1`` judges each step at once. A ``detached``
            parameter (a traced step shows the cut), an all-zero gradient caused by a traced zero-derivative op and
            an ``unused`` one whose output a traced step shows taken out of the graph (see :meth:`_dropped`) are
            reported at once whatever the window.
    """

    def __init__(self, policy: Policy, diagnose: str = "on_finding", idle_window: int = 1) -> None:
        self.policy = policy
        self.diagnose = diagnose
        self.history = History(idle_window)
        self.report = RunReport()
        self.report.idle_provider = self.history.idle_shares
        self.index: ParamIndex | None = None
        self.tracer: Tracer | None = None
        #: The model runs code compiled by ``torch.compile`` that the tracer cannot follow (torch < 2.6 only).
        self.compiled = False
        self.checks = 0
        self._armed = diagnose != "never"
        self._losses: list[_Loss] = []
        # An optimizer judged the losses: they stay for the other optimizers stepping on the same backward, and are
        # dropped at the next backward or at the end of the batch.
        self._checked = False
        #: Set by :meth:`finish`: parameters without a usable gradient on every checked step of a run shorter than
        #: the idle window (warned about, never raised).
        self.short: list[Finding] = []
        self._pending: dict[int, tuple[int, str]] = {}
        self._restored_pending: dict[str, tuple[int, str]] = {}  # from a checkpoint, until `bind` knows the bits
        self._probing: set[str] = set()  # newly idle parameters the next traced step is to look at
        self._consistency_key: tuple[Any, ...] | None = None
        self._stale: list[Finding] = []  # stale tensors of the current optimizer layout
        self._outside: list[int] = []  # bits of the parameters no optimizer of the current layout holds
        self._params_cache: dict[int, tuple[Any, ParamList]] = {}
        #: Under distributed training, agrees facts and decisions with the other ranks (see distributed.py);
        #: ``None`` in a single process, which then runs no collective.
        self.dist: RankSync | None = None
        self._late: list[LateRead] = []  # sync="late": reads of earlier steps, judged at the next check
        #: ``(tag, step, stats)`` of the late reads judged since the caller last took them (:meth:`take_resolved`).
        self.resolved: list[tuple[Any, int, GradStats]] = []

    # ------------------------------------------------------------------ setup
    def bind(self, model: nn.Module, *, on_backward: Any = None) -> None:
        """Index ``model``'s parameters (again, if they changed) and make a tracer for them."""
        # A traced step runs compiled code eagerly (see `EagerStance`); torch < 2.6 cannot, and then steps aside.
        self.compiled = not EagerStance.supported and is_compiled(model)
        index = ParamIndex.of(model)
        if self.index is not None and self.index.params == index.params:
            return
        if self.tracer is not None:
            self.tracer.stop()
        self.index = index
        self.tracer = Tracer(index, on_backward=on_backward)
        self._consistency_key = None
        self.report.set_model(index.names, [p.numel() for p in index.params], self.policy)  # to group findings
        if self._restored_pending:  # candidates saved in a checkpoint, by name: the next step is traced for them
            for name, (first, reason) in self._restored_pending.items():
                bit = index.bit_of.get(name)
                if bit is not None:
                    self._pending.setdefault(bit, (first, reason))
            self._restored_pending = {}
            if self._pending and self.diagnose in ("on_finding", "always"):
                self._armed = True

    def pending_state(self) -> list[list[Any]]:
        """The candidates waiting for a traced step, as plain values ``[name, first step, reason]`` (checkpoints)."""
        if self.index is None:
            return [[name, first, reason] for name, (first, reason) in self._restored_pending.items()]
        return [[self.index.names[bit], first, reason] for bit, (first, reason) in self._pending.items()]

    def load_pending_state(self, rows: list[list[Any]]) -> None:
        """Restore :meth:`pending_state`; the candidates are matched by name when the model is bound."""
        self._restored_pending = {str(name): (int(first), str(reason)) for name, first, reason in rows}

    def params_of(self, optimizer: torch.optim.Optimizer) -> ParamList:
        """``optimizer``'s parameters in order, recomputed only when its param groups change (the same immutable
        :class:`~lightning_gradguard.params.ParamList` until then, which keeps the measurement plans)."""
        layout = optimizer_layout(optimizer)
        hit = self._params_cache.get(id(optimizer))
        if hit is None or hit[0] != layout:
            hit = (layout, ParamList(optimizer_params(optimizer)))
            self._params_cache[id(optimizer)] = hit
        return hit[1]

    @property
    def has_losses(self) -> bool:
        """A backward happened since the last check."""
        return bool(self._losses)

    @property
    def can_trace(self) -> bool:
        """The tracer can follow the model's parameters (not when FSDP swaps them, nor through torch.compile on
        torch < 2.6, which cannot run compiled code eagerly for a traced step)."""
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

    def end_batch(self, *, forget: bool = True) -> None:
        """Stop tracing; forget the losses an optimizer judged, and the trace once no loss of a pending step (under
        gradient accumulation) refers to it. ``forget=False`` keeps both (``check_step`` still judges at its end)."""
        if forget and self._checked:
            self._drop_losses()
        if self.tracer is not None:
            self.tracer.stop()
            if forget and not self._losses and self.tracer.recorded:
                self.tracer.reset()

    def abort(self) -> None:
        """Leave no mode active and hold nothing (after an exception, or at teardown)."""
        if self.tracer is not None:
            self.tracer.stop()
            self.tracer.reset()
        self._drop_losses()

    def _drop_losses(self) -> None:
        self._losses.clear()
        self._checked = False

    def grads_cleared(self) -> None:
        """The gradients were just cleared (``zero_grad``) for a new step: losses recorded since the last check, whose
        step did not reach an optimizer (a custom ``optimizer_step`` that ran the closure but did not step), no
        longer feed any gradient. Forget them and their trace."""
        if not self._losses or self._checked:
            return
        self._drop_losses()
        if self.tracer is not None:
            self.tracer.reset()
        if self.dist is not None:
            self.dist.forget_step()

    # ------------------------------------------------------------------ backward
    def record_loss(self, loss: torch.Tensor, step: int) -> None:
        """Remember ``loss`` (its graph, and the tracer's facts) for the coming optimizer step.

        Raises:
            GradGuardError: the loss has no autograd graph, so ``backward()`` is about to fail with torch's
                "element 0 of tensors does not require grad": the error names the parameters whose gradient
                path was cut, and where.
        """
        if self._checked:  # a new backward after an optimizer step (a GAN's second loss): a new group of losses
            self._drop_losses()
        facts = self.tracer.facts(loss) if self.tracing and self.tracer is not None else None
        self._losses.append(_Loss(loss.grad_fn, facts, weakref.ref(loss)))
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
            if self.can_trace:
                how = "; a traced step names it: `GradGuard(diagnose='always')`, `check_step(..., trace=True)`."
            else:  # tracing would not help
                how = (
                    f" ({'torch.compile on torch < 2.6' if self.compiled else 'FSDP'} keeps GradGuard from tracing "
                    "this model)."
                )
            detail = (
                f" This step was not traced, so GradGuard cannot name the line that cut the graph{how} Look for "
                "`.detach()`, `.data`, `torch.no_grad()`, `.item()` or numpy between the model's output and the loss."
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
        if need_received:
            graphs = [loss.graph() for loss in losses]
            received, complete = walk_graph(fn for fn, _ in graphs)
            complete = complete and all(known for _, known in graphs)  # a loss gone: what it reached is unknown
        else:
            received, complete = None, True
        if losses and all(loss.facts is not None for loss in losses) and self.tracer is not None:
            dep = cuts = 0
            for loss in losses:
                assert loss.facts is not None
                dep |= loss.facts.dep
                cuts |= loss.facts.cuts
            return StepFacts(received, dep, cuts, self.tracer.seen, self.tracer, self.compiled, not complete)
        return StepFacts(received, compiled=self.compiled, opaque=not complete)

    def check(
        self,
        params: Sequence[torch.Tensor],
        step: int,
        *,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        scaler: Any = None,
        scale: float | torch.Tensor = 1.0,
        context: str = "",
        late: bool = False,
        tag: Any = None,
    ) -> GradStats:
        """Judge the gradients of ``params`` (the stepping optimizer's) and enforce the policy.

        Args:
            params: the stepping optimizer's parameters.
            step: the step number findings carry.
            optimizers: every optimizer of the run, for the stale/orphan consistency check.
            scaler: the AMP grad scaler, if any: non-finite gradients are then an overflow that it skips, unless
                the scale has fallen to 1 or below.
            scale: divide gradient norms by this (gradients that are still scaled); the scaler's scale tensor
                (:func:`~lightning_gradguard.audit.loss_scale`) is read in the same transfer as the norms.
            context: first line of the error message.
            late: read the norms at a later check (``sync="late"``, see :meth:`resolve_late`) instead of now, when
                nothing asks for a look now: no parameter is in a run of all-zero gradients or waits for a trace, the
                step is not traced, and there is no grad scaler and no other rank. Missing gradients and
                ``requires_grad=False`` (seen on the host) are judged now as always. Earlier late reads are judged
                first, always. The stats returned are then :attr:`GradStats.late` (no norms).
            tag: given back with the late read's stats in :attr:`resolved`.

        A step that no backward fed and on which no parameter of ``params`` has a usable gradient is not judged (nor
        counted, nor traced): Lightning's skipped batch (``training_step`` returned ``None``), an optimizer stepping
        without any ``backward()``. Its stats say :attr:`GradStats.skipped`. A step checked again (LBFGS evaluates its
        closure several times per optimizer step) counts once in the idle runs, the idle shares and the report.

        Raises:
            GradGuardError: a finding whose action is ``"raise"`` (of this step, or of an earlier late read).
        """
        index = self.index
        assert index is not None, "GuardCore.bind() first"
        if self._late:
            self.resolve_late()
        if isinstance(scale, torch.Tensor) and self.dist is not None and self.dist.sharded is not None:
            scale = float(scale)  # the sharded pass divides by a number (it runs a collective anyway)
        history = self.history
        fed = bool(self._losses)  # a backward fed this step (or an earlier optimizer's check of the same backward)
        traced_step = fed and all(loss.facts is not None for loss in self._losses)
        read = None
        if (late and fed and scaler is None and not isinstance(scale, torch.Tensor) and self.dist is None
                and not (self._pending or history.zero_run or traced_step)):  # fmt: skip
            read = start_late_read(params, step, float(scale), tag)
        if read is not None:
            self._late.append(read)
            stats = read.host  # missing and frozen, judged now; the values later
        else:
            stats = measure_grads(params, scale) if self.dist is None else self.dist.measure_grads(params, scale)
        if not isinstance(scale, torch.Tensor):
            stats.scale = float(scale)
        if not fed and params and len(stats.missing) + len(stats.zero) == len(params):
            stats.skipped = True  # nothing was computed for this step: nothing to judge (and nothing to trace)
            return stats
        self.checks += 1
        judged = history.count_check(params, self._names_among, step)
        findings: list[Finding] = []
        if traced_step and not self._checked:  # several optimizers stepping on one backward: one traced step
            history.traced_steps += 1
        if optimizers:
            findings += self._consistency(optimizers, step)
        lacking: set[str] = set()
        if not stats.clean or self._pending:
            facts = self.step_facts(need_received=bool(stats.zero))
            if self.dist is not None:
                facts = self.dist.merge_facts(facts)
            overflow_ok = bool(stats.nonfinite) and scaler is not None and _current_scale(scaler, stats, scale) > 1.0
            defer = self.diagnose in ("on_finding", "always") and self.can_trace
            sharded = self.dist is not None and bool(self.dist.sharded)
            found, pending = classify(
                index, stats, facts, step, overflow_ok=overflow_ok, defer=defer, skip_empty=not sharded
            )
            found, due = self._window(found, pending, facts, step, lacking)
            findings += self._settle_pending(found, due, facts, step, judged)
        if traced_step and self._probing:
            history.looked |= self._probing
            self._probing.clear()
        if read is not None:  # a gradient is there, but whether it is usable is known when the read comes in
            lacking |= self._present(history.open_runs())
        runs = self._runs_of(findings)
        history.settle(judged, lacking, step)
        self._checked = bool(self._losses)
        for loss in self._losses:  # (freeing a deep graph here would cost ~1 µs per node inside the hook)
            loss.release()
        if self.dist is not None:
            findings = self.dist.combine(findings, step)
        kept = self.policy.keep(findings)
        new = self.report.add(kept, step, runs)
        if new:
            self._note_modules(new)
        self._arm_after_check(new, traced_step, step)
        self.policy.enforce(kept, step, context)
        return stats

    # ------------------------------------------------------------------ sync="late"
    def resolve_late(self) -> None:
        """Judge the late reads of earlier steps (``sync="late"``).

        A non-finite gradient is a ``nonfinite`` finding dated to its step, enforced now: when it raises, that
        step's update has already been applied (the cost of reading late), and the step being checked has not. An
        all-zero gradient counts in its parameter's idle run at its step but is not judged from the read (telling it
        from a gradient left over from an earlier step, ``zero_grad(set_to_none=False)``, needs that step's autograd
        graph, gone by now): while that run lasts the checks read at once, with their graphs. Each read's stats go
        to :attr:`resolved`.

        Raises:
            GradGuardError: a ``nonfinite`` finding whose action is ``"raise"``.
        """
        reads, self._late = self._late, []
        index = self.index
        for read in reads:
            stats = read.result()
            self.resolved.append((read.tag, read.step, stats))
            self._settle_read(read.step, stats)
            if not stats.nonfinite or index is None:
                continue
            bad = GradStats(stats.params, stats.norms, nonfinite=stats.nonfinite, scale=stats.scale)  # judged already
            found, _ = classify(index, bad, StepFacts(), read.step)
            kept = self.policy.keep(found)
            new = self.report.add(kept, read.step)
            if new:
                self._note_modules(new)
            self.policy.enforce(kept, read.step, (
                f"Parameters got no usable gradient at step {read.step}, read late (sync='late'), after the "
                "optimizer applied that step's update"
            ))  # fmt: skip

    def _present(self, names: list[str]) -> set[str]:
        """Those of ``names`` whose parameter has a gradient now."""
        index = self.index
        if not names or index is None:
            return set()
        out = set()
        for name in names:
            bit = index.bit_of.get(name)
            if bit is not None and index.params[bit].grad is not None:
                out.add(name)
        return out

    def _settle_read(self, step: int, stats: GradStats) -> None:
        """Count ``step``, read late, for the idle runs: an all-zero gradient lacked a usable gradient then
        (whether it is ``zero`` or a leftover is told on the next step, which reads at once); the open runs of the
        others, whose gradient was usable (finite or not), end."""
        index = self.index
        if index is None:
            return
        frozen = set(stats.frozen)
        for i in stats.zero:
            bit = index.index.get(id(stats.params[i]))
            if bit is not None and i not in frozen:
                self.history.lack(index.names[bit], step, "zero")
        names = self.history.open_runs()
        if not names:
            return
        at = {id(p): i for i, p in enumerate(stats.params)}
        zero, missing = set(stats.zero), set(stats.missing)
        usable = set()
        for name in names:
            bit = index.bit_of.get(name)
            i = at.get(id(index.params[bit])) if bit is not None else None
            if i is not None and i not in zero and i not in missing:
                usable.add(name)
        self.history.settle(usable, set(), step)

    def take_resolved(self) -> list[tuple[Any, int, GradStats]]:
        """The ``(tag, step, stats)`` of the late reads judged since the last call."""
        out, self.resolved = self.resolved, []
        return out

    def drop_late(self) -> None:
        """Forget the late reads not judged yet (after an exception)."""
        self._late.clear()
        self.resolved.clear()

    def _runs_of(self, findings: list[Finding]) -> dict[tuple[str, str], tuple[int, int]]:
        """For each finding about a parameter in a run of steps without a usable gradient (``unused``, ``detached``,
        ``zero``): the run's steps the report has not counted yet, and its last step (see
        :meth:`History.count_run`), for :meth:`RunReport.add`. Call it while the runs of this step are open."""
        runs = {}
        for f in findings:
            if f.kind in _RUN_KINDS:
                run = self.history.count_run(f.param)
                if run is not None:
                    runs[f.key] = run
        return runs

    def _note_modules(self, new: list[Finding]) -> None:
        """Report notes for modules all of whose parameters a traced step explained alike (see :func:`module_view`)."""
        assert self.index is not None
        traced = {f.key for f in self.history.known.values()}
        for line in module_view(self.index, [f for f in new if f.key in traced]):
            self.report.note(line)

    def _names_among(self, params: Sequence[torch.Tensor]) -> list[str]:
        index = self.index
        assert index is not None
        return [index.names[index.index[id(p)]] for p in params if id(p) in index.index]

    def _consistency(self, optimizers: Sequence[torch.optim.Optimizer], step: int) -> list[Finding]:
        """``stale`` and ``orphan`` findings of this step: the layout is audited when it changes; on every step only
        the parameters outside every optimizer are looked at."""
        index = self.index
        assert index is not None
        key = tuple(optimizer_layout(opt) for opt in optimizers)
        if key != self._consistency_key:
            self._consistency_key = key
            self._stale, self._outside = audit_layout(index, optimizers, step)
        out = [replace(f, step=step) for f in self._stale] if self._stale else []
        if self._outside:
            out += find_orphans(index, self._outside, step)
        return out

    def _window(
        self,
        found: list[Finding],
        pending: list[tuple[int, str]],
        facts: StepFacts,
        step: int,
        lacking: set[str],
    ) -> tuple[list[Finding], list[tuple[int, str, int]]]:
        """Apply the idle window to the parameters lacking a usable gradient on this step.

        Each such parameter extends its run in :attr:`history` (its name goes into ``lacking``). It stays idle
        (no finding) while the run is shorter than the window, unless a traced step shows a cause that is not
        control flow: a ``detached`` parameter, a zero-derivative op behind an all-zero gradient, or an ``unused``
        one that never had a usable gradient and whose value the step took out of the graph instead of into the
        loss (logged, `.item()`-ed: :meth:`~lightning_gradguard.trace.Tracer.dropped_at`).

        Returns:
            ``(findings, due)``: ``due`` holds ``(bit, reason, first step of the run)`` of untraced candidates
            whose run reached the window.
        """
        index = self.index
        assert index is not None
        history = self.history
        window = history.window
        out: list[Finding] = []
        for f in found:
            if f.kind not in _RUN_KINDS:
                out.append(f)
                continue
            first, run = history.lack(f.param, step, "zero" if f.kind == "zero" else "missing")
            first = first if window > 1 else step
            lacking.add(f.param)
            if facts.traced:
                history.known[f.param] = f
                history.looked.add(f.param)
            if f.kind == "detached" or (f.kind == "zero" and f.where is not None) or self._dropped(f, facts):
                out.append(replace(f, step=first))  # not control flow: at once, for the whole run so far
            elif run >= window:
                out.append(self._dead(f, first, run))
        due: list[tuple[int, str, int]] = []
        for bit, reason in pending:
            name = index.names[bit]
            first, run = history.lack(name, step, reason)
            first = first if window > 1 else step
            lacking.add(name)
            known = history.known.get(name)
            if history.reported(name) and known is not None and (known.kind == "zero") == (reason == "zero"):
                out.append(replace(known, step=first))  # the run is a finding already: it holds on this step too
            elif run >= window:
                due.append((bit, reason, first))
            elif reason == "missing" and name not in history.looked:
                self._probing.add(name)  # a cut that starts now is `detached` at once: let the next trace look
        return out, due

    def _dropped(self, f: Finding, facts: StepFacts) -> bool:
        """``f`` is ``unused``, its parameter never had a usable gradient, and this traced step shows its value put
        to a use other than the loss (``.detach()``-ed to be logged, ``.item()``-ed): its output does not reach the
        loss by design of the code, not because routing or LayerDrop skipped it on this step."""
        if f.kind != "unused" or facts.tracer is None or not facts.traced or not self.history.always_lacked(f.param):
            return False
        bit = self.index.bit_of.get(f.param) if self.index is not None else None
        return bit is not None and bool(facts.tracer.dropped_at(bit))

    def _dead(self, f: Finding, first: int, run: int) -> Finding:
        """``f`` as the finding of a run of ``run`` steps without a usable gradient, dated to its ``first`` step."""
        if self.history.window <= 1:
            return replace(f, step=first)
        return replace(f, step=first, message=(
            f"{f.message} It got no usable gradient on {run} checked steps in a row, from step {first} "
            f"(idle_window={self.history.window})."
        ))  # fmt: skip

    def _settle_pending(
        self, found: list[Finding], due: list[tuple[int, str, int]], facts: StepFacts, step: int, judged: set[str]
    ) -> list[Finding]:
        """Keep untraced candidates for the next (traced) step; explain earlier ones now that it came.

        Only the candidates among ``judged`` (the stepping optimizer's parameters) are settled: another optimizer's
        wait for its own check of the traced step (its parameters' gradients say nothing in this one's ``found``).
        """
        index = self.index
        assert index is not None
        out = list(found)
        if facts.traced and self._pending:
            explained = {f.param for f in found}
            for bit, (first, reason) in list(self._pending.items()):
                name = index.names[bit]
                if name not in judged:
                    continue
                del self._pending[bit]
                self.history.looked.add(name)
                if name in explained:  # the traced step shows the same problem: date it back to its first step
                    out = [replace(f, step=first) if f.param == name else f for f in out]
                elif reason == "zero":
                    out.append(replace(explain_zero(name, bit, StepFacts(), first), message=(
                        f"`{name}` received an all-zero gradient {self._since(first, step)}, but not at the next "
                        "(traced) step."
                    )))  # fmt: skip
                else:
                    then = f"on step {first} only" if self.history.window <= 1 else "on those steps only"
                    out.append(replace(explain_missing(name, bit, facts, first), where=None, message=(
                        f"`{name}` received no gradient {self._since(first, step)}, but did at the next (traced) "
                        f"step: something {then} left it out (a data-dependent branch that skipped it, or a cut taken "
                        "on that step only); set diagnose='always' to name the line."
                    ), kind="unused", hint=HINTS["unused"]))  # fmt: skip
        for bit, reason, first in due:
            name = index.names[bit]
            known = self.history.known.get(name)
            if known is not None and (known.kind == "zero") == (reason == "zero"):
                out.append(self._dead(known, first, self.history.run_length(name)))  # explained before: no trace
            elif self._may_trace(name, known is not None):
                self._pending.setdefault(bit, (first, reason))
            else:  # explained before, or no trace left: say what the gradients show
                untraced = StepFacts(compiled=self.compiled)
                f = (
                    explain_missing(name, bit, untraced, step)
                    if reason == "missing"
                    else explain_zero(name, bit, untraced, step)
                )
                out.append(self._dead(f, first, self.history.run_length(name)))
        return out

    def _since(self, first: int, step: int) -> str:
        if self.history.window <= 1:
            return f"at step {first}"
        return f"on every checked step from {first} to {step - 1} ({self.history.window} in a row)"

    def _may_trace(self, name: str, other_reason: bool = False) -> bool:
        """A trace may still explain ``name``: tracing is possible, and no traced step looked at it (or only at a
        gradient lacking for the other reason, ``other_reason``: all zero instead of none, or the reverse)."""
        if self.diagnose not in ("on_finding", "always") or not self.can_trace:
            return False
        if name in self.history.looked and not other_reason:
            return False
        if self.diagnose == "always":
            return True
        if self.history.traced_steps < MAX_TRACED_STEPS:
            return True
        self._note_budget()
        return False

    def _note_budget(self) -> None:
        history = self.history
        if history.budget_spent is None:
            history.budget_spent = self.checks
            self.report.note(
                f"GradGuard traced {history.traced_steps} steps, its budget under diagnose='on_finding' "
                f"({MAX_TRACED_STEPS}); later findings are explained from gradients alone (set diagnose='always' "
                "to trace every step)."
            )

    def _arm_after_check(self, new: list[Finding], traced_step: bool, step: int) -> None:
        if self.diagnose == "always":
            self._armed = True
        elif self.diagnose == "never" or self.diagnose == "first":
            self._armed = False
        else:  # on_finding: trace the next step when something new turned up that a trace can explain
            explainable = any(f.kind in _TRACE_EXPLAINS for f in new)  # not orphan, stale, frozen, nonfinite
            want = bool(self._pending) or bool(self._probing) or (explainable and not traced_step)
            self._armed = want and self.history.traced_steps < MAX_TRACED_STEPS
            if want and not self._armed:
                self._probing.clear()
                self._note_budget()

    def finish(self, step: int) -> None:
        """End of the run: report candidates still waiting for a traced step as they are, and parameters that got
        no usable gradient on any checked step of a run shorter than the idle window."""
        index = self.index
        if index is None:
            return
        facts = StepFacts(compiled=self.compiled)
        explain = {"missing": explain_missing, "zero": explain_zero}
        findings = []
        for bit, (first, reason) in self._pending.items():
            f = explain[reason](index.names[bit], bit, facts, first)
            known = self.history.known.get(f.param, f)
            findings.append(self._dead(known, first, self.history.run_length(f.param)))
        self._pending.clear()
        short = []  # never usable in a run shorter than the window: warned about, never raised
        window = self.history.window
        for name, first, run, reason in self.history.never_usable():
            bit = index.bit_of.get(name)
            if bit is None or run >= window:
                continue  # reported when the run reached the window
            known = self.history.known.get(name)
            if known is None or (known.kind == "zero") != (reason == "zero"):
                known = explain[reason](name, bit, facts, first)
            short.append(replace(known, step=first, message=(
                f"{known.message} It got no usable gradient on any of the {run} checked steps of the run, fewer "
                f"than idle_window={window}: too few to tell a dead part from one idle by design (routing, "
                "LayerDrop), so this is a warning."
            )))  # fmt: skip
        runs = self._runs_of(findings + short)
        kept = self.policy.keep(findings)
        kept_short = self.policy.keep(short)
        self.short = kept_short
        if not kept and not kept_short:
            return
        self._note_modules(self.report.add(kept + kept_short, step, runs))
        self._warn(kept_short)
        self.policy.enforce(kept, step)

    def unrouted(self, model: nn.Module) -> list[Finding]:
        """Those of :attr:`short` (no usable gradient on any step of a run shorter than the idle window) whose part
        does not look routed: not an item of an ``nn.ModuleList``/``nn.ModuleDict`` another item of whose class got
        a usable gradient on some step (as experts, LayerDrop layers and heads chosen per batch do, taking turns).
        Nothing in the run took turns with such a part: a module never called, or whose output is dropped, is dead
        rather than idle (the verdict of ``gradguard check``, whose few steps cannot wait for the window)."""
        if not self.short:
            return []
        history = self.history
        never = {name for name, *_ in history.never_usable()}
        usable = [name for name in history.checked() if name not in never]
        alike = alike_items(model)

        def routed(name: str) -> bool:
            parts = name.split(".")[:-1]
            for k in range(len(parts), 0, -1):  # the parameter's module, then each module above it
                others = [m for m in alike.get(".".join(parts[:k]), ()) if m != ".".join(parts[:k])]
                if any(n.startswith(f"{m}.") for m in others for n in usable):
                    return True
            return False

        return [f for f in self.short if not routed(f.param)]

    def _warn(self, findings: list[Finding]) -> None:
        """Warn once per group of ``findings`` (as :meth:`Policy.enforce` does), whatever their kind's action."""
        new = [f for f in findings if f.key not in self.policy.warned]
        for group in group_findings(new, self.policy.sizes):
            self.policy.warned.update(f.key for f in group.findings)
            text = "GradGuard: " + "\n".join(group.lines())
            warnings.warn(text, GradGuardWarning, stacklevel=user_stacklevel(2))

    @property
    def findings(self) -> list[Finding]:
        return self.report.findings
