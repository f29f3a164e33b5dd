"""What a clean step costs, counted rather than timed: the Python work inside GradGuard's hooks and the host transfers.

A clean step (every gradient usable, no trace, no dashboard) must stay one fused pass over the gradients, read with
one host transfer, and a fixed amount of Python: the per-tensor work belongs in C. Counting Python-level calls (and
the built-in functions Python calls: every torch op called from Python is one) with ``sys.setprofile`` is exact and
does not depend on the machine's load, so these bounds can be tight; times live in ``make bench`` (the per-hook
breakdown), never here. A change that adds Python per parameter or a second transfer turns this red.
"""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn

from conftest import ROOT, loader, make_trainer
from lightning_gradguard import GradGuard

sys.path.insert(0, str(ROOT / "benchmarks"))
from run import STEP_HOOKS  # noqa: E402  (benchmarks/run.py: the per-batch hooks, in Lightning's order)

#: The counts of a clean step at the time of writing, whatever the model: to be lowered, never raised.
FIXED_CALLS = 111  # Python function calls
FIXED_BUILTINS = 81  # built-in calls (each torch op called from Python is one)


#: The tensor methods that copy a tensor's values to the host (on CUDA: a synchronising copy); ``.numpy()`` of the
#: copy is a view of it, not one more read.
READS = {"item", "tolist", "cpu", "to"}


class Stack(LightningModule):
    """``layers`` residual ``Linear(width, width)`` layers: ``2 * layers`` tensors (weights: ``width**2`` elements)."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        for layer in self.layers:
            x = x + 0.01 * layer(x)
        return x.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


class Counted(GradGuard):
    """GradGuard whose per-batch hooks count, per step, the Python calls and built-in calls made inside them."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.current: collections.Counter[str] = collections.Counter()
        self.steps: list[dict[str, int]] = []

    def _profile(self, frame, event, arg) -> None:
        if event in ("call", "c_call"):
            self.current[event] += 1
        if event == "c_call" and getattr(arg, "__name__", None) in READS and isinstance(arg.__self__, torch.Tensor):
            self.current["reads"] += 1


def _counted(name: str):
    def hook(self: Counted, *args) -> None:
        sys.setprofile(self._profile)
        try:
            getattr(GradGuard, name)(self, *args)
        finally:
            sys.setprofile(None)
        if name == "on_train_batch_end":
            self.steps.append(dict(self.current))
            self.current.clear()

    return hook


for _name in STEP_HOOKS:
    if getattr(GradGuard, _name) is not getattr(Callback, _name):
        setattr(Counted, _name, _counted(_name))


def clean_step_counts(layers: int, width: int) -> dict[str, int]:
    """Calls per clean step (after the first two, which plan the pass) of the defaults without a logger."""
    guard = Counted(log_every_n_steps=0, write_report=False)
    make_trainer("unused", [guard], max_steps=6).fit(Stack(layers, width), loader(n=48, features=width))
    assert guard.findings == []
    later = guard.steps[2:]
    assert all(s == later[0] for s in later), later  # a clean step is the same work every time
    return later[0]


@pytest.mark.parametrize(
    ("few", "many", "width"),
    [(5, 500, 8), (2, 20, 256)],
    ids=["10 vs 1000 small tensors", "2 vs 20 large tensors (BLAS dot)"],
)
def test_a_clean_step_does_no_python_per_tensor(tmp_path, monkeypatch, few, many, width):
    monkeypatch.chdir(tmp_path)
    small, large = clean_step_counts(few, width), clean_step_counts(many, width)
    assert large["call"] <= small["call"] <= FIXED_CALLS  # not one call more for more tensors
    assert large["c_call"] <= small["c_call"] <= FIXED_BUILTINS


def test_a_clean_step_reads_the_host_once(tmp_path, monkeypatch):
    """One explicit device-to-host copy per clean step (``.item()``, ``.tolist()``, ``.cpu()`` or ``.to()`` called on
    a tensor), with 10 small tensors as with 1000 or with large ones."""
    monkeypatch.chdir(tmp_path)
    for layers, width in ((5, 8), (500, 8), (20, 256)):
        assert clean_step_counts(layers, width)["reads"] == 1
