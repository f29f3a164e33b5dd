"""`lightning_gradguard.testing.assert_gradients_flow`: a pytest helper that fails with the findings."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from conftest import run_python, where
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


# ---------------------------------------------------------------------------------------------------------------------
# A LightningModule without `optimizer=`: its own `configure_optimizers()`, in each form Lightning accepts.


class Backbone(LightningModule):
    """A backbone frozen for fine-tuning, and a head; `configure_optimizers` returns `form` over `params`."""

    def __init__(self, form: str = "optimizer", params: str = "all") -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.backbone.requires_grad_(False)
        self.form, self.params = form, params

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.relu(self.backbone(x))), y)

    def configure_optimizers(self):
        params = {
            "all": self.parameters(),  # BUG: testing frozen backbone handed to the optimizer
            "trainable": (p for p in self.parameters() if p.requires_grad),
            "no_head": self.backbone.parameters(),
        }[self.params]
        opt = torch.optim.SGD(params, lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        return {
            "optimizer": opt,
            "list": [opt],
            "tuple": (opt,),
            "lists": ([opt], [sched]),
            "dict": {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}},
            "dicts": [{"optimizer": opt, "lr_scheduler": sched}],
        }[self.form]


FORMS = ["optimizer", "list", "tuple", "lists", "dict", "dicts"]


@pytest.mark.parametrize("form", FORMS)
def test_lightning_module_is_checked_with_its_own_optimizer(form):
    with pytest.raises(GradientFlowError, match="frozen") as err:
        assert_gradients_flow(Backbone(form), (X, Y))
    assert {(f.kind, f.param) for f in err.value.findings} == {
        ("frozen", "backbone.weight"),
        ("frozen", "backbone.bias"),
    }


@pytest.mark.parametrize("form", FORMS)
def test_frozen_backbone_left_out_of_its_optimizer_passes(form):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_gradients_flow(Backbone(form, params="trainable"), (X, Y), steps=2)


def test_head_missing_from_its_optimizer_is_an_orphan():
    model = Backbone(params="no_head")
    with pytest.raises(GradientFlowError) as err:
        assert_gradients_flow(model, lambda m: m.training_step((X, Y), 0))  # a loss function: the same optimizer
    assert {(f.kind, f.param) for f in err.value.findings} >= {("orphan", "head.weight"), ("orphan", "head.bias")}


def test_optimizer_over_a_copy_is_stale():
    class Stale(LitModel):
        def configure_optimizers(self):
            return torch.optim.SGD(copy.deepcopy(self).parameters(), lr=0.1)

    with pytest.raises(GradientFlowError, match="stale"):
        assert_gradients_flow(Stale(), (X, Y))


class NoOptimizers(LitModel):
    configure_optimizers = LightningModule.configure_optimizers  # Lightning's own: warns and returns None


class ReturnsNone(LitModel):
    def configure_optimizers(self):
        return None


@pytest.mark.parametrize("model_class", [NoOptimizers, ReturnsNone])
def test_module_without_an_optimizer_of_its_own_gets_sgd_silently(model_class):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "`configure_optimizers` must be implemented" is not called
        assert_gradients_flow(model_class(), (X, Y))
    with pytest.raises(GradientFlowError, match="head.weight: unused"):
        assert_gradients_flow(model_class(unused_head=True), (X, Y))


class TwoOptimizers(LitModel):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]


class NeedsTrainer(LitModel):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        return [opt], [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)]


class UnknownForm(LitModel):
    def configure_optimizers(self):
        return "sgd"


@pytest.mark.parametrize(
    ("model_class", "error", "match"),
    [
        (TwoOptimizers, ValueError, r"returns 2 optimizers, which Lightning trains only with manual optimization"),
        (NeedsTrainer, ValueError, r"`NeedsTrainer.configure_optimizers\(\)` failed \(RuntimeError: .*optimizer="),
        (UnknownForm, TypeError, r"returned 'sgd': Lightning takes an optimizer"),
    ],
)
def test_configure_optimizers_that_cannot_be_used_here_says_so(model_class, error, match):
    with pytest.raises(error, match=match):
        assert_gradients_flow(model_class(), (X, Y))
    model = model_class()
    assert_gradients_flow(model, (X, Y), torch.optim.SGD(model.parameters()))  # `optimizer=` works


# ---------------------------------------------------------------------------------------------------------------------
# Manual optimization: a GAN-like module steps its two optimizers in `training_step`, in a Trainer.


class ManualPair(LightningModule):
    def __init__(self, bug: str = "") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Linear(4, 4)
        self.disc = nn.Linear(4, 1)
        self.bug = bug

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        self.toggle_optimizer(opt_g)
        fake = self.gen(x)
        if self.bug == "detach":
            fake = fake.detach().requires_grad_()  # BUG: testing manual detach
        loss_g = nn.functional.softplus(-self.disc(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        loss_d = nn.functional.softplus(self.disc(fake.detach())).mean() + nn.functional.softplus(-self.disc(x)).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.log("loss_d", loss_d)

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.1), torch.optim.SGD(self.disc.parameters(), lr=0.1)


def test_manual_optimization_runs_its_training_step_and_leaves_the_model_as_it_was():
    model = ManualPair().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_gradients_flow(model, (X, Y), steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        model.trainer  # noqa: B018 - the Trainer it ran in is gone


def test_manual_optimization_cut_is_named():
    with pytest.raises(GradientFlowError, match="gen.weight: detached") as err:
        assert_gradients_flow(ManualPair("detach"), (X, Y))
    assert {f.where for f in err.value.findings if f.param.startswith("gen.")} == {where("BUG: testing manual detach")}


def test_manual_optimization_with_an_optimizer_and_a_batch_is_refused():
    model = ManualPair()
    with pytest.raises(ValueError, match="leave `optimizer=None`, or pass a function"):
        assert_gradients_flow(model, (X, Y), torch.optim.SGD(model.parameters()))


def test_manual_optimization_with_a_loss_function_steps_its_optimizers():
    """Each of its optimizers judges its own parameters: `disc` is missing from the loss."""
    with pytest.raises(GradientFlowError) as err:
        assert_gradients_flow(ManualPair(), lambda m: m.gen(X).pow(2).mean())
    assert {f.param for f in err.value.findings} == {"disc.weight", "disc.bias"}
    assert_gradients_flow(ManualPair(), lambda m: m.disc(m.gen(X)).mean())


# ---------------------------------------------------------------------------------------------------------------------
# What pytest shows: the user's line and the message, none of this helper's source.

FAILING_TESTS = """
import torch
from lightning_gradguard.testing import assert_gradients_flow

X = torch.randn(8, 4)


def test_detached():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    assert_gradients_flow(model, lambda m: m[1](m[0](X).detach()).pow(2).mean())  # USER LINE 1


def test_not_a_loss():
    assert_gradients_flow(torch.nn.Linear(4, 1), lambda m: m(X))  # USER LINE 2
"""


@pytest.mark.parametrize("tb", ["auto", "long", "short"])
def test_pytest_shows_the_users_line_and_the_message_not_the_helpers_source(tmp_path, tb):
    (tmp_path / "test_user.py").write_text(FAILING_TESTS)
    proc = run_python("-m", "pytest", "-p", "no:cacheprovider", f"--tb={tb}", "test_user.py", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "2 failed" in out
    for marker in ("USER LINE 1", "USER LINE 2"):
        assert marker in out
    assert "GradientFlowError: Gradients do not flow to 2 parameter tensors of Sequential" in out
    assert "0.weight: detached" in out
    assert (
        "TypeError: `loss_fn(model)` must return a scalar loss tensor (or a mapping with a 'loss' key), got a " in out
    )
    assert "lightning_gradguard/" not in out  # no frame of the package: not testing.py, step.py nor core.py
    assert "__tracebackhide__" not in out
    assert len(out.splitlines()) < 60, out
