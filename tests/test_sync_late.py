"""``GradGuard(sync="late")``: on a step where nothing asks for a look now, the norms are read at the next check.

On the CPU nothing synchronises anyway; these tests pin what the option means (a NaN raised one step late with the
step that produced it; host-visible problems judged at once; all-zero gradients confirmed on the next step with its
graph, so ``zero`` and a leftover gradient are still told apart; training unchanged; the dashboard steps read at
once). The CUDA test counts synchronisations where a GPU is present.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn

from conftest import events, fit, loader, make_trainer
from lightning_gradguard import GradGuard, GradGuardError, measure


class Net(LightningModule):
    """``enc -> tanh -> head``; ``nan_at``: steps whose ``head.weight`` gradient is NaN; ``zero_head``: the head's
    output is multiplied by 0 (an all-zero gradient through a zero factor); ``dead``: a module never called, with
    ``zero_grad(set_to_none=False)`` (its gradient stays the zeros it got once, a leftover, not a ``zero``)."""

    def __init__(self, nan_at: frozenset[int] = frozenset(), zero_head: bool = False, dead: bool = False) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)
        self.nan_at, self.zero_head, self.dead = nan_at, zero_head, dead
        self.head.weight.register_hook(lambda g: g * math.nan if self.trainer.global_step in self.nan_at else g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.enc(x))
        out = self.head(h).squeeze(-1) * (0.0 if self.zero_head else 1.0)
        if not (self.dead and self.trainer.global_step > 0):
            out = out + self.aux(h).squeeze(-1)
        return ((out - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=not self.dead)


class RaisedAt(Callback):
    """The hook and global step a ``GradGuardError`` left the run from."""

    def __init__(self) -> None:
        self.at: int | None = None

    def on_exception(self, trainer, pl_module, exception):
        self.at = trainer.global_step


@pytest.mark.parametrize(("sync", "raised_at", "late_text"), [("step", 2, False), ("late", 3, True)])
def test_a_nan_is_raised_one_step_late_naming_the_step_that_made_it(tmp_path, sync, raised_at, late_text):
    witness = RaisedAt()
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, Net(nan_at=frozenset({2})), GradGuard(sync=sync), witness, max_steps=6, n=48, ignore=Warning)
    assert witness.at == raised_at  # steps 0..raised_at-1 were applied
    assert err.value.findings[0].step == 2
    assert ("read late (sync='late')" in str(err.value)) is late_text


def test_a_nan_on_the_last_step_is_raised_at_the_end_of_fit(tmp_path):
    with pytest.raises(GradGuardError, match="step 3, read late") as err:
        fit(tmp_path, Net(nan_at=frozenset({3})), GradGuard(sync="late"), max_steps=4, n=32, ignore=Warning)
    assert [(f.kind, f.step) for f in err.value.findings] == [("nonfinite", 3)]


@pytest.mark.parametrize("diagnose", ["on_finding", "never"])
def test_verdicts_on_missing_and_zero_gradients_do_not_depend_on_sync(tmp_path, diagnose):
    """An all-zero gradient through a zero factor is ``zero``; a module left out with ``set_to_none=False`` (its
    gradient stays the zeros of the first step, a leftover the graph does not reach) is ``unused``; a module used on
    every other step only is idle, never a finding. The same with ``sync="late"`` as with ``"step"``, also untraced,
    where runs of steps without a usable gradient must add up across late and immediate reads."""

    class EveryOther(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            h = torch.tanh(self.enc(x))
            out = self.head(h).squeeze(-1)
            if self.trainer.global_step % 2 == 0:
                out = out + self.aux(h).squeeze(-1)
            return ((out - y) ** 2).mean()

    models = {"zero": lambda: Net(zero_head=True), "leftover": lambda: Net(dead=True), "every other": EveryOther}
    kinds = {}
    for sync in ("step", "late"):
        for name, make in models.items():
            guard = GradGuard(sync=sync, idle_window=3, diagnose=diagnose, on_unused="warn", on_zero="warn")
            fit(tmp_path / sync / name, make(), guard, max_steps=10, n=80, ignore=Warning)
            kinds[sync, name] = sorted((f.kind, f.param) for f in guard.findings)
    for sync in ("step", "late"):
        assert kinds[sync, "zero"] == [("zero", "head.bias"), ("zero", "head.weight")], sync
        assert kinds[sync, "leftover"] == [("unused", "aux.bias"), ("unused", "aux.weight")], sync
        assert kinds[sync, "every other"] == [], sync


@pytest.mark.parametrize("sync", ["step", "late"])
def test_an_all_zero_gradient_is_raised_at_the_same_step_under_late(tmp_path, sync):
    """Untraced, idle_window=3: both raise at the third step of zeros. ``"late"`` reads step 0 late, counts it in
    the run when the read comes in, then reads at once while the run lasts."""
    raised_at = 2
    witness = RaisedAt()
    guard = GradGuard(sync=sync, idle_window=3, diagnose="never", on_zero="raise")
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, Net(zero_head=True), guard, witness, max_steps=8, n=64, ignore=Warning)
    assert witness.at == raised_at
    assert {f.kind for f in err.value.findings} == {"zero"}


def test_a_missing_gradient_is_judged_at_once_under_late(tmp_path):
    """No gradient at all is seen on the host without reading a value: raised before its step, as with sync='step'."""

    class Detached(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((self.head(torch.tanh(self.enc(x)).detach()).squeeze(-1) - y) ** 2).mean()

    witness = RaisedAt()
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, Detached(), GradGuard(sync="late"), witness, max_steps=4, n=32, ignore=Warning)
    assert witness.at == 0
    assert {(f.kind, f.param) for f in err.value.findings} == {("detached", "enc.weight"), ("detached", "enc.bias")}


def test_late_reads_leave_training_unchanged_and_read_nothing_at_once_on_clean_steps(tmp_path, monkeypatch):
    reads = []
    real = measure.to_host
    monkeypatch.setattr(measure, "to_host", lambda t: reads.append(t.numel()) or real(t))
    params = {}
    for sync in (None, "step", "late"):
        torch.manual_seed(0)
        model = Net()
        reads.clear()
        guards = [GradGuard(sync=sync, diagnose="never")] if sync else []
        fit(tmp_path / str(sync), model, *guards, max_steps=6, n=48, ignore=Warning)
        params[sync] = [p.detach().clone() for p in model.parameters()]
        if sync == "step":
            assert len(reads) == 6  # one transfer per step
        if sync == "late":
            assert reads == []  # every clean step read late, the last one at the end of the epoch
    for a, b, c in zip(params[None], params["step"], params["late"], strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_sync_must_be_step_or_late():
    with pytest.raises(ValueError, match=r"`GradGuard\(sync='later'\)` must be one of 'step', 'late'"):
        GradGuard(sync="later")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sync", ["step", "late"])
def test_clean_late_steps_do_not_synchronise_on_cuda(tmp_path, sync):
    """Inside GradGuard's hook, with CUDA's sync debug mode set to "error": ``sync="step"`` synchronises once (its
    transfer: the control), ``sync="late"`` never on clean steps (an async copy to pinned memory, an event)."""
    guard = GradGuard(sync=sync, diagnose="never")
    hook = guard.on_before_optimizer_step

    def strict(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            hook(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    guard.on_before_optimizer_step = strict
    trainer = make_trainer(tmp_path, [guard], max_steps=6, accelerator="cuda")
    if sync == "step":
        with pytest.raises(RuntimeError, match="synchroniz"):
            trainer.fit(Net(), loader(n=48))
    else:
        trainer.fit(Net(), loader(n=48))
        assert guard.findings == []


def _run(tmp_path, model, sync, **kwargs):
    from lightning.pytorch.loggers import TensorBoardLogger

    guard = GradGuard(sync=sync, on_orphan="ignore", log_every_n_steps=3)
    logger = TensorBoardLogger(tmp_path, name=sync)
    trainer = fit(tmp_path, model, guard, logger=logger, max_steps=8, max_epochs=3, n=64, ignore=Warning, **kwargs)
    acc = events(trainer)
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if "gradguard" in t}
    return guard.findings, [p.detach().clone() for p in model.parameters()], scalars, guard.report.idle_shares()


class ZeroEveryOther(Net):
    """The head's gradient is all zero on odd steps (idle by design, like drop_path): counted in the idle shares."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.enc(x))
        out = self.head(h).squeeze(-1) * (0.0 if self.trainer.global_step % 2 else 1.0) + self.aux(h).squeeze(-1)
        return ((out - y) ** 2).mean()


@pytest.mark.parametrize("case", ["plain", "accumulate", "bf16-mixed", "two optimizers", "zero every other step"])
def test_late_runs_like_step_runs(tmp_path, case):
    """A plain run, gradient accumulation, bf16 autocast, a GAN stepping two optimizers in manual optimization, and a
    head whose gradient is all zero on every other step: the same findings, parameters, idle shares and logged
    scalars (the dashboard's steps, and the epoch statistics, which take the late reads' totals) with ``sync="late"``
    as with ``"step"``."""
    from test_tensorboard import TwoOptimizers

    kwargs = {"accumulate": {"accumulate_grad_batches": 2}, "bf16-mixed": {"precision": "bf16-mixed"}}.get(case, {})
    runs = {}
    for sync in ("step", "late"):
        torch.manual_seed(0)
        model = {"two optimizers": TwoOptimizers, "zero every other step": ZeroEveryOther}.get(case, Net)()
        runs[sync] = _run(tmp_path / sync, model, sync, **kwargs)
    (f_step, p_step, s_step, idle_step), (f_late, p_late, s_late, idle_late) = runs["step"], runs["late"]
    assert idle_late == idle_step
    assert bool(idle_step) is (case == "zero every other step")
    assert [(f.kind, f.param, f.step) for f in f_late] == [(f.kind, f.param, f.step) for f in f_step]
    assert all(torch.equal(a, b) for a, b in zip(p_step, p_late, strict=True))
    assert any("epoch" in t for t in s_late)
    assert s_late.keys() == s_step.keys()
    for tag, points in s_step.items():  # late norms are taken in float64, the others mostly in float32
        assert [s for s, _ in s_late[tag]] == [s for s, _ in points], tag
        assert [v for _, v in s_late[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
