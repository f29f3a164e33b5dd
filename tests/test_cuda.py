"""GradGuard on a CUDA device, with the parts that exist only there: the CUDA ``GradScaler`` of ``16-mixed``, fused
optimizers on the device they were made for, ``torch.compile`` through inductor's Triton kernels, and the dashboard
reading device tensors. Every test here needs CUDA and is skipped without it; ``make gpu`` runs them, with every other
test marked ``cuda``, on a CUDA machine.

Ground truth is built by construction, not read back from GradGuard: the norms a reference callback computes from
``.grad`` at the same hook (divided by the scaler's scale where the gradients are still scaled there), the steps
the scaler skipped read from the scaler itself, and the lines of the planted cuts from their marker comments.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from conftest import events, fit, loader, make_trainer, where
from lightning_gradguard import GradGuard, GradGuardError

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class Net(LightningModule):
    """``body`` → ``head``; ``cut="detach"`` plants a ``.detach()`` between them; ``blow_up`` multiplies the loss (an
    fp16 overflow the scaler must skip); ``fused`` picks ``Adam(fused=True)`` over SGD."""

    def __init__(self, cut: str = "none", blow_up: float = 1.0, fused: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)
        self.cut, self.blow_up, self.fused = cut, blow_up, fused

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.body(x).relu()
        if self.cut == "detach":
            h = h.detach()  # CUT: detach
        return ((self.head(h).squeeze(-1) - y) ** 2).mean() * self.blow_up

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.fused:
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class ReferenceNorms(Callback):
    """Per step, each parameter's true gradient norm at ``on_before_optimizer_step`` in float64, unscaled by hand
    where the gradients still carry the scaler's scale there (a fused optimizer unscales inside its own step)."""

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler
        self.norms: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaled = self.scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        scale = float(self.scaler.get_scale()) if scaled else 1.0
        self.norms[trainer.global_step] = {
            n: float(p.grad.double().norm()) / scale for n, p in pl_module.named_parameters() if p.grad is not None
        }


def fit_on_cuda(tmp_path, model: Net, guard: GradGuard, precision: str = "32-true", steps: int = 6,
                scale: float = 2.0**10, **kwargs):  # fmt: skip
    """Train ``model`` on the GPU (``16-mixed``: a real CUDA ``GradScaler`` starting at ``scale``): ``(trainer,
    reference norms, scaler or None)``."""
    scaler = torch.amp.GradScaler("cuda", init_scale=scale) if precision == "16-mixed" else None
    plugins = [MixedPrecision("16-mixed", "cuda", scaler=scaler)] if scaler is not None else []
    reference = ReferenceNorms(scaler)
    trainer = fit(
        tmp_path,
        model,
        guard,
        reference,
        n=8 * steps,
        accelerator="cuda",
        max_steps=steps,
        plugins=plugins,
        **({} if plugins else {"precision": precision}),
        **kwargs,
    )
    return trainer, reference, scaler


def logged(trainer) -> dict[str, dict[int, float]]:
    """Every ``gradguard/grad_norm/<name>`` scalar GradGuard wrote: name -> step -> value."""
    acc = events(trainer)
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("gradguard/grad_norm/")]
    return {t.removeprefix("gradguard/grad_norm/"): {e.step: e.value for e in acc.Scalars(t)} for t in tags}


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_healthy_model_is_silent_and_the_dashboard_shows_the_true_unscaled_norms(tmp_path, precision, fused):
    guard = GradGuard(log_every_n_steps=1, norms="param")
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer, reference, _ = fit_on_cuda(tmp_path, Net(fused=fused), guard, precision, logger=logger)
    assert guard.findings == []
    shown = logged(trainer)
    assert set(shown) == {"body.weight", "body.bias", "head.weight", "head.bias"}
    for name, per_step in shown.items():
        assert sorted(per_step) == sorted(reference.norms)
        for step, value in per_step.items():
            assert value == pytest.approx(reference.norms[step][name], rel=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_overflow_steps_the_scaler_skips_are_not_findings(tmp_path, fused):
    guard = GradGuard(log_every_n_steps=0)
    _, _, scaler = fit_on_cuda(tmp_path, Net(blow_up=1e6, fused=fused), guard, "16-mixed", steps=8, scale=2.0**16)
    assert scaler is not None
    assert scaler.get_scale() < 2.0**16  # the scaler did skip overflowing steps
    assert guard.findings == []


def test_a_detach_under_fp16_on_cuda_is_raised_with_its_line(tmp_path):
    guard = GradGuard()
    with pytest.raises(GradGuardError):
        fit_on_cuda(tmp_path, Net(cut="detach"), guard, "16-mixed")
    found = {(f.kind, f.param, f.where, f.step) for f in guard.findings}
    assert found == {("detached", p, where("CUT: detach"), 0) for p in ("body.weight", "body.bias")}


def test_a_nan_gradient_on_cuda_is_nonfinite(tmp_path):
    class NaNHead(Net):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.head.bias.sum() * math.nan

    guard = GradGuard()
    with pytest.raises(GradGuardError):
        fit_on_cuda(tmp_path, NaNHead(), guard)
    assert {(f.kind, f.step) for f in guard.findings if f.param == "head.bias"} == {("nonfinite", 0)}


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["none", "detach"])
def test_inductor_compiled_model_on_cuda_gets_the_eager_verdict(tmp_path, cut):
    """``torch.compile`` with its default backend on CUDA (Triton kernels): the same verdict, parameter names and line
    as eager; a healthy compiled model trains silently."""
    guard = GradGuard()
    model = Net(cut=cut)
    with contextlib.suppress(GradGuardError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_on_cuda(tmp_path, torch.compile(model), guard, steps=4)
    found = {(f.kind, f.param, f.where, f.step) for f in guard.findings}
    cuts = {("detached", p, where("CUT: detach"), 0) for p in ("body.weight", "body.bias")}
    assert found == (cuts if cut == "detach" else set())


def test_bit_identical_training_with_the_guard_on_and_off(tmp_path):
    def trained(with_guard: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Net(fused=True)
        callbacks = [GradGuard(log_every_n_steps=0)] if with_guard else []
        trainer = make_trainer(tmp_path, callbacks, accelerator="cuda", max_steps=6, precision="bf16-mixed")
        trainer.fit(model, loader(n=48))
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}

    on, off = trained(True), trained(False)
    assert all(torch.equal(on[n], off[n]) for n in off)
