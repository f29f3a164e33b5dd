"""The GPU checks in one command (``make gpu``): every test marked ``cuda``, then the benchmark on the GPU.

For a CUDA machine, not CI (CI has no GPU: there these tests skip). Runs with the interpreter it is started with
and the torch installed there (a CUDA build; ``make gpu`` uses ``python3``, ``GPU_PYTHON=...`` picks another), and
imports this checkout of the package (``PYTHONPATH``), so nothing is installed. Needs pytest, Lightning, TensorBoard
and torchmetrics beside torch; ``jsonargparse`` and ``google-crc32c`` are not needed.

1. ``pytest -m cuda`` over the test files that hold such tests (a skip counts as a failure here: on a CUDA machine
   every one of them must run).
2. ``benchmarks/run.py --device cuda`` (3 rounds; its results file beside this one's).

Writes ``benchmarks/gpu-results.md`` (``--out``): the machine, each test's outcome and time, the benchmark tables.
Exit status 0 only if every test passed and the benchmark ran. About 5 minutes on an H100.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "gpu-results.md"


def environment() -> str:
    import lightning
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (
        f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {lightning.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )


def cuda_test_files() -> list[str]:
    """The test files that hold tests marked ``cuda`` (only these are collected: the others may need packages that a
    GPU image lacks, such as ``jsonargparse``)."""
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.cuda" in p.read_text()
    )


def run_tests(env: dict[str, str], timeout: float) -> tuple[bool, list[str]]:
    """``pytest -m cuda``: (all passed and none skipped, one table row per test)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-ra", f"--junitxml={xml}"]
        proc = subprocess.run([*cmd, *cuda_test_files()], cwd=ROOT, env=env, timeout=timeout, check=False)
        if not xml.exists():
            return False, [f"| (pytest exited {proc.returncode} before writing results) | error | |"]
        rows, ok = [], proc.returncode == 0
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    message = (found.get("message") or "").strip().splitlines()
                    outcome = f"{tag}: {message[0][:100]}" if message else tag
                    ok = False
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            rows.append(f"| `{name}` | {outcome} | {float(case.get('time', 0)):.1f} |")
        return ok and bool(rows), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the results file (default {OUT.name})")
    parser.add_argument("--rounds", type=int, default=3, help="benchmark rounds (default 3)")
    parser.add_argument("--no-bench", action="store_true", help="the tests only")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"make gpu needs a CUDA device: torch {torch.__version__} sees none", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    print(f"== {environment()}", flush=True)
    print(f"== pytest -m cuda {' '.join(cuda_test_files())}", flush=True)
    passed, rows = run_tests(env, timeout=420)
    tests_s = time.perf_counter() - start

    bench_ok, bench = True, "(not run: --no-bench)"
    if not args.no_bench:
        bench_file = args.out.with_name(args.out.stem + "-bench.md")
        cmd = [sys.executable, "benchmarks/run.py", "--device", "cuda", "--rounds", str(args.rounds)]
        print(f"== {' '.join(cmd)} --out {bench_file}", flush=True)
        try:
            proc = subprocess.run([*cmd, "--out", str(bench_file)], cwd=ROOT, env=env, timeout=420, check=False)
            bench_ok = proc.returncode == 0 and bench_file.exists()
        except subprocess.TimeoutExpired:
            bench_ok = False
        bench = bench_file.read_text(encoding="utf-8") if bench_ok else "(the benchmark failed: see its output)"
        bench = bench.replace("# GradGuard benchmark\n", "", 1).replace("\n## ", "\n### ")

    args.out.write_text(
        "# GradGuard on a GPU\n\n"
        f"Written by `python benchmarks/gpu.py` (`make gpu`) in {(time.perf_counter() - start) / 60:.1f} min on: "
        f"{environment()}.\n\n"
        f"## Tests marked `cuda` ({tests_s:.0f} s): {'all passed' if passed else 'NOT ALL PASSED'}\n\n"
        "| test | outcome | s |\n|---|---|---:|\n" + "\n".join(rows) + "\n\n"
        "## Benchmark (`benchmarks/run.py --device cuda`)\n\n" + bench + "\n",
        encoding="utf-8",
    )
    verdict = f"tests {'passed' if passed else 'FAILED'}, benchmark {'ran' if bench_ok else 'FAILED'}"
    print(f"\nwritten to {args.out}: {verdict}")
    return 0 if passed and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
