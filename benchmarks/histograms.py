"""Where the time of GradGuard's value histograms and update ratios goes, on the LM of ``benchmarks/run.py``.

Paired rounds like ``run.py`` (each round runs every configuration once, in a shuffled order), CPU, with its
``TensorBoardLogger``. Per configuration: the median step, the median time inside GradGuard's hooks per step
(wall / CPU of the training thread) and its share of the no-callback step of the same round, and where the
dashboard's time goes on a logged step: bucketing the values (``histograms_counts``), building the histogram
records (``fetch_histograms``), the ``Summary`` and its hand-off to the event writer, the update ratio's
copy-before and ratio-after; plus the CPU time per step of TensorBoard's event writer thread (beside the training
thread). Prints only; writes nothing.

Run from the repository root::

    python benchmarks/histograms.py --threads 2
    python benchmarks/histograms.py --threads 1 --rounds 3 --steps 16
    python benchmarks/histograms.py --quick    # a smoke run of every code path (a tiny model)
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run  # noqa: E402

from lightning_gradguard import dashboard, ratios, tensorboard  # noqa: E402

CONFIGS = {
    "no callback": None,
    "full dashboard every step (norms='param')": run.FULL_DASHBOARD,
    "+ value_histograms": {**run.FULL_DASHBOARD, "value_histograms": True},
    "+ update_ratio": {**run.FULL_DASHBOARD, "update_ratio": True},
}
#: What is timed inside the dashboard: (owner, attribute, label).
PARTS = [
    (dashboard, "histograms_counts", "bucketing"),
    (tensorboard, "fetch_histograms", "records"),
    (tensorboard, "make_summary", "summary"),
    (ratios.UpdateSnapshot, "capture", "ratio: copy before"),
    (ratios.UpdateSnapshot, "squares", "ratio: after"),
]
SPENT: collections.Counter[str] = collections.Counter()


def timed(fn: Any, label: str) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t

    return wrapper


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds (user + system) of one thread of this process (0 where unknown)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))  # type: ignore[arg-type]
    except (AttributeError, OSError, TypeError):
        return 0.0


def side_threads() -> dict[str, float]:
    """CPU seconds so far of TensorBoard's event writer threads."""
    out: collections.Counter[str] = collections.Counter()
    for t in threading.enumerate():
        if type(t).__name__ == "_AsyncWriterThread" and t.is_alive():
            out["TensorBoard writer thread"] += thread_cpu(t)
    return out


class Window(run.pl.Callback):
    """Resets the part timers and the side-thread clocks at the end of the warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.batches = 0
        self.start: dict[str, float] = {}
        self.threads: dict[str, float] = {}

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1
        if self.batches == self.warmup + 1:  # the timer's first timed interval starts here
            SPENT.clear()
            self.start = side_threads()

    def on_train_end(self, *args: Any) -> None:
        now = side_threads()
        self.threads = {k: now[k] - self.start.get(k, 0.0) for k in now}


def run_config(name: str, steps: int, warmup: int, root: str) -> dict[str, Any]:
    guard_kwargs = CONFIGS[name]
    torch.manual_seed(0)
    model = run.TinyLM()
    data = torch.utils.data.TensorDataset(
        torch.randint(0, run.VOCAB, ((steps + warmup + 1) * run.BATCH, run.CONTEXT + 1))
    )
    timer = run.StepTimer()
    window = Window(warmup)
    callbacks: list[Any] = [timer, window]
    guard = run.TimedGradGuard(**guard_kwargs) if guard_kwargs is not None else None
    if guard is not None:
        callbacks.insert(0, guard)
    trainer = run.quiet_trainer(
        max_steps=steps + warmup + 1,
        logger=run.TensorBoardLogger(root, name="hist"),
        callbacks=callbacks,
        log_every_n_steps=run.TRAINER_LOG_EVERY,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=run.BATCH))
    hooks = guard.per_batch[1:][warmup:] if guard is not None else []
    timed_steps = len(timer.steps[warmup:])
    return {
        "step": statistics.median(timer.steps[warmup:]),
        "wall": statistics.median(w for w, _ in hooks) if hooks else 0.0,
        "cpu": statistics.median(c for _, c in hooks) if hooks else 0.0,
        "parts": {k: v / timed_steps for k, v in SPENT.items()},
        "threads": {k: v / timed_steps for k, v in window.threads.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 steps, one round: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 2, 1
        run.VOCAB, run.WIDTH, run.LAYERS, run.HEADS, run.FF, run.CONTEXT, run.BATCH = run.SIZES["quick"]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for logger in ("lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    for owner, attr, label in PARTS:
        setattr(owner, attr, timed(getattr(owner, attr), label))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.rounds):
            order = list(CONFIGS)
            rng.shuffle(order)
            for name in order:
                runs[name].append(run_config(name, args.steps, args.warmup, root))
    base = [r["step"] for r in runs["no callback"]]
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {load:.1f}; "
          f"{args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up steps")  # fmt: skip
    print("| configuration | step (ms) | hooks, ms wall / CPU | hooks / no-callback step (paired) | per step, ms |")
    print("|---|---:|---:|---:|---|")
    for name, rs in runs.items():
        share = statistics.median(r["wall"] / b for r, b in zip(rs, base, strict=True))
        spent = collections.Counter()
        for r in rs:
            spent.update({k: v / len(rs) for k, v in {**r["parts"], **r["threads"]}.items()})
        detail = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in spent.items() if v > 0)
        step, wall, cpu = (statistics.median(r[k] for r in rs) * 1e3 for k in ("step", "wall", "cpu"))
        print(f"| {name} | {step:.1f} | {wall:.2f} / {cpu:.2f} | {share:.1%} | {detail or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
