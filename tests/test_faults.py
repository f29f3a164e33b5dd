"""Faults: what the guard does when training goes wrong around it.

An exception inside a traced forward propagates unchanged and leaves no mode active; Ctrl-C still writes the run
report; the callback survives pickling and deep copies (spawn strategies) before and after a run; a checkpoint taken
while a candidate waits for a traced step resumes without losing or repeating it.
"""

from __future__ import annotations

import copy
import json
import pickle
import signal

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from conftest import loader, make_trainer
from lightning_gradguard import GradGuard, check_step
from lightning_gradguard.report import RunReport

pytestmark = pytest.mark.filterwarnings("ignore::lightning_gradguard.policy.GradGuardWarning")


class BoomError(Exception):
    """The user's own error."""


class Net(LightningModule):
    """``body -> head``, and an ``aux`` layer that ``training_step`` uses unless ``skip_aux_at`` names the step.

    ``fail_at`` (a step) and ``error`` (an exception object): raise it from inside the forward pass at that step,
    in the middle of a ``no_grad`` block and after a ``.item()`` (so the tracer holds state when it happens).
    """

    def __init__(self, fail_at: int | None = None, error: BaseException | None = None, skip_aux_at=()) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)
        self.fail_at = fail_at
        self.error = error
        self.skip_aux_at = tuple(skip_aux_at)

    def forward(self, x):
        h = torch.relu(self.body(x))
        if self.global_step == self.fail_at:
            scale = h.mean().item()
            with torch.no_grad():
                h = h * scale
                raise self.error
        out = self.head(h)
        if self.global_step not in self.skip_aux_at:
            out = out + self.aux(h)
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return loader(n=64)


def assert_released(guard: GradGuard) -> None:
    """No mode is active, grad mode is back on, and the guard holds no loss or trace."""
    assert _get_current_function_mode_stack() == []
    assert torch.is_grad_enabled()
    core = guard._core
    assert core._losses == []
    assert core.tracer is None or (not core.tracer.active and not core.tracer.recorded)


# ---------------------------------------------------------------------------------------------------- exceptions
@pytest.mark.parametrize("diagnose", ["always", "on_finding"])
def test_exception_in_traced_forward_propagates_unchanged_and_leaves_no_mode(tmp_path, diagnose):
    error = BoomError("user code failed")
    guard = GradGuard(diagnose=diagnose)
    model = Net(fail_at=1, error=error)
    with pytest.raises(BoomError) as exc_info:
        make_trainer(tmp_path, [guard], max_steps=3).fit(model)
    assert exc_info.value is error  # the same object, not wrapped or re-raised as something else
    assert exc_info.value.__cause__ is None
    assert exc_info.value.__context__ is None
    assert_released(guard)
    guard2 = GradGuard(diagnose=diagnose)  # and the next run starts clean
    make_trainer(tmp_path, [guard2], max_steps=2).fit(Net())
    assert guard2.findings == []


def test_exception_in_check_step_propagates_unchanged_and_leaves_no_mode():
    model = Net()
    error = BoomError("inside check_step")
    with pytest.raises(BoomError) as exc_info, check_step(model, torch.optim.SGD(model.parameters(), lr=0.1)):
        h = model.body(torch.randn(4, 8))
        _ = h.sum().item()
        with torch.no_grad():
            raise error
    assert exc_info.value is error
    assert _get_current_function_mode_stack() == []
    assert torch.is_grad_enabled()


@pytest.fixture
def restore_sigint():
    """Lightning ignores SIGINT while it shuts down after a KeyboardInterrupt; put the handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_ctrl_c_still_writes_the_report(tmp_path, restore_sigint):
    guard = GradGuard(on_unused="warn", idle_window=1)  # aux is a finding from its first step on
    model = Net(fail_at=2, error=KeyboardInterrupt(), skip_aux_at=range(100))  # aux unused: the report has it
    with pytest.raises(SystemExit):  # Lightning catches the KeyboardInterrupt, shuts down, and exits with 1
        make_trainer(tmp_path, [guard], max_steps=5).fit(model)
    report = json.loads((tmp_path / "gradguard_report.json").read_text())
    assert {(f["kind"], f["param"]) for f in report["findings"]} == {("unused", "aux.weight"), ("unused", "aux.bias")}
    assert {f["count"] for f in report["findings"]} == {2}  # steps 0 and 1 ran; step 2 was interrupted
    assert_released(guard)


def test_ctrl_c_report_shows_what_was_idle_so_far_with_the_default_window(tmp_path, restore_sigint):
    guard = GradGuard()
    model = Net(fail_at=2, error=KeyboardInterrupt(), skip_aux_at=range(100))
    with pytest.raises(SystemExit):
        make_trainer(tmp_path, [guard], max_steps=5).fit(model)
    report = json.loads((tmp_path / "gradguard_report.json").read_text())
    assert report["findings"] == []  # 2 steps are fewer than the window: idle, not yet a finding
    assert report["idle"] == {"aux": 1.0}
    assert_released(guard)


# ---------------------------------------------------------------------------------------------------- copies
def _same_guard(a: GradGuard, b: GradGuard) -> None:
    assert repr(a) == repr(b)
    assert a.state_key == b.state_key
    assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings]


OPTIONS = {"on_unused": "warn", "ignore": ["x.*"], "diagnose": "always", "norms": "param", "update_ratio": True}


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_callback_copies_before_a_run_and_the_copy_trains(tmp_path, how):
    guard = GradGuard(**OPTIONS)
    clone = pickle.loads(pickle.dumps(guard)) if how == "pickle" else copy.deepcopy(guard)
    _same_guard(guard, clone)
    make_trainer(tmp_path, [clone], max_steps=2).fit(Net(skip_aux_at=range(100)))
    assert {f.param for f in clone.findings} == {"aux.weight", "aux.bias"}
    assert guard.findings == []  # the original is untouched


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_callback_copies_after_a_run_with_its_findings(tmp_path, how):
    guard = GradGuard(**OPTIONS)
    make_trainer(tmp_path, [guard], max_steps=2).fit(Net(skip_aux_at=range(100)))
    assert guard.findings
    clone = pickle.loads(pickle.dumps(guard)) if how == "pickle" else copy.deepcopy(guard)
    _same_guard(guard, clone)
    assert clone.report.to_dict() == guard.report.to_dict()


# ---------------------------------------------------------------------------------------------------- resume
def _aux_entries(report: RunReport) -> list[tuple[str, str, int, int]]:
    return sorted((e.finding.kind, e.finding.param, e.finding.step, e.count) for e in report.entries)


def _fit(tmp_path, guard: GradGuard, max_steps: int, skip_aux_at, ckpt_path=None, callbacks=()) -> None:
    trainer = make_trainer(tmp_path, [guard, *callbacks], max_steps=max_steps, enable_checkpointing=bool(callbacks))
    trainer.fit(Net(skip_aux_at=skip_aux_at), ckpt_path=ckpt_path)


def _fit_to_step_3_and_resume_to_6(tmp_path, skip_aux_at, **options) -> tuple[dict, GradGuard]:
    """Fit 3 steps with a checkpoint after the third, then a new guard resumes from it to step 6.

    Returns the guard's saved state in the checkpoint and the resumed guard."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = GradGuard(on_unused="warn", **options)
    _fit(tmp_path, first, 3, skip_aux_at, callbacks=[checkpoint])
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    second = GradGuard(on_unused="warn", **options)
    _fit(tmp_path, second, 6, skip_aux_at, ckpt_path=str(path))
    return saved, second


def test_resume_keeps_the_idle_run_of_a_parameter_that_is_never_used(tmp_path):
    # aux is never used: with idle_window=4 it becomes `unused` at step 3, after the checkpoint (steps 0-2 are idle);
    # the finding is dated back to the first step of the run and counts every step without a gradient (0-5).
    reference = GradGuard(on_unused="warn", idle_window=4)
    _fit(tmp_path / "reference", reference, 6, range(100))
    assert _aux_entries(reference.report) == [("unused", "aux.bias", 0, 6), ("unused", "aux.weight", 0, 6)]
    saved, resumed = _fit_to_step_3_and_resume_to_6(tmp_path, range(100), idle_window=4)
    assert saved["report"]["findings"] == [], "the checkpoint is taken while aux is idle, not yet a finding"
    assert _aux_entries(resumed.report) == _aux_entries(reference.report)  # neither lost nor counted twice


def test_resume_reference_run_reports_the_step_2_candidate_once(tmp_path):
    guard = GradGuard(on_unused="warn", idle_window=1)
    _fit(tmp_path, guard, 6, (2,))  # aux is left out on step 2 only, an untraced step under diagnose="on_finding"
    assert _aux_entries(guard.report) == [("unused", "aux.bias", 2, 1), ("unused", "aux.weight", 2, 1)]


def test_resume_from_a_checkpoint_taken_while_a_candidate_is_pending_keeps_it_once(tmp_path):
    # The reference run (test above) reports aux at step 2, once. The checkpoint comes right after step 2.
    saved, resumed = _fit_to_step_3_and_resume_to_6(tmp_path, (2,), idle_window=1)
    assert saved["report"]["findings"] == [], "the checkpoint is taken while aux waits for a traced step"
    assert _aux_entries(resumed.report) == [("unused", "aux.bias", 2, 1), ("unused", "aux.weight", 2, 1)]


def test_a_one_step_skip_gives_no_module_note_that_the_traced_step_disproves(tmp_path):
    guard = GradGuard(on_unused="warn", idle_window=1)
    _fit(tmp_path, guard, 6, (2,))
    assert _aux_entries(guard.report)  # the skip is reported...
    assert not [n for n in guard.report.notes if "never reached the loss" in n]  # ...but not as a discarded output
