"""When a parameter without a usable gradient becomes a finding, and which steps are traced to explain it.

:class:`Schedule` holds the idle window, the candidates waiting for a traced step and the trace budget, as plain data
that ``state_dict`` saves; it reads and extends :class:`~lightning_gradguard.history.History`.

**Idle is not dead.** A trainable parameter with no usable gradient on a step (``grad is None`` or all zero) is
*idle* on that step while its current run of such steps is shorter than ``window`` checked steps (counting from the
start of training); once the run reaches ``window`` it is a finding (``unused``, ``zero``). Routing that sends no
token to an expert, LayerDrop and stochastic depth make parts idle on some steps and train fine; a part that gets
nothing on ``window`` checked steps in a row, from the first step on, is dead. A run of fit shorter than the window
reports, at its end, the parameters that got no usable gradient on any of its steps. Not control flow, so reported
at once whatever the window: ``detached`` (a traced step shows the loss depends on the parameter through a cut),
an all-zero gradient that a traced step blames on a zero-derivative op, and a part that never had a usable gradient
whose output a traced step shows logged or ``.item()``-ed instead of used in the loss. Under DDP with
``find_unused_parameters=False`` a skipped parameter is named at once by ``distributed.py`` (DDP itself would fail
on the next step).

With the default ``window = 16``, a LayerDrop-0.1 layer (dropped on each step independently with probability 0.1)
has a run of 16 drops starting at a given step with probability ``0.9 * 0.1**16 = 9e-17``; over a million steps
the chance of a false alarm is about ``1e6 * 9e-17 = 9e-11`` per layer (2e-9 for a 24-layer wav2vec2). A part
dropped with probability ``p`` has about ``1e6 * (1 - p) * p**16`` false alarms in a million steps: 3e-3 for
``p = 0.3``, 8 for ``p = 0.5`` (raise ``idle_window`` for such models: 40 brings ``p = 0.5`` to 5e-7).

A persistently idle part (a dead expert after a routing collapse) gets no warning of its own: idle on 95 % of
steps, a run of 16 (``0.95**16 = 0.44`` at each start) comes within a few dozen steps and makes it a finding; below
that, its share in :meth:`History.idle_shares` (the run report, and TensorBoard) shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from .audit import StepFacts, explain_missing, explain_zero
from .findings import HINTS, Finding
from .history import History
from .params import ParamIndex

__all__ = ["MAX_TRACED_STEPS", "RUN_KINDS", "Schedule"]

#: Under ``diagnose="on_finding"`` a run traces at most this many optimizer steps (the first included).
MAX_TRACED_STEPS = 8

#: Kinds of finding about a run of checked steps without a usable gradient: the idle window applies to them, and the
#: run report counts every step of the run.
RUN_KINDS = frozenset({"unused", "detached", "zero"})

#: Kinds a traced step can say more about (the cut line, the zero-derivative op); a new finding of another kind on an
#: untraced step does not make the next step traced under ``diagnose="on_finding"``.
_TRACE_EXPLAINS = frozenset({"unused", "detached", "zero"})

_EXPLAIN = {"missing": explain_missing, "zero": explain_zero}


class Schedule:
    """The idle window and the traced steps of one run.

    Args:
        history: the per-parameter memory it reads and extends (runs without a usable gradient).
        diagnose: which steps to trace: ``"first"`` (the first optimizer step), ``"on_finding"`` (the first, and
            the step after a parameter never explained before newly lacks a usable gradient on an untraced step;
            at most :data:`MAX_TRACED_STEPS` steps in a run), ``"always"``, ``"never"``.
        window: a parameter without a usable gradient on fewer than this many checked steps in a row is idle, not a
            finding; ``1`` judges each step at once.
        can_trace: whether the tracer can follow the model now (not under FSDP, nor on torch < 2.6 with compiled
            code).
        note: adds a note to the run report (the trace budget was spent).

    Attributes:
        armed: the next step is to be traced.
        pending: candidates waiting for a traced step: ``{name: (first step of its run, "missing" | "zero")}``.
        checks: checked optimizer steps so far.
        traced_steps: optimizer steps whose forward pass was traced.
        budget_spent: the check (counting from 1) at which :data:`MAX_TRACED_STEPS` first stopped a trace that was
            wanted, or ``None``.
        looked: parameters a traced step looked at while (or just after) they lacked a usable gradient.
        known: what a traced step found for a parameter lacking a usable gradient (reused instead of tracing again).
    """

    def __init__(
        self,
        history: History,
        diagnose: str,
        window: int,
        *,
        can_trace: Callable[[], bool],
        note: Callable[[str], None],
    ) -> None:
        self.history = history
        self.diagnose = diagnose
        self.window = window
        self._can_trace = can_trace
        self._note = note
        self.armed = diagnose != "never"
        self.pending: dict[str, tuple[int, str]] = {}
        self._probing: set[str] = set()  # newly idle parameters the next traced step is to look at
        self.checks = 0
        self.traced_steps = 0
        self.budget_spent: int | None = None
        self.looked: set[str] = set()
        self.known: dict[str, Finding] = {}

    @property
    def defers(self) -> bool:
        """A parameter lacking a usable gradient on an untraced step waits for a traced one (see
        :func:`~lightning_gradguard.audit.classify`'s ``defer``)."""
        return self.diagnose in ("on_finding", "always") and self._can_trace()

    def bind(self, names: Sequence[str]) -> None:
        """The model's parameters are ``names`` now: forget candidates that are not among them, and trace the next
        step for the others (restored from a checkpoint, say)."""
        known = set(names)
        self.pending = {name: entry for name, entry in self.pending.items() if name in known}
        if self.pending and self.diagnose in ("on_finding", "always"):
            self.armed = True

    def count_check(self, traced: bool) -> None:
        """A step is judged; ``traced``: its forward pass was traced (counted once for several optimizers)."""
        self.checks += 1
        if traced:
            self.traced_steps += 1

    # ------------------------------------------------------------------ per step
    def judge(
        self,
        index: ParamIndex,
        found: list[Finding],
        candidates: list[tuple[int, str]],
        facts: StepFacts,
        step: int,
        judged: set[str],
        lacking: set[str],
    ) -> list[Finding]:
        """The findings of this step among ``found`` (classified) and ``candidates`` (``(bit, reason)`` left for a
        traced step by :func:`~lightning_gradguard.audit.classify`), after the idle window and the traced steps.

        Each parameter lacking a usable gradient extends its run (its name goes into ``lacking``). It stays idle (no
        finding) while the run is shorter than the window, unless a traced step shows a cause that is not control
        flow: a ``detached`` parameter, a zero-derivative op behind an all-zero gradient, or an ``unused`` one that
        never had a usable gradient and whose value the step took out of the graph instead of into the loss (logged,
        `.item()`-ed: :meth:`~lightning_gradguard.trace.Tracer.dropped_at`). A run that reaches the window on an
        untraced step waits for a traced one (:attr:`pending`) while a trace may explain it; the candidates among
        ``judged`` (the stepping optimizer's parameters) are explained once it comes.
        """
        found, due = self._window(index, found, candidates, facts, step, lacking)
        return self._settle(index, found, due, facts, step, judged)

    def _window(
        self,
        index: ParamIndex,
        found: list[Finding],
        candidates: list[tuple[int, str]],
        facts: StepFacts,
        step: int,
        lacking: set[str],
    ) -> tuple[list[Finding], list[tuple[str, str, int]]]:
        """``(findings, due)``: ``due`` holds ``(name, reason, first step of the run)`` of the untraced candidates
        whose run reached the window."""
        history = self.history
        window = self.window
        out: list[Finding] = []
        for f in found:
            if f.kind not in RUN_KINDS:
                out.append(f)
                continue
            run = history.record_unusable(f.param, step, "zero" if f.kind == "zero" else "missing")
            first = run.first if window > 1 else step
            lacking.add(f.param)
            if facts.traced:
                self.known[f.param] = f
                self.looked.add(f.param)
            if f.kind == "detached" or (f.kind == "zero" and f.where is not None) or self._dropped(index, f, facts):
                out.append(replace(f, step=first))  # not control flow: at once, for the whole run so far
            elif run.length >= window:
                out.append(self._dead(f, first, run.length))
        due: list[tuple[str, str, int]] = []
        for bit, reason in candidates:
            name = index.names[bit]
            run = history.record_unusable(name, step, reason)
            first = run.first if window > 1 else step
            lacking.add(name)
            known = self.known.get(name)
            if history.reported(name) and known is not None and (known.kind == "zero") == (reason == "zero"):
                out.append(replace(known, step=first))  # the run is a finding already: it holds on this step too
            elif run.length >= window:
                due.append((name, reason, first))
            elif reason == "missing" and name not in self.looked:
                self._probing.add(name)  # a cut that starts now is `detached` at once: let the next trace look
        return out, due

    def _dropped(self, index: ParamIndex, f: Finding, facts: StepFacts) -> bool:
        """``f`` is ``unused``, its parameter never had a usable gradient, and this traced step shows its value put
        to a use other than the loss (``.detach()``-ed to be logged, ``.item()``-ed): its output does not reach the
        loss by design of the code, not because routing or LayerDrop skipped it on this step."""
        if f.kind != "unused" or facts.tracer is None or not facts.traced or not self.history.always_lacked(f.param):
            return False
        bit = index.bit_of.get(f.param)
        return bit is not None and bool(facts.tracer.dropped_at(bit))

    def _settle(
        self,
        index: ParamIndex,
        found: list[Finding],
        due: list[tuple[str, str, int]],
        facts: StepFacts,
        step: int,
        judged: set[str],
    ) -> list[Finding]:
        """Keep untraced candidates for the next (traced) step; explain earlier ones now that it came.

        Only the candidates among ``judged`` (the stepping optimizer's parameters) are settled: another optimizer's
        wait for its own check of the traced step (its parameters' gradients say nothing in this one's ``found``).
        """
        out = list(found)
        if facts.traced and self.pending:
            explained = {f.param for f in found}
            for name, (first, reason) in list(self.pending.items()):
                if name not in judged:
                    continue
                del self.pending[name]
                self.looked.add(name)
                bit = index.bit_of[name]
                if name in explained:  # the traced step shows the same problem: date it back to its first step
                    out = [replace(f, step=first) if f.param == name else f for f in out]
                elif reason == "zero":
                    out.append(replace(explain_zero(name, bit, StepFacts(), first), message=(
                        f"`{name}` received an all-zero gradient {self._since(first, step)}, but not at the next "
                        "(traced) step."
                    )))  # fmt: skip
                else:
                    then = f"on step {first} only" if self.window <= 1 else "on those steps only"
                    out.append(replace(explain_missing(name, bit, facts, first), where=None, message=(
                        f"`{name}` received no gradient {self._since(first, step)}, but did at the next (traced) "
                        f"step: something {then} left it out (a data-dependent branch that skipped it, or a cut taken "
                        "on that step only); set diagnose='always' to name the line."
                    ), kind="unused", hint=HINTS["unused"]))  # fmt: skip
        for name, reason, first in due:
            known = self.known.get(name)
            if known is not None and (known.kind == "zero") == (reason == "zero"):
                out.append(self._dead(known, first, self.history.run_length(name)))  # explained before: no trace
            elif self._may_trace(name, known is not None):
                self.pending.setdefault(name, (first, reason))
            else:  # explained before, or no trace left: say what the gradients show
                f = _EXPLAIN[reason](name, index.bit_of[name], StepFacts(compiled=facts.compiled), step)
                out.append(self._dead(f, first, self.history.run_length(name)))
        return out

    def _dead(self, f: Finding, first: int, length: int) -> Finding:
        """``f`` as the finding of a run of ``length`` steps without a usable gradient, dated to its ``first`` step."""
        if self.window <= 1:
            return replace(f, step=first)
        return replace(f, step=first, message=(
            f"{f.message} It got no usable gradient on {length} checked steps in a row, from step {first} "
            f"(idle_window={self.window})."
        ))  # fmt: skip

    def _since(self, first: int, step: int) -> str:
        if self.window <= 1:
            return f"at step {first}"
        return f"on every checked step from {first} to {step - 1} ({self.window} in a row)"

    def _may_trace(self, name: str, other_reason: bool = False) -> bool:
        """A trace may still explain ``name``: tracing is possible, and no traced step looked at it (or only at a
        gradient lacking for the other reason, ``other_reason``: all zero instead of none, or the reverse)."""
        if not self.defers:
            return False
        if name in self.looked and not other_reason:
            return False
        if self.diagnose == "always":
            return True
        if self.traced_steps < MAX_TRACED_STEPS:
            return True
        self._spend_budget()
        return False

    def _spend_budget(self) -> None:
        """The budget stopped a trace that was wanted: say so in the run report, once."""
        if self.budget_spent is None:
            self.budget_spent = self.checks
            self._note(
                f"GradGuard traced {self.traced_steps} steps, its budget under diagnose='on_finding' "
                f"({MAX_TRACED_STEPS}); later findings are explained from gradients alone (set diagnose='always' "
                "to trace every step)."
            )

    def arm(self, new: list[Finding], traced_step: bool) -> None:
        """After a check (``new``: its findings new to the report): whether the next step is traced."""
        if traced_step and self._probing:
            self.looked |= self._probing
            self._probing.clear()
        if self.diagnose == "always":
            self.armed = True
        elif self.diagnose == "never" or self.diagnose == "first":
            self.armed = False
        else:  # on_finding: trace the next step when something new turned up that a trace can explain
            explainable = any(f.kind in _TRACE_EXPLAINS for f in new)  # not orphan, stale, frozen, nonfinite
            want = bool(self.pending) or bool(self._probing) or (explainable and not traced_step)
            self.armed = want and self.traced_steps < MAX_TRACED_STEPS
            if want and not self.armed:
                self._probing.clear()
                self._spend_budget()

    # ------------------------------------------------------------------ end of the run
    def finish(self, index: ParamIndex, facts: StepFacts) -> tuple[list[Finding], list[Finding]]:
        """End of the run: ``(the candidates still waiting for a traced step, as they are; the parameters that got
        no usable gradient on any checked step of a run shorter than the window)``, explained with ``facts``
        (untraced)."""
        findings = []
        for name, (first, reason) in self.pending.items():
            bit = index.bit_of.get(name)
            if bit is None:
                continue
            f = _EXPLAIN[reason](name, bit, facts, first)
            known = self.known.get(name, f)
            findings.append(self._dead(known, first, self.history.run_length(name)))
        self.pending.clear()
        short = []  # never usable in a run shorter than the window: warned about, never raised
        window = self.window
        for name, run in self.history.never_usable():
            bit = index.bit_of.get(name)
            if bit is None or run.length >= window:
                continue  # reported when the run reached the window
            known = self.known.get(name)
            if known is None or (known.kind == "zero") != (run.reason == "zero"):
                known = _EXPLAIN[run.reason](name, bit, facts, run.first)
            short.append(replace(known, step=run.first, message=(
                f"{known.message} It got no usable gradient on any of the {run.length} checked steps of the run, "
                f"fewer than idle_window={window}: too few to tell a dead part from one idle by design (routing, "
                "LayerDrop)."
            )))  # fmt: skip
        return findings, short

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain values: the tracing counters, what traced steps explained, and the candidates waiting for one
        (``pending``: ``[name, first step, reason]`` rows)."""
        return {
            "window": self.window,
            "traced_steps": self.traced_steps,
            "budget_spent": self.budget_spent,
            "looked": sorted(self.looked),
            "known": [f.to_dict() for f in self.known.values()],
            "pending": [[name, first, reason] for name, (first, reason) in self.pending.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys take their defaults; the window stays this run's option). The
        candidates wait for :meth:`bind` to check their names against the model."""
        self.traced_steps = int(state.get("traced_steps", 0))
        spent = state.get("budget_spent")
        self.budget_spent = None if spent is None else int(spent)
        self.looked = set(state.get("looked", []))
        self.known = {}
        for row in state.get("known", []):
            f = Finding.from_dict(row)
            self.known[f.param] = f
        self.pending = {str(name): (int(first), str(reason)) for name, first, reason in state.get("pending", [])}
