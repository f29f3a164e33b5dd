"""What the tracer costs: a paused tracer is off torch's mode stack (backward, optimizer step and the guard's own
work run without it), and the traced-step benchmark runs (no timing is asserted here)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from conftest import ROOT, loader, make_trainer, run_python, where
from lightning_gradguard import GradGuard, GradGuardError, check_step
from lightning_gradguard.params import ParamIndex
from lightning_gradguard.policy import GradGuardWarning
from lightning_gradguard.trace import Tracer


class _Other(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _no_mode_left():
    """A failing test leaves no mode behind for the next one."""
    yield
    while _get_current_function_mode_stack():
        torch.overrides._pop_mode()


def _tracers() -> list[Tracer]:
    return [m for m in _get_current_function_mode_stack() if isinstance(m, Tracer)]


def test_tracer_paused_after_start_leaves_the_mode_stack_and_resumes():
    lin = nn.Linear(4, 2)
    tracer = Tracer(ParamIndex.of(lin)).start()
    assert _get_current_function_mode_stack() == [tracer]
    seen = lin(torch.randn(3, 4))
    tracer.paused = True
    assert _get_current_function_mode_stack() == []
    unseen = lin(torch.randn(3, 4))
    tracer.paused = False
    assert _get_current_function_mode_stack() == [tracer]
    again = lin(torch.randn(3, 4))
    assert tracer.facts(seen).dep == tracer.facts(again).dep == 0b11
    assert tracer.facts(unseen).dep == 0
    tracer.stop()
    assert _get_current_function_mode_stack() == []
    tracer.paused = True
    tracer.paused = False  # not started: nothing is pushed
    assert _get_current_function_mode_stack() == []


def test_tracer_paused_under_a_later_mode_stays_in_place_and_passes_calls_through():
    lin = nn.Linear(4, 2)
    tracer = Tracer(ParamIndex.of(lin)).start()
    other = _Other()
    with other:
        tracer.paused = True  # another mode is on top: the stack order is kept
        assert _get_current_function_mode_stack() == [tracer, other]
        unseen = lin(torch.randn(3, 4))
        tracer.paused = False
        assert _get_current_function_mode_stack() == [tracer, other]
    assert tracer.facts(unseen).dep == 0
    tracer.stop()
    assert _get_current_function_mode_stack() == []


def test_tracer_stopped_while_paused_leaves_no_mode():
    lin = nn.Linear(4, 2)
    tracer = Tracer(ParamIndex.of(lin)).start()
    tracer.paused = True
    tracer.stop()
    assert _get_current_function_mode_stack() == []
    tracer.paused = False
    tracer.start()  # starts again where it left off
    assert _get_current_function_mode_stack() == [tracer]
    tracer.stop()


class _Lit(LightningModule):
    def __init__(self, cut: bool) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)
        self.cut = cut

    def training_step(self, batch, batch_idx):
        h = self.enc(batch[0])
        if self.cut:
            h = h.detach()
        return nn.functional.mse_loss(self.head(h).squeeze(-1), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _Stacks(Callback):
    """The tracers on torch's mode stack in each hook of the step."""

    def __init__(self) -> None:
        self.by_hook: dict[str, list[int]] = {}

    def _note(self, hook: str) -> None:
        self.by_hook.setdefault(hook, []).append(len(_tracers()))

    def on_train_batch_start(self, *args) -> None:
        self._note("batch_start")

    def on_after_backward(self, *args) -> None:
        self._note("after_backward")

    def on_before_optimizer_step(self, *args) -> None:
        self._note("before_optimizer_step")

    def on_train_batch_end(self, *args) -> None:
        self._note("batch_end")


def test_gradguard_traced_step_runs_backward_and_optimizer_step_without_the_tracer(tmp_path):
    stacks = _Stacks()
    guard = GradGuard(diagnose="always", on_frozen="raise", on_zero="raise")
    make_trainer(tmp_path, [guard, stacks], max_steps=3).fit(_Lit(cut=False), loader())
    assert guard.findings == []
    assert stacks.by_hook["batch_start"] == [1, 1, 1]  # the forward pass is traced on every step
    assert stacks.by_hook["after_backward"] == [0, 0, 0]
    assert stacks.by_hook["before_optimizer_step"] == [0, 0, 0]
    assert stacks.by_hook["batch_end"] == [0, 0, 0]
    assert _get_current_function_mode_stack() == []


def test_gradguard_traced_step_still_names_the_cut_after_pausing(tmp_path):
    guard = GradGuard(diagnose="always")
    with pytest.raises(GradGuardError, match=r"\.detach\(\)` at .*test_trace_cost\.py:\d+"):
        make_trainer(tmp_path, [guard], max_steps=2).fit(_Lit(cut=True), loader())
    assert _get_current_function_mode_stack() == []


def test_check_step_a_forward_after_the_optimizer_step_is_traced_again():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    with pytest.warns(GradGuardWarning, match="detach"), check_step(model, opt) as chk:
        model(x).mean().backward()
        opt.step()
        opt.zero_grad()
        assert len(_tracers()) == 1  # after the step, in the same block: traced again
        h = model[0](x).detach()
        model[1](h).mean().backward()
        opt.step()
    assert _get_current_function_mode_stack() == []
    assert {f.param for f in chk.findings} == {"0.weight", "0.bias"}
    assert all(f.kind == "detached" and "test_trace_cost.py" in (f.where or "") for f in chk.findings)


class _SGDNotingModes(torch.optim.SGD):
    """SGD that notes how many tracers are on torch's mode stack while it steps."""

    seen: list[int]

    def step(self, closure=None):
        self.seen.append(len(_tracers()))
        return super().step(closure)


def test_check_step_runs_the_optimizer_step_without_the_tracer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    opt = _SGDNotingModes(model.parameters(), lr=0.1)
    opt.seen = []
    x = torch.randn(4, 8)
    with check_step(model, opt, strict=True) as chk:
        for _ in range(2):
            model(x).mean().backward()
            assert len(_tracers()) == 1
            opt.step()
            opt.zero_grad()
            assert len(_tracers()) == 1  # resumed after the step: a second forward in the block is traced
    assert opt.seen == [0, 0]
    assert chk.findings == []
    assert _get_current_function_mode_stack() == []


def test_traced_benchmark_quick_mode_prints_the_table_and_writes_nothing(tmp_path):
    pytest.importorskip("transformers")  # the benchmark's models (not installed by `make compat`)
    results = ROOT / "benchmarks" / "traced.md"
    before = results.read_bytes() if results.exists() else None
    proc = run_python(str(ROOT / "benchmarks" / "traced.py"), "--quick", cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("| gpt2 |", "| bert-cls |", "| vit |", "| **median** (3 architectures) |", "| **max** |"):
        assert row in proc.stdout
    assert "Traced step / untraced step: median" in proc.stdout
    assert "| architecture (`aot_eager`) | compiled ms | traced ms |" in proc.stdout  # the compiled part: gpt2
    assert "| gpt2 | " in proc.stdout.split("(`aot_eager`)")[1]
    assert "frames compiled after the first two steps: 0." in proc.stdout
    assert (results.read_bytes() if results.exists() else None) == before


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.round()  # CUT: helper


def test_a_cut_repeated_at_one_user_line_is_one_site_counting_every_call():
    lin = nn.Linear(4, 4)
    tracer = Tracer(ParamIndex.of(lin)).start()
    try:
        x = torch.randn(2, 4)
        for _ in range(3):
            lin(x).argmax(-1)  # CUT: loop
        lin(x).argmax(-1)  # CUT: once
        for _ in range(2):
            lin(x).detach()  # CUT: detach
            _rounded(lin(x))
            _rounded(lin(x))
    finally:
        tracer.stop()
    sites = sorted((s.kind, s.op, s.where, s.calls, s.mask) for s in tracer.sites)
    assert sites == sorted(
        [
            ("nondiff", "argmax", where("CUT: loop"), 3, 0b11),
            ("nondiff", "argmax", where("CUT: once"), 1, 0b11),
            ("detach", "detach", where("CUT: detach"), 2, 0b11),
            ("zero_derivative", "round", where("CUT: helper"), 4, 0b11),
        ]
    )
