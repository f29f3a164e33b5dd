"""Values that leave torch and come back: Python-number arithmetic, invisible constructors, numpy arithmetic.

Each cut is a `detached` finding that names the line where the value left torch (a marker comment). Healthy
constants are not tainted, and a value that cannot be followed makes an `unused` finding that says where the
parameter's value left torch instead of claiming it was discarded.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_trace import ENC, LitCase, Model
from torch import nn

from conftest import loader, make_trainer, where
from lightning_gradguard import GradGuard, GradGuardError, check_step


def ones(x):
    return x.new_ones(x.shape[0], 16)


# Each case: `x` is [B, 8]; the result is the loss; `enc` reaches it only through the marked escape.
def item_times(m, x):
    s = torch.tensor(m.enc(x).pow(2).mean().item() * 0.5)  # CUT: item-times
    return m.head(ones(x)).mean() * s


def float_plus_one(m, x):
    s = float(m.enc(x).sum()) + 1  # CUT: float-plus
    return m.head(ones(x)).mean() * s


def float_into_full(m, x):
    s = float(m.enc(x).abs().mean())  # CUT: float-full
    return (m.head(ones(x)).squeeze(-1) * torch.full((x.shape[0],), s / 3)).mean()


def tolist_comprehension(m, x):
    values = [v * 2 + 1 for v in m.enc(x)[:, 0].tolist()]  # CUT: tolist-comp
    return (m.head(ones(x)).squeeze(-1) * torch.tensor(values)).mean()


def tolist_nested_math(m, x):
    rows = m.enc(x).tolist()  # CUT: tolist-nested
    scaled = [[v / 7 for v in row] for row in rows]
    return m.head(torch.tensor(scaled)).mean()


def parameter_leaf(m, x):
    p = nn.Parameter(m.enc(x).detach().clone())  # CUT: parameter
    return m.head(p).mean()


def legacy_constructor(m, x):
    rows = m.enc(x).tolist()  # CUT: legacy
    return m.head(torch.Tensor(rows)).mean()


def numpy_math_from_numpy(m, x):
    arr = m.enc(x).detach().numpy()  # CUT: numpy-from
    return m.head(torch.from_numpy(np.tanh(arr) * 2)).mean()


def numpy_scalar_times(m, x):
    s = torch.tensor(np.float32(m.enc(x).pow(2).mean().item()) * 2)  # CUT: np-scalar
    return m.head(ones(x)).mean() * s


def short_value_plus_one(m, x):
    """The escaped value is 0.25 and the arithmetic gives 1.25: short reprs, as half-precision values have."""
    with torch.no_grad():
        m.enc.weight.zero_()
        m.enc.bias.fill_(0.25)
    s = m.enc(x).abs().mean().item()  # CUT: short
    assert len(repr(s + 1.0)) <= 8  # (not `== 1.25`: that would make 1.25 a literal of this function)
    return m.head(ones(x)).mean() * (s + 1.0)


CASES = [
    (item_times, "item-times", "`.item()`"),
    (numpy_scalar_times, "np-scalar", "`.item()`"),
    (short_value_plus_one, "short", "`.item()`"),
    (float_plus_one, "float-plus", "`float(tensor)`"),
    (float_into_full, "float-full", "`float(tensor)`"),
    (tolist_comprehension, "tolist-comp", "`.tolist()`"),
    (tolist_nested_math, "tolist-nested", "`.tolist()`"),
    (parameter_leaf, "parameter", "`nn.Parameter(...)`"),
    (legacy_constructor, "legacy", "`.tolist()`"),
    (numpy_math_from_numpy, "numpy-from", "round-trip through numpy"),
]
IDS = [c[1] for c in CASES]


@pytest.mark.parametrize(("forward", "marker", "says"), CASES, ids=IDS)
def test_check_step_follows_the_escape(forward, marker, says):
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt) as chk:
            loss = forward(model, torch.randn(4, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert {(f.kind, f.param, f.where) for f in chk.findings} == {("detached", p, where(f"CUT: {marker}")) for p in ENC}
    assert all(says in f.message for f in chk.findings), [f.message for f in chk.findings]


@pytest.mark.parametrize(("forward", "marker", "says"), CASES, ids=IDS)
def test_gradguard_follows_the_escape(tmp_path, forward, marker, says):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GradGuardError) as err:
            make_trainer(tmp_path, [GradGuard()]).fit(LitCase(forward), loader())
    found = {(f.kind, f.param, f.where) for f in err.value.findings}
    assert found == {("detached", f"net.{p}", where(f"CUT: {marker}")) for p in ENC}


# ---------------------------------------------------------------- the other side: constants, discarded outputs
class Aux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 16)
        self.aux = nn.Linear(8, 4)  # its output is only logged, never in the loss: truly unused
        self.head = nn.Linear(16, 1)
        self.lr = 3e-4
        self.weight = 0.25


AUX = {"aux.weight", "aux.bias"}


class AuxNorm(Aux):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)


def constants_after_an_escape(m, x):
    logged = m.aux(x).abs().mean().item()  # CUT: logged
    assert logged >= 0
    h = m.enc(x) * 0.5
    loss = m.head(h).mean() * torch.tensor(0.5) * torch.tensor(m.lr / m.lr) + torch.full((), m.weight)
    return loss * torch.tensor([1.0, 2.0]).mean() * m.weight


def long_literal_after_an_escape(m, x):
    logged = m.aux(x).abs().mean().item()  # CUT: logged-long
    assert logged >= 0
    return m.head(m.enc(x)).mean() * 0.123456789 + torch.tensor(2.718281828) * 0.1


def short_escape_then_library_floats(m, x):
    with torch.no_grad():
        m.aux.weight.zero_()
        m.aux.bias.fill_(0.25)
    logged = m.aux(x).abs().mean().item()  # CUT: logged-short
    assert len(repr(logged)) <= 8  # a short repr, as half-precision values have: short floats prove nothing now
    h = nn.functional.dropout(m.norm(m.enc(x)), p=0.0)  # LayerNorm's eps=1e-05 comes from torch, not the user
    return m.head(h).mean()


def rounded_escape(m, x):
    s = round(m.aux(x).abs().mean().item(), 1) + 1  # CUT: rounded
    return m.head(m.enc(x)).mean() * s


def nothing_escaped(m, x):
    m.aux(x)
    return m.head(m.enc(x)).mean()


def _findings(forward, model_cls: type[nn.Module] = Aux):
    model = model_cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt) as chk:
            loss = forward(model, torch.randn(4, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return chk.findings


def test_constants_built_after_an_escape_are_not_tainted():
    """`torch.tensor(0.5)`, a learning-rate scalar, `torch.full`: the logged `aux` stays `unused`, not `detached`."""
    findings = _findings(constants_after_an_escape)
    assert {(f.kind, f.param, f.where) for f in findings} == {("unused", p, where("CUT: logged")) for p in AUX}
    for f in findings:  # its value did leave torch: the message says where, without claiming it was discarded
        assert f"`.item()` at {where('CUT: logged')}" in f.message
        assert "Otherwise its output was discarded" in f.message


def test_long_literals_in_the_code_are_constants_not_escaped_values():
    """`* 0.123456789`, `torch.tensor(2.718281828)`: literals of the calling code, however long their repr."""
    findings = _findings(long_literal_after_an_escape)
    assert {(f.kind, f.param, f.where) for f in findings} == {("unused", p, where("CUT: logged-long")) for p in AUX}
    assert all(f"`.item()` at {where('CUT: logged-long')}" in f.message for f in findings)


def test_floats_a_library_passes_are_constants_after_a_short_escape():
    """After a short-repr escape, a module's own `eps` (passed by torch) does not taint the loss."""
    findings = _findings(short_escape_then_library_floats, AuxNorm)
    assert {(f.kind, f.param, f.where) for f in findings} == {("unused", p, where("CUT: logged-short")) for p in AUX}


def test_a_value_that_cannot_be_followed_is_not_called_unused_with_confidence():
    """`round(x.item(), 1) + 1` looks like a typed constant: not followed, but the message names the escape."""
    findings = _findings(rounded_escape)
    assert {(f.kind, f.param) for f in findings} == {("unused", p) for p in AUX}
    assert all(f"`.item()` at {where('CUT: rounded')}" in f.message for f in findings)
    assert all("that is where its gradient path is cut" in f.message for f in findings)


def test_unused_with_nothing_escaped_says_discarded():
    findings = _findings(nothing_escaped)
    assert {(f.kind, f.param) for f in findings} == {("unused", p) for p in AUX}
    assert all("left torch" not in f.message and "discarded" in f.message for f in findings)


def test_inputs_from_numpy_are_not_tainted_by_an_unrelated_numpy_escape():
    """A batch made with `torch.from_numpy` before anything went to numpy keeps what it was first taken to be."""
    model = Aux()
    batch = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 8), dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model) as chk:
            h = model.enc(batch)
            stats = model.aux(batch).detach().numpy()  # CUT: metric
            assert np.isfinite(stats).all()
            model.head(h + batch.sum()).mean().backward()
    assert {(f.kind, f.param) for f in chk.findings} == {("unused", p) for p in AUX}
    assert all(f"`.numpy()` at {where('CUT: metric')}" in f.message for f in chk.findings)
