"""What the guard remembers about each parameter across optimizer steps: its checked steps, idle steps and open run.

Plain data keyed by parameter name, so that :meth:`History.state_dict` survives a resume (and a model rebuilt with
the same names). Work per step is proportional to the parameters lacking a usable gradient, never to all of them.
What a run of steps without a usable gradient becomes (idle, a finding now, or a candidate for a traced step) is
decided by :class:`~lightning_gradguard.schedule.Schedule`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .params import module_of

__all__ = ["History", "Run"]


@dataclass(slots=True)
class Run:
    """A parameter's current run of checked steps without a usable gradient.

    Attributes:
        first: the run's first step.
        length: its checked steps (a step checked twice counts once).
        reason: why the gradient was not usable on its last step: ``"missing"`` (``None``) or ``"zero"``.
        last: its last step.
        counted: how many of its steps the run report counted (0: the run is not a finding yet).
    """

    first: int
    length: int = 0
    reason: str = "missing"
    last: int | None = None
    counted: int = 0


@dataclass(slots=True)
class _Group:
    """A parameter list the guard checks (an optimizer's): its names, and how many distinct steps checked it."""

    names: list[str]
    members: set[str]
    checks: int = 0
    last: int | None = None


class _Counts(NamedTuple):
    """A parameter's counts from before a resume."""

    checked: int
    idle: int


class History:
    """Per-parameter memory of one run: checked steps, steps without a usable gradient, and the open runs of them."""

    def __init__(self) -> None:
        self._groups: dict[tuple[int, int, int], _Group] = {}
        self._base: dict[str, _Counts] = {}  # restored from a checkpoint
        self._idle: dict[str, int] = {}  # name -> checked steps without a usable gradient
        self._runs: dict[str, Run] = {}

    # ------------------------------------------------------------------ per step
    def count_check(self, params: Sequence[torch.Tensor], names_of: Callable[[Sequence[torch.Tensor]], Any],
                    step: int) -> set[str]:  # fmt: skip
        """Count checked step ``step`` of ``params`` (once, however often it is checked: LBFGS evaluates its closure
        several times per step); return their names (cached per parameter list).

        ``names_of(params)`` gives the names of the model's parameters among ``params``; it is called only for a
        parameter list not seen before.
        """
        key = (id(params), len(params), id(params[0]) if params else 0)
        group = self._groups.get(key)
        if group is None:
            names = list(names_of(params))
            group = self._groups[key] = _Group(names, set(names))
        if group.last != step:
            group.checks += 1
            group.last = step
        return group.members

    def record_unusable(self, name: str, step: int, reason: str = "missing") -> Run:
        """``name`` has no usable gradient on checked step ``step`` (``reason``: ``"missing"`` or ``"zero"``): its
        run, extended by the step (a step counts once, however often it is checked)."""
        run = self._runs.get(name)
        if run is None:
            run = self._runs[name] = Run(step)
        run.reason = reason
        if run.last != step:
            self._idle[name] = self._idle.get(name, 0) + 1
            run.length += 1
            run.last = step
        return run

    def count_run(self, name: str) -> tuple[int, int] | None:
        """``(steps of name's current run not counted before, the run's last step)``, and the whole run counted from
        now on; ``None`` when ``name`` has no open run (it had a usable gradient on its last checked step).

        A finding about a run of steps without a usable gradient held on each of them: the run report counts the
        run's steps when the run first becomes a finding, and each further step as it comes.
        """
        run = self._runs.get(name)
        if run is None:
            return None
        new = run.length - run.counted
        run.counted = run.length
        return new, run.last  # type: ignore[return-value]

    def reported(self, name: str) -> bool:
        """``name``'s current run is a finding already (the run report counted its steps)."""
        run = self._runs.get(name)
        return run is not None and run.counted > 0

    def run_length(self, name: str) -> int:
        """Checked steps in a row on which ``name`` lacked a usable gradient, up to its last check (0: none)."""
        run = self._runs.get(name)
        return run.length if run else 0

    def always_lacked(self, name: str) -> bool:
        """``name`` lacked a usable gradient on every one of its checked steps (those before a resume included)."""
        run = self._runs.get(name)
        if run is None:
            return False
        base = self._base.get(name)
        checked = (base.checked if base else 0) + sum(g.checks for g in self._groups.values() if name in g.members)
        return run.length >= checked

    def never_usable(self) -> list[tuple[str, Run]]:
        """``(name, run)`` of the parameters that had no usable gradient on any of their checked steps."""
        if not self._runs:
            return []
        checked = self.checked()
        return [(n, run) for n, run in self._runs.items() if run.length >= checked.get(n, 0)]

    def settle(self, judged: set[str], lacking: set[str], step: int) -> None:
        """End the runs of parameters judged on ``step`` that have a usable gradient again (not of those that lacked
        one on an earlier check of the same step: a step lacks a gradient if any of its checks does)."""
        if not self._runs:
            return
        for name in [n for n, run in self._runs.items() if n in judged and n not in lacking and run.last != step]:
            del self._runs[name]

    def open_runs(self) -> list[str]:
        """The parameters whose run without a usable gradient is open (few: those lacking one lately)."""
        return list(self._runs)

    @property
    def zero_run(self) -> bool:
        """Some parameter's gradient was all zero on its last checked step (a run of them is open)."""
        return any(run.reason == "zero" for run in self._runs.values())

    # ------------------------------------------------------------------ reading
    def checked(self) -> dict[str, int]:
        """Checked steps per parameter name (those before a resume included)."""
        out = {name: counts.checked for name, counts in self._base.items()}
        for group in self._groups.values():
            for name in group.names:
                out[name] = out.get(name, 0) + group.checks
        return out

    def idle_shares(self, exclude: Collection[str] = ()) -> dict[str, float]:
        """Per module, the share of its checked steps on which it got no usable gradient; only idle modules.

        A module's share pools its own parameters (``idle steps / checked steps``). A module whose every parameter
        below it has the same counts is shown once, under the highest such name (``encoder.layers.3`` rather than
        each of its linear layers). Modules never idle are left out. ``""`` is the root module.

        Args:
            exclude: parameter names left out (those already reported as findings: dead, not idle).
        """
        checked = self.checked()
        if exclude:
            checked = {name: n for name, n in checked.items() if name not in exclude}
        idle = {name: counts.idle for name, counts in self._base.items()}
        for name, n in self._idle.items():
            idle[name] = idle.get(name, 0) + n
        if not any(idle.values()):
            return {}
        counts = {name: (idle.get(name, 0), n) for name, n in checked.items() if n}
        below: dict[str, set[tuple[int, int]]] = {}  # module prefix -> the distinct counts of the params under it
        for name, c in counts.items():
            parts = name.split(".")[:-1]
            for k in range(len(parts) + 1):
                below.setdefault(".".join(parts[:k]), set()).add(c)
        pooled: dict[str, list[int]] = {}
        for name, (i, n) in counts.items():
            owner = module_of(name)
            parts = owner.split(".") if owner else []
            for k in range(len(parts) + 1):  # the highest ancestor whose parameters all share these counts
                prefix = ".".join(parts[:k])
                if below.get(prefix) == {(i, n)}:
                    owner = prefix
                    break
            acc = pooled.setdefault(owner, [0, 0])
            acc[0] += i
            acc[1] += n
        return {m: i / n for m, (i, n) in sorted(pooled.items()) if i}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain values: per parameter ``[checked, idle, run start, run length, last reason, run's last step, run
        steps counted as a finding]`` (``params``)."""
        params: dict[str, list[Any]] = {}
        for name, n in self.checked().items():
            base = self._base.get(name)
            run = self._runs.get(name, Run(0))
            idle = (base.idle if base else 0) + self._idle.get(name, 0)
            params[name] = [n, idle, run.first, run.length, run.reason, run.last, run.counted]
        return {"params": params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys take their defaults)."""
        self._groups.clear()
        self._idle.clear()
        self._runs.clear()
        self._base = {}
        for name, row in dict(state.get("params", {})).items():
            checked, idle, first, length = [*row, 0, 0, 0, 0][:4]
            self._base[name] = _Counts(int(checked), int(idle))
            if int(length) > 0:  # older checkpoints lack the last three: the run's last step is then its first + length
                reason = str(row[4]) if len(row) > 4 else "missing"
                last = int(row[5]) if len(row) > 5 and row[5] is not None else int(first) + int(length) - 1
                counted = int(row[6]) if len(row) > 6 else 0
                self._runs[name] = Run(int(first), int(length), reason, last, counted)
