"""The guard never changes training: bit-identical parameters, optimizer states and RNG states with it on or off.

Every option that does work on a step is on (TensorBoard logger, dashboards every step, per-parameter norms, value
histograms, update ratios, every step traced), and the training itself uses what a perturbation would show up in:
dropout (the RNG), gradient clipping (the gradients the guard reads), accumulation (gradients read between
micro-batches), Adam (its moments carry every gradient it ever saw), fp32 and bf16-mixed.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from conftest import events, loader, make_trainer
from lightning_gradguard import GradGuard

pytestmark = pytest.mark.filterwarnings("ignore::lightning_gradguard.policy.GradGuardWarning")

ALL_ON = {
    "log_every_n_steps": 1,
    "norms": "param",
    "histograms": True,
    "value_histograms": True,
    "update_ratio": True,
    "diagnose": "always",
    "on_unused": "warn",  # `aux` is unused: the finding, warning and report paths run too
}


class Dropped(LightningModule):
    """An MLP with dropout, a LayerNorm, Adam, and an unused `aux` layer; draws from numpy and `random` too."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.ReLU(), nn.LayerNorm(32), nn.Linear(32, 1))
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        # A training step that uses the other RNGs: any draw by the guard would shift what these return.
        noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        return ((self.net(x).squeeze(-1) - y) ** 2).mean() + noise

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _train(tmp_path, precision: str, guard: GradGuard | None) -> dict:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    model = Dropped()
    trainer = make_trainer(
        tmp_path,
        [guard] if guard is not None else [],
        max_steps=4,
        precision=precision,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,  # small enough to clip every step
        log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="on" if guard is not None else "off"),
    )
    trainer.fit(model, loader(n=64))
    assert trainer.global_step == 4
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "random_rng": random.getstate(),
    }


def _assert_same_optimizer_state(off: dict, on: dict) -> None:
    assert off["param_groups"] == on["param_groups"]
    assert off["state"].keys() == on["state"].keys()
    assert off["state"], "Adam has state for the trained parameters"
    for i, state in off["state"].items():
        assert state.keys() == on["state"][i].keys()
        for key, value in state.items():
            assert torch.equal(value, on["state"][i][key]), (i, key)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_is_bit_identical_with_every_option_on(tmp_path, precision):
    off = _train(tmp_path, precision, None)
    guard = GradGuard(**ALL_ON)
    on = _train(tmp_path, precision, guard)
    assert {f.param for f in guard.findings} == {"aux.weight", "aux.bias"}  # the guard did run, and found aux
    assert guard._core.checks == 4
    assert off["params"].keys() == on["params"].keys()
    for name, value in off["params"].items():
        assert torch.equal(value, on["params"][name]), name
    _assert_same_optimizer_state(off["optimizer"], on["optimizer"])
    assert torch.equal(off["torch_rng"], on["torch_rng"])
    off_np, on_np = off["numpy_rng"], on["numpy_rng"]
    assert off_np[0] == on_np[0]
    assert np.array_equal(off_np[1], on_np[1])
    assert off_np[2:] == on_np[2:]
    assert off["random_rng"] == on["random_rng"]


class _OneMoreDraw(GradGuard):
    """A guard that draws once from torch's RNG per batch: what the test above must catch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        torch.rand(1)


def test_one_rng_draw_by_a_guard_changes_training(tmp_path):
    """The comparison above can fail: one draw per batch shifts the dropout masks, hence parameters and RNG state."""
    off = _train(tmp_path, "32-true", None)
    on = _train(tmp_path, "32-true", _OneMoreDraw(**ALL_ON))
    assert any(not torch.equal(off["params"][k], on["params"][k]) for k in off["params"])
    assert not torch.equal(off["torch_rng"], on["torch_rng"])


def test_every_option_did_its_work(tmp_path):
    """The options of the bit-identity test really ran: update ratios and value histograms are in the event file."""
    _train(tmp_path, "32-true", GradGuard(**ALL_ON))
    (log_dir,) = [p for p in (tmp_path / "on").iterdir() if p.is_dir()]
    acc = events(log_dir)
    scalars, histograms = acc.Tags()["scalars"], acc.Tags()["histograms"]
    assert "gradguard/total_update_ratio" in scalars
    assert "gradguard/grad_norm/net.0.weight" in scalars  # norms="param"
    assert "gradguard/grad_values/net.0.weight" in histograms  # value_histograms
    assert len(acc.Scalars("gradguard/total_norm")) == 4  # every optimizer step logged
