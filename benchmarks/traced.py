"""What a traced step costs next to an untraced one, over the architectures of the real-model sweep (CPU).

For every architecture of ``tests/realmodels`` (its healthy configuration: tiny config, its own loss, AdamW over
``model.parameters()``) one training step (forward, ``record_loss``, backward, GradGuard's check, optimizer step)
is timed through :class:`~lightning_gradguard.core.GuardCore` exactly as the Lightning callback drives it, in three
arms:

* **untraced**: ``diagnose="never"`` (the check, no tracer);
* **traced**: ``diagnose="always"`` (the tracer records every forward op of the step);
* **floor**: the untraced arm with an empty ``TorchFunctionMode`` pushed around the forward pass: what any
  function-mode tracer costs before it does anything.

Each round runs the three arms once each, in a shuffled order, on the same model and batch; a ratio is taken within
the round (traced / untraced, floor / untraced); a model's ratio is the median over rounds. Also per model: the
torch calls the mode sees in one forward pass, and the median step times. ``OMP_NUM_THREADS=1``, one thread.

Then the same for a few architectures compiled by ``torch.compile(model)`` (``--backend``, default ``inductor``),
in three arms on the one compiled model:

* **compiled**: ``diagnose="never"``: the compiled code runs (the step a compiled model takes when not traced);
* **traced**: ``diagnose="always"``: GradGuard runs the compiled code eagerly (``force_eager`` stance) under the tracer;
* **eager**: ``diagnose="never"`` under the ``force_eager`` stance: the eager run alone, without the tracer.

Two compiled steps compile first; the frames compiled in the warm-up and timed rounds after them are counted (they
must be 0: a traced step does not make the next untraced one recompile).

Run from the repository root::

    python benchmarks/traced.py            # every architecture, then 3 compiled (~8 min); prints, writes traced.md
    python benchmarks/traced.py --quick    # a few architectures, one compiled with aot_eager; nothing written
    python benchmarks/traced.py gpt2 bert-cls --rounds 21   # some architectures; nothing written
    python benchmarks/traced.py --profile gpt2              # cProfile of traced steps of one architecture
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from realmodels.zoo import ARCHS, Arch, build  # noqa: E402

from lightning_gradguard.core import GuardCore  # noqa: E402
from lightning_gradguard.policy import Policy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "traced.md"
QUICK = ("bert-cls", "gpt2", "vit")
#: Architectures also timed compiled (inductor builds C++ for each graph: about a minute each here).
COMPILED = QUICK
#: Every finding is a warning (silenced): a model idle by design must not stop the timing.
ALL_WARN = dict.fromkeys(("frozen", "unused", "detached", "orphan", "stale", "nonfinite", "zero"), "warn")
#: Targets of issue 10, item 4.
TARGET_MEDIAN, TARGET_MAX = 1.3, 1.6


class _Empty(TorchFunctionMode):
    """The floor: a function mode that forwards every call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        return func(*args, **kwargs) if kwargs else func(*args)


class _Count(TorchFunctionMode):
    """Counts the torch calls a function mode sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        self.calls += 1
        return func(*args, **kwargs) if kwargs else func(*args)


class Bench:
    """One architecture: its model, batch, optimizer and the two guards (traced and untraced)."""

    #: The arms; ratios are taken to the first.
    arms: tuple[str, ...] = ("untraced", "traced", "floor")

    def __init__(self, arch: Arch) -> None:
        built = build(arch)
        self.model = built.model.train()
        self.batch = built.batch(0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.cores = {"untraced": GuardCore(Policy(ALL_WARN), "never"), "traced": GuardCore(Policy(ALL_WARN), "always")}
        for core in self.cores.values():
            core.bind(self.model)
        self.steps = 0
        gc.collect()
        gc.freeze()  # the models and modules built so far: the collection before each step does not walk them

    def forward(self) -> torch.Tensor:
        return self.model(**self.batch).loss

    def step(self, arm: str) -> float:
        """One training step of ``arm`` (``"untraced"``, ``"traced"`` or ``"floor"``); its CPU time in ms.

        CPU time of this thread (everything runs on it: one intra-op thread, and CPU autograd runs backward on the
        calling thread), not wall time: on a shared machine, time spent descheduled is not the tracer's.
        """
        core = self.cores["traced" if arm == "traced" else "untraced"]
        mode = self.around_forward(arm)
        gc.collect()  # every arm starts from the same heap; collections its own allocations trigger count
        t0 = time.thread_time()
        core.begin_batch()
        with mode:
            loss = self.forward()
        core.record_loss(loss, self.steps)
        core.pause()
        loss.backward()
        core.check(self.params, self.steps, optimizers=[self.opt])
        self.opt.step()
        self.opt.zero_grad()
        core.end_batch()
        ms = (time.thread_time() - t0) * 1e3
        self.steps += 1
        return ms

    def around_forward(self, arm: str) -> contextlib.AbstractContextManager:
        """What the forward pass of ``arm`` runs under (besides the tracer, which the guard itself starts)."""
        return _Empty() if arm == "floor" else contextlib.nullcontext()

    def ops(self) -> int:
        """Torch calls a function mode sees in one forward pass."""
        counter = _Count()
        with counter:
            self.forward()
        return counter.calls


class CompiledBench(Bench):
    """The same architecture compiled, ``torch.compile(model, backend=backend)``; arms ``compiled``, ``traced``,
    ``eager`` (see the module's docstring). ``counter.frame_count``: the frames compiled so far."""

    arms = ("compiled", "traced", "eager")

    def __init__(self, arch: Arch, backend: str) -> None:
        super().__init__(arch)
        self.counter = CompileCounterWithBackend(backend)
        self.model = torch.compile(self.model, backend=self.counter)

    def around_forward(self, arm: str) -> contextlib.AbstractContextManager:
        return torch.compiler.set_stance("force_eager") if arm == "eager" else contextlib.nullcontext()


def paired(bench: Bench, rounds: int, warmup: int, seed: int = 0) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``(step times per arm, median within-round ratio of each other arm to the first)`` after ``warmup`` rounds."""
    arms = list(bench.arms)
    base = arms[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(warmup):
            for arm in arms:
                bench.step(arm)
        rng = random.Random(seed)
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        ratio: dict[str, list[float]] = {arm: [] for arm in arms[1:]}
        for _ in range(rounds):
            rng.shuffle(arms)
            got = {arm: bench.step(arm) for arm in arms}
            for arm, ms in got.items():
                times[arm].append(ms)
            for arm in ratio:
                ratio[arm].append(got[arm] / got[base])
    return times, {arm: statistics.median(r) for arm, r in ratio.items()}


def measure(arch: Arch, rounds: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """The row of one architecture: ops, median times and median within-round ratios."""
    bench = Bench(arch)
    times, ratio = paired(bench, rounds, warmup, seed)
    return {
        "ops": bench.ops(),
        "untraced": statistics.median(times["untraced"]),
        "traced": statistics.median(times["traced"]),
        "ratio": ratio["traced"],
        "floor": ratio["floor"],
    }


def measure_compiled(arch: Arch, backend: str, rounds: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """The compiled row of one architecture: median times, median within-round ratios to the compiled step, and the
    frames compiled after the first two compiled steps (which compile)."""
    bench = CompiledBench(arch, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Two compiled steps compile: a model may change its own state on its first call (transformers sets
        # `config.problem_type`), and recompile once for it, with or without GradGuard. No later step may compile.
        for _ in range(2):
            bench.step("compiled")
    compiled = bench.counter.frame_count
    times, ratio = paired(bench, rounds, warmup, seed)
    return {
        "compiled": statistics.median(times["compiled"]),
        "traced": statistics.median(times["traced"]),
        "eager": statistics.median(times["eager"]),
        "ratio": ratio["traced"],
        "eager_ratio": ratio["eager"],
        "recompiled": bench.counter.frame_count - compiled,
    }


def table(rows: dict[str, dict[str, float]]) -> str:
    """The markdown table, one row per architecture, then the median and max of the ratios."""
    lines = [
        "| architecture | ops / forward | untraced ms | traced ms | traced / untraced | empty mode / untraced |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["ratio"]):
        lines.append(
            f"| {name} | {r['ops']:.0f} | {r['untraced']:.1f} | {r['traced']:.1f} | {r['ratio']:.2f}× | "
            f"{r['floor']:.2f}× |"
        )
    ratios = [r["ratio"] for r in rows.values()]
    floors = [r["floor"] for r in rows.values()]
    lines.append(
        f"| **median** ({len(rows)} architectures) | | | | **{statistics.median(ratios):.2f}×** | "
        f"{statistics.median(floors):.2f}× |"
    )
    lines.append(f"| **max** | | | | **{max(ratios):.2f}×** | {max(floors):.2f}× |")
    return "\n".join(lines)


def verdict(rows: dict[str, dict[str, float]]) -> str:
    ratios = [r["ratio"] for r in rows.values()]
    med, top = statistics.median(ratios), max(ratios)
    ok = "met" if med <= TARGET_MEDIAN and top <= TARGET_MAX else "MISSED"
    return (
        f"Traced step / untraced step: median {med:.2f}× (target ≤ {TARGET_MEDIAN}×), max {top:.2f}× "
        f"(target ≤ {TARGET_MAX}×): {ok}."
    )


def compiled_table(rows: dict[str, dict[str, float]], backend: str) -> str:
    """The markdown table of the compiled architectures, then the median and max of the ratios."""
    lines = [
        f"| architecture (`{backend}`) | compiled ms | traced ms | eager ms | traced / compiled | eager / compiled "
        "| frames recompiled |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["ratio"]):
        lines.append(
            f"| {name} | {r['compiled']:.1f} | {r['traced']:.1f} | {r['eager']:.1f} | {r['ratio']:.2f}× | "
            f"{r['eager_ratio']:.2f}× | {r['recompiled']:.0f} |"
        )
    ratios = [r["ratio"] for r in rows.values()]
    eager = [r["eager_ratio"] for r in rows.values()]
    lines.append(
        f"| **median** ({len(rows)} architecture{'s' if len(rows) != 1 else ''}) | | | | "
        f"**{statistics.median(ratios):.2f}×** | {statistics.median(eager):.2f}× | |"
    )
    lines.append(f"| **max** | | | | **{max(ratios):.2f}×** | {max(eager):.2f}× | |")
    return "\n".join(lines)


def compiled_verdict(rows: dict[str, dict[str, float]]) -> str:
    ratios = [r["ratio"] for r in rows.values()]
    recompiled = sum(int(r["recompiled"]) for r in rows.values())
    return (
        f"Traced step of a compiled model / its compiled (untraced) step: median {statistics.median(ratios):.2f}×, "
        f"max {max(ratios):.2f}×; frames compiled after the first two steps: {recompiled}."
    )


def profile(arch: Arch, steps: int) -> None:
    """cProfile of ``steps`` traced steps of ``arch``, sorted by own time."""
    import cProfile
    import pstats

    bench = Bench(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.step("traced")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            bench.step("traced")
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(names: list[str], rounds: int, warmup: int, log: Callable[[str], None] = _progress) -> Iterator[tuple]:
    by_name = {a.name: a for a in ARCHS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown architectures {unknown}; known: {sorted(by_name)}")
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        try:
            row = measure(by_name[name], rounds, warmup)
        except Exception as err:  # noqa: BLE001 - one architecture that fails is reported, the others still run
            log(f"[{i}/{len(names)}] {name}: FAILED {type(err).__name__}: {err}")
            continue
        log(f"[{i}/{len(names)}] {name}: {row['ratio']:.2f}× ({time.perf_counter() - t0:.1f} s)")
        yield name, row


def run_compiled(
    names: list[str], backend: str, rounds: int, warmup: int, log: Callable[[str], None] = _progress
) -> Iterator[tuple]:
    by_name = {a.name: a for a in ARCHS}
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        try:
            row = measure_compiled(by_name[name], backend, rounds, warmup)
        except Exception as err:  # noqa: BLE001 - one architecture that fails is reported, the others still run
            log(f"[compiled {i}/{len(names)}] {name}: FAILED {type(err).__name__}: {err}")
            continue
        log(f"[compiled {i}/{len(names)}] {name}: {row['ratio']:.2f}× ({time.perf_counter() - t0:.1f} s)")
        yield name, row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/traced.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="architectures (default: every one of the sweep)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {', '.join(QUICK)}, 3 rounds")
    parser.add_argument("--rounds", type=int, default=15, help="paired rounds per architecture (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--profile", metavar="ARCH", help="profile traced steps of one architecture instead")
    parser.add_argument("--out", type=Path, help=f"write the table here (default for a full run: {RESULTS.name})")
    parser.add_argument(
        "--compiled",
        action="append",
        metavar="ARCH",
        help=f"also time this architecture compiled (repeatable; default for a full run: {', '.join(COMPILED)}; "
        "--quick: gpt2)",
    )
    parser.add_argument("--backend", help="torch.compile backend of the compiled part (default inductor; --quick: "
                        "aot_eager)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.profile:
        profile({a.name: a for a in ARCHS}[args.profile], max(args.rounds, 5))
        return 0
    names = list(QUICK) if args.quick else (args.names or [a.name for a in ARCHS])
    rounds, warmup = (3, 1) if args.quick else (args.rounds, args.warmup)
    t0 = time.perf_counter()
    rows = dict(run(names, rounds, warmup))
    text = table(rows)
    print(text)
    print(verdict(rows))
    seconds = time.perf_counter() - t0
    print(f"{len(rows)} architectures, {rounds} rounds each, {seconds:.0f} s", file=sys.stderr)
    compiled_names = args.compiled or (["gpt2"] if args.quick else [] if args.names else list(COMPILED))
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    compiled_rows = dict(run_compiled(compiled_names, backend, rounds, warmup))
    compiled_text = ""
    if compiled_rows:
        compiled_text = f"{compiled_table(compiled_rows, backend)}\n\n{compiled_verdict(compiled_rows)}"
        print()
        print(compiled_text)
    out = args.out or (RESULTS if not (args.quick or args.names or args.compiled) else None)
    if out is not None:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread"
        out.write_text(
            "# Traced step / untraced step over the real-model sweep\n\n"
            f"`python benchmarks/traced.py` ({rounds} paired rounds per architecture, torch {torch.__version__}, "
            f"{machine}, {seconds:.0f} s). A step: forward, backward, GradGuard's check, AdamW, timed in CPU time of "
            "the training thread. Ratios are taken within a round, then the median over rounds; *empty mode* is an "
            "untraced step with an empty `TorchFunctionMode` around the forward pass (the floor of any "
            "function-mode tracer); *ops / forward*: the torch calls a function mode sees in one forward pass.\n\n"
            f"{text}\n\n{verdict(rows)}\n\n"
            "## Compiled models\n\n"
            f"The same step for `torch.compile(model, backend={backend!r})`, {rounds} paired rounds per architecture "
            "after two compiled steps that compile and the warm-up rounds: *compiled* is an untraced step "
            "(`diagnose='never'`: the compiled code runs), *traced* a traced one (GradGuard runs the compiled code "
            "eagerly under its tracer), *eager* an untraced step run eagerly "
            "(`torch.compiler.set_stance('force_eager')` alone); ratios to the compiled step of the same round. "
            "*Frames recompiled*: frames the backend compiled after those two steps (a traced step must not make "
            f"the next untraced step recompile).\n\n{compiled_text}\n",
            encoding="utf-8",
        )
    failed = len(rows) < len(names) or len(compiled_rows) < len(compiled_names)
    recompiled = any(r["recompiled"] for r in compiled_rows.values())
    if recompiled:
        print("frames compiled while timing: a traced step made an untraced one recompile", file=sys.stderr)
    return 1 if failed or recompiled else 0


if __name__ == "__main__":
    sys.exit(main())
