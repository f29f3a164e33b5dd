"""What the tests share with the scripts beside them (``tests/corpus/corpus_run.py``, ``tests/realmodels``), which
run outside pytest too: plain Python, no pytest and no fixtures here. The tests get it through ``conftest``."""

from __future__ import annotations

import os

from lightning.pytorch import Callback, Trainer

__all__ = ["make_trainer"]


def make_trainer(root: str | os.PathLike, callbacks: list[Callback], **kwargs) -> Trainer:
    """A small, quiet CPU Trainer writing under ``root``: 3 steps on one device, no logger, checkpoints, progress bar,
    model summary or sanity check. ``kwargs`` override any of it."""
    opts = {
        "max_steps": 3,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
        "num_sanity_val_steps": 0,
    }
    opts.update(kwargs)
    return Trainer(callbacks=callbacks, **opts)
