"""The guard's step logic, shared by the Lightning callback and ``check_step``: one optimizer step, top to bottom.

:meth:`GuardCore.check` reads as the step's data path::

    measure (fused pass) -> facts (graph walk, tracer) -> classify (auditor) -> schedule (idle window, traces)
        -> policy (keep / raise / warn once) -> report

Adapters call :meth:`GuardCore.begin_batch` / :meth:`GuardCore.end_batch` around forward passes,
:meth:`GuardCore.record_loss` before each backward and :meth:`GuardCore.check` before each optimizer step. What the
guard remembers across steps is in :class:`~lightning_gradguard.history.History`; when a missing gradient becomes a
finding, and which steps are traced, in :class:`~lightning_gradguard.schedule.Schedule`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _compat
from ._frames import user_stacklevel
from .audit import StepFacts, audit_layout, classify, explain_missing, find_orphans, walk_graph
from .findings import Finding, GradGuardError, group_findings
from .history import History
from .measure import GradStats, LateRead, measure_grads, start_late_read
from .params import ParamIndex, ParamList, alike_items, optimizer_layout, optimizer_params
from .policy import GradGuardWarning, Policy
from .report import RunReport
from .schedule import RUN_KINDS, Schedule
from .trace import EagerStance, LossFacts, Tracer

if TYPE_CHECKING:
    from .distributed import RankSync

__all__ = ["GuardCore"]


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


class GuardCore:
    """Per-run state of a guard: the parameter index, the tracer, the losses of the current step, the report.

    Args:
        policy: what to do with findings.
        diagnose: which steps to trace (see :class:`~lightning_gradguard.schedule.Schedule`).
        idle_window: a parameter without a usable gradient on fewer than this many checked steps in a row is idle
            (counted in :meth:`History.idle_shares`), not a finding; ``1`` judges each step at once.
    """

    def __init__(self, policy: Policy, diagnose: str = "on_finding", idle_window: int = 1) -> None:
        self.policy = policy
        self.diagnose = diagnose
        self.history = History()
        self.report = RunReport()
        self.report.idle_provider = self.history.idle_shares
        self.schedule = Schedule(self.history, diagnose, idle_window, can_trace=self.can_trace,
                                 note=self.report.note)  # fmt: skip
        self.index: ParamIndex | None = None
        self.tracer: Tracer | None = None
        #: The model runs code compiled by ``torch.compile`` that the tracer cannot follow (torch < 2.6 only).
        self.compiled = False
        self._losses: list[_Loss] = []
        # An optimizer judged the losses: they stay for the other optimizers stepping on the same backward, and are
        # dropped at the next backward or at the end of the batch.
        self._checked = False
        #: Set by :meth:`finish`: parameters without a usable gradient on every checked step of a run shorter than
        #: the idle window (warned about, never raised).
        self.short: list[Finding] = []
        self._consistency_key: tuple[Any, ...] | None = None
        self._stale: list[Finding] = []  # stale tensors of the current optimizer layout
        self._outside: list[int] = []  # bits of the parameters no optimizer of the current layout holds
        self._params_cache: dict[int, tuple[Any, ParamList]] = {}
        #: Under distributed training, agrees facts and decisions with the other ranks (see distributed.py);
        #: ``None`` in a single process, which then runs no collective.
        self.dist: RankSync | None = None
        self._late: list[LateRead] = []  # sync="late": reads of earlier steps, judged at the next check
        #: ``(tag, step, stats)`` of the late reads judged since the caller last took them (:meth:`pop_resolved`).
        self.resolved: list[tuple[Any, int, GradStats]] = []

    # ------------------------------------------------------------------ setup
    def bind(self, model: nn.Module, *, on_backward: Any = None) -> None:
        """Index ``model``'s parameters (again, if they changed) and make a tracer for them."""
        # A traced step runs compiled code eagerly (see `EagerStance`); torch < 2.6 cannot, and then steps aside.
        self.compiled = not EagerStance.supported and _compat.is_compiled(model)
        if not Tracer.supported and self.diagnose != "never":
            _compat.warn_missing("torch.overrides._push_mode")
        index = ParamIndex.of(model)
        if self.index is not None and self.index.params == index.params:
            return
        if self.tracer is not None:
            self.tracer.stop()
        self.index = index
        self.tracer = Tracer(index, on_backward=on_backward)
        self._consistency_key = None
        self.report.set_model(index.names, [p.numel() for p in index.params], self.policy)  # to group findings
        self.schedule.bind(index.names)

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
    def checks(self) -> int:
        """Optimizer steps judged so far."""
        return self.schedule.checks

    def can_trace(self) -> bool:
        """The tracer can follow the model's parameters (not when FSDP swaps them, nor through torch.compile on
        torch < 2.6, which cannot run compiled code eagerly for a traced step)."""
        return Tracer.supported and not self.compiled and (self.dist is None or self.dist.traceable)

    @property
    def tracing(self) -> bool:
        """The tracer is recording right now."""
        return self.tracer is not None and self.tracer.active and not self.tracer.paused

    # ------------------------------------------------------------------ forward
    def begin_batch(self) -> None:
        """Start tracing if this step is to be diagnosed."""
        if self.schedule.armed and self.tracer is not None and self.can_trace():
            self.tracer.paused = False
            self.tracer.start()

    def pause(self) -> None:
        """Stop recording until :meth:`resume` or the next :meth:`begin_batch` (backward and the optimizer step)."""
        if self.tracer is not None:
            self.tracer.paused = True

    def resume(self) -> None:
        """Record again after :meth:`pause` (more forward passes follow in the same step)."""
        if self.tracer is not None:
            self.tracer.paused = False

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
                path was cut, and where. Under distributed training, every rank raises at once when some rank's
                loss has no graph, or (DDP with ``find_unused_parameters=False``) some rank's loss does not reach
                a parameter DDP synchronises.
        """
        if self._checked:  # a new backward after an optimizer step (a GAN's second loss): a new group of losses
            self._drop_losses()
        facts = self.tracer.facts(loss) if self.tracing and self.tracer is not None else None
        self._losses.append(_Loss(loss.grad_fn, facts, weakref.ref(loss)))
        why = self._loss_step_facts(facts)
        error = self._detached_loss_error(facts, why, step) if loss.grad_fn is None and not loss.requires_grad else None
        if self.dist is not None:  # before any rank enters backward: decide with the others, raise together
            assert self.index is not None, "GuardCore.bind() first"
            agreed = self.dist.before_backward(self.index, loss, facts, step, error, why, self.policy.sizes)
            for note in agreed.notes:
                self.report.note(note)
            if agreed.error is not None:
                self.report.agree(agreed.error.findings, own=error.findings if error is not None else ())
                raise agreed.error
        if error is not None:
            raise error

    def _loss_step_facts(self, facts: LossFacts | None) -> StepFacts:
        """What explains a missing gradient of this loss's parameters: the trace, or that there is none."""
        if facts is None or self.tracer is None:
            return StepFacts(compiled=self.compiled)
        return StepFacts(dep=facts.dep, cuts=facts.cuts, seen=self.tracer.seen, tracer=self.tracer)

    def _detached_loss_error(self, facts: LossFacts | None, why: StepFacts, step: int) -> GradGuardError:
        index = self.index
        findings: list[Finding] = []
        if facts is not None and index is not None:
            for bit in index.bits(facts.dep):
                if index.params[bit].requires_grad:
                    findings.append(explain_missing(index.names[bit], bit, why, step))
        head = (
            'The loss does not require grad, so `backward()` would fail with "element 0 of tensors does '
            'not require grad and does not have a grad_fn".'
        )
        if facts is None:
            if self.can_trace():
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
                (:func:`~lightning_gradguard.measure.amp_scale`) is read in the same transfer as the norms.
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
        schedule, history = self.schedule, self.history
        fed = bool(self._losses)  # a backward fed this step (or an earlier optimizer's check of the same backward)
        traced_step = fed and all(loss.facts is not None for loss in self._losses)
        # measure: one fused pass (or a late read, started now)
        read = None
        if (late and fed and scaler is None and not isinstance(scale, torch.Tensor) and self.dist is None
                and not (schedule.pending or history.zero_run or traced_step)):  # fmt: skip
            read = start_late_read(params, step, float(scale), tag)
        stats = self._measure(params, scale, read)
        if not fed and params and len(stats.missing) + len(stats.zero) == len(params):
            stats.skipped = True  # nothing was computed for this step: nothing to judge (and nothing to trace)
            return stats
        schedule.count_check(traced_step and not self._checked)  # several optimizers on one backward: one trace
        judged = history.count_check(params, self._names_among, step)
        findings = self._consistency(optimizers, step) if optimizers else []
        lacking: set[str] = set()
        if not stats.clean or schedule.pending:
            # facts: what the losses' graphs reach, and what the tracer saw
            facts = self.step_facts(need_received=bool(stats.zero))
            if self.dist is not None:
                facts = self.dist.merge_facts(facts)
            # classify, then the idle window and the traced steps
            overflow_ok = bool(stats.nonfinite) and scaler is not None and _current_scale(scaler, stats, scale) > 1.0
            sharded = self.dist is not None and bool(self.dist.sharded)
            found, candidates = classify(index, stats, facts, step, overflow_ok=overflow_ok, defer=schedule.defers,
                                         skip_empty=not sharded)  # fmt: skip
            findings += schedule.judge(index, found, candidates, facts, step, judged, lacking)
        if read is not None:  # a gradient is there, but whether it is usable is known when the read comes in
            lacking |= self._present(history.open_runs())
        runs = self._runs_of(findings)
        history.settle(judged, lacking, step)
        self._release_losses()
        if self.dist is not None:
            findings = self.dist.combine(findings, step)
        # policy and report
        kept = self.policy.keep(findings)
        new = self.report.add(kept, step, runs)
        if new:
            self._note_modules(new)
        schedule.arm(new, traced_step)
        self.policy.enforce(kept, step, context)
        return stats

    def _measure(self, params: Sequence[torch.Tensor], scale: float | torch.Tensor, read: LateRead | None) -> GradStats:
        """The gradients' stats: from the fused pass (over the shards of every rank under FSDP), or, for a late
        read, what the host knows now (missing and frozen; the values come later)."""
        if read is not None:
            self._late.append(read)
            stats = read.host
        elif self.dist is None:
            stats = measure_grads(params, scale)
        else:
            if isinstance(scale, torch.Tensor) and self.dist.sharded is not None:
                scale = float(scale)  # the sharded pass divides by a number (it runs a collective anyway)
            stats = self.dist.measure_grads(params, scale)
        if not isinstance(scale, torch.Tensor):
            stats.scale = float(scale)
        return stats

    def _release_losses(self) -> None:
        """The losses were judged: hold their graphs no longer (they stay for other optimizers on the same
        backward, and a later optimizer's check walks them through weak references)."""
        self._checked = bool(self._losses)
        for loss in self._losses:  # (freeing a deep graph here would cost ~1 µs per node inside the hook)
            loss.release()

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

    def _runs_of(self, findings: list[Finding]) -> dict[tuple[str, str], tuple[int, int]]:
        """For each finding about a parameter in a run of steps without a usable gradient (``unused``, ``detached``,
        ``zero``): the run's steps the report has not counted yet, and its last step (see
        :meth:`History.count_run`), for :meth:`RunReport.add`. Call it while the runs of this step are open."""
        runs = {}
        for f in findings:
            if f.kind in RUN_KINDS:
                run = self.history.count_run(f.param)
                if run is not None:
                    runs[f.key] = run
        return runs

    def _note_modules(self, new: list[Finding]) -> None:
        """Report notes for modules all of whose parameters a traced step explained alike (see
        :meth:`RunReport.note_modules`)."""
        index = self.index
        assert index is not None
        traced = {f.key for f in self.schedule.known.values()}
        explained = [f for f in new if f.key in traced]
        if explained:
            trainable = [name for name, p in zip(index.names, index.params, strict=True) if p.requires_grad]
            self.report.note_modules(explained, trainable)

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
                self.history.record_unusable(index.names[bit], step, "zero")
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

    def pop_resolved(self) -> list[tuple[Any, int, GradStats]]:
        """The ``(tag, step, stats)`` of the late reads judged since the last call."""
        out, self.resolved = self.resolved, []
        return out

    def drop_late(self) -> None:
        """Forget the late reads not judged yet (after an exception)."""
        self._late.clear()
        self.resolved.clear()

    # ------------------------------------------------------------------ end of the run
    def finish(self, step: int) -> None:
        """End of the run: report candidates still waiting for a traced step as they are, and parameters that got
        no usable gradient on any checked step of a run shorter than the idle window (warned about, never raised)."""
        index = self.index
        if index is None:
            return
        findings, short = self.schedule.finish(index, StepFacts(compiled=self.compiled))
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
        never = {name for name, _ in history.never_usable()}
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain values: ``{"history": ..., "pending": [[name, first step, reason], ...]}`` (the layout of earlier
        versions' checkpoints: the schedule's counters sit in ``history``)."""
        schedule = self.schedule.state_dict()
        pending = schedule.pop("pending")
        return {"history": {**self.history.state_dict(), **schedule}, "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (older checkpoints may lack either key)."""
        history = state.get("history")
        if history is not None:
            self.history.load_state_dict(history)
            self.schedule.load_state_dict({**history, "pending": state.get("pending", [])})
        else:
            self.schedule.load_state_dict({"pending": state.get("pending", [])})
        if self.index is not None:
            self.schedule.bind(self.index.names)
