"""GAN patterns: a `fake.detach()` made on purpose for the discriminator, reused by mistake in the generator loss.

The finding names the `.detach()` line and says to use the undetached tensor in the generator's loss, not to
remove the `.detach()` (the discriminator step needs it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from conftest import loader, make_trainer, where
from lightning_gradguard import GradGuard, GradGuardError, check_step

GEN = {"G.weight", "G.bias"}


class GAN(LightningModule):
    """Manual optimization, the generator and discriminator stepping in every batch."""

    def __init__(self, *, toggle: bool, bug: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle, self.bug = toggle, bug
        self.G = nn.Linear(4, 8)
        self.D = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        g_opt, d_opt = self.optimizers()
        fake = self.G(torch.randn(x.shape[0], 4))
        fake_d = fake.detach()  # CUT: lit-fake
        if self.toggle:
            self.toggle_optimizer(d_opt)
        d_loss = nn.functional.softplus(self.D(fake_d)).mean() + nn.functional.softplus(-self.D(x)).mean()
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        if self.toggle:
            self.untoggle_optimizer(d_opt)
            self.toggle_optimizer(g_opt)
        g_in = fake_d if self.bug else fake
        g_loss = nn.functional.softplus(-self.D(g_in)).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        if self.toggle:
            self.untoggle_optimizer(g_opt)

    def configure_optimizers(self):
        return torch.optim.SGD(self.G.parameters(), lr=0.01), torch.optim.SGD(self.D.parameters(), lr=0.01)


def _says_keep_the_detach(message: str) -> bool:
    return "use the tensor from before the `.detach()`" in message and "remove the `.detach()`" not in message


@pytest.mark.parametrize("toggle", [True, False], ids=["toggle", "no-toggle"])
def test_gradguard_reused_detached_fake_names_the_line_and_keeps_the_detach(tmp_path, toggle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GradGuardError) as err:
            make_trainer(tmp_path, [GradGuard()]).fit(GAN(toggle=toggle, bug=True), loader(features=8))
    found = {(f.kind, f.param, f.where) for f in err.value.findings}
    assert found == {("detached", p, where("CUT: lit-fake")) for p in GEN}
    assert all(_says_keep_the_detach(f.message) for f in err.value.findings), err.value.findings[0].message


@pytest.mark.parametrize("toggle", [True, False], ids=["toggle", "no-toggle"])
def test_gradguard_correct_gan_is_silent(tmp_path, toggle):
    guard = GradGuard(on_zero="raise", diagnose="always")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [guard]).fit(GAN(toggle=toggle, bug=False), loader(features=8))
    assert guard.findings == []


def test_check_step_plain_loop_reused_detached_fake():
    gen, disc = nn.Linear(4, 8), nn.Linear(8, 1)
    model = nn.ModuleDict({"G": gen, "D": disc})
    g_opt, d_opt = torch.optim.SGD(gen.parameters(), lr=0.01), torch.optim.SGD(disc.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model) as chk:
            fake = gen(torch.randn(4, 4))
            fake_d = fake.detach()  # CUT: plain-fake
            d_loss = nn.functional.softplus(disc(fake_d)).mean()
            d_opt.zero_grad()
            d_loss.backward()
            d_opt.step()
            g_loss = nn.functional.softplus(-disc(fake_d)).mean()
            g_opt.zero_grad()
            g_loss.backward()
            g_opt.step()
    gen = {f.param: f for f in chk.findings if f.param in GEN}
    assert {(f.kind, f.where) for f in gen.values()} == {("detached", where("CUT: plain-fake"))}
    assert set(gen) == GEN
    assert all(_says_keep_the_detach(f.message) for f in gen.values())


def test_a_detach_repeated_per_micro_batch_is_still_a_detach_to_remove():
    """Two micro-batches run the same `.detach()` line once each, each result feeding one loss: not a reuse."""
    enc, head = nn.Linear(8, 8), nn.Linear(8, 1)
    model = nn.ModuleDict({"enc": enc, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt) as chk:
            opt.zero_grad()
            for _ in range(2):
                h = enc(torch.randn(4, 8)).detach()  # CUT: micro
                head(h).mean().backward()
            opt.step()
    assert {(f.kind, f.param, f.where) for f in chk.findings} == {
        ("detached", p, where("CUT: micro")) for p in ("enc.weight", "enc.bias")
    }
    assert all("remove the `.detach()`" in f.message for f in chk.findings)
