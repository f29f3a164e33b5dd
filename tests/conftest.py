"""Shared helpers: tiny Trainers and the `path:line` of marker comments in test files."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

#: The repository's root: subprocesses import this checkout of the package from it.
ROOT = Path(__file__).resolve().parents[1]

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*litlogger.*")


def where(marker: str, path: str | None = None) -> str:
    """``path:line`` of the one line in ``path`` (default: the caller's file) that contains ``# <marker>``."""
    if path is None:
        path = inspect.stack()[1].filename
    with open(path, encoding="utf-8") as fh:
        hits = [i for i, line in enumerate(fh, 1) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, f"marker {marker!r} must be on exactly one line of {path}, found {hits}"
    rel = os.path.relpath(path)
    return f"{path if rel.startswith('..') else rel}:{hits[0]}"


def run_python(*args: str, cwd: os.PathLike | str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` in a subprocess that imports this checkout (``ROOT`` first on ``PYTHONPATH``), with ``env``
    added to the environment; its output captured as text, its exit status left to the caller."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def make_trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    """A small, quiet CPU Trainer."""
    opts = {
        "max_steps": 3,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    opts.update(kwargs)
    return Trainer(callbacks=callbacks, **opts)


def loader(n: int = 32, features: int = 8, batch_size: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    """Synthetic regression batches ``(x[B, features], y[B])``."""
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, features, generator=g), torch.randn(n, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
