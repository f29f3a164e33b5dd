"""What GradGuard costs per training step, next to Lightning's own ``grad_norm`` logging recipe.

A ~6 M-parameter causal transformer LM (76 parameter tensors) trains on random tokens on the CPU with 2 threads and
a ``TensorBoardLogger``. The step time is the time between consecutive ``on_train_batch_end`` calls (data, forward,
backward, every hook, logging, optimizer), after warm-up steps. Each configuration runs several rounds, interleaved
with the others; the table shows, per configuration, the least of its round medians (on a shared machine noise only
adds time, and a neighbour's burst can slow a whole round). Ratios are to the run without callback.

Run from the repository root (takes a few minutes)::

    python benchmarks/run.py            # prints the table and writes benchmarks/results.md
    python benchmarks/run.py --quick    # a smoke run: a few steps, nothing written
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402

VOCAB, WIDTH, LAYERS, HEADS, FF, CONTEXT, BATCH = 4096, 256, 6, 4, 1024, 64, 8
RESULTS = Path(__file__).resolve().parent / "results.md"


class TinyLM(pl.LightningModule):
    """A pre-norm causal transformer LM with tied input/output embeddings (5.8 M parameters in 76 tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, FF, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        x, y = tokens[:, :-1], tokens[:, 1:]
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask, is_causal=True)
        logits = self.head(self.norm(h))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class GradNormRecipe(TinyLM):
    """Lightning's recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` at ``on_before_optimizer_step``."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log_dict(grad_norm(self, norm_type=2))


class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_end`` calls."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.steps: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append(now - self.last)
        self.last = now


class TimedGradGuard(GradGuard):
    """GradGuard that adds up the wall time spent in its own hooks, per training batch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spent = 0.0
        self.per_batch: list[float] = []

    def _timed(self, hook: str, *args: Any) -> None:
        t = time.perf_counter()
        getattr(super(), hook)(*args)
        self.spent += time.perf_counter() - t

    def on_train_batch_start(self, *args: Any) -> None:
        self._timed("on_train_batch_start", *args)

    def on_before_backward(self, *args: Any) -> None:
        self._timed("on_before_backward", *args)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._timed("on_before_optimizer_step", *args)

    def on_train_batch_end(self, *args: Any) -> None:
        self._timed("on_train_batch_end", *args)
        self.per_batch.append(self.spent)
        self.spent = 0.0


# name -> (model class, GradGuard kwargs or None, Trainer kwargs)
CONFIGS: dict[str, tuple[type[TinyLM], dict[str, Any] | None, dict[str, Any]]] = {
    "no callback": (TinyLM, None, {}),
    "Lightning `grad_norm` recipe, every step": (GradNormRecipe, None, {"log_every_n_steps": 1}),
    "GradGuard defaults (dashboard every 50 steps)": (TinyLM, {}, {}),
    "GradGuard defaults, dashboard every step": (TinyLM, {"log_every_n_steps": 1}, {}),
    "GradGuard full dashboard every step (norms='param')": (TinyLM, {"log_every_n_steps": 1, "norms": "param"}, {}),
    "GradGuard full dashboard every step + update_ratio": (
        TinyLM,
        {"log_every_n_steps": 1, "norms": "param", "update_ratio": True},
        {},
    ),
    "GradGuard full dashboard every step + value_histograms": (
        TinyLM,
        {"log_every_n_steps": 1, "norms": "param", "value_histograms": True},
        {},
    ),
    "GradGuard diagnose='never', no dashboard": (TinyLM, {"diagnose": "never", "log_every_n_steps": 0}, {}),
    "GradGuard diagnose='always' (every step traced), no dashboard": (
        TinyLM,
        {"diagnose": "always", "log_every_n_steps": 0},
        {},
    ),
}


def run_once(name: str, steps: int, warmup: int, root: str) -> tuple[list[float], list[float]]:
    """Step times and, with GradGuard, the time spent in its hooks per step, after ``warmup`` steps."""
    model_cls, guard_kwargs, trainer_kwargs = CONFIGS[name]
    torch.manual_seed(0)
    model = model_cls()
    n = (steps + warmup + 1) * BATCH
    data = torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (n, CONTEXT + 1)))
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    guard = None
    if guard_kwargs is not None:
        guard = TimedGradGuard(**guard_kwargs)
        callbacks.insert(0, guard)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup + 1,
        logger=TensorBoardLogger(root, name="bench"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=BATCH))
    hooks = guard.per_batch[1:][warmup:] if guard is not None else []  # aligned with the timer's intervals
    return timer.steps[warmup:], hooks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per configuration")
    parser.add_argument("--quick", action="store_true", help="a few steps, one round; print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds = 3, 1, 1

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    params = sum(p.numel() for p in TinyLM().parameters())
    tensors = len(list(TinyLM().parameters()))
    rounds: dict[str, list[list[float]]] = {name: [] for name in CONFIGS}
    hooks: dict[str, list[float]] = {name: [] for name in CONFIGS}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            for name in CONFIGS:
                times, spent = run_once(name, args.steps, args.warmup, root)
                rounds[name].append(times)
                hooks[name] += spent
                print(f"round {r + 1}/{args.rounds}: {name}: {statistics.median(rounds[name][-1]) * 1e3:.1f} ms")
    elapsed = time.perf_counter() - start

    # A round's median step time; over rounds, the least: on a shared machine noise only ever adds time, and a
    # neighbour's burst can slow a whole round of one configuration.
    best = {name: min(statistics.median(ts) for ts in runs) for name, runs in rounds.items()}
    base = best["no callback"]
    never = best["GradGuard diagnose='never', no dashboard"]
    always = best["GradGuard diagnose='always' (every step traced), no dashboard"]

    def in_hooks(name: str) -> str:
        if not hooks[name]:
            return "-"
        ms = statistics.median(hooks[name])
        return f"{ms * 1e3:.2f} ({ms / base:.1%})"

    lines = [
        "| configuration | step (ms) | × no callback | in GradGuard's hooks, ms (share of a plain step) "
        "| round medians (ms) |",
        "|---|---:|---:|---:|---|",
        *(
            f"| {name} | {best[name] * 1e3:.1f} | {best[name] / base:.3f} | {in_hooks(name)} | "
            f"{', '.join(f'{statistics.median(ts) * 1e3:.0f}' for ts in runs)} |"
            for name, runs in rounds.items()
        ),
    ]
    traced = f"Traced step / untraced step (diagnose='always' / diagnose='never'): **{always / never:.3f}×**"
    table = "\n".join(lines)
    print()
    print(table)
    print()
    print(traced)
    if args.quick:
        return 0
    cpu = platform.processor() or platform.machine()
    env = (
        f"torch {torch.__version__}, lightning {pl.__version__}, Python {platform.python_version()}, {cpu}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible"
    )
    RESULTS.write_text(
        "# GradGuard benchmark\n\n"
        f"Written by `python benchmarks/run.py` ({elapsed / 60:.1f} min). Model: causal transformer LM, "
        f"{params / 1e6:.2f} M parameters in {tensors} tensors (vocabulary {VOCAB}, width {WIDTH}, {LAYERS} layers, "
        f"batch {BATCH} × {CONTEXT} tokens, AdamW), CPU, `TensorBoardLogger`. Step time: between consecutive "
        f"`on_train_batch_end` calls; {args.rounds} interleaved rounds × {args.steps} timed steps (after "
        f"{args.warmup} warm-up steps) per configuration; the median of each round, and the least of those "
        "(noise on a shared machine only adds time). The hook column is the median time spent inside GradGuard's "
        "hooks per step, measured directly (it leaves out the tracer, which works inside the forward pass, and "
        "TensorBoard's writer thread).\n\n"
        f"{env}.\n\n{table}\n\n{traced}\n\n"
        "Targets: full dashboard every step ≤ 1.05×, defaults ≤ 1.01×, traced/untraced ≤ 2×. "
        "The machine is shared with other work: differences of 1-2 % are within its noise (compare the rounds).\n",
        encoding="utf-8",
    )
    print(f"\nwritten to {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
