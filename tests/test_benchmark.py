"""`benchmarks/run.py --quick` runs every configuration and both tables end to end (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_mode_runs_every_configuration_and_writes_nothing(tmp_path):
    results = ROOT / "benchmarks" / "results.md"
    before = results.read_bytes() if results.exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| no callback |", "| Lightning `grad_norm` recipe", "value_histograms |", "diagnose='always'"):
        assert row in out
    assert "Traced step / untraced step" in out
    assert "| 100 tensors | 100 |" in out  # the scaling table
    assert (results.read_bytes() if results.exists() else None) == before


def test_histogram_benchmark_quick_mode_runs(tmp_path):
    """`benchmarks/histograms.py --quick` (where a logged step's dashboard time goes) runs end to end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "histograms.py"), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bucket" in proc.stdout.lower(), proc.stdout[-2000:]
