"""What GradGuard reports: the seven finding kinds, :class:`Finding` and :class:`GradGuardError`; findings grouped
by module for people (:func:`group_findings`), computed here once and used by every sink (warnings, errors, the run
report)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "HINTS",
    "KINDS",
    "Finding",
    "FindingGroup",
    "GradGuardError",
    "format_findings",
    "group_findings",
]

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
    "zero": "check for ops with zero derivative (round/sign/floor, comparisons), dead ReLUs or a `* 0`; behind a "
    "factor that starts at zero (LoRA's `lora_B`, a zero-initialised gate) it is expected until that factor moves",
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
        where: ``"path:line"`` of the user's code that caused it (the line that cut the graph; for a module that
            ran but whose output never reached the loss, the line that called it), or ``None``.
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


#: How many parameter names an error or warning lists per group; the rest are in ``err.findings`` and the report.
MAX_NAMES = 5


def count_text(n: int) -> str:
    """``n`` for people: ``2.3 M``, ``40.1 k``, ``512``.

    Example::

        >>> count_text(2_345_678), count_text(40_100), count_text(512)
        ('2.3 M', '40.1 k', '512')
    """
    for size, unit in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


@dataclass(frozen=True)
class FindingGroup:
    """Findings of one kind on every checked tensor of one module, or a single finding.

    Attributes:
        kind: the findings' kind.
        module: the module whose every checked tensor has this finding (``""``: the whole model), or that holds
            all of the findings of one cause (``of``: its checked tensors), or ``None`` for a single tensor that
            does not make up a module of its own.
        findings: the findings, one per tensor, in the order given.
        numel: the number of parameters (elements) of those tensors, ``0`` when unknown.
    """

    kind: str
    module: str | None
    findings: tuple[Finding, ...]
    numel: int = 0
    #: The number of checked tensors of ``module`` when only some of them have the finding (findings of one cause
    #: spread over a module, see :func:`group_findings`); ``0``: all of them.
    of: int = 0

    @property
    def params(self) -> list[str]:
        return [f.param for f in self.findings]

    @property
    def label(self) -> str:
        """``module `backbone` (100 tensors, 2.3 M parameters)``, or the parameter's name in backticks."""
        if self.module is None or len(self.findings) == 1:
            return f"`{self.findings[0].param}`"
        size = f", {count_text(self.numel)} parameters" if self.numel else ""
        if self.of:
            what = f"module `{self.module}`" if self.module else "the model"
            return f"{what} ({len(self.findings)} of its {self.of} tensors{size})"
        what = f"module `{self.module}`" if self.module else "every parameter of the model"
        return f"{what} ({len(self.findings)} tensors{size})"

    @property
    def where(self) -> str | None:
        """The findings' common ``where``; several different ones joined with ``", "`` (at most three)."""
        wheres = list(dict.fromkeys(f.where for f in self.findings if f.where))
        if not wheres:
            return None
        return ", ".join(wheres[:3]) + (f" and {len(wheres) - 3} more" if len(wheres) > 3 else "")

    @property
    def message(self) -> str:
        """The findings' message with the group's label for the parameter's name, when the messages agree."""
        first = self.findings[0]
        if len(self.findings) == 1:
            return first.message
        template = first.message.replace(f"`{first.param}`", "\0")
        if all(f.message.replace(f"`{f.param}`", "\0") == template for f in self.findings):
            return template.replace("\0", self.label)
        return f"{self.label}: {SUMMARIES.get(self.kind, self.kind)}" + (f" (e.g. {first.message})")

    @property
    def hint(self) -> str:
        return self.findings[0].hint

    def line(self) -> str:
        """The group in one line: ``param: kind (where): message`` for one tensor, ``kind (where): message`` (the
        message names the module) for several."""
        where = f" ({self.where})" if self.where else ""
        if len(self.findings) == 1:
            return f"{self.findings[0].param}: {self.kind}{where}: {self.message}"
        return f"{self.kind}{where}: {self.message}"

    def lines(self, limit: int = MAX_NAMES) -> list[str]:
        """:meth:`line`, then (several tensors) ``name: kind`` for the first ``limit`` of them and how many more
        there are, then the fix; the lines after the first are indented."""
        out = [self.line()]
        if len(self.findings) > 1:
            out += [f"    {f.param}: {f.kind}" for f in self.findings[:limit]]
            if len(self.findings) > limit:
                out.append(f"    ... and {len(self.findings) - limit} more")
        if self.hint and self.hint not in self.message:
            out.append(f"    fix: {self.hint}")
        return out


#: One phrase per kind, for a group whose findings' messages differ.
SUMMARIES: dict[str, str] = {
    "frozen": "in the optimizer but `requires_grad=False`: never updated",
    "unused": "no gradient: the loss does not depend on them",
    "detached": "no gradient: the loss depends on them, but their gradient path is cut",
    "orphan": "they receive gradients, but no optimizer holds them: never updated",
    "stale": "the optimizer holds copies of them, not the model's tensors",
    "nonfinite": "NaN or Inf in their gradients",
    "zero": "their gradients are exactly zero everywhere",
}


def _ancestors(name: str) -> list[str]:
    """The modules that contain parameter ``name``, outermost first: ``"a.b.w"`` -> ``["", "a", "a.b"]``."""
    parts = name.split(".")[:-1]
    return ["", *(".".join(parts[: i + 1]) for i in range(len(parts)))]


def group_findings(findings: Sequence[Finding], sizes: Mapping[str, int] | None = None) -> list[FindingGroup]:
    """Group ``findings`` per kind by the largest module all of whose checked tensors have a finding of that kind.

    Args:
        findings: findings of any kinds (each ``(kind, param)`` once).
        sizes: every checked tensor of the model, ``name -> numel`` (ignored parameters left out). Without it,
            each finding is its own group.

    Returns:
        Groups in :data:`KINDS` order, then in the order of their first finding. Groups of one kind and one cause
        (the same ``where`` and fix) are then merged into one, named after the smallest module holding them all,
        with ``of`` its number of checked tensors: LoRA's frozen base weights beside trainable adapters in every
        adapted module, a backbone frozen but for one tensor, a checkpoint call cutting the adapters inside it,
        are one group each, not one per module or tensor.

    Example::

        >>> fs = [Finding("frozen", f"backbone.{i}.{w}", "") for i in range(2) for w in ("weight", "bias")]
        >>> sizes = {"backbone.0.weight": 4, "backbone.0.bias": 2, "backbone.1.weight": 4, "backbone.1.bias": 2,
        ...          "head.weight": 2}
        >>> [(g.module, len(g.findings), g.numel) for g in group_findings(fs, sizes)]
        [('backbone', 4, 12)]
        >>> [(g.module, len(g.findings), g.of) for g in group_findings(fs[:3], sizes)]
        [('backbone', 3, 4)]
        >>> group_findings(fs[:3], sizes)[0].label
        'module `backbone` (3 of its 4 tensors, 10 parameters)'
    """
    if not findings:  # the common case of a clean step: no walk over the model's tensors
        return []
    by_kind: dict[str, list[Finding]] = {}
    for f in findings:
        by_kind.setdefault(f.kind, []).append(f)
    order = sorted(by_kind, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS))
    if not sizes:
        return [FindingGroup(k, None, (f,)) for k in order for f in by_kind[k]]
    total: dict[str, int] = {}
    for name in sizes:
        for module in _ancestors(name):
            total[module] = total.get(module, 0) + 1
    groups: list[FindingGroup] = []
    for kind in order:
        members = by_kind[kind]
        have: dict[str, int] = {}
        for f in members:
            if f.param in sizes:
                for module in _ancestors(f.param):
                    have[module] = have.get(module, 0) + 1
        keyed: dict[tuple[str | None, str], list[Finding]] = {}
        for f in members:
            module = None
            if f.param in sizes:
                module = next((m for m in _ancestors(f.param) if have.get(m) == total[m] and total[m] > 1), None)
            keyed.setdefault((module, f.param if module is None else ""), []).append(f)
        by_cause: dict[tuple[tuple[str | None, ...], str], list[tuple[str | None, list[Finding]]]] = {}
        for (module, _), group in keyed.items():
            cause = (tuple(sorted({f.where for f in group}, key=str)), group[0].hint)
            by_cause.setdefault(cause, []).append((module, group))
        for parts in by_cause.values():
            merged = tuple(f for _, part in parts for f in part)
            numel = sum(sizes.get(f.param, 0) for f in merged)
            if len(parts) == 1:
                groups.append(FindingGroup(kind, parts[0][0], merged, numel))
                continue
            holder = _common_module([f.param for f in merged])
            of = total.get(holder, 0)
            groups.append(FindingGroup(kind, holder, merged, numel, of if of != len(merged) else 0))
    return groups


def _common_module(names: Sequence[str]) -> str:
    """The smallest module holding every parameter of ``names`` (``""``: the model)."""
    common = _ancestors(names[0])
    for name in names[1:]:
        other = _ancestors(name)
        n = 0
        while n < min(len(common), len(other)) and common[n] == other[n]:
            n += 1
        common = common[:n]
    return common[-1] if common else ""


def format_findings(findings: Sequence[Finding], sizes: Mapping[str, int] | None = None) -> str:
    """A compact multi-line listing, one entry per group (see :func:`group_findings` and
    :meth:`FindingGroup.lines`): the group's line, the first few of its tensors, the fix."""
    lines = []
    for group in group_findings(findings, sizes):
        first, *rest = group.lines()
        lines.append(f"  - {first}")
        lines += [f"  {line}" for line in rest]
    return "\n".join(lines)


class GradGuardError(RuntimeError):
    """Raised when a finding's policy is ``"raise"``; ``.findings`` lists every finding of that step."""

    def __init__(self, message: str, findings: Iterable[Finding] = ()) -> None:
        self.findings: list[Finding] = list(findings)
        super().__init__(message)

    @classmethod
    def from_findings(
        cls, findings: Sequence[Finding], step: int | None, context: str = "", sizes: Mapping[str, int] | None = None
    ) -> GradGuardError:
        """An error whose text lists ``findings`` grouped by module (``sizes``: see :func:`group_findings`), with
        their fixes; ``.findings`` keeps every one of them."""
        n = len(findings)
        at = f" at step {step}" if step is not None else ""
        head = context or f"{n} parameter tensor{'s' if n != 1 else ''} got no usable gradient{at}"
        more = "" if n <= MAX_NAMES else "\n  (`err.findings` and the run report list every tensor)"
        return cls(f"{head}:\n{format_findings(findings, sizes)}{more}", findings)
