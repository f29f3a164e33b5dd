"""The run report: every finding of a run, once, with when it was first seen and how often; table and JSON."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .findings import KINDS, Finding, FindingGroup, group_findings

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["Entry", "RunReport", "module_view"]

#: Kinds of finding whose parameter gets no usable gradient: the idle section leaves such parameters out.
_DEAD_KINDS = frozenset({"frozen", "unused", "detached", "zero"})


@dataclass
class Entry:
    """A finding with its history in the run.

    Attributes:
        finding: its first occurrence (``finding.step``: the first checked step on which it held).
        count: the number of checked steps on which it held.
        last_step: the last checked step on which it held.
    """

    finding: Finding
    count: int = 1
    last_step: int = 0


class RunReport:
    """Every finding of a run, deduplicated by ``(kind, param)``, in the order they were first seen.

    Example::

        >>> from lightning_gradguard import Finding
        >>> report = RunReport()
        >>> [f.param for f in report.add([Finding("zero", "w", "all zero", step=3)])]
        ['w']
        >>> report.add([Finding("zero", "w", "all zero", step=4)])
        []
        >>> report.entries[0].count, report.entries[0].last_step
        (2, 4)
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}
        self.notes: list[str] = []
        #: Gives :meth:`idle_shares` (set by the guard's core to its history's ``idle_shares``); called with the
        #: names of the parameters reported as findings, which are dead rather than idle.
        self.idle_provider: Callable[[set[str]], dict[str, float]] | None = None
        self._idle: dict[str, float] = {}
        #: Every checked tensor of the model, ``name -> numel`` (ignored ones left out); ``None`` until known.
        self.sizes: dict[str, int] | None = None
        #: The ``ignore`` globs, and the names of the model's parameters they matched.
        self.ignore: list[str] = []
        self.ignored: list[str] = []
        self._loaded_groups: list[dict[str, Any]] = []

    def idle_shares(self) -> dict[str, float]:
        """Per module that was idle on some checked steps (no usable gradient, fewer than ``idle_window`` steps in a
        row), the share of its checked steps on which it was: ``{"encoder.layers.3": 0.1, ...}``."""
        if self.idle_provider is None:
            return dict(self._idle)
        dead = {param for kind, param in self._entries if kind in _DEAD_KINDS}
        return self.idle_provider(dead)

    def set_model(self, names: Sequence[str], numels: Sequence[int], policy: Policy | None = None) -> None:
        """Tell the report (and ``policy``, for its warnings and errors) the model's parameters, so that findings are
        grouped by module, and which of them ``policy``'s ``ignore`` globs leave out."""
        ignore = list(policy.ignore) if policy is not None else []
        self.ignore = ignore
        self.ignored = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in ignore)]
        skipped = set(self.ignored)
        self.sizes = {n: int(k) for n, k in zip(names, numels, strict=True) if n not in skipped}
        if policy is not None:
            policy.sizes = self.sizes

    def groups(self) -> list[FindingGroup]:
        """The run's findings grouped by module (see :func:`~lightning_gradguard.findings.group_findings`)."""
        if self.sizes is None and self._loaded_groups:  # a report read back from JSON: its groups as written
            by_key = {e.finding.key: e.finding for e in self._entries.values()}
            out = []
            for g in self._loaded_groups:
                members = tuple(by_key[(g["kind"], p)] for p in g["params"] if (g["kind"], p) in by_key)
                if members:
                    out.append(FindingGroup(g["kind"], g.get("module"), members, int(g.get("numel", 0)),
                                            int(g.get("of", 0))))  # fmt: skip
            return out
        return group_findings(self.findings, self.sizes)

    def add(
        self,
        findings: Iterable[Finding],
        step: int | None = None,
        runs: Mapping[tuple[str, str], tuple[int, int]] | None = None,
    ) -> list[Finding]:
        """Record ``findings`` that held on one checked step; return those never seen before in this run.

        Args:
            findings: the findings.
            step: the step they held on, when it is later than their own ``.step`` (a finding about a run of idle
                steps is dated to the run's first step); else their ``.step``. A step already counted for a finding
                (checked twice) is not counted again.
            runs: for a finding that held on a run of steps, ``(steps of the run not counted before, the run's last
                step)`` by key, instead of one step.
        """
        new = []
        for f in findings:
            run = runs.get(f.key) if runs else None
            n, last = run if run is not None else (1, f.step if step is None else max(f.step, step))
            entry = self._entries.get(f.key)
            if entry is None:
                self._entries[f.key] = Entry(f, max(n, 1), last)
                new.append(f)
            elif run is not None or last != entry.last_step:
                entry.count += n
                entry.last_step = max(entry.last_step, last)
        return new

    def agree(self, findings: Sequence[Finding], own: Iterable[Finding] = ()) -> None:
        """Record ``findings`` the ranks agreed on (under distributed training): the entries of this rank's ``own``
        findings of the step take their agreed version (with the ranks that saw them), the others are added."""
        keys = {f.key for f in own}
        entries = {key: e for key, e in self._entries.items() if key in keys}
        for f in findings:
            if f.key in entries:
                entries[f.key].finding = f
        self.add([f for f in findings if f.key not in entries])

    def note(self, text: str) -> None:
        """Add a line the report shows below its table (things worth knowing that are not findings)."""
        if text not in self.notes:
            self.notes.append(text)

    def note_modules(self, findings: Sequence[Finding], trainable: Iterable[str]) -> None:
        """A note for each module all of whose trainable parameters ``findings`` (explained by a traced step) show
        ``unused`` (or all ``detached``) alike (see :func:`module_view`)."""
        for line in module_view(findings, trainable):
            self.note(line)

    def __len__(self) -> int:
        """The number of distinct findings."""
        return len(self._entries)

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    @property
    def findings(self) -> list[Finding]:
        """Every finding of the run, each once (its first occurrence)."""
        return [e.finding for e in self._entries.values()]

    def counts(self) -> dict[str, int]:
        """Number of distinct findings per kind (every kind present, zeros included)."""
        out = dict.fromkeys(KINDS, 0)
        for key in self._entries:
            out[key[0]] = out.get(key[0], 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain values: ``{"findings": [...], "counts": {...}, "notes": [...], "groups": [...], "ignore": [...],
        "ignored": [...], "idle": {module: share}}``: one finding per tensor; ``groups`` says how they group by module
        (``kind``, ``module`` or ``None``, ``numel``, ``params``); ``ignored`` lists the parameters ``ignore`` matched;
        ``idle`` the share of checked steps on which a module was idle."""
        rows = []
        for e in self._entries.values():
            row = e.finding.to_dict()
            row.update(first_step=e.finding.step, last_step=e.last_step, count=e.count)
            rows.append(row)
        groups = [
            {"kind": g.kind, "module": g.module, "numel": g.numel, "params": g.params, **({"of": g.of} if g.of else {})}
            for g in self.groups()
            if len(g.findings) > 1
        ]
        return {
            "findings": rows,
            "counts": self.counts(),
            "notes": list(self.notes),
            "groups": groups,
            "ignore": list(self.ignore),
            "ignored": list(self.ignored),
            "idle": self.idle_shares(),
        }

    def load_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`to_dict` (unknown keys ignored)."""
        self._entries.clear()
        for row in d.get("findings", []):
            f = Finding.from_dict(row)
            self._entries[f.key] = Entry(f, int(row.get("count", 1)), int(row.get("last_step", f.step)))
        self.notes = list(d.get("notes", []))
        self._idle = {str(k): float(v) for k, v in d.get("idle", {}).items()}
        self.ignore = list(d.get("ignore", self.ignore))
        self.ignored = list(d.get("ignored", self.ignored))
        self._loaded_groups = list(d.get("groups", []))
        if self._loaded_groups:  # with the JSON's groups, regrouping without the model would only split them
            self.sizes = None

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> RunReport:
        """A report written by :meth:`write_json`."""
        with open(os.fspath(path), encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict) or not isinstance(data.get("findings"), list):
            raise ValueError(f"{os.fspath(path)} is not a GradGuard run report (no 'findings' list).")
        report = cls()
        report.load_dict(data)
        return report

    def ignored_line(self) -> str:
        """``"N parameters not checked (ignore=[...])"``, or ``""`` when ``ignore`` matched nothing."""
        if not self.ignored:
            return ""
        n = len(self.ignored)
        names = ", ".join(self.ignored[:5]) + (f", ... ({n - 5} more)" if n > 5 else "")
        return f"{n} parameter tensor{'s' if n != 1 else ''} not checked (ignore={self.ignore!r}): {names}"

    def write_json(self, path: str | os.PathLike[str]) -> str:
        """Write :meth:`to_dict` as JSON to ``path`` (folders created); return the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        return path

    def _rows(self) -> list[tuple[FindingGroup, int, int]]:
        """Each group with its first step and its largest count."""
        rows = []
        for g in self.groups():
            entries = [self._entries[f.key] for f in g.findings if f.key in self._entries]
            first = min((e.finding.step for e in entries), default=g.findings[0].step)
            count = max((e.count for e in entries), default=1)
            rows.append((g, first, count))
        return rows

    def _clean_text(self) -> str:
        if self.ignored:
            return "GradGuard: every checked parameter received a usable gradient."
        return "GradGuard: every parameter received a usable gradient."

    def table(self) -> str:
        """A plain-text table, one row per group of findings (one kind on every checked tensor of a module, or one
        tensor): parameter or module, kind, where, first step, count, fix hint; then the notes and what ``ignore``
        left out."""
        ignored = self.ignored_line()
        if not self._entries:
            lines = [self._clean_text()]
            lines += [f"  note: {n}" for n in self.notes]
            lines += [f"  {ignored}"] if ignored else []
            return "\n".join(lines) + self._idle_lines("\n  ")
        header = ("parameter", "kind", "where", "first step", "count", "fix")
        rows = []
        for g, first, count in self._rows():
            name = g.findings[0].param if g.module is None or len(g.findings) == 1 else g.label
            rows.append((name, g.kind, g.where or "-", str(first), str(count), g.hint))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        n = len(self._entries)
        head = f"GradGuard run report: {n} finding{'s' if n != 1 else ''}"
        if len(rows) != n:
            head += f" in {len(rows)} group{'s' if len(rows) != 1 else ''}"
        lines = [head, fmt.format(*header), fmt.format(*("-" * w for w in widths), "---")]
        lines += [fmt.format(*r) for r in rows]
        lines += [f"note: {n}" for n in self.notes]
        lines += [ignored] if ignored else []
        return "\n".join(lines) + self._idle_lines("\n")

    def _idle_lines(self, sep: str) -> str:
        """The idle section of :meth:`table`: one line per idle module, most idle first."""
        shares = self.idle_shares()
        if not shares:
            return ""
        head = f"{sep}idle (share of checked steps without a usable gradient, not a finding):"
        return head + "".join(f"{sep}  {text}" for text in _idle_rows(shares, "{}"))

    def markdown(self) -> str:
        """The report as markdown (TensorBoard's Text tab renders it): one list item per group of findings (kind,
        parameter or module, where, first step, count, then what happened and the fix), then the notes.

        A list, not a table: TensorBoard's Text tab may break a word anywhere (``word-break: break-word``), so a
        table wider than the page squeezes every column to a few letters ("det/ach/ed"); a list item wraps at spaces.
        """
        ignored = self.ignored_line()
        notes = [*self.notes, *([ignored] if ignored else [])]
        if not self._entries:
            text = "**" + self._clean_text().replace("GradGuard:", "GradGuard:**", 1)
            return text + "".join(f"\n\n{_md_text(n)}" for n in notes) + self._idle_markdown()
        n = len(self._entries)
        rows = self._rows()
        head = f"**GradGuard run report:** {n} finding{'s' if n != 1 else ''}"
        if len(rows) != n:
            head += f" in {len(rows)} group{'s' if len(rows) != 1 else ''}"
        lines = [head, ""]
        for g, first, count in rows:
            name = f"`{g.findings[0].param}`" if g.module is None or len(g.findings) == 1 else g.label
            where = f" at `{g.where}`" if g.where else ""
            what = _md_text(g.message) + (f" Fix: {_md_text(g.hint)}" if g.hint and g.hint not in g.message else "")
            lines.append(f"- **{g.kind}**: {name}{where}, first step {first}, count {count}  \n  {what}")
        lines += [f"\n{_md_text(n)}" for n in notes]
        return "\n".join(lines) + self._idle_markdown()

    def _idle_markdown(self) -> str:
        shares = self.idle_shares()
        if not shares:
            return ""
        cells = "; ".join(_idle_rows(shares, "`{}`"))
        return f"\n\n**Idle** (share of checked steps without a usable gradient, not a finding): {cells}"


#: Modules idle on the same share of steps are one row from this many on (a LoRA model's `lora_A` layers, idle on
#: the first step only while `lora_B` is zero), naming the first few.
_SAME_SHARE_ROW = 3


def _idle_rows(shares: dict[str, float], name: str) -> list[str]:
    """``module: share`` per idle module, most idle first; modules that share a share (to 0.1 %) from
    :data:`_SAME_SHARE_ROW` on are one row: ``5.0 %: 16 modules: a, b, c and 13 more``."""
    by_share: dict[str, list[str]] = {}
    for module, share in sorted(shares.items(), key=lambda kv: (-kv[1], kv[0])):
        by_share.setdefault(f"{share:.1%}", []).append(name.format(module or "(root)"))
    rows = []
    for share, modules in by_share.items():
        if len(modules) < _SAME_SHARE_ROW:
            rows += [f"{m}: {share}" for m in modules]
        else:
            more = f" and {len(modules) - 3} more" if len(modules) > 3 else ""
            rows.append(f"{share}: {len(modules)} modules: {', '.join(modules[:3])}{more}")
    return rows


def _md_text(text: str) -> str:
    """``text`` on one markdown line (no line breaks; pipes escaped, so that no line reads as a table row)."""
    return text.replace("|", "\\|").replace("\n", " ")


def module_view(findings: Sequence[Finding], trainable: Iterable[str]) -> list[str]:
    """One line per module all of whose trainable parameters are ``unused`` (or all ``detached``) alike, for the
    run report's notes.

    Args:
        findings: findings explained by a traced step.
        trainable: the names of the model's trainable parameters.

    Example::

        >>> fs = [Finding("unused", f"pooler.{w}", "... ran, but nothing it computed reached the loss", module="pooler")
        ...       for w in ("weight", "bias")]
        >>> module_view(fs, ["encoder.weight", "pooler.weight", "pooler.bias"])
        ['module `pooler` ran, but its output never reached the loss']
    """
    by_module: dict[str, list[Finding]] = {}
    for f in findings:
        if f.kind in ("unused", "detached"):
            by_module.setdefault(f.module, []).append(f)
    if not by_module:
        return []
    own: dict[str, set[str]] = {}
    for name in trainable:
        module = name.rpartition(".")[0]
        if module in by_module:
            own.setdefault(module, set()).add(name)
    lines = []
    for module, group in by_module.items():
        if {f.param for f in group} != own.get(module, set()) or len({f.kind for f in group}) != 1:
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
