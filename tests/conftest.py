"""Shared helpers: tiny Trainers (``helpers.make_trainer``, which the scripts beside the tests use too) and runs, their
TensorBoard files read back, findings as ``(kind, param)`` pairs, and the `path:line` of marker comments in test
files."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator

from helpers import make_trainer
from lightning_gradguard import Finding

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


def loader(n: int = 32, features: int = 8, batch_size: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    """Synthetic regression batches ``(x[B, features], y[B])``."""
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, features, generator=g), torch.randn(n, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def fit(
    tmp_path: Path,
    model: LightningModule,
    *callbacks: Callback,
    n: int = 32,
    batch_size: int = 8,
    tensorboard: bool = False,
    ignore: type[Warning] | None = None,
    error: type[Warning] | None = None,
    **trainer_kwargs,
) -> Trainer:
    """Fit ``model`` on ``loader(n, batch_size=batch_size)`` in ``make_trainer(tmp_path, callbacks,
    **trainer_kwargs)``; the Trainer. ``tensorboard``: log to ``TensorBoardLogger(tmp_path, name="tb")`` unless
    ``logger`` is given. ``ignore`` / ``error``: a category of warnings silenced / raised meanwhile (``error`` wins
    where both match)."""
    if tensorboard:
        trainer_kwargs.setdefault("logger", TensorBoardLogger(tmp_path, name="tb"))
    with warnings.catch_warnings():
        if ignore is not None:
            warnings.simplefilter("ignore", ignore)
        if error is not None:
            warnings.simplefilter("error", error)
        trainer = make_trainer(tmp_path, list(callbacks), **trainer_kwargs)
        trainer.fit(model, loader(n=n, batch_size=batch_size))
    return trainer


def events(source: Trainer | os.PathLike | str) -> EventAccumulator:
    """The TensorBoard event files of ``source`` (a Trainer: its logger's ``log_dir``; or that folder), read back
    whole: no kind of event down-sampled."""
    log_dir = source.logger.log_dir if isinstance(source, Trainer) else str(source)
    acc = EventAccumulator(log_dir, size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    """``{step: value}`` of the scalar ``tag``."""
    return {e.step: e.value for e in acc.Scalars(tag)}


def kinds(findings: Iterable[Finding]) -> set[tuple[str, str]]:
    """``{(kind, param)}`` of ``findings``."""
    return {(f.kind, f.param) for f in findings}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
