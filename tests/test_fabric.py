"""Guarding a Lightning Fabric loop: `check_fabric_step` with `fabric.backward`, Fabric's wrappers and precision."""

from __future__ import annotations

import doctest
import os
import runpy
import warnings

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from torch import nn

from conftest import where
from lightning_gradguard import GradGuardError, GradGuardWarning, check_step
from lightning_gradguard.fabric import check_fabric_step, unwrap_model, unwrap_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "fabric_loop.py")


class Net(nn.Module):
    def __init__(self, bug: str = "none") -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if self.bug == "detach":
            h = h.detach()  # BUG: fabric detach
        out = self.head(h)
        return out if self.bug == "detach" else out + self.aux(h)


def fabric_step(fabric, model, opt, loss_scale: float = 1.0) -> None:
    opt.zero_grad()
    loss = model(torch.randn(8, 4)).float().pow(2).mean() * loss_scale
    fabric.backward(loss)
    opt.step()


@pytest.fixture
def bf16():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fabric's info about the precision it picked
        return Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")


def test_bf16_mixed_loop_is_silent(bf16):
    net = Net()
    model, opt = bf16.setup(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            with check_fabric_step(bf16, model, opt, strict=True, step=step) as chk:
                fabric_step(bf16, model, opt)
            assert chk.findings == []
    assert net.body.weight.grad is not None  # the steps did run, through Fabric's wrappers


def test_bf16_mixed_detach_and_unused_are_named_without_wrapper_prefixes(bf16):
    net = Net("detach")
    model, opt = bf16.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    before = net.head.weight.detach().clone()
    with pytest.raises(GradGuardError) as err, check_fabric_step(bf16, model, opt, strict=True):
        fabric_step(bf16, model, opt)
    found = {(f.kind, f.param) for f in err.value.findings}
    assert found == {
        ("detached", "body.weight"),
        ("detached", "body.bias"),
        ("unused", "aux.weight"),
        ("unused", "aux.bias"),
    }
    assert {f.where for f in err.value.findings if f.kind == "detached"} == {where("BUG: fabric detach")}
    assert torch.equal(net.head.weight, before)  # raised before Fabric's optimizer stepped


def test_a_fabric_optimizer_stepping_after_the_block_is_judged(bf16):
    net = Net("detach")
    model, opt = bf16.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.warns(GradGuardWarning, match=r"(body|aux)\.(weight|bias)"):
        with check_fabric_step(bf16, model, opt) as chk:
            bf16.backward(model(torch.randn(8, 4)).float().sum())
        opt.step()
    assert {f.kind for f in chk.findings} == {"detached", "unused"}


def fp16_fabric(init_scale: float) -> tuple[Fabric, torch.amp.GradScaler]:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]), scaler


def test_16_mixed_overflow_steps_the_scaler_skips_stay_silent():
    fabric, scaler = fp16_fabric(2.0**100)
    net = Net()
    model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    before = net.body.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        for step in range(2):
            with check_fabric_step(fabric, model, opt, strict=True, step=step) as chk:
                fabric_step(fabric, model, opt)
            assert chk.findings == []
    assert torch.equal(net.body.weight, before)  # both steps overflowed and were skipped by the scaler
    assert scaler.get_scale() == 2.0**98


def test_16_mixed_persistent_nan_is_nonfinite_once_the_scale_falls_to_one():
    fabric, scaler = fp16_fabric(2.0)
    net = Net()
    model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    scales = []
    with pytest.raises(GradGuardError, match="nonfinite") as err:  # noqa: PT012 - the loop is the point
        for step in range(3):
            scales.append(scaler.get_scale())
            with check_fabric_step(fabric, model, opt, strict=True, step=step):
                fabric_step(fabric, model, opt, loss_scale=float("nan"))
    assert scales == [2.0, 1.0]
    assert {f.step for f in err.value.findings} == {1}


def test_gan_set_up_module_by_module_each_optimizer_judges_its_own(bf16):
    g_net, d_net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)), nn.Linear(4, 1)
    gen, opt_g = bf16.setup(g_net, torch.optim.Adam(g_net.parameters(), lr=1e-3))
    disc, opt_d = bf16.setup(d_net, torch.optim.Adam(d_net.parameters(), lr=1e-3))

    def iteration(bug: bool = False) -> None:
        fake = gen(torch.randn(6, 3)).float()
        opt_d.zero_grad()
        softplus = nn.functional.softplus
        bf16.backward(softplus(disc(fake.detach())).mean() + softplus(-disc(torch.randn(6, 4))).mean())
        opt_d.step()
        opt_g.zero_grad()
        g_in = fake.detach() if bug else fake  # BUG: fabric gan detach
        bf16.backward(softplus(-disc(g_in)).mean())
        opt_g.step()

    models = {"G": gen, "D": disc}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            with check_fabric_step(bf16, models, [opt_g, opt_d], strict=True, step=step) as chk:
                iteration()
            assert chk.findings == []  # D's parameters get gradients from G's loss: held by opt_d, never orphans
    with pytest.raises(GradGuardError) as err, check_fabric_step(bf16, models, [opt_g, opt_d], strict=True):
        iteration(bug=True)
    assert {(f.kind, f.param) for f in err.value.findings} == {
        ("detached", n) for n in ("G.0.weight", "G.0.bias", "G.2.weight", "G.2.bias")
    }
    assert {f.where for f in err.value.findings} == {where("BUG: fabric gan detach")}


def test_unwrap_returns_the_users_objects(bf16):
    net = Net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    model, opt = bf16.setup(net, sgd)
    assert unwrap_model(model) is net
    assert unwrap_optimizer(opt) is sgd
    assert unwrap_model(net) is net
    assert unwrap_optimizer(sgd) is sgd


def test_not_a_fabric_is_rejected():
    with pytest.raises(TypeError, match="fabric='cpu'"):
        check_fabric_step("cpu", nn.Linear(2, 1))


def test_docstring_example_runs():
    import lightning_gradguard.fabric as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(("bug", "rc", "says"), [("none", 0, "every parameter got a usable gradient"),
                                                 ("detach", 1, "encoder.0.weight: detached"),
                                                 ("unused", 1, "aux.weight: unused")])  # fmt: skip
def test_example_fabric_loop(bug, rc, says, capsys):
    main = runpy.run_path(EXAMPLE)["main"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--bug", bug, "--steps", "2"]) == rc
    out = capsys.readouterr().out
    assert says in out
    if bug == "detach":
        assert where("BUG: detach", EXAMPLE) in out


# ---------------------------------------------------------------- mutation campaign (tests/mutation/run.py)
def test_plain_check_step_given_fabrics_optimizer_wrapper_judges_it_before_its_step(bf16):
    net = Net("detach")
    model, opt = bf16.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    before = net.head.weight.detach().clone()
    with pytest.raises(GradGuardError) as err, check_step(net, opt, strict=True):
        fabric_step(bf16, model, opt)  # the step hook sees the torch optimizer inside Fabric's wrapper
    assert "block ended" not in str(err.value)
    assert torch.equal(net.head.weight, before)  # raised before the optimizer stepped
    net = Net()  # nearest correct: judged at its step, silent, and the step runs
    model, opt = bf16.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    before = net.head.weight.detach().clone()
    with check_step(net, opt, strict=True) as chk:
        fabric_step(bf16, model, opt)
    assert chk.findings == []
    assert not torch.equal(net.head.weight, before)
