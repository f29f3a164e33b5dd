"""`benchmarks/run.py --quick` runs every configuration and both tables end to end (no timing is asserted)."""

from __future__ import annotations

from conftest import ROOT, run_python


def test_benchmark_quick_mode_runs_every_configuration_and_writes_nothing(tmp_path):
    results = ROOT / "benchmarks" / "results.md"
    before = results.read_bytes() if results.exists() else None
    proc = run_python(str(ROOT / "benchmarks" / "run.py"), "--quick", cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| no callback |", "| Lightning `grad_norm` recipe", "value_histograms |", "diagnose='always'"):
        assert row in out
    assert "Traced step / untraced step" in out
    assert "| 100 tensors | 100 |" in out  # the scaling table
    assert (results.read_bytes() if results.exists() else None) == before


def test_histogram_benchmark_quick_mode_runs(tmp_path):
    """`benchmarks/histograms.py --quick` (where a logged step's dashboard time goes) runs end to end."""
    proc = run_python(str(ROOT / "benchmarks" / "histograms.py"), "--quick", cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bucket" in proc.stdout.lower(), proc.stdout[-2000:]
