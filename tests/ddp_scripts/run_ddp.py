"""Real 2-process CPU/gloo runs for tests/test_ddp.py.

    python run_ddp.py OUT STRATEGY SCENARIO [SCENARIO ...]

Runs one ``Trainer.fit`` per scenario, one after the other, in the same two processes (``ddp``, ``ddp_find_unused_
parameters_true``) or in freshly spawned ones (``ddp_spawn``). Each rank writes ``OUT/<scenario>.rank<r>.json``: its
pid, whether GradGuard raised (and the message), ``guard.findings``, the report's notes, how many collectives
GradGuard ran, and when. A hang shows as a missing file and a run killed by the test's timeout. The process that
called ``trainer.fit`` adds, as ``seen``, the last line of the traceback the user would see: the exception that
came out of ``fit``, after Lightning's ``on_exception`` hooks (``DDPStrategy`` rewrites some messages there).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
from _common import PG_TIMEOUT, Probe, SyntheticModule, make_trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_gradguard import GradGuardError


class Net(SyntheticModule):
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
        elif s == "unused_rank0_detached_rank1" and rank == 1:
            out = out + self.aux(h).detach()  # cut on rank 1: aux
        elif s == "accumulate_last_skips" and batch_idx % 2 == 0:
            out = out + self.aux(h)  # only the first micro-batch of each optimizer step uses aux
        loss = ((out.squeeze(-1) - y) ** 2).mean()
        if s == "graphless_rank1" and rank == 1:
            return loss.detach()  # rank 1 alone returns a loss that backward() cannot go through
        return loss


class DDPProbe(Probe):
    """Records the scenario, how many collectives GradGuard ran and how many steps it checked, and raises in
    ``on_before_backward`` too."""

    def _fields(self, trainer, status, error, hook):
        sync = self._core.dist
        return {
            "scenario": self._tag,
            **super()._fields(trainer, status, error, hook),
            "collectives": sync.collectives if sync is not None else None,
            "optimizer_steps": self._core.checks,
        }

    def on_before_backward(self, trainer, pl_module, loss):
        with self._recording(trainer, "on_before_backward"):
            super().on_before_backward(trainer, pl_module, loss)


#: Scenarios run with GradGuard's default ``idle_window``: a cut is reported at once, on every rank alike.
DEFAULT_WINDOW = ("unused_rank0_detached_rank1",)


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
        trainer = make_trainer(
            out,
            strategy_for(strategy),
            # Judge each step on its own (the scenarios are about one step), except where the default must hold too.
            DDPProbe(out, scenario, **({} if scenario in DEFAULT_WINDOW else {"idle_window": 1})),
            max_steps=3,
            accumulate_grad_batches=2 if scenario.startswith("accumulate") else 1,
        )
        torch.manual_seed(0)
        try:
            trainer.fit(Net(scenario))
        except GradGuardError as err:  # the probe recorded it, on every rank
            record_seen(out, scenario, trainer.global_rank, err)
        except Exception as err:  # ddp_spawn re-raises a child's error in the parent as ProcessRaisedException
            if "GradGuardError" not in str(err):
                raise
            record_seen(out, scenario, trainer.global_rank, err)


def record_seen(out: str, scenario: str, rank: int, err: BaseException) -> None:
    """Add to the rank's record what the user sees of ``err``: the traceback's last line(s), as Python prints it."""
    path = os.path.join(out, f"{scenario}.rank{rank}.json")
    with open(path, encoding="utf-8") as fh:
        record = json.load(fh)
    record["seen"] = "".join(traceback.format_exception_only(type(err), err))
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
