"""The run report counts what happened: a finding's ``count`` is the number of checked steps on which it held,
``first_step`` the first and ``last_step`` the last of them, in ``guard.report``, the JSON, the console table and
TensorBoard's Text tab, across a checkpoint resume too.

Ground truth by construction: `aux`'s contribution to the loss is cut on exactly known optimizer steps (every step
of 40, every other step, steps 3 to 9), and the optimizer does not move the weights, so that nothing else changes
from step to step. A cut that is idle by design (runs shorter than ``idle_window`` and no traced step that sees a
cut) is no finding at all; every finding there is must count the planted steps, whatever ``diagnose`` and
``idle_window`` are.
"""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from conftest import events, fit, loader, make_trainer
from lightning_gradguard import GradGuard

STEPS = 40
PATTERNS = {
    "every step": list(range(STEPS)),
    "every other step": list(range(1, STEPS, 2)),
    "steps 3 to 9": list(range(3, 10)),
}
#: Every kind warns (the run goes on to the end); what is counted does not depend on the action.
WARN = {f"on_{kind}": "warn" for kind in ("unused", "detached", "zero", "nonfinite")}


class Still(torch.optim.SGD):
    """An optimizer that evaluates the closure and changes nothing: every step sees the same weights."""

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        return closure() if closure is not None else None


class Planted(LightningModule):
    """``head(body(x)) + aux(body(x))``, with `aux` cut as ``kind`` says on the optimizer steps in ``steps``:
    ``"detached"`` (its output `.detach()`-ed), ``"unused"`` (not called), ``"zero"`` (times 0) or ``"nonfinite"``
    (a NaN in `aux.weight`'s gradient, and in no other)."""

    def __init__(self, kind: str, steps: list[int]) -> None:
        super().__init__()
        self.kind = kind
        self.steps = set(steps)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.body(x))
        out = self.head(h)
        cut = self.global_step in self.steps
        if not (cut and self.kind == "unused"):
            a = self.aux(h)
            if cut and self.kind == "detached":
                a = a.detach()
            elif cut and self.kind == "zero":
                a = a * 0
            elif cut and self.kind == "nonfinite":
                a = a + (self.aux.weight * 0).abs().sum().sqrt()  # the value 0, the gradient NaN (inf * 0)
            out = out + a
        return ((out.squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return Still(self.parameters(), lr=0.1)


def fit_planted(tmp_path, kind: str, steps: list[int], guard: GradGuard, max_steps: int = STEPS, **kwargs) -> GradGuard:
    """``Planted(kind, steps)`` under ``guard``, its warnings (the findings counted here) silenced; the guard."""
    fit(tmp_path, Planted(kind, steps), guard, n=4 * STEPS, batch_size=4, ignore=Warning, max_steps=max_steps, **kwargs)
    return guard


def aux_entries(guard: GradGuard) -> dict[str, tuple[str, int, int, int]]:
    """``{param: (kind, first step, last step, count)}`` of the report's entries about `aux`."""
    return {
        e.finding.param: (e.finding.kind, e.finding.step, e.last_step, e.count)
        for e in guard.report.entries
        if e.finding.param.startswith("aux.")
    }


def reported(kind: str, pattern: str, diagnose: str, window: int) -> bool:
    """Whether the planted cut is a finding at all: a NaN always is; a missing or zero gradient is once a run of
    steps reaches the window, or at once when a traced step sees a `.detach()` (on the first step, or after an
    untraced step without a gradient, unless the trace lands on a step that was not cut)."""
    if kind == "nonfinite" or window == 1 or pattern == "every step":
        return True
    if kind == "detached":
        return diagnose == "always" or (diagnose == "on_finding" and pattern == "steps 3 to 9")
    return False


CASES = [
    *((kind, pattern, "on_finding", window) for kind in ("unused", "zero", "nonfinite") for pattern in PATTERNS
      for window in (1, 16)),
    *(("detached", pattern, diagnose, window) for pattern in PATTERNS for diagnose in ("on_finding", "always", "never")
      for window in (1, 16)),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "pattern", "diagnose", "window"), CASES)
def test_a_finding_counts_the_steps_it_held_on(tmp_path, kind, pattern, diagnose, window):
    planted = PATTERNS[pattern]
    guard = fit_planted(tmp_path, kind, planted, GradGuard(diagnose=diagnose, idle_window=window, **WARN))
    entries = aux_entries(guard)
    if not reported(kind, pattern, diagnose, window):
        assert entries == {}, "idle by design: no finding"
        return
    params = {"aux.weight"} if kind == "nonfinite" else {"aux.weight", "aux.bias"}
    assert set(entries) == params
    for _, first, last, count in entries.values():
        assert (first, last, count) == (planted[0], planted[-1], len(planted))
    assert {k for k, *_ in entries.values()} <= {kind, "unused"}  # untraced, a cut cannot be told from disuse
    assert [f.param for f in guard.findings if not f.param.startswith("aux.")] == []


@pytest.mark.parametrize(("kind", "diagnose"), [
    ("detached", "always"),  # was first 0, last 5, count 6: one more, at the step after the last (the end of fit)
    ("detached", "on_finding"),
    ("unused", "on_finding"),
    ("zero", "on_finding"),
])  # fmt: skip
def test_a_run_shorter_than_the_window_counts_its_steps_once(tmp_path, kind, diagnose):
    """Five steps, cut on each, fewer than the default window: reported at the end of `fit` (a warning) with the
    steps it held on, not once more for the end of `fit`."""
    guard = fit_planted(tmp_path, kind, list(range(5)), GradGuard(diagnose=diagnose, **WARN), max_steps=5)
    assert {e[1:] for e in aux_entries(guard).values()} == {(0, 4, 5)}


def table_rows(text: str, split: str) -> dict[str, list[str]]:
    """The rows of the report table (console: columns apart by two spaces or more; markdown: by pipes) that are
    about `aux`, by kind."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in (line.strip("| ").split(" | ") if split == "|" else re.split(r"\s{2,}", line))]
        if len(cells) > 4 and "aux" in cells[0]:
            rows[cells[1]] = cells
    return rows


@pytest.mark.parametrize(("kind", "pattern", "diagnose"), [
    ("detached", "every step", "on_finding"),  # was 26 short: the untraced steps before the window went uncounted
    ("detached", "steps 3 to 9", "always"),
    ("unused", "every step", "on_finding"),
    ("zero", "steps 3 to 9", "on_finding"),
    ("nonfinite", "every other step", "on_finding"),
])  # fmt: skip
def test_every_sink_shows_the_same_counts(tmp_path, caplog, kind, pattern, diagnose):
    """`guard.report`, the JSON written at the end of `fit`, the console table and TensorBoard's Text tab."""
    planted = PATTERNS[pattern]
    window = 1 if pattern != "every step" and kind != "detached" else 16
    logger = TensorBoardLogger(tmp_path, name="tb")
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    guard = fit_planted(
        tmp_path, kind, planted, GradGuard(diagnose=diagnose, idle_window=window, **WARN), logger=logger
    )
    truth = (planted[0], planted[-1], len(planted))
    params = {"aux.weight"} if kind == "nonfinite" else {"aux.weight", "aux.bias"}
    assert {p: e[1:] for p, e in aux_entries(guard).items()} == dict.fromkeys(params, truth)
    report = json.loads((tmp_path / "tb" / "version_0" / "gradguard_report.json").read_text())
    rows = [r for r in report["findings"] if r["param"].startswith("aux.")]
    assert {r["param"]: (r["first_step"], r["last_step"], r["count"]) for r in rows} == dict.fromkeys(params, truth)
    (console,) = table_rows(caplog.text, "  ").values()
    assert (int(console[3]), int(console[4])) == truth[::2]  # first step, count
    last = max(events(logger.log_dir).Tensors("gradguard/report/text_summary"), key=lambda e: e.step)
    text = last.tensor_proto.string_val[0].decode()
    items = re.findall(r"^- \*\*(\w+)\*\*: (.*?), first step (\d+), count (\d+)", text, flags=re.M)
    ((_, _, first, count),) = [item for item in items if "aux" in item[1]]
    assert (int(first), int(count)) == truth[::2]


@pytest.mark.parametrize(("kind", "window"), [("detached", 16), ("unused", 16), ("unused", 1), ("zero", 1)])
def test_counts_are_right_across_a_checkpoint_resume(tmp_path, kind, window):
    """Cut on every step; a checkpoint at step 10 (inside the first idle window), resumed to step 30: the run report
    counts 30 steps, as one run of 30 would."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=10)
    options = {"idle_window": window, **WARN}
    first = GradGuard(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [first, ckpt], max_steps=10, enable_checkpointing=True).fit(
            Planted(kind, list(range(30))), loader(n=120, batch_size=4)
        )
        resumed = GradGuard(**options)
        make_trainer(tmp_path, [resumed], max_steps=30, enable_checkpointing=True).fit(
            Planted(kind, list(range(30))), loader(n=120, batch_size=4), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    whole = fit_planted(tmp_path / "whole", kind, list(range(30)), GradGuard(**options), max_steps=30)
    assert aux_entries(resumed) == aux_entries(whole)
    assert {e[1:] for e in aux_entries(resumed).values()} == {(0, 29, 30)}
