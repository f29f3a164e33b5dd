"""README claims that no other test showed (issue 9, item 10): each test names the README sentence it backs.

Where the README states a *limit*, the test pins the limit down: if it fails, the limit is gone (or worse), and the
README must say so. ``tests/README_CLAIMS.md`` maps every README claim to its test.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import ROOT, events, fit, loader, make_trainer, run_python, scalars, where
from lightning_gradguard import GradGuard, GradGuardError, GradGuardWarning, check_step
from lightning_gradguard.cli import main as cli_main
from lightning_gradguard.testing import GradientFlowError
from lightning_gradguard.trace import Tracer

AUX = {"aux.weight", "aux.bias"}


class Net(LightningModule):
    """encoder → head regression; ``cut`` detaches the encoder's output, ``scale`` multiplies the loss."""

    def __init__(self, *, cut: bool = False, frozen: bool = False, head_in_optimizer: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.cut = cut
        self.head_in_optimizer = head_in_optimizer
        if frozen:
            self.encoder[0].bias.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.encoder(x)
        if self.cut:
            h = h.detach()  # CLAIMS: detach
        return ((self.head(h).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        if not self.head_in_optimizer:
            return torch.optim.SGD(self.encoder.parameters(), lr=0.05)  # CLAIMS: orphan optimizer
        return torch.optim.SGD(self.parameters(), lr=0.05)


class OverACopy(Net):
    def configure_optimizers(self):
        copy = nn.Linear(16, 1)
        return torch.optim.SGD([*self.parameters(), *copy.parameters()], lr=0.05)  # CLAIMS: stale optimizer


class Aux(nn.Module):
    """``enc`` → ``head``; ``aux`` reads the input too, and each forward below decides what becomes of it."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)


def plain_step(model: nn.Module, forward, **check_kwargs) -> check_step:
    """One plain-PyTorch step of ``forward(model, x) -> loss`` under ``check_step``; warnings silenced."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt, **check_kwargs) as chk:
            loss = forward(model, torch.randn(4, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return chk


def tracing() -> bool:
    return any(isinstance(m, Tracer) for m in torch.overrides._get_current_function_mode_stack())


# ---------------------------------------------------------------------------------------------------------------------
# check_step: "The step is traced (`trace=False` to skip it), so findings carry the line that cut the graph."


def test_check_step_traces_the_step_unless_trace_false():
    def detached(m, x):
        seen.append(tracing())
        h = m.enc(x).detach()  # CLAIMS: plain detach
        return m.head(h).mean() + m.aux(x).mean()

    seen: list[bool] = []
    traced = plain_step(Aux(), detached)
    untraced = plain_step(Aux(), detached, trace=False)
    assert seen == [True, False]
    enc = {"enc.weight", "enc.bias"}
    assert {(f.kind, f.param, f.where) for f in traced.findings} == {
        ("detached", p, where("CLAIMS: plain detach")) for p in enc
    }
    # untraced: detached and unused cannot be told apart, and no line is named
    assert {(f.kind, f.param, f.where) for f in untraced.findings} == {("unused", p, None) for p in enc}
    assert all("not traced" in f.message for f in untraced.findings)


# ---------------------------------------------------------------------------------------------------------------------
# The kinds: "Judged ... before clipping"; TensorBoard: "taken before clipping"


class GradsAtBatchEnd(Callback):
    """The gradients the optimizer used (after Lightning's clipping), and the ones GradGuard saw (before it)."""

    def __init__(self) -> None:
        self.before: dict[int, float] = {}
        self.after: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.before[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.after[trainer.global_step - 1] = float(torch.nn.utils.get_total_norm(grads))


def test_logged_norms_are_taken_before_clipping(tmp_path):
    rec = GradsAtBatchEnd()
    logger = TensorBoardLogger(tmp_path, name="tb")
    clip = 1e-3
    trainer = fit(tmp_path, Net(), GradGuard(log_every_n_steps=1), rec, logger=logger, gradient_clip_val=clip)
    logged = scalars(events(trainer), "gradguard/total_norm")
    assert sorted(logged) == [0, 1, 2]
    for step, value in logged.items():
        assert value > 10 * clip  # GradGuard logged the unclipped norm ...
        assert value == pytest.approx(rec.before[step], rel=1e-6)
        assert rec.after[step] == pytest.approx(clip, rel=1e-4)  # ... of a run that clipped every step


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard: "The epoch statistics leave out steps whose total norm is not finite (the overflow steps a grad scaler
# skips)."


class Big(Net):
    """A loss whose float16 gradients overflow while the loss scale is large."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 1000.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-7)  # finite steps stay finite


def test_epoch_statistics_leave_out_the_overflow_steps_a_grad_scaler_skips(tmp_path):
    rec = GradsAtBatchEnd()
    # the scale falls by 2**-10 per overflow step: a few overflow steps, then finite ones, all in one epoch
    scaler = torch.amp.GradScaler("cpu")
    logger = TensorBoardLogger(tmp_path, name="tb")
    guard = GradGuard(log_every_n_steps=100)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler)]
    trainer = fit(tmp_path, Big(), guard, rec, logger=logger, plugins=plugins, max_epochs=1, max_steps=-1, n=128)
    assert guard.findings == []  # overflow steps the scaler skips are not `nonfinite`
    finite = [v for _, v in sorted(rec.before.items()) if math.isfinite(v)]
    assert 2 <= len(finite) < len(rec.before)  # some steps overflowed, some did not
    last = max(rec.before)
    acc = events(trainer)
    assert scalars(acc, "gradguard/epoch/total_norm_max") == pytest.approx({last: max(finite)}, rel=1e-6)
    assert scalars(acc, "gradguard/epoch/total_norm_mean") == pytest.approx({last: sum(finite) / len(finite)}, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Limits: "A `frozen` finding has no `where`: the line that set `requires_grad=False` ran before training."


def test_frozen_finding_has_no_where_while_a_cut_in_the_same_step_has_one(tmp_path):
    guard = GradGuard(on_detached="warn", diagnose="always")
    with pytest.warns(GradGuardWarning, match="frozen"):
        fit(tmp_path, Net(cut=True, frozen=True), guard, max_steps=1)
    found = {(f.kind, f.param): f.where for f in guard.findings}
    assert found == {
        ("frozen", "encoder.0.bias"): None,
        ("detached", "encoder.0.weight"): where("CLAIMS: detach"),  # the same traced step names a cut
    }


# ---------------------------------------------------------------------------------------------------------------------
# Grouped for people: "Warnings about `frozen`, `orphan` and `stale` parameters point at the line of your
# `configure_optimizers` that builds the optimizer, not at `trainer.fit`." (frozen: tests/test_messages.py)


@pytest.mark.parametrize(
    ("model", "guard", "marker"),
    [
        (lambda: Net(head_in_optimizer=False), GradGuard(), "CLAIMS: orphan optimizer"),
        (OverACopy, GradGuard(on_stale="warn"), "CLAIMS: stale optimizer"),
    ],
    ids=["orphan", "stale"],
)
def test_orphan_and_stale_warnings_point_at_configure_optimizers(tmp_path, model, guard, marker):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, model(), guard, max_steps=1)
    ours = [w for w in caught if issubclass(w.category, GradGuardWarning)]
    assert ours
    assert {f.kind for f in guard.findings} >= {marker.split()[1]}
    for w in ours:
        assert f"{w.filename}:{w.lineno}".endswith(where(marker))


# ---------------------------------------------------------------------------------------------------------------------
# Limits: "With `diagnose="never"` a detach looks `unused`, so it is windowed too."


def test_untraced_detach_is_unused_and_waits_for_the_idle_window(tmp_path):
    trainer = make_trainer(tmp_path, [GradGuard(diagnose="never")], max_steps=40)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(Net(cut=True), loader(n=320))
    assert {f.kind for f in err.value.findings} == {"unused"}
    assert trainer.global_step == 15  # raised at the 16th check (idle_window=16)
    traced = make_trainer(tmp_path, [GradGuard()], max_steps=40)
    with pytest.raises(GradGuardError) as err:
        traced.fit(Net(cut=True), loader(n=320))
    assert {f.kind for f in err.value.findings} == {"detached"}
    assert traced.global_step == 0  # traced: a detach is reported at once, whatever the window


# ---------------------------------------------------------------------------------------------------------------------
# Limits: "Integer arithmetic after `.item()` ... cannot be followed: the finding stays `unused`, and its message
# names the lines where the parameter's value left torch. `nn.Parameter` of a reshaped copy is not followed either."


def test_integer_arithmetic_after_item_stays_unused_and_names_the_escape():
    def int_arith(m, x):
        k = int(m.aux(x).abs().sum().item() * 1000) + 1000  # CLAIMS: int item
        return m.head(m.enc(x)).mean() * k

    findings = plain_step(Aux(), int_arith).findings
    assert {(f.kind, f.param, f.where) for f in findings} == {("unused", p, where("CLAIMS: int item")) for p in AUX}
    assert all(f"`.item()` at {where('CLAIMS: int item')}" in f.message for f in findings)


def test_float_arithmetic_after_item_is_followed():
    """The nearest case that is followed: the same value kept a float."""

    def float_arith(m, x):
        k = m.aux(x).abs().sum().item() * 1000 + 1000  # CLAIMS: float item
        return m.head(m.enc(x)).mean() * k

    findings = plain_step(Aux(), float_arith).findings
    assert {(f.kind, f.param, f.where) for f in findings} == {("detached", p, where("CLAIMS: float item")) for p in AUX}


def test_parameter_of_a_transposed_copy_is_not_followed():
    def transposed(m, x):
        p = nn.Parameter(m.aux(x).detach().clone().T)  # a new leaf: its value depends on aux, no gradient path
        return m.head(m.enc(x)).mean() + p.sum()

    def same_shape(m, x):
        p = nn.Parameter(m.aux(x).detach().clone())  # CLAIMS: same-shape leaf
        return m.head(m.enc(x)).mean() + p.sum()

    assert {(f.kind, f.param) for f in plain_step(Aux(), transposed).findings} == {("unused", p) for p in AUX}
    followed = plain_step(Aux(), same_shape).findings
    assert {(f.kind, f.param, f.where) for f in followed} == {
        ("detached", p, where("CLAIMS: same-shape leaf")) for p in AUX
    }


# ---------------------------------------------------------------------------------------------------------------------
# Limits: "While a step is traced, and throughout a `check_step` block, ... a warning torch raises there ... is shown
# at your line because GradGuard replaces `warnings.showwarning` meanwhile (and puts it back)."


class WarnsInForward(Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.encoder(x)
        copied = torch.tensor(h)  # CLAIMS: torch warns under Lightning
        return ((self.head(h).squeeze(-1) - y) ** 2).mean() + 0 * copied.sum()


def copy_warnings(caught) -> list[str]:
    return [f"{w.filename}:{w.lineno}" for w in caught if "copy construct" in str(w.message)]


def test_torch_warnings_point_at_the_users_line_on_traced_and_untraced_lightning_steps(tmp_path):
    before = warnings.showwarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, WarnsInForward(), GradGuard(diagnose="first"))  # 3 steps, the first one traced
    shown = copy_warnings(caught)
    assert len(shown) == 3
    assert all(u.endswith(where("CLAIMS: torch warns under Lightning")) for u in shown)
    assert warnings.showwarning is before


@pytest.mark.parametrize("trace", [True, False])
def test_torch_warnings_inside_check_step_point_at_the_users_line(trace):
    """Traced or not (then its backward spy is the mode): a C++ warning of torch (``torch.tensor`` of a tensor) and
    a Python one (``mse_loss`` broadcasting) name the user's line, as outside the block; ``showwarning`` is put
    back."""

    def warns(m, x):
        h = m.enc(x)
        copied = torch.tensor(h)  # CLAIMS: torch warns in a plain loop
        nn.functional.mse_loss(h[:, :1], torch.zeros(len(h)))  # CLAIMS: torch warns from Python
        return m.head(h).mean() + m.aux(x).mean() + 0 * copied.sum()

    model = Aux()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = warnings.showwarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with check_step(model, opt, trace=trace):
            loss = warns(model, torch.randn(4, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
        warns(model, torch.randn(4, 8))  # nearest correct: outside the block, the user's line
    inside, outside = copy_warnings(caught)
    assert outside.endswith(where("CLAIMS: torch warns in a plain loop"))
    assert inside == outside
    inside, outside = [f"{w.filename}:{w.lineno}" for w in caught if "different to the input size" in str(w.message)]
    assert outside.endswith(where("CLAIMS: torch warns from Python"))
    assert inside == outside
    assert warnings.showwarning is before


# ---------------------------------------------------------------------------------------------------------------------
# Limits: "a `model.zero_grad()` inside the block clears an orphan's gradient before the block-end check
# (`optimizer.zero_grad()` does not)."


class Orphaned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.enc(x)))


@pytest.mark.parametrize(("zero_grad", "orphans"), [("optimizer", {"head.weight", "head.bias"}), ("model", set())])
def test_model_zero_grad_at_the_end_of_the_block_hides_an_orphan(zero_grad, orphans):
    model = Orphaned()
    opt = torch.optim.SGD(model.enc.parameters(), lr=0.1)  # the head is in no optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt) as chk:
            model(torch.randn(4, 8)).mean().backward()
            opt.step()
            (model if zero_grad == "model" else opt).zero_grad()
    assert {f.param for f in chk.findings if f.kind == "orphan"} == orphans
    assert {f.kind for f in chk.findings} <= {"orphan"}


# ---------------------------------------------------------------------------------------------------------------------
# Idle is not dead: "a LayerDrop-0.1 layer has a false alarm chance of about 1e-10 over a million steps
# (`1e6 * 0.9 * 0.1**16`); a part dropped half of the time, about 8 in a million steps: ... 40 brings it to 5e-7".


README = Path(__file__).resolve().parents[1] / "README.md"


def expected_false_alarms(p: float, window: int, steps: int) -> float:
    """The expected number of runs of ``window`` steps in a row without a gradient in ``steps`` steps, each without
    one with chance ``p`` independently: a Markov chain over the current run length (a run that reaches the window
    counts once and starts over), plus one state that accumulates the count, raised to the power ``steps``."""
    m = np.zeros((window + 1, window + 1))
    for run in range(window):
        m[run, 0] = 1 - p  # a gradient: the run starts over
        if run + 1 < window:
            m[run, run + 1] = p  # none again
    m[window - 1, 0] += p  # the window is reached: one false alarm, and the run starts over
    m[window - 1, window] = p
    m[window, window] = 1.0
    return float(np.linalg.matrix_power(m, steps)[0, window])


@pytest.mark.parametrize(
    ("p", "window", "text", "readme", "formula"),
    [
        (0.1, 16, "about 1e-10 over a million steps (`1e6 * 0.9 * 0.1**16`)", 1e-10, 1e6 * 0.9 * 0.1**16),
        (0.5, 16, "a part dropped half of the time, about 8 in a million steps", 8.0, 1e6 * 0.5 * 0.5**16),
        (0.5, 40, "(40 brings it to 5e-7)", 5e-7, 1e6 * 0.5 * 0.5**40),
    ],
)
def test_the_readmes_false_alarm_arithmetic(p, window, text, readme, formula):
    assert text in " ".join(README.read_text(encoding="utf-8").split())  # the README still says this
    assert window == 40 or GradGuard().idle_window == window  # the default window
    exact = expected_false_alarms(p, window, 1_000_000)
    assert exact == pytest.approx(formula, rel=1e-3)  # the README's formula, computed another way
    assert exact == pytest.approx(readme, rel=0.15)  # and rounded ("about")


# ---------------------------------------------------------------------------------------------------------------------
# The README's Python snippets run as printed, with the names they leave to the reader filled in.


def readme_snippet(first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    [block] = [b for b in blocks if first_line in b]
    return block


class Pooled(LightningModule):
    """``pooler`` is never called: the README's "Ten lines" ignore it with ``ignore=["pooler.*"]``."""

    def __init__(self, cut: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.pooler = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)
        self.cut = cut

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.encoder(x)
        if self.cut:
            h = h.detach()  # CLAIMS: ten lines cut
        return ((self.head(h).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Data(LightningDataModule):
    def train_dataloader(self):
        return loader()


@pytest.mark.parametrize("cut", [False, True])
def test_readme_ten_lines_run(tmp_path, monkeypatch, capsys, cut):
    monkeypatch.chdir(tmp_path)  # the snippet's Trainer logs to ./lightning_logs
    scope = {"model": Pooled(cut=cut), "data": Data()}
    exec(readme_snippet("trainer.fit(model, datamodule=data)"), scope)  # noqa: S102 - the README's code
    out = capsys.readouterr().out
    if cut:
        assert "got no usable gradient at step 0" in out  # `print(err)`
        assert f"`.detach()` at {where('CLAIMS: ten lines cut')}" in out
        assert {(f.kind, f.param) for f in scope["guard"].findings} == {
            ("detached", "encoder.0.weight"),
            ("detached", "encoder.0.bias"),
        }
    else:
        assert scope["guard"].findings == []  # the never-called pooler is ignored, as the snippet says
        assert out.strip().endswith("[]")


def test_readme_check_step_loop_runs():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    scope = {
        "loader": [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(3)],
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loss_fn": nn.functional.mse_loss,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy loop: not one warning
        exec(readme_snippet("with check_step(model, optimizer, step=step) as chk:"), scope)  # noqa: S102
    assert scope["chk"].findings == []
    scope["optimizer"] = torch.optim.SGD([*model.parameters(), nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(GradGuardWarning, match="stale"):  # nearest wrong loop: an optimizer over a foreign tensor
        exec(readme_snippet("with check_step(model, optimizer, step=step) as chk:"), scope)  # noqa: S102
    assert {f.kind for f in scope["chk"].findings} == {"stale"}


class HeadNeverCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 1)
        self.extra = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_readme_assert_gradients_flow_snippet_runs():
    class MyLightningModule(Pooled):
        def __init__(self) -> None:
            super().__init__()
            del self.pooler

    scope = {
        "torch": torch,
        "MyNet": lambda: nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1)),
        "MyLightningModule": MyLightningModule,
        "batch": next(iter(loader())),
    }
    exec(readme_snippet("def test_every_parameter_learns():"), scope)  # noqa: S102
    scope["test_every_parameter_learns"]()
    scope["MyNet"] = HeadNeverCalled  # nearest wrong model: the snippet's test fails, naming it
    with pytest.raises(GradientFlowError, match=r"extra\.weight"):
        scope["test_every_parameter_learns"]()


def test_readme_fabric_snippet_runs():
    fabric = Fabric(accelerator="cpu", devices=1)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    scope = {
        "fabric": fabric,
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loader": [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(3)],
        "loss_fn": nn.functional.mse_loss,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        exec(readme_snippet("with check_fabric_step(fabric, model, optimizer, step=step):"), scope)  # noqa: S102
    assert scope["model"].module is model  # the snippet set it up and trained it


def test_readme_dashboard_snippet_runs():
    scope = {"Trainer": Trainer, "GradGuard": GradGuard}
    exec(readme_snippet('GradGuard(norms="module", update_ratio=True)'), scope)  # noqa: S102
    [guard] = [c for c in scope["trainer"].callbacks if isinstance(c, GradGuard)]
    assert (guard.norms, guard.update_ratio, scope["trainer"].log_every_n_steps) == ("module", True, 50)


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard, the run report: the README's JSON example has the report's fields.


class AuxNeverCalled(Net):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(16, 2)  # in the optimizer, never called


def test_readme_report_json_example_has_the_fields_of_a_real_report(tmp_path):
    [block] = re.findall(r"```json\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    example = json.loads(block)
    guard = GradGuard(on_unused="warn", report_path=str(tmp_path / "report.json"))
    with pytest.warns(GradGuardWarning, match="aux"):
        fit(tmp_path, AuxNeverCalled(), guard, max_steps=2)
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report) == list(example)
    assert list(report["counts"]) == list(example["counts"])
    assert list(report["findings"][0]) == list(example["findings"][0])
    assert list(report["groups"][0]) == list(example["groups"][0])
    assert [(f["kind"], f["param"], f["module"], f["where"]) for f in report["findings"]] == [
        (f["kind"], f["param"], "aux", None) for f in example["findings"]
    ]
    assert report["notes"] == example["notes"]
    assert report["findings"][0]["hint"] == example["findings"][0]["hint"]


# ---------------------------------------------------------------------------------------------------------------------
# Limits: "A `no_grad` block nested inside a reentrant-checkpointed function whose inputs require grad is not seen as
# a cut (grad mode is already off there): its parameters are `detached`, but no line is named."


@pytest.mark.parametrize("reentrant", [True, False])
def test_no_grad_inside_a_reentrant_checkpoint_is_detached_without_a_line(reentrant):
    def forward(m, x):
        def block(h):
            with torch.no_grad():
                a = m.aux(h)  # CLAIMS: no_grad in a checkpoint
            return h * 2 + a

        h = m.enc(x)
        return m.head(checkpoint(block, h, use_reentrant=reentrant)).mean()

    findings = plain_step(Aux(), forward).findings
    line = None if reentrant else where("CLAIMS: no_grad in a checkpoint")  # non-reentrant: the line is named
    assert {(f.kind, f.param, f.where) for f in findings} == {("detached", p, line) for p in AUX}


# ---------------------------------------------------------------------------------------------------------------------
# Limits: "a part whose output is logged or `.item()`-ed but not in the loss, is reported on the first traced step: an
# auxiliary loss logged from the start but added to the loss only after a warmup is reported then".


class AuxAfterWarmup(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.enc(x))
        loss = ((self.head(h).squeeze(-1) - y) ** 2).mean()
        aux_loss = ((self.aux(h).squeeze(-1) - y) ** 2).mean()  # CLAIMS: aux after warmup
        self.log("aux_loss", aux_loss)
        return loss + aux_loss if self.global_step >= 5 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_an_aux_loss_logged_before_a_warmup_adds_it_is_reported_at_the_first_step(tmp_path):
    trainer = make_trainer(tmp_path, [GradGuard()], max_steps=10)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(AuxAfterWarmup(), loader())
    assert trainer.global_step == 0
    assert {(f.kind, f.param, f.where) for f in err.value.findings} == {
        ("unused", p, where("CLAIMS: aux after warmup")) for p in AUX
    }
    guard = GradGuard(ignore="aux.*")  # the README's way out
    make_trainer(tmp_path, [guard], max_steps=10).fit(AuxAfterWarmup(), loader())
    assert guard.findings == []


# ---------------------------------------------------------------------------------------------------------------------
# Limits: "Through a custom autograd Function the tracer follows the ops it sees: a `forward` that calls a compiled
# extension kernel (not a torch function) carries nothing, so a parameter reaching the loss only that way is `unused`,
# not `detached` at the `.apply` line. Of two Functions in a row that a parameter reaches the loss through, the later
# one is named, whichever `backward` left it out."


class OpaqueKernel(torch.autograd.Function):
    """`forward` computes out of the tracer's sight (as an extension kernel does); `backward` leaves out `w`."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        with torch._C.DisableTorchFunction():
            return x @ w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g @ w.t(), None


class LeavesOutW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g @ w.t(), None


class Doubles(torch.autograd.Function):
    """Correct: `2 * x`."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.head = nn.Linear(8, 1)


def test_a_function_computing_out_of_the_tracers_sight_leaves_its_parameter_unused():
    findings = plain_step(Square(), lambda m, x: m.head(OpaqueKernel.apply(m.enc(x), m.w)).mean()).findings
    assert {(f.kind, f.param) for f in findings} == {("unused", "w")}


def test_of_two_functions_in_a_row_the_later_one_is_named():
    def forward(m, x):
        h = LeavesOutW.apply(m.enc(x), m.w)  # CLAIMS: leaves out w
        return m.head(Doubles.apply(h)).mean()  # CLAIMS: the later Function

    [f] = plain_step(Square(), forward).findings
    assert (f.kind, f.param, f.where) == ("detached", "w", where("CLAIMS: the later Function"))
    assert "`Doubles.apply`" in f.message


# ---------------------------------------------------------------------------------------------------------------------
# Lightning Fabric: "Fabric calls only `on_after_setup` and `on_after_optimizer_step` on its callbacks".


class EveryHook:
    """A Fabric callback that answers to every hook name and records which ones Fabric called."""

    def __init__(self) -> None:
        self.called: list[str] = []

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.called.append(name)


def test_fabric_calls_only_two_hooks_on_its_callbacks():
    hooks = EveryHook()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[hooks])
    model = nn.Linear(4, 1)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(2):
        optimizer.zero_grad()
        fabric.backward(model(torch.randn(2, 4)).sum())
        optimizer.step()
    assert hooks.called == ["on_after_setup", "on_after_optimizer_step", "on_after_optimizer_step"]


# ---------------------------------------------------------------------------------------------------------------------
# Preflight: "`--cli` names your `LightningCLI` subclass, as `module:Class` or `path/to/train.py:Class`; without it the
# YAML's `model` and `data` need a `class_path`, or name the classes with `--model`/`--data`"; "`gradguard report`
# ... (`--markdown` for a table)". (The path form, exit codes and `--report`: tests/test_preflight.py.)


def check_in_process(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """`gradguard ...` run in this process (`cli.main`, the console script's entry): its exit status and output."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))  # `examples.train:...` as `python -m` finds it from the repository
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = cli_main(list(args))
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_preflight_cli_as_module_and_class_and_the_report_as_markdown(tmp_path, capsys, monkeypatch):
    report = tmp_path / "report.json"
    root = f"--trainer.default_root_dir={tmp_path}"
    args = ("--config", "configs/demo.yaml", "--steps", "1", "--report", str(report), root)
    status, out = check_in_process(capsys, monkeypatch, "check", *args, "--cli", "examples.train:DemoCLI")
    assert status == 1, out  # the demo's planted `.detach()`
    assert "encoder.0.weight: detached" in out
    status, out = check_in_process(capsys, monkeypatch, "report", "--markdown", str(report))
    assert status == 0, out
    assert "- **detached**: module `encoder` (2 tensors, 544 parameters) at `examples/train.py:" in out


#: LightningModules for `gradguard check --model <this file>:<class>` (DemoData's batches: 16 features, 4 classes).
PREFLIGHT_MODELS = """
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn


class Net(LightningModule):
    \"\"\"Four residual layers in a ModuleList; `skip` names the layer left out on every step (LayerDrop's draw).\"\"\"

    def __init__(self, skip: int = -1, extra: str = "none") -> None:
        super().__init__()
        self.skip = skip
        self.extra = extra
        self.inp = nn.Linear(16, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 4)
        self.aux = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.inp(x)
        for k, layer in enumerate(self.layers):
            if k != self.skip:
                h = h + torch.tanh(layer(h))
        loss = F.cross_entropy(self.head(h), y)
        if self.extra == "dropped":
            _ = self.aux(h)  # computed, never used
        elif self.extra == "logged":
            self.log("aux", F.cross_entropy(self.aux(h), y))
        elif self.extra == "none":
            loss = loss + 0.1 * F.cross_entropy(self.aux(h), y)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Experts(Net):
    \"\"\"Top-1 routing over the ModuleList `layers` as experts; expert `skip` gets no token (not called).\"\"\"

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.inp(x)
        choice = torch.arange(len(x)) % 4
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.layers):
            rows = ((choice == e) & (choice != self.skip)).nonzero().squeeze(-1)
            if rows.numel():
                out = out.index_add(0, rows, expert(h[rows]))
        return F.cross_entropy(self.head(out) + self.aux(h), y)
"""


@pytest.mark.parametrize(("model", "args", "status", "says"), [
    ("Net", ["--model.extra=never_called"], 1, "in `aux`: not items of a ModuleList"),  # no part takes turns with it
    ("Net", ["--model.extra=dropped"], 1, "in `aux`: not items of a ModuleList"),  # ran, output simply dropped
    ("Net", ["--model.extra=logged"], 1, "aux.weight: unused"),  # logged only: the first traced step raises
    ("Net", ["--model.skip=2"], 0, "Run with --steps 16 to have them judged."),  # layers.2 idle: LayerDrop
    ("Experts", ["--model.skip=3"], 0, "Run with --steps 16 to have them judged."),  # expert 3 idle: routing
    ("Net", [], 0, "gradguard check: passed (3 optimizer step(s))\n"),  # nothing more to say
])  # fmt: skip
def test_preflight_with_its_default_steps_fails_on_a_dead_part_and_passes_parts_that_take_turns(
    tmp_path, capsys, monkeypatch, model, args, status, says
):
    """README: with its default 3 steps, `gradguard check` exits 1 on a module never called or whose output never
    reaches the loss; a part that got nothing on any step but is one of several alike items of a `ModuleList` or
    `ModuleDict`, some of which got gradients (experts, LayerDrop layers), is only a warning."""
    models = tmp_path / "models.py"
    models.write_text(PREFLIGHT_MODELS)
    config = tmp_path / "plain.yaml"
    config.write_text("data:\n  num_samples: 64\n")  # no class_path anywhere: --model and --data name the classes
    classes = ("--model", f"{models}:{model}", "--data", "examples.train:DemoData")
    root = f"--trainer.default_root_dir={tmp_path}"
    status_, out = check_in_process(capsys, monkeypatch, "check", "--config", str(config), root, *classes, *args)
    assert status_ == status, out
    assert says in out
    if status:
        assert "gradguard check: FAILED" in out
    else:
        assert "gradguard check: passed (3 optimizer step(s))" in out


def test_preflight_a_dead_part_passes_when_its_kind_is_not_raised(tmp_path, capsys, monkeypatch):
    """The config's own actions decide: with `on_unused: warn` the never-called `aux` is a warning, exit 0."""
    config = tmp_path / "plain.yaml"
    config.write_text(
        "model:\n  bug: unused\ndata:\n  num_samples: 64\n"
        "trainer:\n  callbacks:\n    - class_path: GradGuard\n      init_args:\n        on_unused: warn\n"
    )
    root = f"--trainer.default_root_dir={tmp_path}"
    classes = ("--model", "examples.train:DemoModel", "--data", "examples.train:DemoData")
    status, out = check_in_process(capsys, monkeypatch, "check", "--config", str(config), root, *classes)
    assert status == 0, out
    assert "but 2 parameter tensor(s) got no usable gradient on any step" in out
    status, out = check_in_process(
        capsys, monkeypatch, "check", "--config", str(config), "--steps", "16", root, *classes
    )
    assert status == 0, out  # reported at the window now, as a warning all the same


def test_python_m_is_the_command_and_a_config_without_class_paths_needs_model_and_data(tmp_path):
    """`python -m lightning_gradguard` is the same command (one subprocess: the rest run `cli.main` in-process);
    a YAML without `class_path` and no `--cli`/`--model`/`--data` says nothing about what to build: bad usage."""
    config = tmp_path / "plain.yaml"
    config.write_text("model:\n  bug: unused\ndata:\n  num_samples: 64\n")
    proc = run_python("-m", "lightning_gradguard", "check", "--config", str(config), "--steps", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard tags: "`gradguard/grad_values/<name>` | histogram | the gradient values per parameter or module, or `all`
# with `norms="total"`".


def test_value_histogram_with_norms_total_is_one_histogram_of_every_gradient_value(tmp_path):
    guard = GradGuard(norms="total", value_histograms=True, log_every_n_steps=1)
    trainer = fit(tmp_path, Net(), guard, tensorboard=True, max_steps=2)
    acc = events(trainer)
    assert set(acc.Tags()["histograms"]) == {"gradguard/grad_norms", "gradguard/grad_values/all"}
    n_values = sum(p.numel() for p in Net().parameters())
    assert [(e.step, e.histogram_value.num) for e in acc.Histograms("gradguard/grad_values/all")] == [
        (0, n_values),
        (1, n_values),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# How it works: "a `raise` comes before the bad update".


class NanAtStep1(Net):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 1 else loss


class WeightsAtBatchStart(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("action", ["raise", "warn"])
def test_a_raise_comes_before_the_bad_update(tmp_path, action):
    model, before = NanAtStep1(), WeightsAtBatchStart()
    trainer = make_trainer(tmp_path, [GradGuard(on_nonfinite=action), before])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if action == "raise":
            with pytest.raises(GradGuardError, match="nonfinite"):
                trainer.fit(model, loader())
        else:  # nearest correct: a warning lets the step update the weights with NaN
            trainer.fit(model, loader())
    assert trainer.global_step == (1 if action == "raise" else 3)
    stepped = {n: torch.equal(p, before.weights[n]) for n, p in model.named_parameters()}
    if action == "raise":
        assert all(stepped.values())  # the weights of step 1's start: the NaN step never updated them
        assert all(torch.isfinite(p).all() for p in model.parameters())
    else:
        assert not any(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# "What `make demo` prints" and the article table's "what GradGuard says": the README quotes real output.


def test_readme_quotes_the_demos_error_as_it_is_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the error names `examples/train.py:74` relative to the working directory
    spec = importlib.util.spec_from_file_location("gradguard_claims_train", ROOT / "examples" / "train.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    trainer = make_trainer(tmp_path, [GradGuard()], max_steps=1)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(demo.DemoModel(bug="detach"), demo.DemoData())
    text = README.read_text(encoding="utf-8")
    quoted = text.split("What `make demo` prints", 1)[1].split("```\n", 2)[1]
    assert quoted == f"GradGuardError: {err.value}\n"


def test_readme_article_table_quotes_the_example_scripts_output(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "examples" / "why_no_gradients.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = [line for line in README.read_text(encoding="utf-8").splitlines() if re.match(r"\| [123] \| ", line)]
    assert len(rows) == 3
    for row in rows:
        said = row.rsplit(" | ", 1)[1].removesuffix(" |")
        quotes = re.findall(r"``(.+?)``", said)  # the double-backtick spans are quoted verbatim (up to a `...`)
        assert quotes, row
        for quote in quotes:
            for piece in quote.split(" ... "):
                assert piece.strip() in out, piece


# ---------------------------------------------------------------------------------------------------------------------
# Long runs: "`configs/monitoring.yaml` ...: every kind of finding warns ... instead of raising, the dashboards and
# update ratios are logged every 50 steps, value histograms stay off." (It trains cleanly: tests/test_preflight.py.)


def test_monitoring_config_warns_on_every_kind_and_logs_every_50_steps():
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "monitoring.yaml").read_text(encoding="utf-8"))
    [callback] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("GradGuard")]
    guard = GradGuard(**callback["init_args"])  # valid options
    assert {k: v for k, v in callback["init_args"].items() if k.startswith("on_")} == {
        f"on_{kind}": "warn" for kind in ("frozen", "unused", "detached", "orphan", "stale", "nonfinite", "zero")
    }
    assert (guard.log_every_n_steps, guard.update_ratio, guard.value_histograms) == (50, True, False)


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard: "the per-parameter norms of the one fused pass ..., and a logged step costs no extra pass or sync for
# them"; `histograms`: the norm histogram reads its bucket counts once more per logged step.


class CountingGuard(GradGuard):
    """GradGuard, counting inside its optimizer-step hook the transfers to the host: the fused pass's (every one goes
    through `measure.to_host`) and the dashboard's histogram fetches (`tensorboard.fetch_histograms`). The guard's own
    ops run with `__torch_function__` handling off, so a counting mode would see none of them."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        import lightning_gradguard.measure as measure
        import lightning_gradguard.tensorboard as tensorboard

        count = [0]
        real_host, real_fetch = measure.to_host, tensorboard.fetch_histograms

        def to_host(t):
            count[0] += 1
            return real_host(t)

        def fetch(parts):
            count[0] += len({c.device for _, c in parts}) if parts else 0  # one transfer per device
            return real_fetch(parts)

        measure.to_host, tensorboard.fetch_histograms = to_host, fetch
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            measure.to_host, tensorboard.fetch_histograms = real_host, real_fetch
        self.reads = {**getattr(self, "reads", {}), trainer.global_step: count[0]}


@pytest.mark.parametrize(("histograms", "extra"), [(False, 0), (True, 1)])
def test_a_logged_step_reads_the_norms_no_extra_time(tmp_path, histograms, extra):
    guard = CountingGuard(log_every_n_steps=2, norms="param", diagnose="never", histograms=histograms)
    trainer = fit(tmp_path, Net(), guard, tensorboard=True, max_steps=4)
    assert sorted(scalars(events(trainer), "gradguard/total_norm")) == [1, 3]  # steps 1 and 3 are logged
    unlogged, logged = guard.reads[0], guard.reads[1]
    assert unlogged == 1  # the one transfer of the fused pass
    assert guard.reads == {0: unlogged, 1: logged, 2: unlogged, 3: logged}
    assert logged == unlogged + extra


def test_speech_models_ship_layerdrop_0_1():
    """Idle is not dead: "LayerDrop (wav2vec2, HuBERT and WavLM ship `layerdrop=0.1`)"."""
    transformers = pytest.importorskip("transformers")
    configs = (transformers.Wav2Vec2Config, transformers.HubertConfig, transformers.WavLMConfig)
    assert [c().layerdrop for c in configs] == [0.1, 0.1, 0.1]


def test_report_last_step_is_the_last_step_a_finding_was_seen(tmp_path):
    """The README's JSON example: `"first_step": 0, "last_step": 1999, "count": 2000` for a run of 2000 steps."""
    guard = GradGuard(on_unused="warn", report_path=str(tmp_path / "report.json"))
    with pytest.warns(GradGuardWarning, match="aux"):
        fit(tmp_path, AuxNeverCalled(), guard, max_steps=20, n=160)
    row = json.loads((tmp_path / "report.json").read_text())["findings"][0]
    assert (row["first_step"], row["count"]) == (0, 20)
    assert row["last_step"] == 19


# ---------------------------------------------------------------------------------------------------------------------
# "Verified on real models and on a generated bug corpus": the README's numbers are those of the generated reports
# (`make corpus` → docs/corpus.md, `make sweep` → docs/sweep.md) and of the subsets `make test` runs.


def flat(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8").split())


def test_readme_corpus_and_sweep_numbers_are_the_generated_reports():
    readme, corpus, sweep = flat(README), flat(ROOT / "docs" / "corpus.md"), flat(ROOT / "docs" / "sweep.md")
    n, buggy, healthy = re.search(r"`make corpus` \((\d+) models, \d+ s\): (\d+) with one planted bug, (\d+) healthy",
                                  corpus).groups()  # fmt: skip
    assert f"make corpus # the generated bug corpus: {n} models" in readme
    assert f"`make corpus` builds {n} small models" in readme
    assert f"{buggy} with one planted bug" in readme
    assert f"and {healthy} healthy ones" in readme
    right = re.search(r"right kinds and parameters: (\d+/\d+)", corpus).group(1)
    cuts = re.search(r"right `where` \(detached parameters\): (\d+/\d+)", corpus).group(1)
    assert f"Result: {right} right kinds and parameters, {cuts} cut lines right" in readme
    calls = re.search(r"module whose output is discarded \(the line that called it\): (\d+/\d+)", corpus).group(1)
    assert f"named at the line that called it ({calls} parameters)" in readme
    assert f"healthy models with a finding: 0/{healthy}" in corpus  # "no finding on any healthy model"
    assert "crashes: 0" in corpus  # "no crash"
    configs, archs = re.search(r"(\d+) configurations of (\d+) architectures: \1 fully right", sweep).groups()
    peft = len(re.findall(r"\| [\w-]+\+(?:lora|dora|ia3|prompt|prefix)[\w+/-]* \|", sweep))  # a table row each
    assert (
        f"make sweep # the real-model sweep: {configs} configurations of {archs} transformers architectures" in readme
    )
    assert f"trains {archs} Hugging Face `transformers` architectures" in readme
    assert f"plus planted bugs and {peft} PEFT configurations" in readme
    assert f"Llama, BERT and RoBERTa): {configs} configurations" in readme


def test_readme_counts_the_subsets_make_test_runs():
    readme = flat(README)
    tree = ast.parse((ROOT / "tests" / "realmodels" / "test_sweep.py").read_text(encoding="utf-8"))
    [sweep] = [n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SUBSET"]
    assert f"`make test` runs {len(sweep.elts)} of the configurations" in readme
    corpus = sys.modules.get("test_corpus")  # collected in this session already: its SUBSET is computed
    if corpus is None:
        spec = importlib.util.spec_from_file_location(
            "claims_test_corpus", ROOT / "tests" / "corpus" / "test_corpus.py"
        )
        corpus = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(ROOT / "tests" / "corpus"))
        try:
            spec.loader.exec_module(corpus)
        finally:
            sys.path.remove(str(ROOT / "tests" / "corpus"))
    assert f"`make test` runs {len(corpus.SUBSET)} of the models" in readme
