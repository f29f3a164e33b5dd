"""What the guard remembers across optimizer steps: idle runs, idle shares, what a traced step explained.

Plain data keyed by parameter name, so that :meth:`History.state_dict` survives a resume (and a model rebuilt with
the same names). Work per step is proportional to the parameters lacking a usable gradient, never to all of them.

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

from collections.abc import Collection, Sequence
from typing import Any

import torch

from .findings import Finding
from .params import module_of

__all__ = ["DEFAULT_WINDOW", "MAX_TRACED_STEPS", "History"]

#: Default length (checked steps) of a run without a usable gradient that makes an idle parameter a finding.
DEFAULT_WINDOW = 16

#: Under ``diagnose="on_finding"`` a run traces at most this many optimizer steps (the first included).
MAX_TRACED_STEPS = 8


class History:
    """Per-parameter memory of one run.

    Args:
        window: a parameter lacking a usable gradient on fewer than this many checked steps in a row is idle, not
            a finding; ``1`` judges every step at once (``check_step``).

    Attributes:
        traced_steps: optimizer steps whose forward pass was traced.
        budget_spent: the check (counting checked optimizer steps from 1) at which ``MAX_TRACED_STEPS`` first
            stopped a trace that was wanted, or ``None``.
    """

    def __init__(self, window: int = 1) -> None:
        self.window = window
        self.traced_steps = 0
        self.budget_spent: int | None = None
        self._groups: dict[tuple[int, int, int], list[Any]] = {}  # key -> [names, name set, checks, last step]
        self._base: dict[str, list[int]] = {}  # restored name -> [checked, idle]
        self._idle: dict[str, int] = {}  # name -> checked steps without a usable gradient
        # name -> [first step of the current run, its length, last reason, its last step, how many of its steps the
        # run report counted (0: the run is not a finding, yet)]
        self._gaps: dict[str, list[Any]] = {}
        self.looked: set[str] = set()  # a traced step looked at it while (or just after) it lacked a gradient
        #: What a traced step found for a parameter lacking a usable gradient (reused instead of tracing again).
        self.known: dict[str, Finding] = {}

    # ------------------------------------------------------------------ per step
    def count_check(self, params: Sequence[torch.Tensor], names_of: Any, step: int) -> set[str]:
        """Count checked step ``step`` of ``params`` (once, however often it is checked: LBFGS evaluates its closure
        several times per step); return their names (cached per parameter list).

        ``names_of(params)`` gives the names of the model's parameters among ``params``; it is called only for a
        parameter list not seen before.
        """
        key = (id(params), len(params), id(params[0]) if params else 0)
        group = self._groups.get(key)
        if group is None:
            names = list(names_of(params))
            group = self._groups[key] = [names, set(names), 0, None]
        if group[3] != step:
            group[2] += 1
            group[3] = step
        return group[1]

    def lack(self, name: str, step: int, reason: str = "missing") -> tuple[int, int]:
        """``name`` has no usable gradient on checked step ``step`` (``reason``: ``"missing"`` or ``"zero"``):
        ``(first step of the run, run length)``. A step counts once, however often it is checked."""
        gap = self._gaps.get(name)
        if gap is None:
            gap = self._gaps[name] = [step, 0, reason, None, 0]
        gap[2] = reason
        if gap[3] != step:
            self._idle[name] = self._idle.get(name, 0) + 1
            gap[1] += 1
            gap[3] = step
        return gap[0], gap[1]

    def count_run(self, name: str) -> tuple[int, int] | None:
        """``(steps of name's current run not counted before, the run's last step)``, and the whole run counted from
        now on; ``None`` when ``name`` has no open run (it had a usable gradient on its last checked step).

        A finding about a run of steps without a usable gradient held on each of them: the run report counts the
        run's steps when the run first becomes a finding, and each further step as it comes.
        """
        gap = self._gaps.get(name)
        if gap is None:
            return None
        new = gap[1] - gap[4]
        gap[4] = gap[1]
        return new, gap[3]

    def reported(self, name: str) -> bool:
        """``name``'s current run is a finding already (the run report counted its steps)."""
        gap = self._gaps.get(name)
        return gap is not None and gap[4] > 0

    def run_length(self, name: str) -> int:
        """Checked steps in a row on which ``name`` lacked a usable gradient, up to its last check (0: none)."""
        gap = self._gaps.get(name)
        return gap[1] if gap else 0

    def always_lacked(self, name: str) -> bool:
        """``name`` lacked a usable gradient on every one of its checked steps (those before a resume included)."""
        gap = self._gaps.get(name)
        if gap is None:
            return False
        checked = self._base.get(name, [0, 0])[0] + sum(count for _, names, count, _ in self._groups.values()
                                                        if name in names)  # fmt: skip
        return gap[1] >= checked

    def never_usable(self) -> list[tuple[str, int, int, str]]:
        """``(name, first step, run length, last reason)`` of the parameters that had no usable gradient on any of
        their checked steps."""
        if not self._gaps:
            return []
        checked = self.checked()
        return [(n, g[0], g[1], g[2]) for n, g in self._gaps.items() if g[1] >= checked.get(n, 0)]

    def settle(self, judged: set[str], lacking: set[str], step: int) -> None:
        """End the runs of parameters judged on ``step`` that have a usable gradient again (not of those that lacked
        one on an earlier check of the same step: a step lacks a gradient if any of its checks does)."""
        if not self._gaps:
            return
        for name in [n for n, g in self._gaps.items() if n in judged and n not in lacking and g[3] != step]:
            del self._gaps[name]

    def open_runs(self) -> list[str]:
        """The parameters whose run without a usable gradient is open (few: those lacking one lately)."""
        return list(self._gaps)

    @property
    def zero_run(self) -> bool:
        """Some parameter's gradient was all zero on its last checked step (a run of them is open)."""
        return any(gap[2] == "zero" for gap in self._gaps.values())

    def in_run(self, name: str) -> bool:
        """``name`` lacked a usable gradient on its last checked step."""
        return name in self._gaps

    @property
    def has_runs(self) -> bool:
        return bool(self._gaps)

    # ------------------------------------------------------------------ reading
    def checked(self) -> dict[str, int]:
        """Checked steps per parameter name (those before a resume included)."""
        out = {name: v[0] for name, v in self._base.items()}
        for names, _, count, _ in self._groups.values():
            for name in names:
                out[name] = out.get(name, 0) + count
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
        idle = {name: v[1] for name, v in self._base.items()}
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
        steps counted as a finding]``, and the tracing counters."""
        checked = self.checked()
        params: dict[str, list[int]] = {}
        for name, n in checked.items():
            base_idle = self._base.get(name, [0, 0])[1]
            gap = self._gaps.get(name, [0, 0, "missing", None, 0])
            params[name] = [n, base_idle + self._idle.get(name, 0), *gap]
        return {
            "window": self.window,
            "params": params,
            "traced_steps": self.traced_steps,
            "budget_spent": self.budget_spent,
            "looked": sorted(self.looked),
            "known": [f.to_dict() for f in self.known.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys take their defaults; the window stays this run's option)."""
        self._groups.clear()
        self._idle.clear()
        self._gaps.clear()
        self._base = {}
        for name, row in dict(state.get("params", {})).items():
            checked, idle, first, run = [*row, 0, 0, 0, 0][:4]
            self._base[name] = [int(checked), int(idle)]
            if int(run) > 0:  # older checkpoints lack the last three: the run's last step is then its first + length
                reason = str(row[4]) if len(row) > 4 else "missing"
                last = int(row[5]) if len(row) > 5 and row[5] is not None else int(first) + int(run) - 1
                counted = int(row[6]) if len(row) > 6 else 0
                self._gaps[name] = [int(first), int(run), reason, last, counted]
        self.traced_steps = int(state.get("traced_steps", 0))
        spent = state.get("budget_spent")
        self.budget_spent = None if spent is None else int(spent)
        self.looked = set(state.get("looked", []))
        self.known = {}
        for row in state.get("known", []):
            f = Finding.from_dict(row)
            self.known[f.param] = f
