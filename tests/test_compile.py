"""``torch.compile``: a compiled model gets the same verdicts as the same model eager.

A traced step runs the compiled code eagerly (``torch.compiler.set_stance("force_eager")`` while the tracer records),
so the tracer sees every op and the cut line is named as in eager mode; the other steps run the compiled code, with
no recompilation. Both ways to compile under Lightning: ``torch.compile(submodule)`` inside the LightningModule and
``trainer.fit(torch.compile(module))``; ``aot_eager`` throughout, ``inductor`` (a C++ build per graph) once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import loader, make_trainer, run_python, where
from lightning_gradguard import GradGuard, GradGuardError, GradGuardWarning, check_step
from lightning_gradguard.testing import assert_gradients_flow
from lightning_gradguard.trace import EagerStance

BACKEND = "aot_eager"  # the graphs inductor gets, run by torch's eager kernels: the fast backend for tests


class Encoder(nn.Module):
    def __init__(self, cut: str) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).relu()
        if self.cut == "inside":
            h = h.detach()  # CUT: inside
        elif self.cut == "round":
            h = torch.round(h)  # CUT: round
        return h


class Net(LightningModule):
    """``enc`` → ``head``, plus ``aux`` on the input. ``cut``: ``"detach"`` (in ``training_step``), ``"inside"``
    (a ``.detach()`` in the encoder's forward), ``"round"`` (a zero-derivative op there), ``"unused"`` (``aux`` is
    never called) or ``"none"``. ``compile="sub"`` compiles the encoder; ``trainer.fit(compiled(net, "whole"))`` the
    whole module."""

    def __init__(self, cut: str = "none", compile: str | None = None, backend: object = BACKEND) -> None:
        super().__init__()
        self.enc = Encoder(cut)
        self.head = nn.Linear(16, 1)
        self.aux = nn.Linear(8, 1)
        self.cut = cut
        if compile == "sub":
            self.enc = torch.compile(self.enc, backend=backend)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.enc(x)
        if self.cut == "detach":
            h = h.detach()  # CUT: detach
        out = self.head(h).squeeze(-1)
        if self.cut != "unused":
            out = out + self.aux(x).squeeze(-1)
        return ((out - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def compiled(net: Net, compile: str | None, backend: object = BACKEND) -> nn.Module:
    """What ``trainer.fit`` gets: the module itself, or ``torch.compile(module)`` for ``compile="whole"``."""
    return torch.compile(net, backend=backend) if compile == "whole" else net


def fit(tmp_path, cut: str, compile: str | None, backend: object = BACKEND, steps: int = 16, **guard_kwargs):
    """Train ``Net(cut)`` for up to ``steps`` steps: ``({(kind, param, where, step)}, last step, the guard)``."""
    torch.manual_seed(0)
    guard = GradGuard(**guard_kwargs)
    trainer = make_trainer(tmp_path, [guard], max_steps=steps)
    with warnings.catch_warnings(), contextlib.suppress(GradGuardError):
        warnings.simplefilter("ignore", GradGuardWarning)  # `zero` warns by default
        trainer.fit(compiled(Net(cut, compile, backend), compile, backend), loader(n=8 * steps))
    assert runs_compiled(), "the compiler's stance was left changed"
    return {(f.kind, f.param, f.where, f.step) for f in guard.findings}, trainer.global_step, guard


@torch.compile(backend=BACKEND)
def _probe(x: torch.Tensor) -> torch.Tensor:
    return x + 1 if torch.compiler.is_compiling() else x  # `is_compiling()` is True only in the compiled graph


def runs_compiled() -> bool:
    """Compiled code runs compiled now (no stance such as ``force_eager`` is left set)."""
    return bool(_probe(torch.zeros(1)).item() == 1)


ENC = ["enc.lin.weight", "enc.lin.bias"]  # under `torch.compile(submodule)` named `enc._orig_mod.lin.weight` by torch
AUX = ["aux.weight", "aux.bias"]

#: The eager verdicts: (findings, the step training stopped at). A detach is raised at step 0 with its line; a
#: never-called module at its 16th step without a gradient (idle_window), dated to step 0; a zero-derivative op is a
#: `zero` warning at step 0 with its line.
EAGER = {
    "detach": ({("detached", p, where("CUT: detach"), 0) for p in ENC}, 0),
    "inside": ({("detached", p, where("CUT: inside"), 0) for p in ENC}, 0),
    "round": ({("zero", p, where("CUT: round"), 0) for p in ENC}, 16),
    "unused": ({("unused", p, None, 0) for p in AUX}, 15),
    "none": (set(), 16),
}


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", sorted(EAGER))
def test_eager_reference(tmp_path, cut):
    found, stopped, _ = fit(tmp_path, cut, None)
    assert (found, stopped) == EAGER[cut]


@pytest.mark.parametrize("compile", ["sub", "whole"])
@pytest.mark.parametrize("cut", sorted(EAGER))
def test_compiled_model_gets_the_eager_verdicts(tmp_path, cut, compile):
    """The same kinds, parameters (``_orig_mod.`` stripped), lines and steps as eager; a clean model stays silent."""
    found, stopped, _ = fit(tmp_path, cut, compile)
    assert (found, stopped) == EAGER[cut]


def test_unused_module_beside_a_compiled_one_says_it_never_ran(tmp_path):
    _, _, guard = fit(tmp_path, "unused", "sub")
    assert {f.param for f in guard.findings} == set(AUX)
    for f in guard.findings:
        assert "never took part in the forward pass" in f.message
        assert "diagnose" not in f.message
        assert "torch.compile" not in f.message


def test_aot_eager_training_is_bit_identical_with_the_guard(tmp_path):
    """The traced step runs the graph's ops eagerly: with ``aot_eager`` (the same kernels, the same random draws) the
    parameters and the RNG state come out bit-identical, dropout included."""

    class WithDropout(Net):
        def __init__(self) -> None:
            super().__init__("none", None)
            self.enc = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.LayerNorm(16))

    def train(guard: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        net = WithDropout()
        callbacks = [GradGuard(diagnose="always")] if guard else []
        make_trainer(tmp_path, callbacks, max_steps=4).fit(torch.compile(net, backend=BACKEND), loader())
        return [p.detach().clone() for p in net.parameters()], torch.get_rng_state()

    (off, rng_off), (on, rng_on) = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(off, on, strict=True))
    assert torch.equal(rng_off, rng_on)


# ---------------------------------------------------------------------------------------------------------------------
class FramesPerStep(Callback):
    """The frames the counting backend compiled, after each batch."""

    def __init__(self, counter: CompileCounterWithBackend) -> None:
        self.counter = counter
        self.frames: list[int] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.frames.append(self.counter.frame_count)


class SkipsAuxOnce(Net):
    """A clean model whose plain (uncompiled) code leaves ``aux`` out on step 5 only: that step is untraced and
    lacks a gradient, so GradGuard traces step 6, between compiled steps."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.head(self.enc(x)).squeeze(-1)
        if batch_idx != 5:
            out = out + self.aux(x).squeeze(-1)
        return ((out - y) ** 2).mean()


@pytest.mark.parametrize("compile", ["sub", "whole"])
def test_untraced_steps_run_the_compiled_code_without_recompiling(tmp_path, compile):
    counter = CompileCounterWithBackend(BACKEND)
    frames = FramesPerStep(counter)
    guard = GradGuard()
    net = Net("none", compile, counter) if compile == "whole" else SkipsAuxOnce("none", compile, counter)
    make_trainer(tmp_path, [guard, frames], max_steps=10).fit(compiled(net, compile, counter), loader(n=80))
    # Step 0 is traced (run eagerly: nothing compiled yet); step 1 compiles the one graph; no step recompiles, not
    # even the one after the traced step 6 (sub).
    assert frames.frames == [0] + [1] * 9
    assert guard._core.schedule.traced_steps == (1 if compile == "whole" else 2)
    assert guard.findings == []  # `aux` idle on one step is not a finding


def test_every_step_traced_never_compiles(tmp_path):
    counter = CompileCounterWithBackend(BACKEND)
    frames = FramesPerStep(counter)
    net = Net("none", "sub", counter)
    make_trainer(tmp_path, [GradGuard(diagnose="always"), frames], max_steps=4).fit(net, loader())
    assert frames.frames == [0, 0, 0, 0]
    assert runs_compiled()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo in SGD
def test_manual_optimization_in_a_compiled_training_step(tmp_path):
    """With ``trainer.fit(torch.compile(module))`` and manual optimization, ``manual_backward`` and ``opt.step()``
    run GradGuard's hooks from inside the compiled ``training_step``: dynamo runs them as they are (not traced
    into a graph), the traced step still names the line, and the untraced steps compile what they compile without
    GradGuard."""

    class Manual(Net):
        def __init__(self, cut: str, backend: object) -> None:
            super().__init__(cut, None, backend)
            self.automatic_optimization = False

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()

    frames: dict[str, list[int]] = {}
    for label, guards in (("without", []), ("with", [GradGuard()])):
        counter = CompileCounterWithBackend(BACKEND)
        seen = FramesPerStep(counter)
        trainer = make_trainer(tmp_path, [*guards, seen], max_steps=4)
        trainer.fit(torch.compile(Manual("none", counter), backend=counter), loader())
        frames[label] = seen.frames
    assert frames["with"][0] == 0  # the traced step 0 ran eagerly
    assert frames["with"][1:] == frames["without"][1:]  # then the frames compiled without GradGuard, no more

    guard = GradGuard()
    with pytest.raises(GradGuardError):
        make_trainer(tmp_path, [guard], max_steps=4).fit(torch.compile(Manual("detach", BACKEND), backend=BACKEND),
                                                         loader())  # fmt: skip
    assert {(f.kind, f.param, f.where, f.step) for f in guard.findings} == EAGER["detach"][0]
    assert runs_compiled()


class SeesTheStance(Callback):
    """Whether compiled code runs compiled at each hook after the forward pass of a traced step."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def on_after_backward(self, *args: object) -> None:
        self.seen.append(("backward", runs_compiled()))

    def on_before_optimizer_step(self, *args: object) -> None:
        self.seen.append(("step", runs_compiled()))


class NotingSGD(torch.optim.SGD):
    """Notes whether compiled code runs compiled inside each ``step()``."""

    seen: list[bool]

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        self.seen.append(runs_compiled())
        return super().step(closure)


def test_only_the_forward_pass_runs_eagerly(tmp_path):
    """The stance is held while the tracer records: the backward pass and the optimizer step (a compiled optimizer,
    say) of a traced step run as they would without GradGuard, under Lightning and inside ``check_step``."""
    seer = SeesTheStance()
    make_trainer(tmp_path, [GradGuard(diagnose="always"), seer], max_steps=2).fit(Net("none", "sub"), loader())
    assert seer.seen == [("backward", True), ("step", True)] * 2

    model = nn.ModuleDict({"enc": torch.compile(Encoder("none"), backend=BACKEND), "head": nn.Linear(16, 1)})
    opt = NotingSGD(model.parameters(), lr=0.1)
    opt.seen = []
    with check_step(model, opt, strict=True):
        for _ in range(2):  # the second forward pass is traced again: the stance comes back after the step
            model["head"](model["enc"](torch.randn(4, 8))).mean().backward()
            opt.step()
            opt.zero_grad()
    assert opt.seen == [True, True]
    assert runs_compiled()


def test_check_step_runs_each_forward_pass_of_the_block_eagerly():
    """After an optimizer step inside the block, the next forward pass is traced, compiled code included."""
    enc = Encoder("none")
    model = nn.ModuleDict({"enc": torch.compile(enc, backend=BACKEND), "head": nn.Linear(16, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradGuardError) as err, check_step(model, opt, strict=True):
        for cut in ("none", "inside"):
            enc.cut = cut
            model["head"](model["enc"](torch.randn(4, 8))).mean().backward()
            opt.step()
            opt.zero_grad()
    assert {(f.kind, f.param, f.where) for f in err.value.findings} == {
        ("detached", p, where("CUT: inside")) for p in ENC
    }
    assert runs_compiled()


class Raises(Net):
    """Raises inside the traced forward pass: GradGuard's error for a loss without a graph (``"graph"``), or the
    user's own (``"user"``)."""

    def __init__(self, how: str) -> None:
        super().__init__("none", "sub")
        self.how = how

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.how == "user":
            raise ValueError("the user's own error")
        return loss.detach()


@pytest.mark.parametrize(("how", "error"), [("graph", GradGuardError), ("user", ValueError)])
def test_the_stance_is_put_back_when_the_traced_step_raises(tmp_path, how, error):
    with pytest.raises(error):
        make_trainer(tmp_path, [GradGuard()]).fit(compiled(Raises(how), "whole"), loader())
    assert runs_compiled()


# ---------------------------------------------------------------------------------------------------------------------
def test_check_step_untraced_compiles_once_more_then_alternates_without_compiling():
    """``check_step(trace=False)`` keeps a function mode on the stack (to see ``backward``): the README's limit, a
    compiled model that ran outside such a block compiles once more inside one, and never again after."""
    counter = CompileCounterWithBackend(BACKEND)
    model = nn.ModuleDict({"enc": torch.compile(Encoder("none"), backend=counter), "head": nn.Linear(16, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    frames = []
    try:
        for step in range(6):
            with check_step(model, opt, trace=False) if step % 2 else contextlib.nullcontext() as chk:
                model["head"](model["enc"](torch.randn(4, 8))).mean().backward()
                opt.step()
                opt.zero_grad()
            if step % 2:
                assert chk.findings == []
            frames.append(counter.frame_count)
    finally:  # its two cache entries of `Encoder.forward` would count towards dynamo's recompile limit in later tests
        torch._dynamo.reset()
    assert frames == [1, 2, 2, 2, 2, 2]


def test_check_step_traces_compiled_code_and_restores_the_stance():
    x = torch.randn(4, 8)
    cut = nn.ModuleDict({"enc": torch.compile(Encoder("inside"), backend=BACKEND), "head": nn.Linear(16, 1)})
    opt = torch.optim.SGD(cut.parameters(), lr=0.1)
    with pytest.raises(GradGuardError) as err, check_step(cut, opt, strict=True):
        cut["head"](cut["enc"](x)).mean().backward()
        opt.step()
    assert {(f.kind, f.param, f.where) for f in err.value.findings} == {
        ("detached", p, where("CUT: inside")) for p in ENC
    }
    assert runs_compiled()
    model = nn.ModuleDict({"enc": torch.compile(Encoder("none"), backend=BACKEND), "head": nn.Linear(16, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradGuardError) as err, check_step(model, opt, strict=True):
        model["enc"](x).detach().sum().backward()  # the loss has no graph: raised at backward
    assert runs_compiled()
    with warnings.catch_warnings():  # nearest correct: silent
        warnings.simplefilter("error")
        with check_step(model, opt, strict=True) as chk:
            model["head"](model["enc"](x)).mean().backward()
            opt.step()
    assert chk.findings == []
    assert runs_compiled()


def test_assert_gradients_flow_names_the_line_inside_a_compiled_model():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(8, 16)
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(x).detach())  # CUT: flow

    x = torch.randn(4, 8)
    with pytest.raises(AssertionError) as err:
        assert_gradients_flow(torch.compile(Model(), backend=BACKEND), lambda m: m(x).mean())
    assert {(f.kind, f.param, f.where) for f in err.value.findings} == {
        ("detached", p, where("CUT: flow")) for p in ("enc.weight", "enc.bias")
    }
    assert "diagnose" not in str(err.value)
    assert runs_compiled()


class HeadLeftOut(LightningModule):
    """``configure_optimizers`` leaves ``head`` out unless ``everything``."""

    def __init__(self, everything: bool) -> None:
        super().__init__()
        self.everything = everything
        self.enc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters() if self.everything else self.enc.parameters(), lr=0.1)


def test_assert_gradients_flow_on_a_compiled_lightning_module_uses_its_configure_optimizers():
    """``torch.compile(module)`` wraps it in an ``OptimizedModule``, whose class has no ``configure_optimizers``: the
    check must still step the user's optimizer (a head it leaves out is an orphan) and name the user's class."""
    batch = (torch.randn(4, 8), torch.randn(4))
    with pytest.raises(AssertionError) as err:
        assert_gradients_flow(torch.compile(HeadLeftOut(everything=False), backend=BACKEND), batch)
    assert {(f.kind, f.param) for f in err.value.findings} == {("orphan", "head.weight"), ("orphan", "head.bias")}
    assert str(err.value).startswith("Gradients do not flow to 2 parameter tensors of HeadLeftOut (1 step checked)")
    assert_gradients_flow(torch.compile(HeadLeftOut(everything=True), backend=BACKEND), batch)  # nearest correct
    assert runs_compiled()


# ---------------------------------------------------------------------------------------------------------------------
MODEL_PY = """
import torch
from torch import nn
from lightning.pytorch import LightningModule


class CompiledNet(LightningModule):
    def __init__(self, backend: str = "aot_eager") -> None:
        super().__init__()
        self.enc = torch.compile(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), backend=backend)
        self.head = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.head(self.enc(x).detach()).squeeze(-1) - y) ** 2).mean()  # CUT: preflight

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64))
        return torch.utils.data.DataLoader(data, batch_size=8)
"""


@pytest.mark.slow
def test_preflight_check_fails_on_a_compiled_detach(tmp_path):
    model_py = tmp_path / "compiled_net.py"
    model_py.write_text(MODEL_PY, encoding="utf-8")
    config = tmp_path / "train.yaml"
    config.write_text("model:\n  backend: aot_eager\n", encoding="utf-8")
    proc = run_python("-m", "lightning_gradguard", "check", "--config", str(config), "--model",
                      f"{model_py}:CompiledNet", f"--trainer.default_root_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = where("CUT: preflight", str(model_py)).rsplit(":", 1)[1]
    assert "every step traced" in proc.stdout
    assert "gradguard check: FAILED" in proc.stdout
    assert "enc.0.weight: detached" in proc.stdout
    assert f"`.detach()` at compiled_net.py:{line}" in proc.stdout  # relative to the working directory


# ---------------------------------------------------------------------------------------------------------------------
def test_without_an_eager_stance_the_advice_is_still_true(tmp_path, monkeypatch):
    """torch < 2.6 cannot run compiled code eagerly: the tracer steps aside, and the messages say what cannot be told
    and what would tell it (never "set diagnose='always'", which would change nothing)."""
    monkeypatch.setattr(EagerStance, "supported", False)
    found, stopped, guard = fit(tmp_path, "detach", "sub", idle_window=1)
    assert found == {("unused", p, None, 0) for p in ENC}
    for f in guard.findings:
        assert "torch < 2.6" in f.message
        assert "diagnose" not in f.message
        assert f.hint.startswith("if the loss uses it, remove what cuts its gradient path")

    model = nn.ModuleDict({"enc": torch.compile(Encoder("none"), backend=BACKEND)})
    with pytest.raises(GradGuardError) as err, check_step(model, strict=True):
        model["enc"](torch.randn(4, 8)).detach().sum().backward()
    assert "torch.compile on torch < 2.6 keeps GradGuard from tracing" in str(err.value)
    assert "diagnose" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor needs a C++ compiler")
def test_inductor_gets_the_eager_verdicts_and_compiles_once(tmp_path):
    assert fit(tmp_path, "detach", "whole", "inductor")[:2] == EAGER["detach"]
    counter = CompileCounterWithBackend("inductor")
    frames = FramesPerStep(counter)
    net = SkipsAuxOnce("none", "sub", counter)
    make_trainer(tmp_path, [GradGuard(), frames], max_steps=8).fit(net, loader(n=64))
    assert frames.frames == [0] + [1] * 7
    assert runs_compiled()
