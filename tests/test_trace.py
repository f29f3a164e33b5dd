"""Every kind of cut site, named by its exact `path:line` (from a marker comment), under GradGuard and check_step."""

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


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)


ENC = {"enc.weight", "enc.bias"}


# Each case: the forward pass with one cut, marked on its line. `x` is [B, 8]; the result is the loss.
def cut_detach(m, x):
    h = m.enc(x).detach()  # CUT: detach
    return m.head(h).mean()


def cut_detach_(m, x):
    h = m.enc(x)
    h.detach_()  # CUT: detach_
    return m.head(h).mean()


def cut_data(m, x):
    h = m.enc(x).data  # CUT: data
    return m.head(h).mean()


def cut_param_data(m, x):
    h = nn.functional.linear(x, m.enc.weight.data, m.enc.bias)  # CUT: param-data
    return m.head(h).mean()


def cut_numpy(m, x):
    arr = m.enc(x).detach().numpy()  # CUT: numpy
    np.tanh(arr, out=arr)
    return m.head(torch.from_numpy(arr)).mean()


def cut_numpy_math(m, x):
    arr = m.enc(x).detach().cpu().numpy()  # CUT: numpy-math
    return m.head(torch.as_tensor(np.tanh(arr) * 2)).mean()


def cut_numpy_identity(m, x):
    h = m.enc(x)
    arr = np.asarray(h.detach())  # CUT: asarray
    return m.head(torch.as_tensor(arr)).mean()


def cut_item(m, x):
    h = m.enc(x)
    scale = torch.tensor(h.abs().mean().item())  # CUT: item
    return (m.head(x.new_ones(x.shape[0], 16)) * scale).mean()


def cut_float(m, x):
    h = m.enc(x)
    s = float(h.sum())  # CUT: float
    return m.head(x.new_ones(x.shape[0], 16)).mean() * s


def cut_tolist(m, x):
    h = m.enc(x)
    values = h[:, 0].tolist()  # CUT: tolist
    return (m.head(x.new_ones(x.shape[0], 16)).squeeze(-1) * torch.tensor(values)).mean()


def cut_no_grad(m, x):
    with torch.no_grad():
        h = m.enc(x)  # CUT: no_grad
    return m.head(h).mean()


def cut_set_grad_enabled(m, x):
    with torch.set_grad_enabled(False):
        h = m.enc(x)  # CUT: set_grad_enabled
    return m.head(h).mean()


def cut_inference_mode(m, x):
    with torch.inference_mode():
        h = m.enc(x)  # CUT: inference_mode
    return m.head(h.clone()).mean()


def cut_argmax(m, x):
    idx = m.enc(x).argmax(dim=1)  # CUT: argmax
    return m.head(nn.functional.one_hot(idx, 16).float()).mean()


def cut_topk_indices(m, x):
    _, idx = m.enc(x).topk(2, dim=1)  # CUT: topk
    return m.head(nn.functional.one_hot(idx[:, 0], 16).float()).mean()


def cut_compare(m, x):
    mask = m.enc(x) > 0  # CUT: compare
    return m.head(mask.float()).mean()


def cut_int_cast(m, x):
    h = m.enc(x).long()  # CUT: long
    return m.head(h.float()).mean()


def cut_copy_leaf(m, x):
    w = m.enc.weight.detach().clone().requires_grad_()  # CUT: copy
    return m.head(nn.functional.linear(x, w, m.enc.bias)).mean()


def cut_checkpoint(m, x):
    h = checkpoint(m.enc, x, use_reentrant=True)  # CUT: checkpoint
    return m.head(h).mean()


CASES = [
    (cut_detach, "detach", ENC, "`.detach()`"),
    (cut_detach_, "detach_", ENC, "`.detach_()`"),
    (cut_data, "data", ENC, "`.data`"),
    (cut_param_data, "param-data", {"enc.weight"}, "`.data`"),
    (cut_numpy, "numpy", ENC, "`.numpy()`"),
    (cut_numpy_math, "numpy-math", ENC, "round-trip through numpy"),
    (cut_numpy_identity, "asarray", ENC, "`np.asarray(tensor)`"),
    (cut_item, "item", ENC, "`.item()`"),
    (cut_float, "float", ENC, "`float(tensor)`"),
    (cut_tolist, "tolist", ENC, "`.tolist()`"),
    (cut_no_grad, "no_grad", ENC, "torch.no_grad()"),
    (cut_set_grad_enabled, "set_grad_enabled", ENC, "torch.no_grad()"),
    (cut_inference_mode, "inference_mode", ENC, "torch.inference_mode()"),
    (cut_argmax, "argmax", ENC, "non-differentiable `argmax`"),
    (cut_topk_indices, "topk", ENC, "non-differentiable `topk`"),
    (cut_compare, "compare", ENC, "non-differentiable `gt`"),
    (cut_int_cast, "long", ENC, "non-differentiable `long`"),
    (cut_copy_leaf, "copy", {"enc.weight"}, "a copy into a new leaf"),
    (cut_checkpoint, "checkpoint", ENC, "checkpoint(..., use_reentrant=True)"),
]
IDS = [c[1] for c in CASES]


@pytest.mark.parametrize(("forward", "marker", "params", "says"), CASES, ids=IDS)
def test_check_step_names_the_cut(forward, marker, params, says):
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt) as chk:
            loss = forward(model, torch.randn(4, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
    detached = {f.param: f for f in chk.findings if f.kind == "detached"}
    assert set(detached) == params, chk.findings
    assert {f.where for f in detached.values()} == {where(f"CUT: {marker}")}
    assert all(says in f.message for f in detached.values()), [f.message for f in detached.values()]
    assert {f.param for f in chk.findings} - params <= {"enc.bias"}  # enc.bias may be unaffected (copy, data)


class LitCase(LightningModule):
    def __init__(self, forward) -> None:
        super().__init__()
        self.net = Model()
        self.forward_fn = forward

    def training_step(self, batch, batch_idx):
        return self.forward_fn(self.net, batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("forward", "marker", "params", "says"), CASES, ids=IDS)
def test_gradguard_names_the_cut(tmp_path, forward, marker, params, says):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GradGuardError) as err:
            make_trainer(tmp_path, [GradGuard()]).fit(LitCase(forward), loader())
    detached = {f.param: f for f in err.value.findings if f.kind == "detached"}
    assert set(detached) == {f"net.{p}" for p in params}
    assert {f.where for f in detached.values()} == {where(f"CUT: {marker}")}
    assert all(says in f.message for f in detached.values())


def test_where_is_in_the_user_module_forward_not_in_torch():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x).detach()  # CUT: inner

    model = nn.Sequential(Block(), nn.Linear(8, 1))
    with check_step(model) as chk:
        model(torch.randn(2, 8)).sum().backward()
    assert {f.where for f in chk.findings} == {where("CUT: inner")}
    assert {f.param for f in chk.findings} == {"0.lin.weight", "0.lin.bias"}


def test_no_grad_names_the_call_inside_the_block_and_where_it_was_entered():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.lin(x))

    block, head = Block(), nn.Linear(8, 1)
    model = nn.ModuleDict({"block": block, "head": head})
    with check_step(model) as chk:
        with torch.no_grad():  # CUT: entered
            h = block(torch.randn(2, 8))  # CUT: call
        head(h).sum().backward()
    f = next(f for f in chk.findings if f.param == "block.lin.weight")
    assert f.kind == "detached"
    assert f.where == where("CUT: call")
    assert f"entered at {where('CUT: entered')}" in f.message


def test_zero_derivative_op_is_named_for_zero_findings():
    model = Model()
    with check_step(model) as chk:
        h = torch.round(model.enc(torch.randn(4, 8)))  # CUT: round
        model.head(h).mean().backward()
    zero = {f.param: f for f in chk.findings if f.kind == "zero"}
    assert set(zero) == ENC
    assert {f.where for f in zero.values()} == {where("CUT: round")}
    assert "derivative is zero" in zero["enc.weight"].message


def test_whole_loss_detached_error_replaces_torch_error_and_names_the_line(tmp_path):
    class Lit(LitCase):
        def training_step(self, batch, batch_idx):
            return self.net.head(self.net.enc(batch[0])).mean().detach()  # CUT: loss

    with pytest.raises(GradGuardError, match="does not require grad") as err:
        make_trainer(tmp_path, [GradGuard()]).fit(Lit(cut_detach), loader())
    assert "element 0 of tensors" in str(err.value)  # quotes the error it replaces
    assert {f.param for f in err.value.findings} == {"net.enc.weight", "net.enc.bias", "net.head.weight",
                                                     "net.head.bias"}  # fmt: skip
    assert {f.where for f in err.value.findings} == {where("CUT: loss")}


def test_whole_loss_detached_on_untraced_step_still_explains(tmp_path):
    class Lit(LitCase):
        def training_step(self, batch, batch_idx):
            loss = self.net.head(self.net.enc(batch[0])).mean()
            return loss.detach() if batch_idx == 2 else loss

    with pytest.raises(GradGuardError, match="not traced"):
        make_trainer(tmp_path, [GradGuard()], max_steps=4).fit(Lit(cut_detach), loader())


# ---------------------------------------------------------------- correct code stays silent
class Correct(LightningModule):
    """Cuts everywhere that do not feed the loss: logging, metrics, validation, EMA, a correct checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Model()
        self.ema = Model().requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = checkpoint(self.net.enc, x.requires_grad_(), use_reentrant=True)
        out = self.net.head(h).squeeze(-1)
        loss = ((out - y) ** 2).mean()
        self.log("train_loss", loss)
        self.log("pred_mean", out.detach().mean().item())
        acc = ((out.detach() > 0) == (y > 0)).float().mean()
        self.log("acc", acc)
        with torch.no_grad():
            _ = self.net.head(self.net.enc(x)).argmax()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                e.mul_(0.9).add_(p.detach(), alpha=0.1)

    def validation_step(self, batch, batch_idx):
        self.log("val", self.net.head(self.net.enc(batch[0])).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def test_logging_metrics_validation_ema_and_correct_checkpoint_are_silent(tmp_path):
    guard = GradGuard(on_frozen="raise", on_orphan="raise", on_zero="raise", diagnose="always")
    trainer = make_trainer(tmp_path, [guard], val_check_interval=2, limit_val_batches=1)
    trainer.fit(Correct(), loader(), loader())
    assert guard.findings == []


def test_exception_in_user_code_propagates_unchanged_and_leaves_no_mode(tmp_path):
    from torch.overrides import _get_current_function_mode_stack

    class BoomError(Exception):
        pass

    class Lit(LitCase):
        def training_step(self, batch, batch_idx):
            self.net.enc(batch[0])
            raise BoomError("user bug")

    with pytest.raises(BoomError, match="user bug"):
        make_trainer(tmp_path, [GradGuard()]).fit(Lit(cut_detach), loader())
    assert _get_current_function_mode_stack() == []
    assert torch.is_grad_enabled()

    model = Model()
    with pytest.raises(BoomError), check_step(model):
        model.enc(torch.randn(2, 8))
        raise BoomError("user bug")
    assert _get_current_function_mode_stack() == []


def test_trace_holds_no_tensor_after_the_step(tmp_path):
    import gc
    import weakref

    refs = []

    class Lit(LitCase):
        def training_step(self, batch, batch_idx):
            h = self.net.enc(batch[0])
            refs.append(weakref.ref(h))
            return self.net.head(h).mean()

    guard = GradGuard(diagnose="always")
    make_trainer(tmp_path, [guard], max_steps=2).fit(Lit(cut_detach), loader())
    gc.collect()
    assert refs
    assert all(r() is None for r in refs)
    assert guard._core.tracer is not None
    assert guard._core.tracer._prov == {}


def test_setitem_carries_the_written_value():
    model = Model()
    with check_step(model) as chk:
        buf = torch.zeros(4, 16)
        buf[:, :] = model.enc(torch.randn(4, 8)).detach()  # CUT: setitem
        model.head(buf).mean().backward()
    assert {(f.kind, f.param, f.where) for f in chk.findings} == {
        ("detached", "enc.weight", where("CUT: setitem")),
        ("detached", "enc.bias", where("CUT: setitem")),
    }


def test_large_tolist_is_followed_within_a_budget():
    model = Model()
    with check_step(model) as chk:
        values = model.enc(torch.randn(512, 8)).tolist()  # CUT: big-tolist
        model.head(torch.tensor(values)).mean().backward()
    assert {f.where for f in chk.findings if f.kind == "detached"} == {where("CUT: big-tolist")}


@pytest.mark.parametrize("make", [
    lambda h: torch.zeros_like(h),
    lambda h: h.new_ones(h.shape),
    lambda h: torch.full_like(h, 0.5),
    lambda h: h.new_full(h.shape, 2.0),
    lambda h: torch.empty_like(h).fill_(1.0),
])  # fmt: skip
def test_a_module_whose_output_gives_only_a_shape_is_unused(make):
    """`zeros_like(h)`, `h.new_ones(...)`: `h`'s shape is used, not its value, so `a` is unused, not detached."""
    m = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 1)})
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(m, opt) as chk:
            x = torch.randn(3, 4)
            m["b"](x + make(m["a"](x))).mean().backward()
            opt.step()
    assert {(f.kind, f.param) for f in chk.findings} == {("unused", "a.weight"), ("unused", "a.bias")}


def test_new_tensor_still_carries_its_data():
    """`h.new_tensor(data)`: the data's value flows (and its graph is cut); `h` gives only dtype and device."""
    m = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 1), "c": nn.Linear(4, 4)})
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(m, opt) as chk:
            x = torch.randn(3, 4)
            copied = m["c"](x).new_tensor(m["a"](x))
            m["b"](x + copied).mean().backward()
            opt.step()
    found = {(f.kind, f.param) for f in chk.findings}
    assert found == {("detached", "a.weight"), ("detached", "a.bias"), ("unused", "c.weight"), ("unused", "c.bias")}


def test_detach_numpy_repeated_at_one_line_is_one_escape_site():
    """`.detach().numpy()` in a loop: one escape site counting every call (not one site per iteration)."""
    from lightning_gradguard.params import ParamIndex
    from lightning_gradguard.trace import Tracer

    lin, head = nn.Linear(4, 4), nn.Linear(4, 1)
    index = ParamIndex.of(nn.ModuleDict({"lin": lin, "head": head}))
    with Tracer(index) as tracer:
        total = torch.zeros(2, 4)
        for _ in range(3):
            total = total + torch.from_numpy(lin(torch.randn(2, 4)).detach().numpy())  # CUT: loop numpy
        loss = head(total).mean()
    facts = tracer.facts(loss)
    assert [(s.kind, s.op, s.where, s.calls) for s in tracer.site_bits(facts.cuts)] == [
        ("escape", "numpy", where("CUT: loop numpy"), 3)
    ]
    assert len(tracer.sites) == 1
