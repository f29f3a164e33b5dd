"""What GradGuard costs per training step, next to no callback and to Lightning's own ``grad_norm`` logging recipe.

Two parts, both on the CPU:

1. **Paired table.** A ~6 M-parameter causal transformer LM (76 parameter tensors) trains on random tokens with a
   ``TensorBoardLogger`` and ``Trainer(log_every_n_steps=8)``, so that every configuration logs inside its timed
   window (GradGuard's defaults follow the Trainer). Step time: between consecutive ``on_train_batch_end`` calls
   (data, forward, backward, every hook, logging, optimizer), after warm-up steps. Each round runs every
   configuration once, in a shuffled order; a configuration's ratio is its round median over the no-callback round
   median *of the same round*; the table shows the median of those ratios over rounds. Also measured directly:
   the time inside GradGuard's hooks (wall and CPU time of the training thread), the tracer's own time inside the
   forward pass (its ``__torch_function__`` minus the ops it forwards), and each configuration's peak RSS
   (``VmHWM``, reset before each run). A reference row without GradGuard (:class:`ReadFloor`) times the least any
   check of every gradient on every step costs: one read of each gradient and one host copy.
2. **Scaling table.** Time inside GradGuard's hooks with the defaults (no logger: no dashboard) on residual stacks of
   small ``Linear`` layers (100 / 1000 / 4000 parameter tensors) and on MLPs of 1 M / 10 M / 100 M parameters.

Run from the repository root::

    python benchmarks/run.py            # ~10 min; prints both tables and writes benchmarks/results.md
    python benchmarks/run.py --quick    # a smoke run of every code path: a tiny model, a few steps, nothing written
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402
from lightning_gradguard.trace import Tracer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.md"
SIZES = {"full": (4096, 256, 6, 4, 1024, 64, 8), "quick": (256, 32, 2, 2, 64, 16, 4)}
VOCAB, WIDTH, LAYERS, HEADS, FF, CONTEXT, BATCH = SIZES["full"]
TRAINER_LOG_EVERY = 8
DEVICE = "cpu"  # --device


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


class WandbWatch(pl.Callback):
    """W&B's ``watch(model, log="gradients", log_freq=1)`` on an offline run (only if ``wandb`` is installed)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.run: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import wandb

        self.run = wandb.init(mode="offline", dir=self.root, project="gradguard-bench")
        self.run.watch(pl_module, log="gradients", log_freq=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is not None:
            self.run.finish(quiet=True)


class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_end`` calls."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.steps: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # a step ends when its kernels have run, with or without GradGuard
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append(now - self.last)
        self.last = now


#: The hooks run inside a training batch, in the order Lightning calls them (FACTS.md); the per-hook breakdown.
STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_zero_grad",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
)


class TimedGradGuard(GradGuard):
    """GradGuard that adds up the wall and thread CPU time spent in each of its own per-batch hooks (every hook of
    ``STEP_HOOKS`` that GradGuard overrides: a hook added later is timed without touching this class)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wall = self.cpu = 0.0
        self.per_batch: list[tuple[float, float]] = []
        self.per_hook: dict[str, list[float]] = {}  # hook -> wall time of each call
        self._current: dict[str, float] = {}

    def _timed(self, hook: str, *args: Any) -> None:
        w, c = time.perf_counter(), time.thread_time()
        getattr(super(), hook)(*args)
        wall = time.perf_counter() - w
        self.wall += wall
        self.cpu += time.thread_time() - c
        self._current[hook] = self._current.get(hook, 0.0) + wall
        if hook == "on_train_batch_end":
            self.per_batch.append((self.wall, self.cpu))
            for name in STEP_HOOKS:
                if name in self.overridden:
                    self.per_hook.setdefault(name, []).append(self._current.get(name, 0.0))
            self.wall = self.cpu = 0.0
            self._current = {}

    overridden: tuple[str, ...] = tuple(h for h in STEP_HOOKS if getattr(GradGuard, h) is not getattr(pl.Callback, h))


def _timed_hook(name: str) -> Any:
    def hook(self: TimedGradGuard, *args: Any) -> None:
        self._timed(name, *args)

    hook.__name__ = name
    return hook


for _name in TimedGradGuard.overridden:
    setattr(TimedGradGuard, _name, _timed_hook(_name))


class ReadFloor(pl.Callback):
    """Not GradGuard: the least a per-parameter gradient check costs at ``on_before_optimizer_step``, timed like
    GradGuard's hooks: read every gradient once (a dot product each) and bring the values to the host in one
    transfer, nothing else. What GradGuard's hooks take above it is its own work; the read itself is memory traffic
    that no check of every gradient on every step avoids."""

    def __init__(self) -> None:
        self.per_batch: list[tuple[float, float]] = []
        self.per_hook: dict[str, list[float]] = {h: [] for h in TimedGradGuard.overridden}
        self._spent = (0.0, 0.0)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        w, c = time.perf_counter(), time.thread_time()
        flat = [p.grad.reshape(-1) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.stack(list(map(torch.dot, flat, flat))).tolist()
        self._spent = (time.perf_counter() - w, time.thread_time() - c)

    def on_train_batch_end(self, *args: Any) -> None:
        self.per_batch.append(self._spent)
        for hook, calls in self.per_hook.items():
            calls.append(self._spent[0] if hook == "on_before_optimizer_step" else 0.0)
        self._spent = (0.0, 0.0)


class TracerClock:
    """The tracer's own time: its ``__torch_function__``, minus the torch functions it forwards to."""

    def __init__(self) -> None:
        self.spent = 0.0

    @contextlib.contextmanager
    def installed(self) -> Iterator[TracerClock]:
        original = Tracer.__torch_function__
        clock = self

        def timed(mode: Tracer, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            inner = 0.0

            @functools.wraps(func)
            def forward(*a: Any, **k: Any) -> Any:
                nonlocal inner
                t = time.perf_counter()
                try:
                    return func(*a, **k)
                finally:
                    inner += time.perf_counter() - t

            start = time.perf_counter()
            try:
                return original(mode, forward, types, args, kwargs)
            finally:
                clock.spent += time.perf_counter() - start - inner

        Tracer.__torch_function__ = timed  # type: ignore[method-assign]
        try:
            yield self
        finally:
            Tracer.__torch_function__ = original  # type: ignore[method-assign]


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (Linux: ``clear_refs`` 5), if allowed."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's peak resident set size since the last reset (``VmHWM``), in MB; NaN where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


FULL_DASHBOARD = {"log_every_n_steps": 1, "norms": "param"}
# name -> (model class, GradGuard kwargs or None, extra callback or None)
CONFIGS: dict[str, tuple[type[TinyLM], dict[str, Any] | None, str | None]] = {
    "no callback": (TinyLM, None, None),
    "Lightning `grad_norm` recipe, every step": (GradNormRecipe, None, None),
    f"GradGuard defaults (dashboard every {TRAINER_LOG_EVERY} steps, the Trainer's)": (TinyLM, {}, None),
    "GradGuard defaults, dashboard every step": (TinyLM, {"log_every_n_steps": 1}, None),
    "GradGuard full dashboard every step (norms='param')": (TinyLM, FULL_DASHBOARD, None),
    "GradGuard full dashboard every step + update_ratio": (TinyLM, {**FULL_DASHBOARD, "update_ratio": True}, None),
    "GradGuard full dashboard every step + value_histograms": (
        TinyLM,
        {**FULL_DASHBOARD, "value_histograms": True},
        None,
    ),
    "GradGuard diagnose='never', no dashboard": (TinyLM, {"diagnose": "never", "log_every_n_steps": 0}, None),
    "reference, not GradGuard: one read of every gradient (a dot each) and one host copy": (TinyLM, None, "floor"),
    "GradGuard diagnose='always' (every step traced), no dashboard": (
        TinyLM,
        {"diagnose": "always", "log_every_n_steps": 0},
        None,
    ),
}
try:
    import wandb  # noqa: F401

    CONFIGS["W&B `watch(log='gradients', log_freq=1)`, offline"] = (TinyLM, None, "wandb")
except ImportError:
    pass


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator=DEVICE,
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def run_once(name: str, steps: int, warmup: int, root: str) -> dict[str, Any]:
    """One run of a configuration: step times, hook times, tracer time (all after ``warmup`` steps), peak RSS."""
    model_cls, guard_kwargs, extra = CONFIGS[name]
    torch.manual_seed(0)
    model = model_cls()
    n = (steps + warmup + 1) * BATCH
    data = torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (n, CONTEXT + 1)))
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    guard: TimedGradGuard | ReadFloor | None = None
    if guard_kwargs is not None:
        guard = TimedGradGuard(**guard_kwargs)
        callbacks.insert(0, guard)
    if extra == "wandb":
        callbacks.insert(0, WandbWatch(root))
    if extra == "floor":
        guard = ReadFloor()  # timed as GradGuard's hooks are
        callbacks.insert(0, guard)
    trainer = quiet_trainer(
        max_steps=steps + warmup + 1,
        logger=TensorBoardLogger(root, name="bench"),
        callbacks=callbacks,
        log_every_n_steps=TRAINER_LOG_EVERY,
    )
    clock = TracerClock()
    reset_peak_rss()
    with clock.installed():
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=BATCH))
    hooks = guard.per_batch[1:][warmup:] if guard is not None else []  # aligned with the timer's intervals
    per_hook = {h: calls[1:][warmup:] for h, calls in guard.per_hook.items()} if guard is not None else {}
    return {
        "steps": timer.steps[warmup:],
        "per_hook": per_hook,
        "hooks_wall": [w for w, _ in hooks],
        "hooks_cpu": [c for _, c in hooks],
        "tracer": clock.spent / (steps + warmup + 1),
        "rss": peak_rss_mb(),
    }


# ------------------------------------------------------------------------------------------------------ scaling
class Stack(pl.LightningModule):
    """``x = x + 0.01 * layer(x)`` over ``n`` layers ``Linear(width, width)`` (2 tensors each); with ``drop > 0``
    each layer is skipped on a step with that probability (LayerDrop: a new set of tensors without a gradient on
    almost every step, idle rather than dead under GradGuard's default ``idle_window``)."""

    def __init__(self, layers: int, width: int, drop: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.drop = drop

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        rng = random.Random(batch_idx)  # the same layers skipped in both arms
        for layer in self.layers:
            if self.drop and rng.random() < self.drop:
                continue
            x = x + 0.01 * layer(x)
        return x.pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-6)


class GradReadClock(pl.Callback):
    """CPU time to read every ``.grad`` once at ``on_before_optimizer_step`` (before anything else reads them):
    creating the Python objects of the gradients that backward made, which the optimizer step otherwise creates."""

    def __init__(self) -> None:
        self.per_step: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        t = time.thread_time()
        grads = [p.grad for p in params]
        self.per_step.append(time.thread_time() - t)
        del grads


def scaling_row(label: str, layers: int, width: int, steps: int, warmup: int, drop: float = 0.0) -> dict[str, Any]:
    batch = 8
    torch.manual_seed(0)
    model = Stack(layers, width, drop)
    params = sum(p.numel() for p in model.parameters())
    data = torch.utils.data.TensorDataset(torch.randn((steps + warmup + 1) * batch, width))
    out: dict[str, Any] = {"label": label, "tensors": 2 * layers, "params": params}
    for arm in ("none", "guard"):
        timer = StepTimer()
        guard = TimedGradGuard(write_report=False) if arm == "guard" else None  # no report file in the cwd
        reader = GradReadClock()
        callbacks: list[pl.Callback] = [timer, reader] if guard is None else [guard, timer]
        trainer = quiet_trainer(max_steps=steps + warmup + 1, logger=False, callbacks=callbacks)
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=batch))
        out[f"step_{arm}"] = statistics.median(timer.steps[warmup:])
        if guard is None:
            out["read_grads"] = statistics.median(reader.per_step[warmup:])
        if guard is not None:
            hooks = guard.per_batch[1:][warmup:]
            out["hooks_wall"] = statistics.median(w for w, _ in hooks)
            out["hooks_cpu"] = statistics.median(c for _, c in hooks)
    return out


SCALING = [  # label, layers, width, timed steps (full run), share of layers skipped per step
    ("10 tensors", 5, 8, 100, 0.0),
    ("100 tensors", 50, 8, 30, 0.0),
    ("1000 tensors", 500, 8, 30, 0.0),
    ("4000 tensors", 2000, 8, 30, 0.0),
    ("4000 tensors, LayerDrop 0.05", 2000, 8, 30, 0.05),
    ("1 M parameters", 4, 512, 20, 0.0),
    ("10 M parameters", 10, 1024, 10, 0.0),
    ("100 M parameters", 24, 2048, 4, 0.0),
]


def hook_table(runs: dict[str, list[dict[str, Any]]], base: list[float]) -> str:
    """Median wall time per step in each of GradGuard's per-batch hooks, per configuration that has GradGuard."""
    hooks = TimedGradGuard.overridden
    lines = [
        "| configuration | " + " | ".join(f"`{h}`, ms" for h in hooks) + " | all, % of the no-callback step |",
        "|---|" + "---:|" * (len(hooks) + 1),
    ]
    step = statistics.median(base) if base else float("nan")
    for name, rs in runs.items():
        if not rs or not rs[0]["per_hook"]:
            continue
        medians = [statistics.median(x for run in rs for x in run["per_hook"][h]) for h in hooks]
        cells = " | ".join(f"{m * 1e3:.3f}" for m in medians)
        lines.append(f"| {name} | {cells} | {sum(medians) / step:.2%} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one linear script
    global VOCAB, WIDTH, LAYERS, HEADS, FF, CONTEXT, BATCH, DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every configuration once")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    parser.add_argument("--no-paired", action="store_true", help="only the scaling table (printed, nothing written)")
    parser.add_argument("--no-100m", action="store_true", help="skip the 100 M-parameter row of the scaling table")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--only", action="append", help="run only the configurations whose name contains this")
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps, one round; print only")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models train")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the results file (default {RESULTS.name})")
    args = parser.parse_args(argv)
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device (torch {torch.__version__})")
    scaling = SCALING if not args.no_100m else SCALING[:-1]
    if args.quick:
        args.steps, args.warmup, args.rounds = 2, 1, 1
        VOCAB, WIDTH, LAYERS, HEADS, FF, CONTEXT, BATCH = SIZES["quick"]
        scaling = [("100 tensors", 50, 8, 2, 0.0), ("100 tensors, LayerDrop 0.1", 50, 8, 2, 0.1)]

    torch.set_num_threads(args.threads)
    if args.only:
        for name in [n for n in CONFIGS if n != "no callback" and not any(o in n for o in args.only)]:
            del CONFIGS[name]
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.ERROR)

    model = TinyLM()
    params, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    rng = random.Random(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for r in range(0 if args.no_paired else args.rounds):
            order = list(CONFIGS)
            rng.shuffle(order)
            for name in order:
                runs[name].append(run_once(name, args.steps, args.warmup, root))
                print(f"round {r + 1}/{args.rounds}: {name}: {statistics.median(runs[name][-1]['steps']) * 1e3:.1f} ms")
    paired_s = time.perf_counter() - start

    if args.no_paired:
        runs = {}
    base = [statistics.median(run["steps"]) for run in runs.get("no callback", [])]
    lines = [
        "| configuration | step (ms) | × no callback (median of paired ratios) | ratio per round "
        "| in GradGuard's hooks, ms wall / CPU | tracer's own, ms | peak RSS (MB) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    summary: dict[str, float] = {}
    for name, rs in runs.items():
        medians = [statistics.median(run["steps"]) for run in rs]
        ratios = [m / b for m, b in zip(medians, base, strict=True)]
        ratio = statistics.median(ratios)
        summary[name] = ratio
        wall = [x for run in rs for x in run["hooks_wall"]]
        cpu = [x for run in rs for x in run["hooks_cpu"]]
        hooks = f"{statistics.median(wall) * 1e3:.2f} / {statistics.median(cpu) * 1e3:.2f}" if wall else "-"
        tracer = statistics.median(run["tracer"] for run in rs) * 1e3
        rss = max(run["rss"] for run in rs)
        lines.append(
            f"| {name} | {statistics.median(medians) * 1e3:.1f} | {ratio:.3f} | "
            f"{', '.join(f'{x:.2f}' for x in ratios)} | {hooks} | {tracer:.2f} | {rss:.0f} |"
        )
    paired = "\n".join(lines)
    per_hook = hook_table(runs, base)
    never = runs.get("GradGuard diagnose='never', no dashboard")
    always = runs.get("GradGuard diagnose='always' (every step traced), no dashboard")
    traced_line = ""
    if never and always:
        traced = statistics.median(
            statistics.median(a["steps"]) / statistics.median(n["steps"]) for a, n in zip(always, never, strict=True)
        )
        traced_line = f"Traced step / untraced step (diagnose='always' / diagnose='never', paired): **{traced:.3f}×**"
    if runs:
        print()
        print(paired)
        print()
        print(per_hook)
        print()
        print(traced_line)

    scale_text = ""
    if not args.no_scaling:
        rows = []
        for label, layers, width, steps, drop in scaling:
            steps = steps if not args.quick else 2
            rows.append(scaling_row(label, layers, width, steps, 1 if args.quick else 3, drop))
            print(f"scaling: {label}: hooks {rows[-1]['hooks_wall'] * 1e3:.2f} ms")
        table = [
            "| model | tensors | parameters | step without GradGuard (ms) | with (ms) | in the hooks, ms wall / CPU "
            "| µs per tensor (CPU) | of which reading `.grad`, ms CPU | share of the step (wall) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            table.append(
                f"| {row['label']} | {row['tensors']} | {row['params'] / 1e6:.2f} M | {row['step_none'] * 1e3:.1f} | "
                f"{row['step_guard'] * 1e3:.1f} | {row['hooks_wall'] * 1e3:.2f} / {row['hooks_cpu'] * 1e3:.2f} | "
                f"{row['hooks_cpu'] * 1e6 / row['tensors']:.2f} | {row['read_grads'] * 1e3:.2f} | "
                f"{row['hooks_wall'] / row['step_none']:.1%} |"
            )
        scale_text = "\n".join(table)
        print()
        print(scale_text)
    elapsed = time.perf_counter() - start
    if args.quick or args.no_paired:
        return 0

    cpu = platform.processor() or platform.machine()
    gpu = f"{torch.cuda.get_device_name()}, " if DEVICE == "cuda" else ""
    env = (
        f"torch {torch.__version__}, lightning {pl.__version__}, Python {platform.python_version()}, {gpu}{cpu}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = "CPU" if DEVICE == "cpu" else f"CUDA ({torch.cuda.get_device_name()}; a step's time ends at a "
    where += "`torch.cuda.synchronize()` in `on_train_batch_end`)" if DEVICE == "cuda" else ""
    args.out.write_text(
        "# GradGuard benchmark\n\n"
        f"Written by `python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip()
        + f" ({elapsed / 60:.1f} min; the paired table "
        f"{paired_s / 60:.1f} min). {env}; load average at the end {load:.1f} (the machine is shared: compare the "
        "ratios per round).\n\n"
        "## Paired table\n\n"
        f"Model: causal transformer LM, {params / 1e6:.2f} M parameters in {tensors} tensors (vocabulary {VOCAB}, "
        f"width {WIDTH}, {LAYERS} layers, batch {BATCH} × {CONTEXT} tokens, AdamW), {where}, `TensorBoardLogger`, "
        f"`Trainer(log_every_n_steps={TRAINER_LOG_EVERY})`. Each of {args.rounds} rounds runs every configuration "
        f"once (shuffled order; {args.steps} timed steps after {args.warmup} warm-up steps). Step: the median "
        "time between consecutive `on_train_batch_end` calls. Ratio: a run's median step over the no-callback run's "
        "median step of the same round; the table gives the median of those ratios. Hooks: median per step of the "
        "time inside GradGuard's hooks, wall clock and CPU time of the training thread (CPU time leaves out the time "
        "the thread waited for a core; TensorBoard's writer thread is not in it); in the *reference* row, the time of "
        "its one hook, which reads every gradient once (a dot product each) and copies the values to the host: the "
        "floor of any check of every gradient on every step. Tracer: its own time per step "
        "inside the forward pass (`Tracer.__torch_function__` minus the ops it forwards). Peak RSS: the process's "
        "`VmHWM`, reset before each run, the largest over rounds.\n\n"
        f"{paired}\n\n"
        "### Where the time in GradGuard's hooks goes\n\n"
        "Median wall time per step inside each of GradGuard's per-batch hooks, per configuration (the hooks that "
        "GradGuard does not override are left out); the last column is the sum of the medians over the no-callback "
        "step of the same rounds.\n\n"
        f"{per_hook}\n\n{traced_line}\n\n"
        "## Scaling\n\n"
        "`GradGuard()` defaults, no logger (so no dashboard: the always-on check alone), on residual stacks "
        "`x = x + 0.01 * Linear(width, width)(x)` (batch 8, SGD): width 8 for the tensor counts, wider for the "
        "parameter counts; the LayerDrop row skips each layer with probability 0.05 on each step (a new set of "
        "tensors without a gradient on almost every step: idle, not findings, under the default `idle_window`). "
        "Medians per step after 3 warm-up steps. *Of which reading `.grad`*: the CPU time of "
        "`[p.grad for p in params]` at the same hook in the run without GradGuard: the first read of a gradient "
        "that backward made creates its Python object, which the optimizer step creates when GradGuard did not, so "
        "that part moves from the optimizer to the hooks rather than adding to the step.\n\n"
        f"{scale_text}\n",
        encoding="utf-8",
    )
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
