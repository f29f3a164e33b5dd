"""Idle is not dead: parts that control flow skips on some steps train with the defaults; dead parts are still found.

Also: reentrant activation checkpointing, bounded tracing, and the per-step orphan check.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import fit, kinds, loader, make_trainer, where
from lightning_gradguard import GradGuard, GradGuardError, GradGuardWarning, check_step
from lightning_gradguard.history import History
from lightning_gradguard.options import DEFAULT_WINDOW
from lightning_gradguard.schedule import MAX_TRACED_STEPS

#: The data of most runs here (``loader(**DATA)``, ``fit(..., **DATA)``): 16 batches of 4 an epoch.
DATA = {"n": 64, "batch_size": 4}


def drops(step: int, layer: int, p: float) -> bool:
    """A fixed pseudo-random schedule (the same in every run, resumed or not): is ``layer`` dropped at ``step``?"""
    g = torch.Generator().manual_seed(1000 * step + layer)
    return layer == 0 and step == 0 or bool(torch.rand((), generator=g) < p)


class LayerDrop(LightningModule):
    """Four residual layers, each skipped on a step with probability ``p`` (wav2vec2/HuBERT ship p = 0.1); layer 0
    is skipped on step 0, the step that used to raise."""

    def __init__(self, p: float = 0.3, with_dead_head: bool = False) -> None:
        super().__init__()
        self.p = p
        self.inp = nn.Linear(8, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4))
        self.out = nn.Linear(16, 1)
        self.dead = nn.Linear(16, 1) if with_dead_head else None

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.inp(x)
        for k, layer in enumerate(self.layers):
            if not drops(self.global_step, k, self.p):
                h = h + layer(h)
        return ((self.out(h).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_layerdrop_trains_200_steps_with_the_defaults(tmp_path):
    guard = GradGuard()
    fit(tmp_path, LayerDrop(), guard, max_steps=200, error=GradGuardWarning, **DATA)
    assert guard.findings == []
    shares = guard.report.idle_shares()
    assert set(shares) == {f"layers.{k}" for k in range(4)}  # each layer once, not each of its Linear layers
    assert all(0.15 < v < 0.45 for v in shares.values())  # dropped with p = 0.3
    expected = sum(drops(s, 2, 0.3) for s in range(200)) / 200
    assert shares["layers.2"] == pytest.approx(expected)
    assert guard.report.to_dict()["idle"] == shares
    assert "layers.2:" in guard.report.table()
    assert guard._core.schedule.traced_steps <= MAX_TRACED_STEPS


def test_layerdrop_model_still_raises_a_never_called_head_within_the_window(tmp_path):
    trainer = make_trainer(tmp_path, [GradGuard()], max_steps=200)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(LayerDrop(with_dead_head=True), loader(**DATA))
    assert kinds(err.value.findings) == {("unused", "dead.weight"), ("unused", "dead.bias")}
    assert trainer.global_step == DEFAULT_WINDOW - 1  # raised at the 16th check, before its optimizer step
    f = err.value.findings[0]
    assert f.step == 0
    assert "never took part in the forward pass" in f.message  # the explanation of the traced first step, reused
    assert f"{DEFAULT_WINDOW} checked steps in a row" in f.message


def test_window_option_sets_when_a_dead_part_becomes_a_finding(tmp_path):
    trainer = make_trainer(tmp_path, [GradGuard(idle_window=3)], max_steps=50)
    with pytest.raises(GradGuardError, match="dead.weight"):
        trainer.fit(LayerDrop(p=0.0, with_dead_head=True), loader(**DATA))
    assert trainer.global_step == 2
    trainer = make_trainer(tmp_path, [GradGuard(idle_window=1)], max_steps=50)
    with pytest.raises(GradGuardError, match="layers.0.0.weight"):  # window 1: LayerDrop's step-0 skip raises
        trainer.fit(LayerDrop(), loader(**DATA))
    assert trainer.global_step == 0


def test_a_run_shorter_than_the_window_warns_about_never_used_parts_at_the_end(tmp_path):
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="too few to tell a dead part") as rec:
        fit(tmp_path, LayerDrop(p=0.0, with_dead_head=True), guard, max_steps=4, **DATA)
    assert kinds(guard.findings) == {("unused", "dead.weight"), ("unused", "dead.bias")}
    assert "any of the 4 checked steps of the run" in guard.findings[0].message
    assert "never took part in the forward pass" in guard.findings[0].message
    assert guard.report.entries[0].count == 4
    assert len([w for w in rec if issubclass(w.category, GradGuardWarning)]) == 1  # one per module


def test_a_one_step_run_of_a_layerdrop_model_does_not_raise(tmp_path):
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="layers.0.0.weight"):  # dropped on step 0: can't tell, so a warning
        fit(tmp_path, LayerDrop(p=0.0), guard, fast_dev_run=True, **DATA)
    assert {f.module for f in guard.findings} == {"layers.0.0"}


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "16", None])
def test_bad_idle_window_fails_at_construction(value):
    with pytest.raises(ValueError, match=rf"idle_window={value!r}"):
        GradGuard(idle_window=value)


class Experts(LightningModule):
    """Top-1 routing of 4 tokens over 4 experts: some experts get no token on some steps. ``dead`` experts are never
    routed to (a collapsed router)."""

    def __init__(self, dead: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.out = nn.Linear(8, 1)
        self.dead = dead

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.router(x)
        if self.dead:
            logits[:, list(self.dead)] = float("-inf")
        probs = logits.softmax(-1)
        choice = probs.argmax(-1)
        h = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(-1)
            if rows.numel():  # as Switch Transformers do: an expert without tokens is not called
                h = h.index_add(0, rows, expert(x[rows]) * probs[rows, e : e + 1])
        return ((self.out(h).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_experts_without_tokens_on_some_steps_are_idle_not_unused(tmp_path):
    guard = GradGuard(on_zero="raise")
    fit(tmp_path, Experts(), guard, max_steps=100, error=GradGuardWarning, **DATA)
    assert guard.findings == []
    shares = guard.report.idle_shares()
    assert shares
    assert set(shares) <= {f"experts.{e}" for e in range(4)}
    assert all(0 < v < 1 for v in shares.values())


class DenseExperts(LightningModule):
    """Every expert runs on every token; the router picks one output per token by index (tensor level) or, in the
    Python form, one expert's output for the whole batch: the others' outputs are computed and dropped."""

    def __init__(self, python_choice: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.out = nn.Linear(8, 1)
        self.python_choice = python_choice

    def training_step(self, batch, batch_idx):
        x, y = batch
        probs = self.router(x).softmax(-1)
        outs = [expert(x) for expert in self.experts]
        if self.python_choice:
            e = self.global_step % 4  # a schedule standing in for a batch-level routing decision
            h = outs[e] * probs[:, e : e + 1]
        else:
            choice = probs.argmax(-1)
            h = torch.stack(outs, 1)[torch.arange(len(x)), choice] * probs.gather(1, choice[:, None])
        return ((self.out(h).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("python_choice", [False, True])
def test_experts_computed_then_selected_are_idle_not_unused(tmp_path, python_choice):
    """Selected by index, the unchosen experts' outputs still reach the loss: all-zero gradients, idle. Selected in
    Python, they are computed and dropped, nothing else: idle too, every step traced."""
    guard = GradGuard(on_zero="raise", diagnose="always")
    fit(tmp_path, DenseExperts(python_choice), guard, max_steps=40, error=GradGuardWarning, **DATA)
    assert guard.findings == []
    assert set(guard.report.idle_shares()) <= {"experts", *(f"experts.{e}" for e in range(4))}


class AuxEveryThirdStep(LightningModule):
    """An auxiliary loss logged on every step and added to the loss on every third one (from the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.body(x))
        loss = ((self.out(h).squeeze(-1) - y) ** 2).mean()
        aux_loss = ((self.aux(h).squeeze(-1) - y) ** 2).mean()
        self.log("aux_loss", aux_loss)
        return loss + aux_loss if self.global_step % 3 == 0 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_an_output_logged_on_every_step_and_in_the_loss_on_some_is_idle(tmp_path):
    """Logged and left out of the loss on a traced step, but it had a gradient before: idle, not dead."""
    guard = GradGuard(diagnose="always")
    fit(tmp_path, AuxEveryThirdStep(), guard, max_steps=40, error=GradGuardWarning, **DATA)
    assert guard.findings == []
    assert guard.report.idle_shares() == {"aux": pytest.approx(26 / 40)}


def test_a_dead_expert_is_unused_within_the_window(tmp_path):
    trainer = make_trainer(tmp_path, [GradGuard()], max_steps=100)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(Experts(dead=(3,)), loader(**DATA))
    assert kinds(err.value.findings) == {("unused", "experts.3.weight"), ("unused", "experts.3.bias")}
    assert trainer.global_step == DEFAULT_WINDOW - 1


class DropPath(LightningModule):
    """Stochastic depth with a batch of one: the whole batch of the block is dropped (its gradient is all zero)."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p
        self.stem = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.stem(x)
        keep = torch.floor(1 - self.p + torch.rand(x.shape[0], 1))  # timm's drop_path
        h = h + self.block(h) * keep / (1 - self.p)
        return ((self.out(h).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_drop_path_of_a_whole_batch_is_idle_not_zero(tmp_path):
    model = DropPath()
    make_trainer(tmp_path, [guard := GradGuard(on_zero="raise")], max_steps=60).fit(model, loader(n=60, batch_size=1))
    assert guard.findings == []
    assert 0.1 < guard.report.idle_shares()["block"] < 0.5
    assert (tmp_path / "gradguard_report.json").exists()


def test_drop_path_that_always_drops_is_zero(tmp_path):
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, DropPath(p=0.9999999), GradGuard(on_zero="raise"), max_steps=30, **DATA)
    assert kinds(err.value.findings) == {("zero", "block.weight"), ("zero", "block.bias")}


class DetachFrom(LayerDrop):
    """The input layer is cut from step 3 on (an untraced step): not control flow."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.inp(x)
        if self.global_step >= 3:
            h = h.detach()  # CUT: from step 3
        for layer in self.layers:
            h = h + layer(h)
        return ((self.out(h).squeeze(-1) - y) ** 2).mean()


def test_a_cut_that_starts_on_an_untraced_step_is_detached_at_the_next_step(tmp_path):
    trainer = make_trainer(tmp_path, [GradGuard()], max_steps=30)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(DetachFrom(), loader(**DATA))
    assert trainer.global_step == 4  # step 3 idle; step 4 traced, which shows the cut
    assert kinds(err.value.findings) == {("detached", "inp.weight"), ("detached", "inp.bias")}
    assert {f.where for f in err.value.findings} == {where("CUT: from step 3")}


def test_resume_keeps_the_idle_history(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class UsedOnce(LayerDrop):
        def __init__(self):
            super().__init__(with_dead_head=True)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step == 0:
                loss = loss + self.dead(batch[0] @ torch.ones(8, 16)).mean()  # `dead` learns on step 0 only
            return loss

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=10)
    first = GradGuard()
    make_trainer(tmp_path, [first, ckpt], max_steps=10, enable_checkpointing=True).fit(UsedOnce(), loader())
    assert first.findings == []  # `dead` idle on steps 1-9: a run of 9
    state = first.state_dict()["history"]
    assert state["params"]["dead.weight"][:4] == [10, 9, 1, 9]  # checked, idle, run start, run length
    resumed = GradGuard()
    trainer = make_trainer(tmp_path, [resumed], max_steps=40, enable_checkpointing=True)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(UsedOnce(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == DEFAULT_WINDOW  # the run of steps 1..16 reached the window
    assert {f.step for f in err.value.findings} == {1}
    assert "never took part in the forward pass" in err.value.findings[0].message  # traced before the checkpoint
    assert resumed._core.history.checked()["layers.0.0.weight"] == DEFAULT_WINDOW + 1


def test_checkpoint_without_history_still_loads():
    guard = GradGuard()
    guard.load_state_dict({"report": {"findings": []}, "warned": []})
    assert guard.findings == []
    History().load_state_dict({})


def test_idle_shares_pool_a_module_and_merge_identical_children():
    h = History()
    x, y = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    z = torch.nn.Parameter(torch.zeros(1))
    names = {id(x): "a.q.weight", id(y): "a.k.weight", id(z): "b.weight"}
    params = [x, y, z]
    for step in range(4):
        h.count_check(params, lambda ps: [names[id(p)] for p in ps], step)
        lacking = {"a.q.weight", "a.k.weight"} if step % 2 else set()
        for name in lacking:
            h.record_unusable(name, step)
        h.settle({"a.q.weight", "a.k.weight", "b.weight"}, lacking, step)
    assert h.idle_shares() == {"a": 0.5}
    assert h.run_length("a.q.weight") == 1


# ---------------------------------------------------------------- activation checkpointing
class Checkpointed(nn.Module):
    """``inp`` → checkpoint(block) → ``out``. ``mode``: "healthy", "zero" (``gate`` inside the block is multiplied
    by 0) or "unused" (``gate`` is never used by the checkpointed function)."""

    def __init__(self, mode: str = "healthy", reentrant: bool = True) -> None:
        super().__init__()
        self.mode = mode
        self.reentrant = reentrant
        self.inp = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.gate = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.block(h))
        if self.mode == "healthy":
            return h * torch.sigmoid(self.gate(h))
        if self.mode == "zero":
            return h + self.gate(h) * 0.0
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.inner, self.inp(x), use_reentrant=self.reentrant)
        return self.out(h)


def checked_step(model: nn.Module, **kwargs) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        with check_step(model, opt, **kwargs) as chk:
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
    return chk.findings


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_healthy_model_is_silent(reentrant):
    assert checked_step(Checkpointed("healthy", reentrant), strict=True) == []


@pytest.mark.parametrize("reentrant", [True, False])
def test_all_zero_gradient_inside_a_checkpoint_is_zero(reentrant):
    with pytest.warns(GradGuardWarning, match="exactly zero") as rec:
        opt_model = Checkpointed("zero", reentrant)
        opt = torch.optim.SGD(opt_model.parameters(), lr=0.1)
        with check_step(opt_model, opt) as chk:
            opt_model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
    assert rec
    assert kinds(chk.findings) == {("zero", "gate.weight"), ("zero", "gate.bias")}


@pytest.mark.parametrize("reentrant", [True, False])
def test_param_the_checkpointed_function_never_uses_is_unused(reentrant):
    model = Checkpointed("unused", reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradGuardError) as err, check_step(model, opt, strict=True):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    assert kinds(err.value.findings) == {("unused", "gate.weight"), ("unused", "gate.bias")}


class CheckpointedModule(LightningModule):
    def __init__(self, mode: str, reentrant: bool, set_to_none: bool = True) -> None:
        super().__init__()
        self.net = Checkpointed(mode, reentrant)
        self.set_to_none = set_to_none

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x).squeeze(-1) - y) ** 2).mean()

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=self.set_to_none)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("diagnose", ["on_finding", "always", "never"])
def test_checkpointed_lightning_model_is_silent_under_every_policy(tmp_path, reentrant, set_to_none, diagnose):
    guard = GradGuard(on_frozen="raise", on_orphan="raise", on_zero="raise", idle_window=1, diagnose=diagnose)
    model = CheckpointedModule("healthy", reentrant, set_to_none)
    fit(tmp_path, model, guard, max_steps=3, error=GradGuardWarning, **DATA)
    assert guard.findings == []


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_inside_a_reentrant_checkpoint_is_zero_under_lightning(tmp_path, reentrant, set_to_none):
    guard = GradGuard(on_zero="raise", idle_window=1)
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, CheckpointedModule("zero", reentrant, set_to_none), guard, max_steps=3, **DATA)
    assert kinds(err.value.findings) == {("zero", "net.gate.weight"), ("zero", "net.gate.bias")}


# ---------------------------------------------------------------- bounded tracing
class Stack(LightningModule):
    """A residual stack of tanh layers. ``vanishing``: on each step a different random fifth of the layers gets an
    exactly-zero gradient (the set of zero gradients changes every step, as underflow does in a deep network)."""

    def __init__(self, depth: int = 500, vanishing: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))
        self.vanishing = vanishing

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = x[:, :4]
        g = torch.Generator().manual_seed(batch_idx)
        alive = torch.rand(len(self.layers), generator=g) > 0.2 if self.vanishing else None
        for k, layer in enumerate(self.layers):
            scale = 1.0 if alive is None or alive[k] else 0.0
            h = h + torch.tanh(layer(h)) * scale
        return ((h.sum(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def test_changing_zero_gradients_trace_no_more_steps_than_a_clean_model(tmp_path):
    clean = GradGuard()
    fit(tmp_path, Stack(vanishing=False), clean, max_steps=12, ignore=GradGuardWarning, **DATA)
    vanishing = GradGuard()
    fit(tmp_path, Stack(), vanishing, max_steps=12, ignore=GradGuardWarning, **DATA)
    assert clean._core.schedule.traced_steps == 1
    assert vanishing._core.schedule.traced_steps == 1
    assert vanishing.findings == []


def test_tracing_has_a_budget_and_the_report_says_when_it_stopped(tmp_path):
    guard = GradGuard(idle_window=1, on_zero="warn")
    fit(tmp_path, Stack(), guard, max_steps=20, ignore=GradGuardWarning, **DATA)
    assert guard._core.schedule.traced_steps == MAX_TRACED_STEPS
    assert any("budget" in n for n in guard.report.notes)
    assert {f.kind for f in guard.findings} == {"zero"}
    always = GradGuard(idle_window=1, diagnose="always")
    fit(tmp_path, Stack(depth=20), always, max_steps=12, ignore=GradGuardWarning, **DATA)
    assert always._core.schedule.traced_steps == 12  # no budget when every step is asked for


# ---------------------------------------------------------------- orphans on untraced steps
class LateOrphan(LightningModule):
    """``extra`` is in no optimizer and joins the loss from step 3 on (an untraced step)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 1)
        self.extra = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.body(x).squeeze(-1)
        if self.global_step >= 3:
            out = out + self.extra(x).squeeze(-1)
        return ((out - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.body.parameters(), lr=0.01)


def test_orphan_first_seen_on_an_untraced_step_is_reported_and_counted_per_step(tmp_path):
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="no optimizer holds it"):
        fit(tmp_path, LateOrphan(), guard, max_steps=6, **DATA)
    assert kinds(guard.findings) == {("orphan", "extra.weight"), ("orphan", "extra.bias")}
    entry = next(e for e in guard.report.entries if e.finding.param == "extra.weight")
    assert (entry.finding.step, entry.count, entry.last_step) == (3, 3, 5)


# ---------------------------------------------------------------- odd models
@pytest.mark.parametrize("used", [True, False])
def test_empty_parameter_is_silent(tmp_path, used):
    class WithEmpty(LayerDrop):
        def __init__(self):
            super().__init__(p=0.0)
            self.empty = nn.Parameter(torch.zeros(0, 4))

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + self.empty.sum() if used else loss

    guard = GradGuard(on_zero="raise")
    fit(tmp_path, WithEmpty(), guard, max_steps=3, error=GradGuardWarning, **DATA)
    assert guard.findings == []


def test_a_zero_run_that_ends_at_the_traced_step_is_reported_with_its_steps(tmp_path):
    class ZeroedFor16(LayerDrop):
        def __init__(self):
            super().__init__(p=0.0, with_dead_head=True)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            scale = 0.0 if 1 <= self.global_step <= DEFAULT_WINDOW else 1.0
            return loss + self.dead(batch[0] @ torch.ones(8, 16)).mean() * scale

    trainer = make_trainer(tmp_path, [GradGuard(on_zero="raise")], max_steps=40)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(ZeroedFor16(), loader(**DATA))
    assert trainer.global_step == DEFAULT_WINDOW + 1  # the window ran out on step 16; step 17 was traced to explain
    assert kinds(err.value.findings) == {("zero", "dead.weight"), ("zero", "dead.bias")}
    assert f"on every checked step from 1 to {DEFAULT_WINDOW}" in err.value.findings[0].message
    assert "but not at the next (traced) step" in err.value.findings[0].message


def test_zero_gradient_from_a_zero_derivative_op_is_reported_at_once(tmp_path):
    class Rounded(LayerDrop):
        def __init__(self):
            super().__init__(p=0.0, with_dead_head=True)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + torch.round(self.dead(batch[0] @ torch.ones(8, 16))).mean()  # CUT: round

    trainer = make_trainer(tmp_path, [GradGuard(on_zero="raise")], max_steps=40)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(Rounded(), loader(**DATA))
    assert trainer.global_step == 0  # not control flow: no window
    assert kinds(err.value.findings) == {("zero", "dead.weight"), ("zero", "dead.bias")}
    assert {f.where for f in err.value.findings} == {where("CUT: round")}


def test_modules_idle_on_the_same_share_of_steps_are_one_row_of_the_report():
    """A healthy LoRA run: every `lora_A` is idle on the first step only (`lora_B` starts at zero). 16 modules at
    5.0 % are one row naming three of them, in the console table and in TensorBoard's markdown; two modules at the
    same share stay two rows (nearest correct)."""
    from lightning_gradguard.report import RunReport

    report = RunReport()
    shares = {f"layers.{i // 4}.{p}_proj.lora_A": 0.05 for i, p in enumerate("qkvo" * 4)} | {"head": 0.25}
    report.idle_provider = lambda dead: shares
    table = report.table()
    assert "head: 25.0%" in table
    assert (
        "5.0%: 16 modules: layers.0.k_proj.lora_A, layers.0.o_proj.lora_A, layers.0.q_proj.lora_A and 13 more" in table
    )
    assert len(table.splitlines()) == 4  # clean line, idle header, two rows
    assert "5.0%: 16 modules: `layers.0.k_proj.lora_A`" in report.markdown()
    report.idle_provider = lambda dead: {"a": 0.05, "b": 0.05}
    assert [line.strip() for line in report.table().splitlines()[-2:]] == ["a: 5.0%", "b: 5.0%"]


# ---------------------------------------------------------------- mutation campaign (tests/mutation/run.py)
def test_an_idle_layer_is_probed_by_one_trace_not_on_every_drop(tmp_path):
    guard = GradGuard()
    fit(tmp_path, LayerDrop(), guard, max_steps=60, error=GradGuardWarning, **DATA)
    assert guard.findings == []
    # the first step, and at most one probe per layer once it is first dropped on an untraced step
    assert guard._core.schedule.traced_steps <= 1 + 4
    assert not any("budget" in n for n in guard.report.notes)


class ZeroThenUnused(LightningModule):
    """``extra`` gets an all-zero gradient on step 0 (``* 0``), none on step 1, a usable one from step 2 on."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 1)
        self.extra = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.body(x).squeeze(-1)
        if self.global_step == 0:
            out = out + self.extra(x).squeeze(-1) * 0.0
        elif self.global_step >= 2:
            out = out + self.extra(x).squeeze(-1)
        return ((out - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_with_window_1_each_finding_is_dated_to_its_own_step_within_one_run(tmp_path):
    guard = GradGuard(idle_window=1, on_zero="warn", on_unused="warn", diagnose="always")
    with pytest.warns(GradGuardWarning):
        fit(tmp_path, ZeroThenUnused(), guard, max_steps=4, **DATA)
    # one run without a usable gradient (steps 0-1), but the `unused` finding is seen first on step 1, not 0
    assert {(f.kind, f.param, f.step) for f in guard.findings} == {
        ("zero", "extra.weight", 0),
        ("zero", "extra.bias", 0),
        ("unused", "extra.weight", 1),
        ("unused", "extra.bias", 1),
    }


class ZeroThenGone(ZeroThenUnused):
    """``extra`` gets an all-zero gradient on step 0 and none from step 1 on (its branch is gone)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.body(x).squeeze(-1)
        if self.global_step == 0:
            out = out + self.extra(x).squeeze(-1) * 0.0
        return ((out - y) ** 2).mean()


def test_a_parameter_a_trace_explained_as_zero_is_traced_again_when_its_gradient_goes_missing(tmp_path):
    guard = GradGuard(idle_window=1, on_zero="warn", on_unused="warn")
    with pytest.warns(GradGuardWarning):
        fit(tmp_path, ZeroThenGone(), guard, max_steps=4, **DATA)
    unused = [f for f in guard.findings if f.kind == "unused"]
    assert {(f.param, f.step) for f in unused} == {("extra.weight", 1), ("extra.bias", 1)}
    # the explanation of a trace (step 2), not "the step was not traced": the earlier trace looked at a zero gradient
    assert all("never took part in the forward pass" in f.message for f in unused)


class StackWithLateUnused(Stack):
    """:class:`Stack` whose ``extra`` layer leaves the loss from step 25 on, after the tracing budget is spent."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + self.extra(batch[0][:, :4]).mean() if self.global_step < 25 else loss


def test_once_the_tracing_budget_is_spent_a_new_finding_is_reported_at_its_step(tmp_path):
    guard = GradGuard(idle_window=1, on_zero="ignore")
    trainer = make_trainer(tmp_path, [guard], max_steps=40)
    with pytest.raises(GradGuardError, match="extra.weight") as err:
        trainer.fit(StackWithLateUnused(), loader(**DATA))
    assert guard._core.schedule.traced_steps == MAX_TRACED_STEPS
    assert any("budget" in n for n in guard.report.notes)  # spent before step 25
    assert trainer.global_step == 25  # at once, not held for a trace that the budget no longer allows
    assert {(f.kind, f.step) for f in err.value.findings} == {("unused", 25)}
    assert "the step was not traced" in err.value.findings[0].message


class FrozenBias(LightningModule):
    """``body.bias`` is frozen but handed to the optimizer: a ``frozen`` finding on the first (traced) step."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 1)
        self.body.bias.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.body(x).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_finding_of_the_traced_first_step_does_not_cost_another_trace(tmp_path):
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="body.bias"):
        fit(tmp_path, FrozenBias(), guard, max_steps=6, **DATA)
    assert kinds(guard.findings) == {("frozen", "body.bias")}
    assert guard._core.schedule.traced_steps == 1


@pytest.mark.parametrize("window", [2, 3])
def test_a_run_exactly_as_long_as_the_window_reports_its_dead_part_once(tmp_path, window):
    guard = GradGuard(idle_window=window, on_unused="warn")
    with pytest.warns(GradGuardWarning) as rec:
        fit(tmp_path, LayerDrop(p=0.0, with_dead_head=True), guard, max_steps=window, **DATA)
    assert kinds(guard.findings) == {("unused", "dead.weight"), ("unused", "dead.bias")}
    entry = next(e for e in guard.report.entries if e.finding.param == "dead.weight")
    assert entry.count == window  # every checked step, not one more for a "shorter than the window" copy at the end
    assert f"{window} checked steps in a row" in entry.finding.message
    texts = [str(w.message) for w in rec if issubclass(w.category, GradGuardWarning) and "dead" in str(w.message)]
    assert len(texts) == 1
    assert "fewer than idle_window" not in texts[0]


def test_a_part_that_dies_right_after_a_resume_is_dated_to_that_step(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class DiesAtStep10(LayerDrop):
        def __init__(self):
            super().__init__(p=0.0, with_dead_head=True)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step < 10:
                loss = loss + self.dead(batch[0] @ torch.ones(8, 16)).mean()  # `dead` learns until the checkpoint
            return loss

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=10)
    first = GradGuard()
    make_trainer(tmp_path, [first, ckpt], max_steps=10, enable_checkpointing=True).fit(DiesAtStep10(), loader())
    assert first.state_dict()["history"]["params"]["dead.weight"][3] == 0  # no run at the checkpoint
    trainer = make_trainer(tmp_path, [GradGuard(idle_window=3)], max_steps=40, enable_checkpointing=True)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(DiesAtStep10(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 12
    assert {(f.param, f.step) for f in err.value.findings} == {("dead.weight", 10), ("dead.bias", 10)}
    assert "from step 10" in err.value.findings[0].message


def test_idle_shares_leave_out_the_parts_reported_dead(tmp_path):
    guard = GradGuard(on_unused="warn")
    with pytest.warns(GradGuardWarning, match="dead"):
        fit(tmp_path, LayerDrop(with_dead_head=True), guard, max_steps=40, **DATA)
    assert kinds(guard.findings) == {("unused", "dead.weight"), ("unused", "dead.bias")}
    assert set(guard.report.idle_shares()) == {f"layers.{k}" for k in range(4)}  # idle, not `dead`: it is a finding


class LateNan(LightningModule):
    """``enc -> head``; from ``nan_from`` on, the head's gradient is NaN (``nonfinite``, which no trace explains);
    with ``cut_from``, the encoder's output is ``.detach()``-ed from that step on (``detached``: a trace names it)."""

    def __init__(self, nan_from: int | None = None, cut_from: int | None = None) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.nan_from, self.cut_from = nan_from, cut_from
        self.head.weight.register_hook(
            lambda g: g * float("nan") if self.nan_from is not None and self.trainer.global_step >= self.nan_from else g
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.enc(x))
        if self.cut_from is not None and self.trainer.global_step >= self.cut_from:
            h = h.detach()
        return ((self.head(h).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_a_finding_no_trace_can_explain_does_not_cost_a_trace(tmp_path):
    """A NaN first seen on an untraced step is reported from the gradients: tracing the next step would explain
    nothing (the tracer follows values and gradient paths, not NaNs), so only the first step is traced. Nearest
    correct: a cut that starts on an untraced step gets the next step traced, which names it."""
    nan = GradGuard(on_nonfinite="warn")
    fit(tmp_path / "nan", LateNan(nan_from=3), nan, max_steps=6, ignore=GradGuardWarning, **DATA)
    assert {f.kind for f in nan.findings} == {"nonfinite"}
    assert nan._core.schedule.traced_steps == 1
    cut = GradGuard(on_detached="warn", idle_window=1)
    fit(tmp_path / "cut", LateNan(cut_from=3), cut, max_steps=6, ignore=GradGuardWarning, **DATA)
    assert {f.kind for f in cut.findings} == {"detached"}
    assert cut._core.schedule.traced_steps == 2
    assert all(f.where is not None for f in cut.findings)
