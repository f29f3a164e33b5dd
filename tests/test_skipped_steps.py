"""Steps without a backward are handled as a user expects, with the real Trainer.

- A batch for which ``training_step`` returns ``None`` (Lightning's "skip this batch": no backward, and an optimizer
  step over no gradient) is not a checked step: it does not extend idle runs, count in idle shares or in the report,
  count as a traced step or use the trace budget, and a traced batch that gets skipped leaves the next real step
  traced. The same for an optimizer stepped without any ``backward()`` (manual optimization), and in ``check_step``.
- A ``backward()`` GradGuard does not see (a plain ``loss.backward()`` under manual optimization) is still judged
  from the gradients it left.
- LBFGS evaluates its closure (a backward and an ``on_before_optimizer_step``) several times per optimizer step:
  the step counts once, in the idle window, the idle shares and the report.
- A closure that ran without an optimizer step (a custom ``optimizer_step`` that skips the update) leaves nothing
  behind: its gradients are cleared before the next step, and so is what GradGuard knew of its loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from conftest import fit, kinds, loader, make_trainer, where
from lightning_gradguard import GradGuard, GradGuardError, GradGuardWarning, check_step
from lightning_gradguard.options import DEFAULT_WINDOW


class Skipping(LightningModule):
    """``head(body(x))``, plus ``aux`` as ``aux`` says (``"used"``, ``"unused"``: never called, ``"detached"``);
    ``training_step`` returns ``None`` on the batches ``skip(batch_idx)`` picks."""

    def __init__(self, skip: Callable[[int], bool], aux: str = "used", set_to_none: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.aux_mode = aux
        self.set_to_none = set_to_none
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        h = torch.tanh(self.body(x))
        out = self.head(h)
        if self.aux_mode == "used":
            out = out + self.aux(h)
        elif self.aux_mode == "detached":
            out = out + self.aux(h).detach()  # CUT: aux
        return ((out.squeeze(-1) - y) ** 2).mean()

    def training_step(self, batch, batch_idx):
        if self.skip(batch_idx):
            return None
        return self.loss(batch)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=self.set_to_none)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


#: The healthy runs below (``fit(..., n=4 * max_steps, **SILENT)``): batches of 4, Lightning's own warnings about the
#: skipped batches silenced, a GradGuard warning raised.
SILENT = {"batch_size": 4, "ignore": UserWarning, "error": GradGuardWarning}


def every_other(batch_idx: int) -> bool:
    return batch_idx % 2 == 0


# ---------------------------------------------------------------------------------------------------- skipped batches
@pytest.mark.parametrize("set_to_none", [True, False])  # skipped gradients: None, or all zero
def test_skipped_batches_are_not_checked_steps(tmp_path, set_to_none):
    guard = GradGuard(idle_window=1)
    fit(tmp_path, Skipping(every_other, set_to_none=set_to_none), guard, max_steps=6, n=4 * 6, **SILENT)
    assert guard.findings == []
    assert guard._core.checks == 3
    assert set(guard._core.history.checked().values()) == {3}
    assert guard.report.idle_shares() == {}


def test_skipped_warm_up_batches_do_not_fill_the_idle_window(tmp_path):
    """20 skipped batches, then training: a healthy model is never raised (it was, at step 20: a 16-step run)."""
    guard = GradGuard()
    fit(tmp_path, Skipping(lambda i: i < 20), guard, max_steps=30, n=4 * 30, **SILENT)
    assert guard.findings == []
    assert guard._core.checks == 10


def test_a_dead_module_is_raised_at_its_16th_judged_step_between_skipped_batches(tmp_path):
    """Nearest true positive: the window counts the steps that were judged, not the skipped ones."""
    trainer = make_trainer(tmp_path, [guard := GradGuard()], max_steps=100)
    with pytest.raises(GradGuardError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(Skipping(every_other, aux="unused"), loader(n=400, batch_size=4))
    assert kinds(err.value.findings) == {("unused", "aux.weight"), ("unused", "aux.bias")}
    assert trainer.global_step == 2 * DEFAULT_WINDOW - 1  # the 16th odd step
    assert {(e.finding.step, e.last_step, e.count) for e in guard.report.entries} == {(1, 31, DEFAULT_WINDOW)}


@pytest.mark.parametrize("diagnose", ["first", "on_finding"])
def test_a_skipped_first_batch_leaves_the_first_judged_step_traced(tmp_path, diagnose):
    guard = GradGuard(diagnose=diagnose)
    trainer = make_trainer(tmp_path, [guard], max_steps=6)
    with pytest.raises(GradGuardError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(Skipping(lambda i: i == 0, aux="detached"), loader(n=24, batch_size=4))
    assert kinds(err.value.findings) == {("detached", "aux.weight"), ("detached", "aux.bias")}
    assert {f.where for f in err.value.findings} == {where("CUT: aux")}
    assert {f.step for f in err.value.findings} == {1}
    assert guard._core.schedule.traced_steps == 1  # the skipped batch did not use the trace budget


# ------------------------------------------------------------------------------------------------- manual optimization
class Manual(Skipping):
    """Manual optimization: ``opt.step()`` on every batch, the backward only where ``skip`` does not pick the batch;
    ``raw``: ``loss.backward()`` instead of ``self.manual_backward(loss)`` (no hook sees it)."""

    def __init__(self, skip: Callable[[int], bool], aux: str = "used", raw: bool = False) -> None:
        super().__init__(skip, aux)
        self.automatic_optimization = False
        self.raw = raw

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        if not self.skip(batch_idx):
            loss = self.loss(batch)
            if self.raw:
                loss.backward()
            else:
                self.manual_backward(loss)
        opt.step()


def test_manual_optimizer_step_without_a_backward_is_not_a_checked_step(tmp_path):
    guard = GradGuard(idle_window=1)
    fit(tmp_path, Manual(every_other), guard, max_steps=6, n=4 * 6, **SILENT)
    assert guard.findings == []
    assert guard._core.checks == 3


def test_a_backward_no_hook_saw_is_still_judged_from_its_gradients(tmp_path):
    """Nearest correct code for the rule above: `loss.backward()` (not `manual_backward`) under manual optimization
    leaves gradients, so the step is judged; a module it never used is still found."""
    trainer = make_trainer(tmp_path, [GradGuard(idle_window=1)], max_steps=6)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(Manual(lambda i: False, aux="unused", raw=True), loader(n=24, batch_size=4))
    assert kinds(err.value.findings) == {("unused", "aux.weight"), ("unused", "aux.bias")}


def test_check_step_block_stepping_without_any_gradient_checks_nothing_and_says_so():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    says = "an optimizer stepped, but none of its parameters had a gradient, so nothing was checked"
    with pytest.warns(GradGuardWarning, match=says), check_step(model, opt, strict=True) as chk:
        opt.zero_grad()
        opt.step()
    assert chk.findings == []
    assert chk._core.history.checked() == {}


# ---------------------------------------------------------------------------------------------------- LBFGS
class WithLBFGS(Skipping):
    """LBFGS evaluates the closure (forward, backward, `on_before_optimizer_step`) up to ``max_iter`` times per step.
    ``frozen``: a parameter with ``requires_grad=False`` in the optimizer too."""

    def __init__(self, skip: Callable[[int], bool], aux: str = "used", frozen: bool = False) -> None:
        super().__init__(skip, aux)
        if frozen:
            self.scale = nn.Parameter(torch.ones(1), requires_grad=False)

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


class Evaluations(GradGuard):
    """Counts the closure evaluations GradGuard sees."""

    evaluations = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.evaluations += 1
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def test_lbfgs_evaluations_of_one_step_count_as_one_checked_step(tmp_path):
    """A module LBFGS never uses: 6 optimizer steps of 4 evaluations each are 6 checked steps, fewer than the
    window (it raised after 4 steps: 16 evaluations), reported at the end with count 6; a frozen parameter, judged
    on every evaluation, is counted once per step too."""
    guard = Evaluations(on_unused="warn")
    with pytest.warns(GradGuardWarning, match="any of the 6 checked steps of the run"):
        make_trainer(tmp_path, [guard], max_steps=6).fit(WithLBFGS(lambda i: False, "unused", frozen=True), loader())
    assert guard.evaluations > 6 * 3  # several evaluations per step, really
    assert kinds(guard.findings) == {("unused", "aux.weight"), ("unused", "aux.bias"), ("frozen", "scale")}
    assert {(e.finding.step, e.last_step, e.count) for e in guard.report.entries} == {(0, 5, 6)}
    assert set(guard._core.history.checked().values()) == {6}


def test_lbfgs_on_a_healthy_model_is_silent(tmp_path):
    guard = GradGuard(idle_window=1, diagnose="always")
    fit(tmp_path, WithLBFGS(lambda i: False), guard, max_steps=4, n=4 * 4, **SILENT)
    assert guard.findings == []
    assert guard._core.schedule.traced_steps == 4  # one per optimizer step: the first evaluation of each


# ---------------------------------------------------------------------------------------------------- closure, no step
class UpdateSkipped(LightningModule):
    """A custom ``optimizer_step`` that runs the closure (forward and backward) on even batches but skips the
    update; ``aux`` is used on those batches only, so it never gets a gradient on a step that updates."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.body(x))
        out = self.head(h)
        if batch_idx % 2 == 0:
            out = out + self.aux(h)
        return ((out.squeeze(-1) - y) ** 2).mean()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if batch_idx % 2 == 0:
            optimizer_closure()  # gradients computed, no update; the next step's zero_grad clears them
            return
        optimizer.step(closure=optimizer_closure)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_closure_without_an_update_leaves_nothing_for_the_next_step(tmp_path):
    """`aux` gets no gradient on any step that updates: `unused`, from the steps' own losses (the loss of the skipped
    update, whose graph reached `aux`, made it `detached`)."""
    guard = GradGuard(idle_window=1, on_unused="warn")
    with pytest.warns(GradGuardWarning, match="aux"):
        make_trainer(tmp_path, [guard], max_steps=6).fit(UpdateSkipped(), loader(n=48, batch_size=4))
    assert kinds(guard.findings) == {("unused", "aux.weight"), ("unused", "aux.bias")}
    assert {(e.finding.step, e.last_step, e.count) for e in guard.report.entries} == {(1, 5, 3)}
