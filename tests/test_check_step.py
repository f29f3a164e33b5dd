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

    with pytest.warns(GradGuardWarning, match="b.weight"), check_step(model, opt) as chk:
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


def test_grad_scaler_skipped_steps_are_not_checked():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        with check_step(model, opt, strict=True) as chk:
            scaler.scale(model(torch.randn(2, 4)).sum() * 1e30).backward()
            scaler.step(opt)  # inf gradients: the scaler skips `opt.step()`, so nothing is judged
            scaler.update()
    assert chk.findings == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"model": "net"}, "model='net'"),
    ({"optimizer": "adam"}, "optimizer='adam'"),
    ({"ignore": "b.*"}, r"ignore='b.\*'"),
])  # fmt: skip
def test_bad_arguments_fail_at_construction(kwargs, match):
    args = {"model": nn.Linear(2, 1), **kwargs}
    with pytest.raises((TypeError, ValueError), match=match):
        check_step(**args)


def test_plain_pytorch_use_does_not_import_lightning():
    code = (
        "import sys, torch\n"
        "from lightning_gradguard import check_step\n"
        "m = torch.nn.Linear(2, 1)\n"
        "with check_step(m) as c:\n"
        "    m(torch.ones(1, 2)).sum().backward()\n"
        "print(len(c.findings), sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'tensorboard')))\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True)  # fmt: skip
    assert out.stdout.strip() == "0 []"
