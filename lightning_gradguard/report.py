"""The run report: every finding of a run, once, with when it was first seen and how often; table and JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .findings import KINDS, Finding

__all__ = ["Entry", "RunReport"]


@dataclass
class Entry:
    """A finding with its history in the run."""

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
        #: Gives :meth:`idle_shares` (set by the guard's core to its history's ``idle_shares``).
        self.idle_provider: Callable[[], dict[str, float]] | None = None
        self._idle: dict[str, float] = {}

    def idle_shares(self) -> dict[str, float]:
        """Per module that was idle on some checked steps (no usable gradient, fewer than ``idle_window`` steps in a
        row), the share of its checked steps on which it was: ``{"encoder.layers.3": 0.1, ...}``."""
        return self.idle_provider() if self.idle_provider is not None else dict(self._idle)

    def add(self, findings: Iterable[Finding]) -> list[Finding]:
        """Record ``findings`` of one step; return those never seen before in this run."""
        new = []
        for f in findings:
            entry = self._entries.get(f.key)
            if entry is None:
                self._entries[f.key] = Entry(f, 1, f.step)
                new.append(f)
            else:
                entry.count += 1
                entry.last_step = max(entry.last_step, f.step)
        return new

    def note(self, text: str) -> None:
        """Add a line the report shows below its table (things worth knowing that are not findings)."""
        if text not in self.notes:
            self.notes.append(text)

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
        """Plain values: ``{"findings": [...], "counts": {...}, "notes": [...], "idle": {module: share}}``."""
        rows = []
        for e in self._entries.values():
            row = e.finding.to_dict()
            row.update(first_step=e.finding.step, last_step=e.last_step, count=e.count)
            rows.append(row)
        return {"findings": rows, "counts": self.counts(), "notes": list(self.notes), "idle": self.idle_shares()}

    def load_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`to_dict` (unknown keys ignored)."""
        self._entries.clear()
        for row in d.get("findings", []):
            f = Finding.from_dict(row)
            self._entries[f.key] = Entry(f, int(row.get("count", 1)), int(row.get("last_step", f.step)))
        self.notes = list(d.get("notes", []))
        self._idle = {str(k): float(v) for k, v in d.get("idle", {}).items()}

    def write_json(self, path: str | os.PathLike[str]) -> str:
        """Write :meth:`to_dict` as JSON to ``path`` (folders created); return the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        return path

    def table(self) -> str:
        """A plain-text table: finding, kind, where, first step, count, fix hint."""
        if not self._entries:
            text = "GradGuard: every parameter received a usable gradient."
            return text + "".join(f"\n  note: {n}" for n in self.notes) + self._idle_lines("\n  ")
        header = ("parameter", "kind", "where", "first step", "count", "fix")
        rows = [
            (e.finding.param, e.finding.kind, e.finding.where or "-", str(e.finding.step), str(e.count), e.finding.hint)
            for e in sorted(self._entries.values(), key=lambda e: (KINDS.index(e.finding.kind), e.finding.param))
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [f"GradGuard run report: {len(rows)} finding{'s' if len(rows) != 1 else ''}", fmt.format(*header)]
        lines.append(fmt.format(*("-" * w for w in widths), "---"))
        lines += [fmt.format(*r) for r in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) + self._idle_lines("\n")

    def _idle_lines(self, sep: str) -> str:
        """The idle section of :meth:`table`: one line per idle module, most idle first."""
        shares = self.idle_shares()
        if not shares:
            return ""
        rows = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
        head = f"{sep}idle (share of checked steps without a usable gradient, not a finding):"
        return head + "".join(f"{sep}  {m or '(root)'}: {v:.1%}" for m, v in rows)

    def markdown(self) -> str:
        """The table as GitHub markdown (TensorBoard's Text tab renders it): parameter, kind, where, first step,
        count, what happened, fix."""
        if not self._entries:
            text = "**GradGuard:** every parameter received a usable gradient."
            return text + "".join(f"\n\n{_md_cell(n)}" for n in self.notes) + self._idle_markdown()
        n = len(self._entries)
        lines = [
            f"**GradGuard run report:** {n} finding{'s' if n != 1 else ''}",
            "",
            "| parameter | kind | where | first step | count | what happened | fix |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in sorted(self._entries.values(), key=lambda e: (KINDS.index(e.finding.kind), e.finding.param)):
            f = e.finding
            where = f"`{f.where}`" if f.where else "-"
            cells = (f"`{f.param}`", f.kind, where, str(f.step), str(e.count), _md_cell(f.message), _md_cell(f.hint))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [f"\n{_md_cell(n)}" for n in self.notes]
        return "\n".join(lines) + self._idle_markdown()

    def _idle_markdown(self) -> str:
        shares = self.idle_shares()
        if not shares:
            return ""
        rows = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
        cells = ", ".join(f"`{m or '(root)'}` {v:.1%}" for m, v in rows)
        return f"\n\n**Idle** (share of checked steps without a usable gradient, not a finding): {cells}"


def _md_cell(text: str) -> str:
    """``text`` safe inside a markdown table cell (no pipes, no line breaks)."""
    return text.replace("|", "\\|").replace("\n", " ")
