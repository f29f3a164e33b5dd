"""Run the generated bug corpus through GradGuard / check_step and score it against the ground truth.

``python tests/corpus/corpus_run.py`` (``make corpus``) runs every case in one process, prints the confusion
matrix (planted kind vs reported kinds, plus ``none`` and ``crash``), the parameter and ``where`` accuracy, and
writes ``docs/corpus.md``. ``--n``, ``--only`` and ``--no-write`` select a part of it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from lightning.pytorch import LightningModule  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # corpus_gen beside this file; tests/helpers.py (the tests' Trainer)
from corpus_gen import BUG_KINDS, N_SEEDS, Case, generate  # noqa: E402

from helpers import make_trainer  # noqa: E402
from lightning_gradguard import GradGuard, GradGuardError, check_step  # noqa: E402

__all__ = ["N_CASES", "Result", "run_case", "score"]

#: The corpus: seeds 0..N_CASES-1. The first N_RANDOM draw kind and setup (about 30 % healthy); the next walk
#: every (kind, setup) pair four times, the last every (kind, variant, setup) once.
N_CASES = N_SEEDS
KINDS = ("none", *BUG_KINDS)


@dataclass
class Result:
    """A case's outcome: what the guard reported and how it compares with the ground truth."""

    case: Case
    got: set[tuple[str, str]] = field(default_factory=set)
    wheres: dict[tuple[str, str], str | None] = field(default_factory=dict)
    messages: dict[tuple[str, str], str] = field(default_factory=dict)
    crash: str | None = None
    raised: bool = False
    seconds: float = 0.0

    @property
    def judged(self) -> set[tuple[str, str]]:
        """``got``, where a value that truly left torch (``str``) may be `unused` if the message says it may be cut."""
        if not self.case.unfollowable:
            return self.got
        return {("detached", p) if k == "unused" and p in self.case.cut_lines and
                _hedges(self.messages.get((k, p), "")) else (k, p) for k, p in self.got}  # fmt: skip

    @property
    def reported_kinds(self) -> set[str]:
        return {k for k, _ in self.judged}

    @property
    def expected_kinds(self) -> set[str]:
        return {k for k, _ in self.case.expected}

    @property
    def kinds_ok(self) -> bool:
        return self.crash is None and self.reported_kinds == self.expected_kinds

    @property
    def params_ok(self) -> bool:
        # a stale tensor has no name of its own (the guard names the parameter it looks like): count-free compare
        def norm(s: set[tuple[str, str]]) -> set[tuple[str, str]]:
            return {(k, "*" if k == "stale" else p) for k, p in s}

        return self.crash is None and norm(self.judged) == norm(self.case.expected)

    def where_hits(self, path: str) -> tuple[int, int]:
        """(right, total) over the detached parameters with a known cut line."""
        right = 0
        for p, line in self.case.cut_lines.items():
            w = self.wheres.get(("detached", p))
            if w is None and self.case.unfollowable and ("unused", p) in self.got:  # the exit named in the message
                m = self.messages.get(("unused", p), "")
                right += f"{os.path.basename(path)}:{line}" in m
                continue
            right += w == expected_where(path, line)
        return right, len(self.case.cut_lines)

    def call_misses(self, path: str) -> list[str]:
        """The parameters of a discarded module whose `unused` finding does not name the line that used them."""
        out = []
        for p, line in sorted(self.case.call_lines.items()):
            w = self.wheres.get(("unused", p))
            if w != expected_where(path, line):
                out.append(f"{p}: want {expected_where(path, line)}, got {w}")
        return out

    @property
    def label(self) -> str:
        """The confusion-matrix column: the planted kind when the reported kinds are right."""
        if self.crash is not None:
            return "crash"
        if not self.got:
            return "none"
        if self.kinds_ok:
            return self.case.kind
        label = "+".join(sorted(self.reported_kinds))
        if self.hedged:
            label += " (hedged)"
        return label

    @property
    def hedged(self) -> bool:
        """Every parameter that should be `detached` but came as `unused` has a message that says it may be cut."""
        wrong = [p for p in self.case.cut_lines if ("unused", p) in self.got]
        return bool(wrong) and all(_hedges(self.messages.get(("unused", p), "")) for p in wrong)


def expected_where(path: str, line: int) -> str:
    """``path:line`` as GradGuard writes it: the path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return f"{path if rel.startswith('..') else rel}:{line}"


def _hedges(message: str) -> bool:
    """An `unused` message that does not claim it with confidence (the value may have left through a number)."""
    m = message.lower()
    return any(w in m for w in ("may have", "python number", "cannot tell", "could not follow", "left torch"))


# --------------------------------------------------------------------------- running
def _batches(seed: int, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    from corpus_gen import D, V

    return [(torch.randn(4, D, generator=g), torch.randint(0, V, (4, 4), generator=g), torch.randn(4, generator=g))
            for _ in range(n)]  # fmt: skip


def _loss(out: torch.Tensor, lm: torch.Tensor | None, y: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    loss = F.mse_loss(out.float(), y)
    if lm is not None:
        loss = loss + F.cross_entropy(lm.float(), tok[:, 0])
    return loss


def _load(case: Case, folder: str):  # noqa: ANN202 - a generated module
    path = os.path.join(folder, f"{case.name}.py")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(case.source)
    spec = importlib.util.spec_from_file_location(f"corpus_{case.name}", path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


class _NoGuard:
    """Stands in for ``check_step`` to run a case without the guard (is a crash the guard's?)."""

    findings: list = []

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        pass

    def __enter__(self) -> _NoGuard:
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        return None


def _run_plain(case: Case, mod, net: torch.nn.Module, res: Result, guard: bool = True) -> None:  # noqa: ANN001
    opts = mod.make_optimizers(net)
    micro = 2 if case.setup == "plain-accum" else 1
    dtype = {"plain-bf16": torch.bfloat16, "plain-fp16-scaler": torch.float16}.get(case.setup)
    scaler = torch.amp.GradScaler("cpu") if case.setup == "plain-fp16-scaler" else None
    batches = _batches(case.seed, max(8, case.steps * micro))
    for step in range(case.steps):
        opt = {"plain-2opt": None, "plain-2opt-list": opts}.get(case.setup, opts[0])
        chk = (check_step if guard else _NoGuard)(net, opt, step=step, scaler=scaler)
        try:
            with chk:
                for o in opts:
                    o.zero_grad()
                for m in range(micro):
                    x, tok, y = batches[step * micro + m]
                    ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
                    with ctx:
                        out, lm = net(x, tok)
                        loss = _loss(out, lm, y, tok)
                    if scaler is not None:
                        loss = scaler.scale(loss)
                    (loss / micro).backward()
                if case.setup == "plain-clip":
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                for o in opts:
                    if scaler is not None:
                        scaler.step(o)
                    else:
                        o.step()
                if scaler is not None:
                    scaler.update()
        except GradGuardError as err:
            res.raised = True
            _collect(res, err.findings, "")
            _collect(res, chk.findings, "")
            return
        _collect(res, chk.findings, "")


class _Lit(LightningModule):
    def __init__(self, net: torch.nn.Module, mod, manual: bool) -> None:  # noqa: ANN001
        super().__init__()
        self.net = net
        self._mod = mod
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, tok, y = batch
        out, lm = self.net(x, tok)
        loss = _loss(out, lm, y, tok)
        if self.automatic_optimization:
            return loss
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for o in opts:
            o.zero_grad()
        self.manual_backward(loss)
        for o in opts:
            o.step()
        return None

    def configure_optimizers(self):  # noqa: ANN201
        opts = self._mod.make_optimizers(self.net)
        return opts if len(opts) > 1 else opts[0]


def _run_lit(case: Case, mod, net: torch.nn.Module, res: Result, folder: str, guard_on: bool = True) -> None:  # noqa: ANN001
    kinds = ("frozen", "unused", "detached", "orphan", "stale", "nonfinite", "zero")
    diagnose = "always" if case.setup == "lit-always" else "on_finding"
    window = {"idle_window": 1} if case.setup == "lit-window1" else {}
    guard = GradGuard(**{f"on_{k}": "warn" for k in kinds}, diagnose=diagnose, **window)
    xs, toks, ys = zip(*_batches(case.seed, 16), strict=True)
    ds = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(toks), torch.cat(ys))
    data = torch.utils.data.DataLoader(ds, batch_size=4)
    opts = {"max_steps": case.steps}
    if case.setup == "lit-bf16":
        opts["precision"] = "bf16-mixed"
    if case.setup == "lit-accum":
        opts["accumulate_grad_batches"] = 2
    if case.setup == "lit-clip":
        opts["gradient_clip_val"] = 1.0
    trainer = make_trainer(folder, [guard] if guard_on else [], **opts)
    try:
        trainer.fit(_Lit(net, mod, manual=case.setup == "lit-manual2"), train_dataloaders=data)
    except GradGuardError as err:
        res.raised = True
        _collect(res, err.findings, "net.")
    _collect(res, guard.findings, "net.")
    if not res.raised and case.setup != "lit-manual2" and trainer.global_step != case.steps:
        raise AssertionError(f"corpus runner: the Trainer ran {trainer.global_step} steps, not {case.steps}")


def _collect(res: Result, findings, prefix: str) -> None:  # noqa: ANN001
    for f in findings:
        name = f.param.removeprefix(prefix)
        res.got.add((f.kind, name))
        res.wheres.setdefault((f.kind, name), f.where)
        res.messages.setdefault((f.kind, name), f.message)


def run_case(case: Case, folder: str, guard: bool = True) -> tuple[Result, str]:
    """Run one case (its source written to ``folder``); returns the result and the source's path.

    A crash is re-run without the guard: if the model fails there too, the case is invalid (``crash`` says so).
    """
    res = Result(case)
    t0 = time.perf_counter()
    path = ""
    try:
        mod, path = _load(case, folder)
        torch.manual_seed(case.seed)
        net = mod.Net()
        quiet = io.StringIO()  # the run report GradGuard prints at the end of fit
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            if case.setup.startswith("plain"):
                _run_plain(case, mod, net, res, guard)
            else:
                _run_lit(case, mod, net, res, folder, guard)
    except Exception as err:  # noqa: BLE001 - a crash is a result
        tb = traceback.extract_tb(err.__traceback__)
        ours = [fr for fr in tb if "lightning_gradguard" in fr.filename and fr.name != "__torch_function__"]
        inner = ours[-1] if ours else (tb[-1] if tb else None)
        at = f" at {os.path.basename(inner.filename)}:{inner.lineno} ({inner.name})" if inner else ""
        res.crash = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}{at}"
        if guard and run_case(case, folder, guard=False)[0].crash is not None:
            res.crash = "INVALID CASE (fails without the guard too): " + res.crash
    res.seconds = time.perf_counter() - t0
    return res, path


def validate_case(case: Case, folder: str) -> list[str]:
    """Check the ground truth against raw torch, without the guard: one fp32 forward/backward, then each parameter's
    gradient must be what its expected kinds say (``None`` for detached/unused, all zero, non-finite, or usable).

    Returns the disagreements (empty: the construction holds). Cases whose truth depends on more than one step or on
    the setup (idle branches, a graphless loss, clipping a NaN into every gradient) are skipped.
    """
    if case.graphless or case.variant == "idle_branch" or (case.kind == "nonfinite" and case.setup == "plain-clip"):
        return []
    mod, _ = _load(case, folder)
    torch.manual_seed(case.seed)
    net = mod.Net()
    x, tok, y = _batches(case.seed)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a planted reentrant checkpoint without grad inputs warns
        out, lm = net(x, tok)
        _loss(out, lm, y, tok).backward()
    kinds: dict[str, set[str]] = defaultdict(set)
    for k, p in case.expected:
        kinds[p].add(k)
    held = {id(p) for opt in mod.make_optimizers(net) for g in opt.param_groups for p in g["params"]}
    bad = []
    for name, p in net.named_parameters():
        k, g = kinds.get(name, set()), p.grad
        if g is not None and g.is_sparse:
            g = g.coalesce().values()
        if "frozen" in k:
            ok = not p.requires_grad
        elif k & {"detached", "unused"}:
            ok = g is None
        elif "zero" in k:
            ok = g is not None and not bool(g.ne(0).any())
        elif "nonfinite" in k:
            ok = g is not None and not bool(torch.isfinite(g).all())
        elif not p.requires_grad or (id(p) not in held and "orphan" not in k):
            continue  # frozen and left out, or an EMA copy: nothing to say
        else:
            ok = g is not None and bool(torch.isfinite(g).all()) and bool(g.ne(0).any())
        if not ok:
            state = "None" if g is None else f"norm {float(g.double().norm()):.3g}"
            bad.append(f"{case.name} {name}: expected {sorted(k) or 'a usable gradient'}, torch gives {state}")
    return bad


# --------------------------------------------------------------------------- scoring
def score(results: list[tuple[Result, str]]) -> dict:
    """Totals over a run."""
    matrix: dict[str, Counter] = defaultdict(Counter)
    where_right = where_total = 0
    for res, path in results:
        matrix[res.case.kind][res.label] += 1
        r, t = res.where_hits(path)
        where_right += r
        where_total += t
    buggy = [r for r, _ in results if r.case.kind != "none"]
    healthy = [r for r, _ in results if r.case.kind == "none"]
    return {
        "matrix": matrix,
        "buggy": len(buggy),
        "healthy": len(healthy),
        "kinds_ok": sum(r.kinds_ok for r in buggy),
        "params_ok": sum(r.params_ok for r in buggy),
        "healthy_fp": sum(bool(r.got) for r in healthy),
        "hedged_ok": sum(r.kinds_ok and r.judged != r.got for r in buggy),
        "crashes": sum(r.crash is not None for r, _ in results),
        "where_right": where_right,
        "where_total": where_total,
        "cut_cases_ok": sum(r.where_hits(p)[0] == r.where_hits(p)[1] for r, p in results if r.case.cut_lines),
        "cut_cases": sum(bool(r.case.cut_lines) for r, _ in results),
        "call_total": sum(len(r.case.call_lines) for r, _ in results),
        "call_right": sum(len(r.case.call_lines) - len(r.call_misses(p)) for r, p in results),
    }


def failure_class(res: Result, path: str) -> str | None:
    """A short signature of what went wrong (``None``: all right)."""
    c = res.case
    if res.crash is not None:
        return f"crash: {res.crash}"
    if c.kind == "none":
        return f"false positive: {sorted(res.reported_kinds)} under {c.setup}" if res.got else None
    r, t = res.where_hits(path)
    if res.params_ok and r == t and not res.call_misses(path):
        return None
    if not res.kinds_ok:
        return f"{c.kind}/{c.variant} reported as {res.label}"
    if not res.params_ok:
        return f"{c.kind}/{c.variant}: right kinds, wrong parameters"
    return f"{c.kind}/{c.variant}: wrong `where`"


def describe(res: Result, path: str) -> str:
    """One paragraph about a failing case: what was expected and what came."""
    c = res.case
    miss = sorted(c.expected - res.got)
    extra = sorted(res.got - c.expected)
    lines = [f"{c.name} (seed {c.seed}, {c.setup}, trunk {'/'.join(c.blocks)})"]
    if res.crash:
        lines.append(f"crash: {res.crash}")
    if miss:
        lines.append(f"missing: {miss[:6]}{' ...' if len(miss) > 6 else ''}")
    if extra:
        lines.append(f"unexpected: {extra[:6]}{' ...' if len(extra) > 6 else ''}")
    bad = []
    for p, line in sorted(c.cut_lines.items()):
        w = res.wheres.get(("detached", p))
        if w != expected_where(path, line) and not (c.unfollowable and ("unused", p) in res.got):
            bad.append(f"{p}: want {expected_where(path, line)}, got {w}")
    bad += res.call_misses(path)
    if bad:
        lines.append("where: " + "; ".join(bad[:3]))
    return " | ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=N_CASES, help="number of cases (seeds 0..n-1)")
    parser.add_argument("--only", type=int, nargs="*", help="run these seeds only (prints each case's source)")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/corpus.md")
    parser.add_argument("--out", default="docs/corpus.md")
    parser.add_argument("--validate", action="store_true", help="check the ground truth against raw torch only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_gradguard").setLevel(logging.ERROR)
    seeds = args.only if args.only else list(range(args.n))
    with tempfile.TemporaryDirectory(prefix="gradguard-corpus-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checked = [validate_case(generate(seed), folder) for seed in seeds]
    bad = [line for lines in checked for line in lines]
    validated = f"{len(seeds) - sum(bool(lines) for lines in checked)}/{len(seeds)}"
    if args.validate or bad:
        print("\n".join(bad[:50]) or f"ground truth holds for all {len(seeds)} models (one fp32 step, raw torch)")
        return 1 if bad else 0
    t0 = time.perf_counter()
    results = []
    # below the working directory, so that the `where` paths come relative (as for a user's own code)
    with tempfile.TemporaryDirectory(prefix=".gradguard-corpus-", dir=os.getcwd()) as folder:
        for seed in seeds:
            res, path = run_case(generate(seed), folder)
            results.append((res, path))
            if args.only:
                print(res.case.source)
                print(f"expected: {sorted(res.case.expected)}\ncut lines: {res.case.cut_lines}")
                print(f"got: {sorted(res.got)}\nwheres: {res.wheres}\ncrash: {res.crash}")
        elapsed = time.perf_counter() - t0
        text = render(results, elapsed, validated)
    print(text)
    if not args.no_write and not args.only:
        Path(args.out).write_text(text, encoding="utf-8")
    s = score(results)
    ok = s["params_ok"] == s["buggy"] and s["healthy_fp"] == 0 and s["crashes"] == 0
    return 0 if ok else 1


ABOUT = """\
Each model is Python source generated from a seed (`tests/corpus/corpus_gen.py`) and imported from a file, so the
`path:line` of every cut is known. A trunk of 2-4 blocks (linear, optionally under non-reentrant activation
checkpointing; residual MLP, also as a method of the model under reentrant or non-reentrant checkpointing; Conv1d;
multi-head attention; GRU/LSTM/RNN; embedding, dense with a tied head or `sparse=True`; soft routing over two
experts; LayerNorm; BatchNorm; dropout) feeds a linear head. One bug is planted at a random place, or none; the
ground truth (kinds, parameter names, and the line of each cut) follows from the construction, never from running
the guard. Healthy models include decoys that look like bugs but are not (a `.detach()`-ed batch mean subtracted,
`.item()`/numpy only for logging, a `no_grad` statistic, `torch.where` on a comparison, a one-hot of `argmax`
multiplying `h`, a frozen block left out of the optimizer, a trainable EMA copy of the head updated under `no_grad`
and in no optimizer) and, under Lightning, a branch taken on every other batch (idle, not unused, inside GradGuard's
`idle_window`).

Setups: `plain` (`check_step(model, opt)`, 1-2 blocks), `plain-bf16` (autocast), `plain-accum` (two micro-batches),
`plain-clip` (`clip_grad_norm_` before the step: a NaN then reaches every gradient), `plain-2opt`
(`check_step(model)`, two optimizers), `plain-2opt-list` (`check_step(model, [opt_a, opt_b])`), `plain-fp16-scaler`
(float16 autocast, `GradScaler`, `check_step(..., scaler=)`, 20 steps: a NaN counts once the scale has fallen to 1);
`lit` (Trainer, 4 steps), `lit-bf16` (`bf16-mixed`), `lit-accum` (`accumulate_grad_batches=2`), `lit-clip`
(`gradient_clip_val`), `lit-manual2` (manual optimization, two optimizers), `lit-long` (20 steps, beyond the idle
window), `lit-always` (`diagnose="always"`), `lit-window1` (`idle_window=1`: every step judged alone). GradGuard
runs with every action `"warn"`; a loss without a graph raises `GradGuardError`, whose findings are scored. A
planted NaN runs one step (the update spreads it to every parameter). Bugs: cuts after a block (`.detach()`,
`.data`, `detach_()`, numpy round trips, `.item()`/ `float()`/`.tolist()` re-wrapped with or without
Python/`math`/numpy arithmetic, `torch.Tensor(list)`, `nn.Parameter`, copied leaves, `deepcopy`, comparisons,
`argmax`/`topk`/`gather` indices, integer casts), cuts inside a block (residual branch, attention, embedding term,
router), `no_grad`/`set_grad_enabled(False)`/ `inference_mode` around a block, `.data`/copy of one weight, a
reentrant checkpoint without grad inputs, a cut after the head; never-called module, branch never taken, discarded
output; frozen weights in the optimizer; a block or the head missing from the optimizer; an optimizer over a copy of
the head or the model; NaN/Inf gradients (custom backward, `sqrt(0)`, NaN in the forward); all-zero gradients
(custom backward, `* 0`, `round`, `floor`, `sign`). Values sent through `str` truly cannot be followed: there
`unused` is accepted if its message says the value left torch ("hedged")."""


def render(results: list[tuple[Result, str]], elapsed: float, validated: str = "") -> str:
    """The report: totals, the confusion matrix and every failure class with an example."""
    s = score(results)
    cols = list(KINDS)
    extra_cols = sorted({lab for row in s["matrix"].values() for lab in row} - set(cols) - {"crash"})
    cols = cols + extra_cols + ["crash"]
    out = ["# Generated bug corpus", ""]
    out.append(f"`make corpus` ({len(results)} models, {elapsed:.0f} s): {s['buggy']} with one planted bug, "
               f"{s['healthy']} healthy.")  # fmt: skip
    out += ["", ABOUT]
    out += [
        "",
        "## Result",
        "",
        f"- right kinds: {s['kinds_ok']}/{s['buggy']} buggy models (counting {s['hedged_ok']} `str` round trips "
        "reported `unused` with a message that says the value left torch)",
        f"- right kinds and parameters: {s['params_ok']}/{s['buggy']}",
        f"- right `where` (detached parameters): {s['where_right']}/{s['where_total']} "
        f"({s['cut_cases_ok']}/{s['cut_cases']} models with a cut)",
        f"- right `where` of the parameters of a module whose output is discarded (the line that called it): "
        f"{s['call_right']}/{s['call_total']}",
        f"- healthy models with a finding: {s['healthy_fp']}/{s['healthy']}",
        f"- crashes: {s['crashes']}",
        f"- ground truth checked against raw torch (one fp32 step without the guard; `--validate`): {validated} "
        "models agree",
        "",
        "## Confusion matrix",
        "",
        "Rows: the planted kind. Columns: the kinds reported (the planted kind when exactly the expected kinds were "
        "reported; a stale copy also leaves its originals orphaned; a `str` round trip may be `unused` if hedged). "
        "`none`: nothing reported; `(hedged)`: every wrong `unused` says the value left torch.",
        "",
        "| planted \\ reported | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for k in KINDS:
        row = s["matrix"].get(k, Counter())
        out.append(f"| {k} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    by_variant: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for res, path in results:
        by_variant[(res.case.kind, res.case.variant)][1] += 1
        by_variant[(res.case.kind, res.case.variant)][0] += failure_class(res, path) is None
    out += ["", "## By bug variant", "", "| kind | variant | all right | models |", "|---|---|---|---|"]
    out += [f"| {k} | {v} | {n[0]} | {n[1]} |" for (k, v), n in sorted(by_variant.items())]
    by_setup: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for res, path in results:
        by_setup[res.case.setup][1] += 1
        by_setup[res.case.setup][0] += failure_class(res, path) is None
    out += ["", "## By setup", "", "| setup | all right | models |", "|---|---|---|"]
    out += [f"| {k} | {v[0]} | {v[1]} |" for k, v in sorted(by_setup.items())]
    classes: dict[str, list[tuple[Result, str]]] = defaultdict(list)
    for res, path in results:
        fc = failure_class(res, path)
        if fc:
            classes[fc].append((res, path))
    out += ["", "## Failures", ""]
    if not classes:
        out.append("None.")
    for fc, items in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        seeds = ", ".join(str(r.case.seed) for r, _ in items)
        out.append(f"- **{fc}** — {len(items)} model(s); seeds {seeds}")
        if fc.startswith("crash"):
            kinds = Counter(f"{r.case.kind}/{r.case.variant} under {r.case.setup}" for r, _ in items)
            out.append(f"  - cases: {', '.join(f'{k} ({n})' for k, n in kinds.most_common(8))}")
        out.append(f"  - e.g. {describe(*items[0])}")
    out += ["", "Re-run one case with its source and ground truth: `python tests/corpus/corpus_run.py --only SEED`."]
    times = sorted(r.seconds for r, _ in results)
    if times:
        out.append(f"Per model: median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
