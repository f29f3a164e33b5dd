"""`check_step` in plain PyTorch loops, starting with the article's three examples."""

from __future__ import annotations

import os
import re
import runpy
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import where
from lightning_gradguard import GradGuardError, GradGuardWarning, check_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The article our users start from: the shared copy beside the repository, else the copy kept with the tests.
SEED = next(
    p
    for p in (
        os.path.join(ROOT, "..", "shared", "seed", "why-no-gradients.md"),
        os.path.join(ROOT, "tests", "data", "why-no-gradients.md"),
    )
    if os.path.exists(p)
)
EXAMPLE = os.path.join(ROOT, "examples", "why_no_gradients.py")


def seed_snippets() -> list[str]:
    with open(SEED, encoding="utf-8") as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


def run_snippet_in_check_step(code: str, tmp_path) -> tuple[check_step, BaseException | None, str]:
    """Run the article's snippet verbatim: the lines that build the model first, the rest inside check_step.

    The snippet is written to a file so that `where` can point at its lines.
    """
    lines = code.splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("input_tensor"))
    body = "\n".join("    " + line for line in lines[cut:])
    src = "\n".join(lines[:cut]) + "\nfrom lightning_gradguard import check_step\nwith check_step(model) as chk:\n"
    path = tmp_path / "snippet.py"
    path.write_text(src + body + "\n")
    scope: dict = {}
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exec(compile(path.read_text(), str(path), "exec"), scope)  # noqa: S102 - the article's code
        except GradGuardError as err:
            error = err
    chk = scope.get("chk")
    if chk is None:  # raised inside the block: fish the guard out of the traceback's frame
        tb = error.__traceback__
        while tb is not None and "chk" not in tb.tb_frame.f_locals:
            tb = tb.tb_next
        chk = tb.tb_frame.f_locals["chk"] if tb is not None else None
    return chk, error, str(path)


@pytest.fixture(scope="module")
def snippets():
    found = seed_snippets()
    assert len(found) == 3
    return found


def test_article_example_1_reports_weight_frozen(snippets, tmp_path):
    chk, error, _ = run_snippet_in_check_step(snippets[0], tmp_path)
    assert error is None
    assert [(f.param, f.kind) for f in chk.findings] == [("weight", "frozen")]


@pytest.mark.parametrize(("n", "cut", "says"), [(1, ".detach()", "`.detach()`"), (2, "output.data", "`.data`")])
def test_article_examples_2_and_3_report_weight_and_bias_detached(snippets, tmp_path, n, cut, says):
    chk, error, path = run_snippet_in_check_step(snippets[n], tmp_path)
    assert isinstance(error, GradGuardError)
    assert "element 0 of tensors does not require grad" in str(error)
    assert sorted((f.param, f.kind) for f in error.findings) == [("bias", "detached"), ("weight", "detached")]
    with open(path) as fh:
        line = next(i for i, text in enumerate(fh, 1) if cut in text)
    rel = os.path.relpath(path)
    assert {f.where for f in error.findings} == {f"{path if rel.startswith('..') else rel}:{line}"}
    assert all(says in f.message for f in error.findings)
    assert chk is not None
    assert sorted(f.param for f in chk.findings) == ["bias", "weight"]


def test_example_script_prints_the_three_answers(capsys):
    runpy.run_path(EXAMPLE, run_name="__main__")
    out = capsys.readouterr().out
    parts = out.split("--- example ")[1:]
    assert "weight: frozen" in parts[0]
    for part, marker in ((parts[1], "BUG: example 2"), (parts[2], "BUG: example 3")):
        assert "GradGuardError" in part
        assert "weight: detached" in part
        assert "bias: detached" in part
        assert where(marker, EXAMPLE) in part


def test_correct_loop_is_silent_and_does_not_warn():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            with check_step(model, opt, step=step) as chk:
                opt.zero_grad()
                model(torch.randn(4, 4)).pow(2).mean().backward()
                opt.step()
            assert chk.findings == []


def test_warns_by_default_and_raises_when_strict():
    model = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        model["a"](torch.randn(2, 4)).sum().backward()
        opt.step()

    with pytest.warns(GradGuardWarning, match=r"b\.(weight|bias): unused"), check_step(model, opt) as chk:
        step()
    assert {(f.kind, f.param) for f in chk.findings} == {("unused", "b.weight"), ("unused", "b.bias")}
    before = model["a"].weight.detach().clone()
    with pytest.raises(GradGuardError, match="b.weight: unused"), check_step(model, opt, strict=True):
        step()
    assert torch.equal(model["a"].weight, before)  # raised before the optimizer stepped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with check_step(model, opt, strict=True, ignore=["b.*"]) as chk:
            step()
    assert chk.findings == []


def test_checks_at_block_end_when_no_optimizer_steps():
    model = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    with pytest.warns(GradGuardWarning), check_step(model) as chk:
        out = model["a"](torch.randn(2, 4))
        _ = model["b"](torch.randn(2, 4))
        out.sum().backward()
    assert {(f.kind, f.param) for f in chk.findings} == {("unused", "b.weight"), ("unused", "b.bias")}


def test_zero_grad_after_step_inside_the_block_does_not_hide_anything():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(GradGuardWarning, match="exactly zero"), check_step(model, opt) as chk:
        (model(torch.randn(2, 4)) * 0).sum().backward()
        opt.step()
        opt.zero_grad()
    assert {f.kind for f in chk.findings} == {"zero"}


def test_optimizer_over_a_copy_is_stale():
    import copy

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1)
    with pytest.raises(GradGuardError, match="stale"), check_step(model, opt, strict=True):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()


def _amp_step(model, opt, scaler, factor):
    opt.zero_grad()
    scaler.scale(model(torch.randn(2, 4)).sum() * factor).backward()
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_skipped_overflow_steps_stay_silent():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    before = model.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        for step in range(2):
            with check_step(model, opt, scaler=scaler, strict=True, step=step) as chk:
                _amp_step(model, opt, scaler, 1e30)  # inf gradients: the scaler skips `opt.step()`
            assert chk.findings == []
    assert torch.equal(model.weight, before)  # both steps were skipped: the silence is about skipped steps
    assert scaler.get_scale() == 2.0**98
    assert "step" not in vars(scaler)  # `scaler.step` is the class's again


def test_persistent_nan_under_a_grad_scaler_is_nonfinite_once_the_scale_falls_to_one():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scales = []
    with pytest.raises(GradGuardError, match="weight: nonfinite") as err:  # noqa: PT012 - the loop is the point
        for step in range(4):
            scales.append(scaler.get_scale())
            with check_step(model, opt, scaler=scaler, strict=True, step=step):
                _amp_step(model, opt, scaler, float("nan"))
    assert scales == [4.0, 2.0, 1.0]  # silent while the scale was above 1, raised at scale 1
    assert {(f.kind, f.step) for f in err.value.findings} == {("nonfinite", 2)}
    assert "step" not in vars(scaler)  # restored although the block raised


def test_a_step_the_scaler_skipped_is_judged_without_the_scaler_argument():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    says = r"pass `check_step\(\.\.\., scaler=scaler\)`[\s\S]*weight: nonfinite"
    with pytest.raises(GradGuardError, match=says), check_step(model, opt, strict=True):
        _amp_step(model, opt, scaler, 1e30)


def test_optimizer_stepping_after_the_block_is_judged_when_the_block_ends():
    model = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(GradGuardError, match=r"block ended[\s\S]*b.weight: unused"),
        check_step(model, opt, strict=True),
    ):
        model["a"](torch.randn(2, 4)).sum().backward()
    opt.zero_grad()
    with warnings.catch_warnings():  # nearest correct: every parameter used, the step still after the block
        warnings.simplefilter("error")
        with check_step(model, opt, strict=True) as chk:
            (model["a"](torch.randn(2, 4)) + model["b"](torch.randn(2, 4))).sum().backward()
        opt.step()
    assert chk.findings == []


def test_block_end_check_works_untraced():
    model = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(GradGuardWarning, match=r"b\.(weight|bias): unused"), check_step(model, opt, trace=False) as chk:
        model["a"](torch.randn(2, 4)).sum().backward()
    assert {(f.kind, f.param) for f in chk.findings} == {("unused", "b.weight"), ("unused", "b.bias")}


@pytest.mark.parametrize("trace", [True, False])
def test_block_without_backward_warns(trace):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    says = r"no `backward\(\)` ran inside .*nothing was checked"
    with pytest.warns(GradGuardWarning, match=says), check_step(model, opt, trace=trace) as chk:
        model(torch.randn(2, 4))
    assert chk.findings == []
    model(torch.randn(2, 4)).sum().backward()
    says = "stepped on gradients computed before the block"
    with pytest.warns(GradGuardWarning, match=says), check_step(model, opt, trace=trace) as chk:
        opt.step()
    assert chk.findings == []


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.G = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
        self.D = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def gan_block(gan, opt_g, opt_d, order, *, bug=False):
    """One iteration of a plain GAN loop; with ``bug``, the generator loss reuses the detached fake."""
    real = torch.randn(6, 4)
    for which in order:
        fake = gan.G(torch.randn(6, 3))
        if which == "D":
            opt_d.zero_grad()
            d_loss = nn.functional.softplus(gan.D(fake.detach())).mean() + nn.functional.softplus(-gan.D(real)).mean()
            d_loss.backward()
            opt_d.step()
        else:
            opt_g.zero_grad()
            g_in = fake.detach() if bug else fake  # BUG: gan detach
            nn.functional.softplus(-gan.D(g_in)).mean().backward()
            opt_g.step()


@pytest.mark.parametrize("order", ["DG", "GD"])
@pytest.mark.parametrize("given", ["none", "list"])
def test_gan_each_optimizer_judges_its_own_parameters_and_none_is_an_orphan(order, given):
    gan = GAN()
    opt_g = torch.optim.Adam(gan.G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(gan.D.parameters(), lr=1e-3)
    arg = None if given == "none" else [opt_g, opt_d]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            with check_step(gan, arg, strict=True, step=step) as chk:
                gan_block(gan, opt_g, opt_d, order)
            assert chk.findings == []
    with pytest.raises(GradGuardError) as err, check_step(gan, arg, strict=True):
        gan_block(gan, opt_g, opt_d, order, bug=True)
    found = {(f.kind, f.param) for f in err.value.findings}
    assert found == {("detached", n) for n in ("G.0.weight", "G.0.bias", "G.2.weight", "G.2.bias")}
    assert {f.where for f in err.value.findings} == {where("BUG: gan detach")}


def two_optimizers_one_backward(net, opts, *, bug: bool) -> None:
    x = torch.randn(6, 3)
    out = net.G(x)
    if bug:
        # G.0.weight keeps a gradient path through `.sum()`; G.0.bias and G.2 do not
        out = out.detach() * net.G[0].weight.sum()  # BUG: two-opt detach
    loss = net.D(out).pow(2).mean()
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    for opt in opts:
        opt.step()


@pytest.mark.parametrize(("given", "order"), [
    ("none", "GD"), ("none", "DG"), ("list", "GD"), ("list", "DG"), ("second", "DG"),
])  # fmt: skip
def test_two_optimizers_stepping_on_one_backward_are_judged_with_its_trace(given, order):
    """Whichever optimizer steps second, its parameters are judged with the trace: `detached` at the line."""
    gan = GAN()
    opt_g = torch.optim.SGD(gan.G.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(gan.D.parameters(), lr=0.1)
    opts = [opt_g, opt_d] if order == "GD" else [opt_d, opt_g]
    arg = {"none": None, "list": opts, "second": opts[1]}[given]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with check_step(gan, arg, strict=True) as chk:
            two_optimizers_one_backward(gan, opts, bug=False)
    assert chk.findings == []
    with pytest.raises(GradGuardError) as err, check_step(gan, arg, strict=True):
        two_optimizers_one_backward(gan, opts, bug=True)
    assert {(f.kind, f.param, f.where) for f in err.value.findings} == {
        ("detached", p, where("BUG: two-opt detach")) for p in ("G.0.bias", "G.2.weight", "G.2.bias")
    }


def test_a_parameter_no_optimizer_holds_is_still_an_orphan():
    gan = GAN()
    opt_g = torch.optim.SGD(gan.G.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(gan.D[0].parameters(), lr=0.1)  # BUG: the last layer of D is in no optimizer
    with pytest.warns(GradGuardWarning, match="orphan"), check_step(gan, [opt_g, opt_d]) as chk:
        gan_block(gan, opt_g, opt_d, "DG")
    assert {(f.kind, f.param) for f in chk.findings} == {("orphan", "D.2.weight"), ("orphan", "D.2.bias")}


def test_only_the_given_optimizer_is_judged_but_the_others_hold_their_parameters():
    gan = GAN()
    opt_g = torch.optim.SGD(gan.G.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(gan.D.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with check_step(gan, opt_g, strict=True) as chk:  # D steps too: its parameters are held, not orphans
            gan_block(gan, opt_g, opt_d, "GD")
    assert chk.findings == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"model": "net"}, "model='net'"),
    ({"optimizer": "adam"}, "optimizer='adam'"),
    ({"ignore": [3]}, r"ignore=.*3"),
    ({"optimizer": [torch.optim.SGD([nn.Parameter(torch.ones(1))]), "adam"]}, "'adam'"),
    ({"optimizer": []}, r"optimizer=\[\]"),
    ({"scaler": "amp"}, "scaler='amp'"),
])  # fmt: skip
def test_bad_arguments_fail_at_construction(kwargs, match):
    args = {"model": nn.Linear(2, 1), **kwargs}
    with pytest.raises((TypeError, ValueError), match=match):
        check_step(**args)


def test_plain_pytorch_use_does_not_import_lightning():
    code = (
        "import sys, torch\n"
        "from lightning_gradguard import check_step\n"
        "from lightning_gradguard.testing import assert_gradients_flow\n"
        "m = torch.nn.Linear(2, 1)\n"
        "with check_step(m) as c:\n"
        "    m(torch.ones(1, 2)).sum().backward()\n"
        "assert_gradients_flow(m, lambda m: m(torch.ones(1, 2)).sum())\n"
        "print(len(c.findings), sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'tensorboard')))\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True)  # fmt: skip
    assert out.stdout.strip() == "0 []"


def test_gradient_accumulation_window_in_one_block_judges_the_summed_gradients():
    model = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with check_step(model, opt, strict=True) as chk:
            for micro in range(4):  # `b` takes part in one micro-batch only: its summed gradient is usable
                out = model["a"](torch.randn(2, 4))
                if micro == 2:
                    out = out + model["b"](torch.randn(2, 4))
                out.sum().backward()
            opt.step()
    assert chk.findings == []
    opt.zero_grad()
    with pytest.raises(GradGuardError, match="b.weight: unused"), check_step(model, opt, strict=True):
        model["a"](torch.randn(2, 4)).sum().backward()  # one micro-batch per block: judged on its own at the end


def test_the_graph_is_not_held_past_the_optimizer_step():
    """Once an optimizer judged the step, the guard keeps the loss's graph only through the user's own reference:
    a graph kept with `retain_graph=True` (and the activations it saved) dies when the user drops the loss."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with check_step(model, opt, strict=True) as chk:
        act = model[1](model[0](torch.randn(4, 8)))  # tanh saves its output for backward
        saved = weakref.ref(act)
        loss = model[2](act).sum()
        del act
        loss.backward(retain_graph=True)
        opt.step()
        del loss
        gc.collect()
        assert saved() is None  # before the block ends
    assert chk.findings == []


# ---------------------------------------------------------------- mutation campaign (tests/mutation/run.py)
def test_a_loss_that_is_a_parameter_itself_is_not_graphless():
    class Temperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.tensor(2.0))

    model = Temperature()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with check_step(model, opt, strict=True) as chk:
            loss = model.t  # a leaf: no grad_fn, but it requires grad, so backward() works
            loss.backward()
            opt.step()
    assert chk.findings == []
    assert model.t.item() == pytest.approx(1.9)
    with pytest.raises(GradGuardError, match="does not require grad"), check_step(model, opt, strict=True):
        model.t.detach().backward()  # nearest wrong: the same value without its graph


def test_the_second_optimizer_judges_a_zero_gradient_after_the_loss_is_gone():
    model = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    opt_a = torch.optim.SGD(model["a"].parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model["b"].parameters(), lr=0.1)
    x = torch.randn(2, 4)
    with pytest.warns(GradGuardWarning, match="zero"), check_step(model, [opt_a, opt_b]) as chk:
        (model["a"](x) + model["b"](x) * 0.0).sum().backward()  # no name keeps the loss: it is gone after backward
        opt_a.step()
        opt_b.step()  # judged after opt_a released the graph: what the loss reached is no longer known
    assert {(f.kind, f.param) for f in chk.findings} == {("zero", "b.weight"), ("zero", "b.bias")}
    with warnings.catch_warnings():  # nearest correct: b takes part in the loss
        warnings.simplefilter("error")
        with check_step(model, [opt_a, opt_b]) as chk:
            (model["a"](x) + model["b"](x)).sum().backward()
            opt_a.step()
            opt_b.step()
    assert chk.findings == []
