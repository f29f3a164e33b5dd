"""What GradGuard reports: the seven finding kinds, :class:`Finding` and :class:`GradGuardError`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["KINDS", "Finding", "GradGuardError", "Kind", "format_findings"]

Kind = Literal["frozen", "unused", "detached", "orphan", "stale", "nonfinite", "zero"]

#: Every finding kind, in the order reports list them.
KINDS: tuple[str, ...] = ("stale", "detached", "unused", "nonfinite", "frozen", "orphan", "zero")

#: One line per kind: the usual fix.
HINTS: dict[str, str] = {
    "frozen": "set `requires_grad=True`, or leave it out of the optimizer "
    "(`filter(lambda p: p.requires_grad, model.parameters())`)",
    "unused": "use it in the loss, delete it, or leave it out of the optimizer",
    "detached": "remove the operation that cuts the graph (`.detach()`, `.data`, `no_grad`, numpy, `.item()`)",
    "orphan": "add it to the optimizer (e.g. `optimizer(self.parameters())`), or freeze it",
    "stale": "build the optimizer over the model's own parameters, after any copy/`deepcopy` of the model",
    "nonfinite": "look for log/sqrt/division of zero or negative values, lower the learning rate, or clip gradients",
    "zero": "check for ops with zero derivative (round/sign/floor, comparisons), dead ReLUs or a `* 0`",
}


@dataclass(frozen=True)
class Finding:
    """One parameter that did not get a usable gradient on an optimizer step.

    Attributes:
        kind: one of ``"frozen"``, ``"unused"``, ``"detached"``, ``"orphan"``, ``"stale"``, ``"nonfinite"``,
            ``"zero"``.
        param: the parameter's name as ``named_parameters()`` of the model gives it (with ``_orig_mod.`` of
            compiled submodules stripped). A stale tensor, which has no name, is called after the model
            parameter it copies, or ``param_groups[g][i]``.
        message: one sentence for the user: what happened and how to fix it.
        where: ``"path:line"`` of the user's code that caused it (the line that cut the graph), or ``None``.
        step: the optimizer step (``trainer.global_step``) on which it was first seen.
        hint: the usual fix for this kind.
        module: the name of the module that owns the parameter (``""`` for the root).
        ranks: under distributed training, the ranks on which it was seen (empty: all ranks / single process).
    """

    kind: str
    param: str
    message: str
    where: str | None = None
    step: int = 0
    hint: str = ""
    module: str = ""
    ranks: tuple[int, ...] = field(default=())

    @property
    def key(self) -> tuple[str, str]:
        """``(kind, param)``: a finding is reported once per run under this key."""
        return (self.kind, self.param)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for JSON and checkpoints."""
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so older or newer reports load."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["ranks"] = tuple(known.get("ranks", ()))
        return cls(**known)

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"{self.param}: {self.kind}{where}: {self.message}"


def format_findings(findings: Sequence[Finding]) -> str:
    """A compact multi-line listing: ``name: kind (where): message`` and the fix hint, one finding per line."""
    lines = []
    for f in sorted(findings, key=lambda f: KINDS.index(f.kind) if f.kind in KINDS else len(KINDS)):
        lines.append(f"  - {f}")
        if f.hint and f.hint not in f.message:
            lines.append(f"      fix: {f.hint}")
    return "\n".join(lines)


class GradGuardError(RuntimeError):
    """Raised when a finding's policy is ``"raise"``; ``.findings`` lists every finding of that step."""

    def __init__(self, message: str, findings: Iterable[Finding] = ()) -> None:
        self.findings: list[Finding] = list(findings)
        super().__init__(message)

    @classmethod
    def from_findings(cls, findings: Sequence[Finding], step: int | None, context: str = "") -> GradGuardError:
        """An error whose text lists ``findings`` with their fixes."""
        n = len(findings)
        at = f" at step {step}" if step is not None else ""
        head = context or f"{n} parameter{'s' if n != 1 else ''} got no usable gradient{at}"
        return cls(f"{head}:\n{format_findings(findings)}", findings)
