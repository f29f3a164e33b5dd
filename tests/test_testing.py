"""`lightning_gradguard.testing.assert_gradients_flow`: a pytest helper that fails with the findings."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from conftest import where
from lightning_gradguard.testing import GradientFlowError, assert_gradients_flow

X, Y = torch.randn(8, 4), torch.randn(8, 1)


class TwoHeads(nn.Module):
    def __init__(self, cut: str = "") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU())
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.cut == "detach":
            h = h.detach()  # BUG: testing detach
        out = self.head(h)
        if self.cut != "unused":
            out = out + 0.1 * self.aux(h)
        return out


def mse(model: nn.Module) -> torch.Tensor:
    return nn.functional.mse_loss(model(X), Y)


def test_healthy_model_passes_and_is_left_unchanged():
    model = TwoHeads().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_gradients_flow(model, mse, steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training  # eval mode restored (the steps ran in train mode)
    assert torch.equal(torch.get_rng_state(), rng)


def test_unused_head_fails_with_the_findings():
    with pytest.raises(GradientFlowError, match=r"do not flow to 2 parameter tensors of TwoHeads") as err:
        assert_gradients_flow(TwoHeads("unused"), mse)
    assert isinstance(err.value, AssertionError)
    assert {(f.kind, f.param) for f in err.value.findings} == {("unused", "aux.weight"), ("unused", "aux.bias")}
    assert "aux.weight: unused" in str(err.value)
    assert "fix:" in str(err.value)


def test_detached_body_names_the_line():
    with pytest.raises(GradientFlowError, match="body.0.weight: detached") as err:
        assert_gradients_flow(TwoHeads("detach"), mse)
    assert {f.param for f in err.value.findings} == {"body.0.weight", "body.0.bias"}
    assert {f.where for f in err.value.findings} == {where("BUG: testing detach")}


def test_loss_without_any_graph_fails_naming_the_cut():
    model = nn.Linear(4, 1)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(m(X).detach(), Y)  # BUG: testing whole loss detached

    with pytest.raises(GradientFlowError, match="weight: detached") as err:
        assert_gradients_flow(model, loss_fn, steps=2)
    assert {f.where for f in err.value.findings} == {where("BUG: testing whole loss detached")}


def test_given_optimizer_checks_frozen_and_orphan_and_its_state_is_restored():
    model = TwoHeads()
    model.body[0].weight.requires_grad_(False)
    opt = torch.optim.Adam([*model.body.parameters(), *model.head.parameters()], lr=0.1)  # aux is missing
    state = opt.state_dict()
    with pytest.raises(GradientFlowError) as err:
        assert_gradients_flow(model, mse, opt, steps=2)
    assert {(f.kind, f.param) for f in err.value.findings} == {
        ("frozen", "body.0.weight"),
        ("orphan", "aux.weight"),
        ("orphan", "aux.bias"),
    }
    assert opt.state_dict() == state  # no Adam moments left behind
    with warnings.catch_warnings():  # nearest correct: the same model with `allow` and `ignore`
        warnings.simplefilter("error")
        assert_gradients_flow(model, mse, opt, allow=["frozen"], ignore=["aux.*"])


def test_zero_gradient_fails_unless_allowed():
    model = nn.Linear(4, 1)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return (m(X) * 0).sum()

    with pytest.raises(GradientFlowError, match="zero"):
        assert_gradients_flow(model, loss_fn)
    assert_gradients_flow(model, loss_fn, allow=("zero",))


class LitModel(LightningModule):
    def __init__(self, unused_head: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.head = nn.Linear(4, 1)
        self.unused_head = unused_head

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x) if self.unused_head else self.net(x) + self.head(x)
        loss = nn.functional.mse_loss(out, y)
        self.log("loss", loss)  # no Trainer here: the helper keeps Lightning's warning about it quiet
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_module_with_a_batch_runs_its_training_step():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_gradients_flow(LitModel(), (X, Y), steps=2)
    with pytest.raises(GradientFlowError, match="head.weight: unused"):
        assert_gradients_flow(LitModel(unused_head=True), (X, Y))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("net", mse), {}, TypeError, "model='net'"),
        ((nn.Linear(4, 1), (X, Y)), {}, TypeError, "no `training_step`: pass a function"),
        ((nn.Linear(4, 1), mse), {"steps": 0}, ValueError, "steps=0"),
        ((nn.Linear(4, 1), mse), {"allow": ["zeros"]}, ValueError, r"allow=\['zeros'\]"),
        ((nn.Linear(4, 1), mse), {"optimizer": "sgd"}, TypeError, "optimizer='sgd'"),
        ((nn.Linear(4, 1), lambda m: m(X)), {}, TypeError, "scalar loss tensor"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        assert_gradients_flow(*args, **kwargs)


def test_docstring_example_runs():
    import doctest

    import lightning_gradguard.testing as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
