"""`benchmarks/run.py --quick` runs every configuration and both tables end to end, `benchmarks/gpu.py` (`make gpu`)
as far as a machine without CUDA lets it (no timing is asserted)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import ROOT, run_python

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402  (benchmarks/gpu.py)


def test_benchmark_quick_mode_runs_every_configuration_and_writes_nothing(tmp_path):
    results = ROOT / "benchmarks" / "results.md"
    before = results.read_bytes() if results.exists() else None
    proc = run_python(str(ROOT / "benchmarks" / "run.py"), "--quick", cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| no callback |", "| Lightning `grad_norm` recipe", "value_histograms |", "diagnose='always'"):
        assert row in out
    assert "Traced step / untraced step" in out
    header = next(line for line in out.splitlines() if "`on_before_optimizer_step`, ms" in line)  # per-hook breakdown
    assert "`on_before_backward`, ms" in header
    assert "`on_train_batch_end`, ms" in header
    assert "| 100 tensors | 100 |" in out  # the scaling table
    assert (results.read_bytes() if results.exists() else None) == before


def test_histogram_benchmark_quick_mode_runs(tmp_path):
    """`benchmarks/histograms.py --quick` (where a logged step's dashboard time goes) runs end to end."""
    proc = run_python(str(ROOT / "benchmarks" / "histograms.py"), "--quick", cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bucket" in proc.stdout.lower(), proc.stdout[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: `make gpu` runs there")
def test_gpu_checks_refuse_a_machine_without_cuda_and_list_every_cuda_test_file(tmp_path):
    out = tmp_path / "gpu.md"
    proc = run_python(str(ROOT / "benchmarks" / "gpu.py"), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stderr
    assert not out.exists()
    proc = run_python(str(ROOT / "benchmarks" / "run.py"), "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--device cuda: no CUDA device" in proc.stderr

    files = gpu.cuda_test_files()
    assert {"tests/test_cuda.py", "tests/test_measure.py", "tests/test_sync_late.py"} <= set(files)
    passed, rows = gpu.run_tests({**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert not passed  # on a CPU machine every one of them skips, and a skip is not a pass there
    assert len(rows) >= 13
    assert all("skipped" in row for row in rows)
