"""A hand-picked mutation campaign over GradGuard's verdict path: does a test go red when the core breaks?

Each mutation changes one line of one library file (flip a comparison, negate a condition, ``and``/``or``, drop a
``not``, change a returned boolean or a ``+ 1``, or delete one statement) and runs a fast pytest subset chosen for
that file with ``-x -q -p no:cacheprovider`` under a hard ``timeout``. A mutation is *killed* when the subset fails,
*survived* when it passes.

The mutations are applied to a throw-away copy of the repository (made once per campaign under a temporary
directory), never to the checkout itself: the copy's file is restored after every mutation (also on Ctrl-C or
SIGTERM), and the copy is deleted at the end. So an interrupted campaign cannot leave a mutant behind.

Run it from the repository root (not collected by pytest: the file is not named ``test_*.py``)::

    OMP_NUM_THREADS=1 .venv/bin/python tests/mutation/run.py             # every mutation not marked equivalent
    .venv/bin/python tests/mutation/run.py --list                       # the table of sites, no test run
    .venv/bin/python tests/mutation/run.py --check                      # every anchor still applies, no test run
    .venv/bin/python tests/mutation/run.py --only C09,C10 --timeout 120  # some of them
    .venv/bin/python tests/mutation/run.py --file policy.py --all        # one file, equivalent ones included
    .venv/bin/python tests/mutation/run.py --baseline                    # every subset must pass unmutated

It prints one line per mutation and exits 1 when a mutation not marked equivalent survived (or a mutation no
longer applies: its anchor line changed; update the list).

Each entry of :data:`MUTATIONS` names the line by a substring (``anchor``, unique in the file unless ``nth`` picks
one of several), the text replaced in it (``old`` -> ``new``; ``new=None`` replaces the whole statement by
``pass``), the test subset, the test that kills it (documentation; the campaign reports what actually failed) and,
for a mutation that cannot change behaviour, ``equivalent`` with the reason (``survives``: a known gap, reported but
not counted as a failure). ``tests/mutation/RESULTS.md`` holds the table of the last campaign: which test killed
each mutation, and the tests added for the survivors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "lightning_gradguard"

#: Test files in the order they run (``-x`` stops at the first failure: the likeliest killers go first).
VERDICT = [
    "tests/test_kinds.py",
    "tests/test_check_step.py",
    "tests/test_idle.py",
    "tests/test_messages.py",
    "tests/test_options.py",
    "tests/test_faults.py",
    "tests/test_skipped_steps.py",
    "tests/test_report_counts.py",
    "tests/test_measure.py",
    "tests/test_reliability.py",
    "tests/test_testing.py",
    "tests/test_fabric.py",
    "tests/test_trace.py",
    "tests/test_trace_gan.py",
    "tests/test_trace_checkpoint.py",
    "tests/test_trace_escapes.py",
    "tests/test_trace_memory.py",
    "tests/test_flow.py",
]
TRACE = [
    "tests/test_trace.py",
    "tests/test_trace_gan.py",
    "tests/test_trace_checkpoint.py",
    "tests/test_trace_escapes.py",
    "tests/test_trace_memory.py",
    "tests/test_kinds.py",
    "tests/test_check_step.py",
    "tests/test_messages.py",
]
FINDINGS = ["tests/test_messages.py", "tests/test_doctests.py", "tests/test_kinds.py", "tests/test_check_step.py",
            "tests/test_testing.py", "tests/test_tensorboard.py", "tests/test_cli.py"]  # fmt: skip
LATE = ["tests/test_sync_late.py"]
#: The in-process tests of distributed.py (the multi-process launches of test_ddp.py are left out: too slow here).
DIST = ["tests/test_ddp.py", "-m", "not ddp", "tests/test_doctests.py"]


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str  # under lightning_gradguard/
    anchor: str  # a substring of the line to mutate
    old: str  # the text replaced in that line (first occurrence)
    new: str | None  # ``None``: the statement is deleted (replaced by ``pass``)
    tests: tuple[str, ...] = tuple(VERDICT)
    killer: str = ""  # the test expected to kill it (documentation)
    equivalent: str = ""  # why the mutation cannot change behaviour (then it is skipped unless --all)
    nth: int | None = None  # which line containing ``anchor`` (when several do); None: it must be unique
    survives: str = ""  # a known gap: why no test kills it yet (reported, not counted as a failure)

    @property
    def label(self) -> str:
        return "delete statement" if self.new is None else f"{self.old!r} -> {self.new!r}"


def M(id, file, anchor, old, new, tests=VERDICT, killer="", equivalent="", nth=None, survives=""):  # noqa: ANN001, ANN201, N802
    return Mutation(id, file, anchor, old, new, tuple(tests), killer, equivalent, nth, survives)


# fmt: off
MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------------------------------- audit.py
    M("A01", "audit.py", "    if stats.clean:", "if stats.clean", "if not stats.clean"),
    M("A02", "audit.py", "        if not p.requires_grad:", "if not p.requires_grad", "if p.requires_grad"),
    M("A03", "audit.py", "if skip_empty and p.numel() == 0:", " and ", " or "),
    M("A04", "audit.py", "if i in zero and received is not None and id(p) not in received", "id(p) not in", "id(p) in"),
    M("A05", "audit.py", "missing.add(i)  # a zeroed gradient left", "missing.add(i)", None),
    M("A06", "audit.py", "if defer and not facts.traced:", " and ", " or ", nth=0),
    M("A07", "audit.py", "if defer and not facts.traced:", " and ", " or ", nth=1),
    M("A08", "audit.py", "    if not overflow_ok:", "if not overflow_ok", "if overflow_ok"),
    M("A09", "audit.py", "    if not facts.opaque:", "if not facts.opaque", "if facts.opaque"),
    M("A10", "audit.py", "return facts.traced and not facts.seen >> bit & 1", "and not facts", "and facts"),
    M("A11", "audit.py", '(site.kind == "zero_derivative") != zero', "!= zero", "== zero"),
    M("A12", "audit.py", "    if facts.dep >> bit & 1:", "if facts.dep >> bit & 1", "if not facts.dep >> bit & 1"),
    M("A13", "audit.py", "    if exits:  # its value left torch", "if exits", "if not exits"),
    M("A14", "audit.py", "    elif facts.seen >> bit & 1:", "elif facts", "elif not facts"),
    M("A15", "audit.py", "    if facts.dep is None:", "is None", "is not None"),
    M("A16", "audit.py", "site = _culprit(facts, bit, zero=True)", "zero=True", "zero=False"),
    M("A17", "measure.py", "        if not finite:", "if not finite", "if finite"),
    M("A18", "measure.py", "elif not nonzero and g is not None and g.numel() > 0:", "numel() > 0", "numel() >= 0"),
    M("A19", "measure.py", "if not (finite.all() and values.all()):  # a norm read zero", " and ", " or "),
    M("A20", "measure.py", "    if len(missing) == n:", "==", "!="),
    M("A21", "measure.py", "    if scale != 1.0:", "!=", "=="),
    M("A22", "audit.py", "if complete and type(fn).__name__ in _OPAQUE_NODES:", " in _OPAQUE", " not in _OPAQUE"),
    M("A23", "audit.py", "if not p.requires_grad or p.grad is None:", "p.grad is None",
      "p.grad is not None"),
    M("A24", "audit.py", "if not p.requires_grad or p.grad is None:", "if not p.requires_grad or",
      "if not p.requires_grad and"),
    M("A25", "audit.py", "                if id(t) in index.index:", " in index", " not in index"),
    M("A26", "audit.py", "if len(flat) == len(index.params) and index.params[pos].shape", "==", "!="),
    # -------------------------------------------------------------------------------------------- core.py
    M("C01", "core.py", "if not stats.clean or schedule.pending:", " or ", " and "),
    M("C02", "core.py", "_current_scale(scaler, stats, scale) > 1.0", "> 1.0", ">= 1.0"),
    M("C03", "schedule.py", 'return self.diagnose in ("on_finding", "always") and self._can_trace()', " and ", " or ",
      equivalent="a candidate deferred where no trace can come goes pending -> due -> _settle_pending, where "
      "_may_trace is False, and is explained with the same untraced facts and _dead as classify would; the _probing "
      "it may add is read only under on_finding with tracing possible (only the order of err.findings changes)"),
    M("C04", "core.py", "schedule.count_check(traced_step and not self._checked)", "and not self", "and self"),
    M("C05", "schedule.py", "self.looked |= self._probing", "self.looked |= self._probing", None),
    M("C06", "core.py", "self._checked = bool(self._losses)", "= bool(", "= not bool("),
    M("C07", "core.py", "findings = self._consistency(optimizers, step) if optimizers else []", "if optimizers",
      "if not optimizers"),
    M("C08", "schedule.py", 'if f.kind == "detached" or (f.kind == "zero" and f.where is not None) or self._dropped',
      "is not None", "is None"),
    M("C09", "schedule.py", "            elif run.length >= window:", ">=", ">", nth=0),
    M("C10", "schedule.py", "            elif run.length >= window:", ">=", ">", nth=1),
    M("C11", "schedule.py", "first = run.first if window > 1 else step", "window > 1", "window >= 1", nth=0),
    M("C12", "schedule.py", 'elif reason == "missing" and name not in self.looked:', "not in", "in"),
    M("C13", "schedule.py", "self.known[f.param] = f", "self.known", None, nth=0),
    M("C14", "schedule.py", "if facts.traced and self.pending:", " and ", " or "),
    M("C15", "schedule.py", "if name in explained:", " in ", " not in "),
    M("C16", "schedule.py", '            elif reason == "zero":', "==", "!="),
    M("C17", "schedule.py", 'if known is not None and (known.kind == "zero") == (reason == "zero"):', ') == (',
      ') != ('),
    M("C18", "schedule.py", "elif self._may_trace(name, known is not None):", "is not None", "is None"),
    M("C19", "schedule.py", "if name in self.looked and not other_reason:", "and not other", "and other"),
    M("C20", "schedule.py", "        if self.traced_steps < MAX_TRACED_STEPS:", "<", "<="),
    M("C21", "schedule.py", "(explainable and not traced_step)", "and not traced_step", "and traced_step"),
    M("C22", "schedule.py", "self.armed = want and self.traced_steps < MAX_TRACED_STEPS", "<", "<="),
    M("C23", "schedule.py", "if bit is None or run.length >= window:", ">=", ">",
      equivalent="a run exactly as long as the window gets an end-of-run copy too, but the report keeps one entry per "
      "(kind, parameter) and the policy warns once per kind and group: nothing a user sees changes"),
    M("C24", "schedule.py", 'if known is None or (known.kind == "zero") != (run.reason == "zero"):', ") != (",
      ") == ("),
    M("C25", "core.py", "if not kept and not kept_short:", " and ", " or "),
    M("C26", "core.py", "self._warn(kept_short)", "self._warn", None),
    M("C27", "core.py", "            if f.kind in RUN_KINDS:", " in RUN", " not in RUN"),
    M("C28", "core.py", "if loss.grad_fn is None and not loss.requires_grad else None", " and not", " or not"),
    M("C29", "core.py", "if key != self._consistency_key:", "!=", "=="),
    M("C30", "report.py", "if {f.param for f in group} != own.get(module, set())", "!= own", "== own"),
    M("C31", "core.py", "if index.params[bit].requires_grad:", "if index", "if not index"),
    M("C32", "schedule.py", 'then = f"on step {first} only" if self.window <= 1', "<= 1", "< 1"),
    M("C33", "core.py", "if forget and self._checked:", " and ", " or "),
    M("C34", "core.py", "complete = complete and all(known for _, known in graphs)", "complete =", None),
    M("C35", "schedule.py", "                if name not in judged:", "if name not in judged", "if False"),
    M("C36", "core.py", "if not fed and params and len(stats.missing)", "if not fed", "if fed"),
    # ------------------------------------------------------------------------------------------ policy.py
    M("P01", "policy.py", 'return [f for f in findings if self.actions[f.kind] != "ignore" and not', " and not",
      " or not"),
    M("P02", "policy.py", 'if any(self.actions[f.kind] == "raise" for f in findings):', '== "raise"', '!= "raise"'),
    M("P03", "policy.py", "new = [f for f in findings if f.key not in self._warned]", "not in", "in"),
    M("P04", "policy.py", "self._warned.update(f.key for f in group.findings)", "self._warned", None),
    M("P05", "policy.py", "if group.kind in CONFIG_KINDS and self.optimizer_site is not None:", " in CONFIG",
      " not in CONFIG"),
    M("P06", "options.py", "if not isinstance(p, str) or not p:", " or not p", ""),
    M("P07", "options.py", "if not isinstance(value, str) or value not in choices:", "value not in", "value in"),
    M("P08", "policy.py", "hit = any(fnmatch.fnmatchcase(name, pattern)", "any(", "all("),
    # ----------------------------------------------------------------------------------------- history.py
    M("H01", "history.py", "self._idle[name] = self._idle.get(name, 0) + 1", "+ 1", "+ 2"),
    M("H02", "history.py", "if run.length >= checked.get(n, 0)]", ">=", ">"),
    M("H03", "history.py", "n in judged and n not in lacking and run.last != step]", " and ", " or "),
    M("H04", "history.py", "if below.get(prefix) == {(i, n)}:", "==", "!="),
    M("H05", "history.py", "if int(length) > 0:", "> 0", ">= 0"),
    M("H06", "history.py", "            group.checks += 1", "+= 1", "+= 2"),
    M("H07", "history.py", "idle = (base.idle if base else 0) + self._idle.get(name, 0)", "0) + self", "0) - self"),
    M("H08", "history.py", "checked = {name: n for name, n in checked.items() if name not in exclude}", "not in",
      "in"),
    M("H09", "history.py", "        if run.last != step:", "run.last != step", "True"),
    # -------------------------------------------------------------------------------------------- step.py
    M("S01", "step.py", "        if target is None:", "is None", "is not None"),
    M("S02", "measure.py", "if optimizer is not None and not _compat.optimizer_unscales(optimizer):",
      "not _compat", "_compat", killer="test_measure::test_amp_scale_is_the_scalers_tensor_without_a_read"),
    M("S03", "step.py", "todo = [opt for opt in self.optimizers if id(opt) not in self._judged]", "not in", "in"),
    M("S04", "step.py", "todo = [] if self._seen else [None]", "if self._seen", "if not self._seen"),
    M("S05", "step.py", "            if self._backwards:", "if self", "if not self"),
    M("S06", "step.py", "            if known:  # orphans and stale", "if known", "if not known"),
    M("S07", "step.py", "if self._step_calls == before:", "==", "!="),
    M("S08", "measure.py", 'if scaler is None or (hasattr(scaler, "is_enabled") and not scaler.is_enabled()):',
      "and not scaler", "and scaler"),
    M("S09", "step.py", "return a is b or a.param_groups is b.param_groups", " or ", " and "),
    M("S10", "step.py", "            self._seen.append(optimizer)", "self._seen", None),
    M("S11", "step.py", "actions = DEFAULT_ACTIONS if strict else", "if strict", "if not strict"),
    # ----------------------------------------------------------------------------------------- findings.py
    M("F01", "findings.py", "if have.get(m) == total[m] and total[m] > 1), None)", "total[m] > 1", "total[m] > 0",
      tests=FINDINGS),
    M("F02", "findings.py", "if self.module is None or len(self.findings) == 1:", " or ", " and ", tests=FINDINGS,
      equivalent="group_findings makes a module group only of 2+ findings and a module-less group of exactly one "
      "(a report read back from JSON keeps the groups as written, all members present)"),
    M("F03", "findings.py", "if len(self.findings) > limit:", ">", ">=", tests=FINDINGS),
    M("F04", "findings.py", 'more = "" if n <= MAX_NAMES else', "<=", "<", tests=FINDINGS),
    M("F05", "findings.py", "if self.hint and self.hint not in self.message:", "not in", "in", tests=FINDINGS),
    M("F06", "findings.py", 'if len(wheres) > 3 else ""', "> 3", ">= 3", tests=FINDINGS),
    M("F07", "findings.py", 'if all(f.message.replace(f"`{f.param}`", "\\0") == template', "if all(", "if any(",
      tests=FINDINGS),
    M("F08", "findings.py", "            if len(parts) == 1:", "== 1", "== 0", tests=FINDINGS,
      killer="test_messages::test_findings_of_one_kind_with_different_causes_stay_apart"),
    M("F09", "findings.py", "cause = (tuple(sorted({f.where for f in group}, key=str)), group[0].hint)",
      "cause = (tuple(sorted({f.where for f in group}, key=str)), group[0].hint)", "cause = (group[0].hint,)",
      tests=FINDINGS, killer="test_messages::test_findings_of_one_kind_with_different_causes_stay_apart"),
    M("F10", "findings.py", "groups.append(FindingGroup(kind, holder, merged, numel, of if of != len(merged) else 0))",
      "of if of != len(merged) else 0", "0", tests=FINDINGS,
      killer="test_messages::test_group_findings_by_largest_module"),
    # ------------------------------------------------------------------------- core.py, sync="late"
    M("L01", "core.py", "and not (schedule.pending or history.zero_run or traced_step)",
      " or history.zero_run", "", tests=LATE, killer="test_sync_late::test_an_all_zero_gradient_is_raised_..."),
    M("L02", "core.py", "lacking |= self._present(history.open_runs())",
      "lacking |= self._present(history.open_runs())", None, tests=LATE,
      killer="test_sync_late::test_verdicts_on_missing_and_zero_gradients_do_not_depend_on_sync"),
    M("L03", "core.py", '                self.history.record_unusable(index.names[bit], step, "zero")',
      'self.history.record_unusable(index.names[bit], step, "zero")', None, tests=LATE,
      killer="test_sync_late::test_late_runs_like_step_runs[zero every other step]"),
    M("L04", "core.py", "            if i is not None and i not in zero and i not in missing:", " and i not in zero",
      "", tests=LATE, equivalent="History.settle no longer ends a run extended on the same step (`run.last == step`), "
      "which every all-zero gradient of this step just was: `i not in zero` is a redundant second guard"),
    M("L06", "measure.py", "stats.zero = [i for i in order[values == 0.0].tolist()", "values == 0.0", "values < 0.0",
      tests=LATE, killer="test_sync_late::test_verdicts_on_missing_and_zero_gradients_do_not_depend_on_sync"),
    M("L07", "measure.py", "stats.nonfinite = order[~finite].tolist()", "order[~finite]", "order[finite]", tests=LATE,
      killer="test_sync_late::test_a_nan_is_raised_one_step_late_naming_the_step_that_made_it"),
    # -------------------------------------------------------------------------------------- distributed.py
    M("D01", "shards.py", "        if with_grad == 0:", "==", "!=", tests=DIST),
    M("D02", "shards.py", "        if bad > 0:", "> 0", ">= 0", tests=DIST),
    M("D03", "shards.py", "        elif norm == 0.0:", "==", "!=", tests=DIST),
    M("D04", "distributed.py", "out[:, rank // BITS] = flags.to(torch.int64) << (rank % BITS)", "(rank % BITS)",
      "(rank % BITS + 1)", tests=DIST),
    M("D05", "distributed.py", "if len(bad) == self.world_size:", "==", "!=", tests=DIST),
    M("D06", "distributed.py", "if agreed is None or self.strict:", " or ", " and ", tests=DIST),
    M("D07", "distributed.py", 'if f.kind == "zero" and self.sharded == "fsdp":', '== "fsdp"', '!= "fsdp"', tests=DIST),
    M("D08", "distributed.py", 'return f"rank {ranks[0]}" if len(ranks) == 1 else', "== 1", "!= 1", tests=DIST),
    # -------------------------------------------------------------------------------------------- trace.py
    M("T01", "trace.py", "            if site.mask >> param_bit & 1:", "if site", "if not site", tests=TRACE),
    M("T02", "trace.py", "                found = site", "found = site", "found = found or site", tests=TRACE),
    M("T03", "trace.py", "for site in self._exits.values() if site.mask >> param_bit & 1]", "if site", "if not site",
      tests=TRACE),
    M("T04", "trace.py", 'return self.kind in ("detach", "data") and self.losses > max(self.calls, 1)', "> max",
      ">= max", tests=TRACE),
    M("T05", "trace.py", '        if name in ("detach", "detach_"):', '("detach", "detach_")', '("detach",)',
      tests=TRACE),
    M("T06", "trace.py", "        elif torch.is_inference_mode_enabled():", "elif torch", "elif not torch",
      tests=TRACE),
    M("T07", "trace.py", "                if ckpt[2]:  # grad inputs", "if ckpt", "if not ckpt", tests=TRACE),
    M("T08", "trace.py", 'if site.kind == "detach" and site.where == where:', "site.where ==", "site.where !=",
      tests=TRACE),
    M("T09", "trace.py", "if site.kind == kind and site.op == op:  # not since made", " and ", " or ", tests=TRACE,
      equivalent="the only change to a memoised site (_escape turning a `.detach()` into an escape) changes its kind "
      "and its op together"),
    M("T10", "trace.py", "if self.entered and self.entered != self.where else", "!=", "==", tests=TRACE),
    M("T11", "trace.py", 'if site.kind in ("detach", "data") and site.mask & dep:', " and site", " or site",
      tests=TRACE,
      survives="`nn.Parameter(h.clone())` of a value cut under no_grad: the original names the new leaf's first "
      "use, the mutant the no_grad line; neither is the `nn.Parameter(...)` line (the mode does not see it). "
      "Not pinned by a test: see the mutation campaign's report"),
    M("T12", "trace.py", "if dep and dep & (dep - 1) == 0 else None", "== 0", "!= 0", tests=TRACE),
    M("T13", "trace.py", 'if kind == "inference_mode" and first_user is not None:', "is not None", "is None",
      tests=TRACE),
]
# fmt: on


# --------------------------------------------------------------------------------------------- machinery
def _copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", ".ruff_cache", ".pytest_cache",
                                    "lightning_logs", "*.egg-info")  # fmt: skip
    for item in ROOT.iterdir():
        if item.name in (".git", ".venv", "__pycache__", ".ruff_cache", ".pytest_cache"):
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(item, dest / item.name)


def mutate_text(text: str, m: Mutation) -> str:
    """``text`` with ``m`` applied, or a ``ValueError`` saying why it no longer applies."""
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if m.anchor in line]
    if (len(hits) != 1) if m.nth is None else (len(hits) <= m.nth):
        raise ValueError(f"{m.id}: anchor {m.anchor!r} is on {len(hits)} lines of {m.file}")
    i = hits[m.nth or 0]
    line = lines[i]
    if m.old not in line:
        raise ValueError(f"{m.id}: {m.old!r} not in line {i + 1} of {m.file}: {line.strip()!r}")
    if m.new is None:
        indent = line[: len(line) - len(line.lstrip())]
        if line.rstrip().endswith(("(", "[", "{", ",", "\\")):
            raise ValueError(f"{m.id}: line {i + 1} is not a whole statement: {line.strip()!r}")
        lines[i] = f"{indent}pass  # mutant {m.id}\n"
    else:
        lines[i] = line.replace(m.old, m.new, 1)
    return "".join(lines)


def run_tests(cwd: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """``(outcome, detail, seconds)``: outcome ``"pass"``, ``"fail"`` or ``"timeout"``."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = ["timeout", "-k", "5", str(int(timeout)), sys.executable, "-m", "pytest", "-x", "-q", "-p",
           "no:cacheprovider", *tests]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t0
    if proc.returncode in (124, 137):
        return "timeout", "", took
    if proc.returncode == 0:
        return "pass", "", took
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    detail = failed[0] if failed else (proc.stdout.strip().splitlines() or ["?"])[-1]
    return "fail", detail, took


class _InterruptedError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutation ids")
    ap.add_argument("--file", help="only mutations of this library file (e.g. core.py)")
    ap.add_argument("--all", action="store_true", help="also run the mutations marked equivalent")
    ap.add_argument("--list", action="store_true", help="print the mutations, run nothing")
    ap.add_argument("--check", action="store_true", help="check that every mutation still applies, run nothing")
    ap.add_argument("--baseline", action="store_true", help="run each distinct test subset unmutated")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per pytest run (default 120)")
    args = ap.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        ids = set(args.only.split(","))
        chosen = [m for m in chosen if m.id in ids]
    if args.file:
        chosen = [m for m in chosen if m.file == args.file]
    if not args.all and not args.only:
        chosen = [m for m in chosen if not m.equivalent]

    if args.check:
        bad = 0
        for m in MUTATIONS if not (args.only or args.file) else chosen:
            path = ROOT / PACKAGE / m.file
            try:
                compile(mutate_text(path.read_text(encoding="utf-8"), m), str(path), "exec")
            except (ValueError, SyntaxError) as e:
                bad += 1
                print(f"{m.id}  INVALID   {e}")
        print(f"{len(MUTATIONS) if not (args.only or args.file) else len(chosen)} mutations, {bad} invalid")
        return int(bad > 0)

    if args.list:
        for m in chosen:
            note = f"  [equivalent: {m.equivalent}]" if m.equivalent else ""
            print(f"{m.id}  {m.file:15s} {m.anchor.strip()[:60]!r:64s} {m.label}{note}")
        return 0

    def on_term(signum, frame):  # noqa: ANN001, ANN202, ARG001
        raise _InterruptedError

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="gradguard-mutants-"))
    bad = 0
    try:
        _copy_repo(tmp)
        if args.baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                outcome, detail, took = run_tests(tmp, tests, args.timeout)
                print(f"baseline {outcome:8s} {took:5.1f}s  {' '.join(tests)[:90]} {detail}", flush=True)
                bad += outcome != "pass"
            return int(bad > 0)
        counts = {"killed": 0, "survived": 0, "timeout": 0, "invalid": 0}
        for m in chosen:
            path = tmp / PACKAGE / m.file
            original = path.read_text(encoding="utf-8")
            try:
                mutated = mutate_text(original, m)
                compile(mutated, str(path), "exec")
            except (ValueError, SyntaxError) as e:
                counts["invalid"] += 1
                bad += 1
                print(f"{m.id}  INVALID   {e}", flush=True)
                continue
            try:
                path.write_text(mutated, encoding="utf-8")
                outcome, detail, took = run_tests(tmp, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")  # always restored, also on Ctrl-C
            status = {"fail": "killed", "pass": "survived", "timeout": "timeout"}[outcome]
            counts[status] += 1
            if status == "survived" and not (m.equivalent or m.survives):
                bad += 1
            tag = f"  (equivalent: {m.equivalent[:60]})" if m.equivalent else ""
            tag += f"  (known gap: {m.survives[:60]})" if m.survives else ""
            print(f"{m.id}  {status:9s} {took:5.1f}s  {m.file}: {m.label}  {detail}{tag}", flush=True)
        print("  ".join(f"{k}={v}" for k, v in counts.items()))
    except (KeyboardInterrupt, _InterruptedError):
        print("interrupted: the checkout was never touched; the copy is removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
