"""Real 2-process CPU/gloo runs for tests/test_ddp.py.

    python run_ddp.py OUT STRATEGY SCENARIO [SCENARIO ...]

Runs one ``Trainer.fit`` per scenario, one after the other, in the same two processes (``ddp``, ``ddp_find_unused_
parameters_true``) or in freshly spawned ones (``ddp_spawn``). Each rank writes ``OUT/<scenario>.rank<r>.json``: its
pid, whether GradGuard raised (and the message), ``guard.findings``, the report's notes, how many collectives
GradGuard ran, and when. A hang shows as a missing file and a run killed by the test's timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_gradguard import GradGuard, GradGuardError

PG_TIMEOUT = datetime.timedelta(seconds=45)


class Net(LightningModule):
    """``body -> head`` always; ``aux`` joins the output as the scenario says."""

    def __init__(self, scenario: str) -> None:
        super().__init__()
        self.scenario = scenario
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        s, rank = self.scenario, self.global_rank
        if s == "nan_rank1" and rank == 1:
            x = x * float("nan")  # a poisoned batch on rank 1 only
        h = torch.relu(self.body(x))
        out = self.head(h)
        if s in ("clean", "accumulate", "nan_rank1", "graphless_rank1") or s == "unused_rank1" and rank == 0:
            out = out + self.aux(h)
        elif s == "detached":
            out = out + self.aux(h).detach()  # cut: aux
        elif s == "accumulate_last_skips" and batch_idx % 2 == 0:
            out = out + self.aux(h)  # only the first micro-batch of each optimizer step uses aux
        loss = ((out.squeeze(-1) - y) ** 2).mean()
        if s == "graphless_rank1" and rank == 1:
            return loss.detach()  # rank 1 alone returns a loss that backward() cannot go through
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, generator=g))
        return torch.utils.data.DataLoader(ds, batch_size=4)


class Probe(GradGuard):
    """GradGuard that writes, on every rank, what it did: raised (in which hook) or finished."""

    def __init__(self, out: str, scenario: str) -> None:
        super().__init__()
        self._out = out
        self._scenario = scenario

    def _record(self, trainer: Trainer, status: str, error: BaseException | None = None, hook: str = "") -> None:
        sync = self._core.dist
        record = {
            "scenario": self._scenario,
            "rank": trainer.global_rank,
            "pid": os.getpid(),
            "status": status,
            "hook": hook,
            "error": str(error) if error is not None else None,
            "step": trainer.global_step,
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.report.notes),
            "sync": repr(sync),
            "collectives": sync.collectives if sync is not None else None,
            "optimizer_steps": self._core.checks,
            "time": time.time(),
        }
        path = os.path.join(self._out, f"{self._scenario}.rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)

    def on_before_backward(self, trainer, pl_module, loss):
        try:
            super().on_before_backward(trainer, pl_module, loss)
        except GradGuardError as err:
            self._record(trainer, "raised", err, "on_before_backward")
            raise

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        except GradGuardError as err:
            self._record(trainer, "raised", err, "on_before_optimizer_step")
            raise

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        self._record(trainer, "finished")


def strategy_for(name: str):
    if name == "ddp":
        return DDPStrategy(timeout=PG_TIMEOUT)
    if name == "ddp_find_unused_parameters_true":
        return DDPStrategy(find_unused_parameters=True, timeout=PG_TIMEOUT)
    if name == "ddp_spawn":
        return DDPStrategy(start_method="spawn", timeout=PG_TIMEOUT)
    raise ValueError(name)


def main(out: str, strategy: str, scenarios: list[str]) -> None:
    for scenario in scenarios:
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy_for(strategy),
            max_steps=3,
            accumulate_grad_batches=2 if scenario.startswith("accumulate") else 1,
            callbacks=[Probe(out, scenario)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=out,
        )
        torch.manual_seed(0)
        try:
            trainer.fit(Net(scenario))
        except GradGuardError:
            pass  # the probe recorded it, on every rank
        except Exception as err:  # ddp_spawn re-raises a child's error in the parent as ProcessRaisedException
            if "GradGuardError" not in str(err):
                raise


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
