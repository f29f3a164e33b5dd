"""The tracer retains no memory: no tensor, array or frame past its use, and nothing grows across steps."""

from __future__ import annotations

import gc
import os
import warnings
import weakref

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn

from conftest import loader, make_trainer
from lightning_gradguard import GradGuard, check_step


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # `isinstance` on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_an_escaped_numpy_array_is_not_held_while_tracing():
    model = nn.Linear(8, 8)
    refs = []
    with check_step(model) as chk:
        h = model(torch.randn(256, 8)).detach()
        arr = h.numpy()  # shares, and keeps alive, the tensor's memory
        assert np.isfinite(arr).all()
        refs.append(weakref.ref(arr))
        del arr, h
        gc.collect()
        assert refs[0]() is None  # the tracer did not hold the array (nor, through it, the tensor's memory)
        model(torch.randn(2, 8)).sum().backward()
    assert chk.findings == []


def test_a_no_grad_region_left_open_by_a_returned_function_does_not_keep_its_frame():
    model = nn.Linear(8, 8)
    refs = []

    def switch_off():
        big = torch.randn(1024)
        refs.append(weakref.ref(big))
        torch.set_grad_enabled(False)

    with check_step(model):
        switch_off()
        gc.collect()
        try:
            assert refs[0]() is None  # the frame (and its local `big`) was not kept
        finally:
            torch.set_grad_enabled(True)
        model(torch.randn(2, 8)).sum().backward()


class SidePaths(LightningModule):
    """A small model whose step sends values to `.item()`, `.tolist()` and numpy, as logging and metrics do."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 32)
        self.head = nn.Linear(32, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.enc(x))
        out = self.head(h).squeeze(-1)
        loss = ((out - y) ** 2).mean()
        stats = h.detach().numpy()
        self.log("h_mean", float(np.mean(stats)))
        self.log("out0", out[0].item())
        assert len(out.detach().tolist()) == x.shape[0]
        with torch.no_grad():
            self.log("acc", ((out > 0) == (y > 0)).float().mean())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Probe(Callback):
    def __init__(self, at: tuple[int, ...], measure) -> None:
        self.at = at
        self.measure = measure
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.at:
            self.values.append(self.measure())


def test_live_tensors_stay_flat_over_300_traced_steps(tmp_path):
    """Counted after the first epoch ended (Lightning and the guard build some state once there)."""
    guard = GradGuard(diagnose="always")
    probe = Probe((120, 300), _live_tensors)  # after the first epoch end: its one-time state is made
    trainer = make_trainer(tmp_path, [guard, probe], max_steps=300)
    trainer.fit(SidePaths(), loader(n=800, batch_size=8))
    assert guard.findings == []
    assert len(probe.values) == 2
    assert probe.values[1] <= probe.values[0], probe.values


def _rss_over_1000_steps(tmp_path, guard: GradGuard) -> list[float]:
    probe = Probe((100, 1000), _rss_mb)
    trainer = make_trainer(tmp_path, [guard, probe], max_steps=1000)
    trainer.fit(SidePaths(), loader(n=800, batch_size=8))
    assert guard.findings == []
    assert len(probe.values) == 2
    return probe.values


@pytest.mark.slow
def test_rss_stays_flat_over_1000_steps_with_defaults(tmp_path):
    before, after = _rss_over_1000_steps(tmp_path, GradGuard())
    assert abs(after - before) <= 20, (before, after)


@pytest.mark.slow
def test_rss_stays_flat_over_1000_steps_traced_every_step(tmp_path):
    before, after = _rss_over_1000_steps(tmp_path, GradGuard(diagnose="always"))
    assert abs(after - before) <= 20, (before, after)
