"""Custom autograd Functions (`torch.autograd.Function`): autograd runs `forward` with grad mode off and gives the
inputs of `apply` whatever `backward` returns. An op inside `forward` cuts nothing by itself; a parameter that gets
no gradient through a Function is named at the `.apply` line, with the input whose gradient `backward` left out.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import loader, make_trainer, where
from lightning_gradguard import GradGuard, GradGuardError, check_step

W = ("w",)
ENC = ("enc.weight", "enc.bias")


class Matmul(torch.autograd.Function):
    """``x @ w``; ``backward`` gives each input a gradient, unless the class says to leave one out."""

    skip: tuple[int, ...] = ()

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @classmethod
    def grads(cls, ctx, g):
        x, w = ctx.saved_tensors
        grads = (g @ w.t(), x.t() @ g)
        return tuple(None if i in cls.skip else grad for i, grad in enumerate(grads))


class NoGradForW(Matmul):
    skip = (1,)

    @staticmethod
    def backward(ctx, g):
        return NoGradForW.grads(ctx, g)


class NoGradForX(Matmul):
    skip = (0,)

    @staticmethod
    def backward(ctx, g):
        return NoGradForX.grads(ctx, g)


class Scaled(torch.autograd.Function):
    """Correct: ``(x @ w) * k``, with ``None`` for the int ``k`` (which has no gradient)."""

    @staticmethod
    def forward(ctx, x, w, k: int):
        ctx.save_for_backward(x, w)
        ctx.k = k
        return (x @ w) * k

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g * ctx.k
        return g @ w.t(), x.t() @ g, None


class Captured(torch.autograd.Function):
    """Uses ``net.w`` inside ``forward`` without taking it as an input: autograd never gives it a gradient."""

    @staticmethod
    def forward(ctx, x, net):
        ctx.w = net.w
        return x @ net.w

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.w.t(), None


class MarkedNonDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        out = x @ w
        ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def backward(ctx, g):
        return None, None


class ThroughNumpy(torch.autograd.Function):
    """The numpy-extension recipe: ``forward`` computes in numpy; ``backward`` leaves out ``w``."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.from_numpy(np.tanh(x.detach().numpy() @ w.detach().numpy()))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.t(), None


class Identity(torch.autograd.Function):
    """Returns its input (autograd makes the output a view of it); ``backward`` gives it nothing."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return None


class ReverseGrad(torch.autograd.Function):
    """The gradient reversal layer (domain-adversarial training): correct."""

    @staticmethod
    def forward(ctx, x, alpha: float):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.alpha * g, None


class NewStyle(torch.autograd.Function):
    """``forward`` without ``ctx`` and a ``setup_context`` (the form `torch.func` needs); leaves out ``w``."""

    @staticmethod
    def forward(x, w):
        return x @ w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.t(), None


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 4) / 3)
        self.head = nn.Linear(4, 1)


def step(forward) -> list:
    """One ``check_step`` step of ``forward(net, x) -> loss``: its findings."""
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(net, opt) as chk:
            loss = forward(net, torch.randn(4, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return chk.findings


# ---------------------------------------------------------------- the Function is named, with the input
def no_grad_for_w(net, x):
    return net.head(NoGradForW.apply(net.enc(x), net.w)).mean()  # APPLY: w


def no_grad_for_x(net, x):
    return net.head(NoGradForX.apply(net.enc(x), net.w)).mean()  # APPLY: x


def numpy_inside(net, x):
    return net.head(ThroughNumpy.apply(net.enc(x), net.w)).mean()  # APPLY: numpy


def new_style(net, x):
    return net.head(NewStyle.apply(net.enc(x), net.w)).mean()  # APPLY: new style


def identity(net, x):
    return net.head(Identity.apply(net.enc(x)) @ net.w).mean()  # APPLY: identity


def inside_reentrant_checkpoint(net, x):
    def block(h):
        return NoGradForW.apply(h, net.w)  # APPLY: checkpointed

    return net.head(checkpoint(block, net.enc(x), use_reentrant=True)).mean()


@pytest.mark.parametrize(
    ("forward", "marker", "params", "says"),
    [
        (no_grad_for_w, "APPLY: w", W, "whose `backward` returned no gradient for its 2nd input `w`"),
        (no_grad_for_x, "APPLY: x", ENC, "whose `backward` returned no gradient for its 1st input `x`"),
        (numpy_inside, "APPLY: numpy", W, "`ThroughNumpy.apply` at"),
        (new_style, "APPLY: new style", W, "returned no gradient for its 2nd input `w`"),
        (identity, "APPLY: identity", ENC, "returned no gradient for its 1st input `x`"),
        (inside_reentrant_checkpoint, "APPLY: checkpointed", W, "returned no gradient for its 2nd input `w`"),
    ],
)
def test_a_function_whose_backward_gives_an_input_no_gradient_is_named_at_its_apply(forward, marker, params, says):
    findings = step(forward)
    assert {(f.kind, f.param, f.where) for f in findings} == {("detached", p, where(marker)) for p in params}
    for f in findings:
        assert says in f.message
        assert "no_grad" not in f.message  # the user wrote no `no_grad`
    name = "x" if params == ENC else "w"
    assert f"return a gradient for `{name}` from `" in findings[0].hint


def test_the_fix_names_the_position_of_the_missing_gradient():
    [f] = step(no_grad_for_w)
    assert f.message == (
        f"The loss depends on `w`, but `NoGradForW.apply` at {where('APPLY: w')}, whose `backward` returned no "
        "gradient for its 2nd input `w`, cuts its gradient path: return a gradient for `w` from "
        "`NoGradForW.backward` (its 2nd value)."
    )


def test_a_tensor_used_in_forward_without_being_an_input_is_named():
    def forward(net, x):
        return net.head(Captured.apply(net.enc(x), net)).mean()  # APPLY: captured

    [f] = step(forward)
    assert (f.kind, f.param, f.where) == ("detached", "w", where("APPLY: captured"))
    assert "whose `forward` uses it without taking it as an input" in f.message
    assert f.hint == "pass it to `Captured.apply` as an input and return its gradient from `Captured.backward`"


def test_an_output_marked_non_differentiable_that_the_loss_uses_is_named():
    def forward(net, x):
        h = net.enc(x)
        gate = MarkedNonDifferentiable.apply(h, net.w)  # APPLY: marked
        return (net.head(h[:, :4]) * gate[:, :1]).mean()

    [f] = step(forward)
    assert (f.kind, f.param, f.where) == ("detached", "w", where("APPLY: marked"))
    assert "whose output used by the loss is not differentiable" in f.message


def test_nested_functions_name_the_outer_one():
    class Outer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return Scaled.apply(x, w, 2) + 1  # an `apply` inside a `forward` is not differentiated

        @staticmethod
        def backward(ctx, g):
            return g.sum(-1, keepdim=True).expand(-1, 8).clone(), None

    def forward(net, x):
        return net.head(Outer.apply(net.enc(x), net.w)).mean()  # APPLY: outer

    assert {(f.kind, f.param, f.where) for f in step(forward)} == {("detached", "w", where("APPLY: outer"))}


# ---------------------------------------------------------------- the nearest correct code stays silent
def correct_with_an_int_argument(net, x):
    return net.head(Scaled.apply(net.enc(x), net.w, 3)).mean()


def reversed_gradient(net, x):
    return net.head(ReverseGrad.apply(net.enc(x), 0.5) @ net.w).mean()


def correct_in_reentrant_checkpoint(net, x):
    return net.head(checkpoint(lambda h: Scaled.apply(h, net.w, 1), net.enc(x), use_reentrant=True)).mean()


def unused_output_of_a_function(net, x):
    _ = NoGradForW.apply(net.enc(x), net.w)
    return net.head(net.enc(x)[:, :4]).mean()


@pytest.mark.parametrize("forward", [correct_with_an_int_argument, reversed_gradient, correct_in_reentrant_checkpoint])
def test_a_correct_function_is_silent(forward):
    assert step(forward) == []


def test_a_function_whose_output_is_unused_makes_its_parameter_unused_not_detached():
    assert {(f.kind, f.param) for f in step(unused_output_of_a_function)} == {("unused", "w")}


# ---------------------------------------------------------------- real cuts around a Function keep their names
def test_no_grad_around_the_apply_is_still_a_no_grad_cut():
    def forward(net, x):
        h = net.enc(x)
        with torch.no_grad():  # CUT: entered
            y = Scaled.apply(h, net.w, 2)  # CUT: no_grad
        return net.head(y).mean() + h.mean()

    [f] = step(forward)
    assert (f.kind, f.param, f.where) == ("detached", "w", where("CUT: no_grad"))
    assert f"under `torch.no_grad()` at {where('CUT: no_grad')} (entered at {where('CUT: entered')})" in f.message


def test_a_detach_after_a_correct_function_is_the_culprit():
    def forward(net, x):
        y = Scaled.apply(net.enc(x), net.w, 1).detach()  # CUT: detach
        return net.head(y).mean() + net.enc(x).mean()

    [f] = step(forward)
    assert (f.kind, f.param, f.where) == ("detached", "w", where("CUT: detach"))
    assert "`.detach()`" in f.message


# ---------------------------------------------------------------- under the Lightning callback
class LitNet(LightningModule):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function
        self.enc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 1) / 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.function.apply(self.enc(x), self.w)  # APPLY: lightning
        return ((out.squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Correct(Matmul):
    @staticmethod
    def backward(ctx, g):
        return Correct.grads(ctx, g)


def test_gradguard_raises_at_the_first_step_naming_the_apply(tmp_path):
    with pytest.raises(GradGuardError) as err:
        make_trainer(tmp_path, [GradGuard()], max_steps=3).fit(LitNet(NoGradForW), loader())
    [f] = err.value.findings
    assert (f.kind, f.param, f.where, f.step) == ("detached", "w", where("APPLY: lightning"), 0)
    assert "returned no gradient for its 2nd input `w`" in str(err.value)


def test_gradguard_is_silent_on_a_correct_function(tmp_path):
    guard = GradGuard(on_frozen="raise", on_orphan="raise", on_zero="raise", diagnose="always")
    make_trainer(tmp_path, [guard], max_steps=3).fit(LitNet(Correct), loader())
    assert guard.findings == []
