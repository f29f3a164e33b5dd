"""What ``run_ddp.py`` and ``run_fsdp.py`` share: the synthetic data, the recording ``Probe``, the quiet Trainer.

A sibling module, imported by plain ``import`` (each script's folder is ``sys.path[0]`` in every rank's process).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_gradguard import GradGuard, GradGuardError

PG_TIMEOUT = datetime.timedelta(seconds=45)


class SyntheticModule(LightningModule):
    """SGD over 64 fixed random regression samples ``(x[4, 8], y[4])``; subclasses define the model."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, generator=g))
        return torch.utils.data.DataLoader(ds, batch_size=4)


class Probe(GradGuard):
    """GradGuard that writes, on every rank, what it did to ``OUT/<tag>.rank<r>.json``: raised (in which hook) or
    finished. Subclasses add fields (``_fields``) and record raises in more hooks (``_recording``)."""

    def __init__(self, out: str, tag: str, **options) -> None:
        super().__init__(**options)
        self._out = out
        self._tag = tag

    def _fields(self, trainer: Trainer, status: str, error: BaseException | None, hook: str) -> dict:
        return {
            "rank": trainer.global_rank,
            "pid": os.getpid(),
            "status": status,
            "hook": hook,
            "error": str(error) if error is not None else None,
            "step": trainer.global_step,
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.report.notes),
            "sync": repr(self._core.dist),
        }

    def _record(self, trainer: Trainer, status: str, error: BaseException | None = None, hook: str = "") -> None:
        record = {**self._fields(trainer, status, error, hook), "time": time.time()}
        path = os.path.join(self._out, f"{self._tag}.rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)

    @contextlib.contextmanager
    def _recording(self, trainer: Trainer, hook: str):
        """Record a GradGuardError raised inside the block as raised in ``hook``, and let it propagate."""
        try:
            yield
        except GradGuardError as err:
            self._record(trainer, "raised", err, hook)
            raise

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with self._recording(trainer, "on_before_optimizer_step"):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_end(self, trainer, pl_module):
        with self._recording(trainer, "on_train_end"):  # the end of `fit` reports what a short run left idle
            super().on_train_end(trainer, pl_module)
        self._record(trainer, "finished")


def make_trainer(out: str, strategy, probe: Probe, **kwargs) -> Trainer:
    """A quiet 2-process CPU Trainer with ``probe`` as its only callback."""
    return Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
        **kwargs,
    )
