"""Real 2-process CPU/gloo runs of sharded strategies for tests/test_ddp.py.

    python run_fsdp.py OUT KIND SCENARIO [SCENARIO ...]

``KIND`` is ``fsdp`` (torch's ``FullyShardedDataParallel`` with ``use_orig_params=True`` under Lightning's
``FSDPStrategy``) or ``model_parallel`` (``fully_shard``, i.e. FSDP2, under Lightning's ``ModelParallelStrategy``).

Lightning refuses ``FSDPStrategy`` on CPU with a check on the exact strategy type and, on CPU, hands torch's FSDP
``device_id=None``, which torch refuses on a machine without an accelerator. torch's FSDP itself runs on CPU with
gloo when given ``device_id=cpu``. So the ``fsdp`` runs use a subclass of ``FSDPStrategy`` (which skips the type
check) and wrap the submodules themselves in ``configure_model`` (Lightning then leaves the wrapping alone).

Each rank writes ``OUT/<kind>-<scenario>.rank<r>.json``: findings, status, and per parameter the norm GradGuard
measured next to a reference (FSDP1: ``FullyShardedDataParallel.clip_grad_norm_``'s total norm; FSDP2:
``DTensor.full_tensor()`` of each gradient).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from _common import PG_TIMEOUT, Probe, SyntheticModule, make_trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_gradguard import GradGuardError


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on CPU, for tests (see the module docstring)."""


class Heads(nn.Module):
    """One FSDP unit holding a used and a maybe-unused layer (FSDP runs a unit only through its own forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def forward(self, h: torch.Tensor, use_aux: bool) -> torch.Tensor:
        y = self.out(h)
        return y + self.aux(h) if use_aux else y


class Net(SyntheticModule):
    def __init__(self, kind: str, scenario: str) -> None:
        super().__init__()
        self.kind = kind
        self.scenario = scenario
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.heads = Heads()

    def configure_model(self) -> None:
        if self.kind == "model_parallel":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for m in (self.body, self.heads):
                fully_shard(m, mesh=mesh)
            fully_shard(self, mesh=mesh)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel

            cpu = torch.device("cpu")
            for name in ("body", "heads"):
                setattr(self, name, FullyShardedDataParallel(getattr(self, name), use_orig_params=True, device_id=cpu))

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.body(x))
        out = self.heads(h, use_aux=self.scenario == "clean")
        return ((out.squeeze(-1) - y) ** 2).mean()


class NormProbe(Probe):
    """Also records GradGuard's parameter names and, at the first optimizer step, each norm it measured next to the
    sharding library's own (see ``references``)."""

    def __init__(self, out: str, tag: str) -> None:
        super().__init__(out, tag, idle_window=1)  # judge each step on its own: the scenarios are about one step
        self._norms: list = []
        self._own = 0  # collectives the probe itself ran

    def _fields(self, trainer, status, error, hook):
        return {
            **super()._fields(trainer, status, error, hook),
            "names": list(self._core.index.names) if self._core.index is not None else [],
            "norms": self._norms,
            # less the probe's own `measure_grads` (below): not GradGuard's cost
            "collectives": self._core.dist.collectives - self._own if self._core.dist is not None else None,
            "optimizer_steps": self._core.checks,
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # records a raise, and re-raises it
        if trainer.global_step == 0 and self._core.dist is not None:
            params = self._core.params_of(optimizer)
            stats = self._core.dist.measure_grads(params)  # what check() measured (one more collective, all ranks)
            self._own += 1
            refs = references(pl_module, params)
            self._norms = [[n, stats.norms[i], refs[i]] for i, n in enumerate(self._core.index.names)]


def references(pl_module, params) -> list[float | None]:
    """Each gradient's norm as the sharding library itself assembles the full gradient (collectives, all ranks)."""
    if any(type(p).__name__ == "DTensor" for p in params):
        return [None if p.grad is None else float(p.grad.full_tensor().norm()) for p in params]
    from torch.distributed.fsdp import FullyShardedDataParallel

    norms: dict[str, float | None] = {}
    for unit in (pl_module.body, pl_module.heads):
        with FullyShardedDataParallel.summon_full_params(unit, with_grads=True):
            for name, p in unit.named_parameters():
                norms[f"{id(unit)}.{name}"] = None if p.grad is None else float(p.grad.norm())
    return list(norms.values())  # same order as the module's named_parameters(), i.e. GradGuard's index


def main(out: str, kind: str, scenarios: list[str]) -> None:
    for scenario in scenarios:
        strategy = CPUFSDPStrategy(timeout=PG_TIMEOUT) if kind == "fsdp" else ModelParallelStrategy(timeout=PG_TIMEOUT)
        trainer = make_trainer(out, strategy, NormProbe(out, f"{kind}-{scenario}"), max_steps=2)
        torch.manual_seed(0)
        with contextlib.suppress(GradGuardError):
            trainer.fit(Net(kind, scenario))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    # Every record is written and closed. The interpreter's own teardown sometimes aborted here (about one run in
    # ten: "terminate called without an active exception", SIGABRT, with FSDP's threads on CPU), so skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
