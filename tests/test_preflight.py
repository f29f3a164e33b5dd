"""``gradguard check`` / ``gradguard report`` (``python -m lightning_gradguard``), as subprocesses on the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def gradguard(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return subprocess.run(
        [sys.executable, "-m", "lightning_gradguard", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def check(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    return gradguard(
        tmp_path,
        "check",
        "--config",
        config,
        "--cli",
        "examples/train.py:DemoCLI",
        "--steps",
        "2",
        f"--trainer.default_root_dir={tmp_path / 'logs'}",
        *args,
    )


@pytest.mark.slow
def test_check_clean_config_exits_0(tmp_path: Path) -> None:
    proc = check(tmp_path, "configs/monitoring.yaml")  # bug: none; its 2000 steps cut to 2, its logger off
    assert proc.returncode == 0, proc.stdout
    assert "every parameter received a usable gradient" in proc.stdout
    assert "gradguard check: passed (2 optimizer step(s))" in proc.stdout


@pytest.mark.slow
def test_check_demo_config_exits_1_and_report_prints_it(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = check(tmp_path, "configs/demo.yaml", "--report", str(report))
    assert proc.returncode == 1, proc.stdout
    assert "gradguard check: FAILED" in proc.stdout
    assert "GradGuardError" in proc.stdout
    assert "encoder.0.weight: detached" in proc.stdout
    assert "examples/train.py:" in proc.stdout
    data = json.loads(report.read_text())
    assert {f["param"] for f in data["findings"]} == {"encoder.0.weight", "encoder.0.bias"}

    shown = gradguard(tmp_path, "report", str(report))
    assert shown.returncode == 0, shown.stdout
    assert "GradGuard run report: 2 findings in 1 group" in shown.stdout
    assert "module `encoder` (2 tensors, 544 parameters)" in shown.stdout


@pytest.mark.slow
def test_check_warn_only_config_exits_0_with_findings(tmp_path: Path) -> None:
    proc = check(tmp_path, "configs/lenient.yaml", "--model.bug=frozen")  # every kind warns
    assert proc.returncode == 0, proc.stdout
    assert "encoder.0.weight" in proc.stdout
    assert "frozen" in proc.stdout


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    proc = gradguard(tmp_path, "check", "--config", "configs/demo.yaml", "--cli", "no_such_module_xyz:CLI")
    assert proc.returncode == 2
    assert "no_such_module_xyz" in proc.stdout
    missing = gradguard(tmp_path, "report", str(tmp_path / "missing.json"))
    assert missing.returncode == 2
    assert "missing.json" in missing.stdout


@pytest.mark.slow
def test_check_any_config_with_class_paths_adds_a_guard(tmp_path: Path) -> None:
    """No --cli, no GradGuard in the YAML: plain LightningCLI with `class_path`s, and a default GradGuard."""
    config = tmp_path / "boring.yaml"
    config.write_text(
        "model:\n  class_path: lightning.pytorch.demos.boring_classes.BoringModel\n"
        "data:\n  class_path: lightning.pytorch.demos.boring_classes.BoringDataModule\n"
    )
    proc = gradguard(tmp_path, "check", "--config", str(config), f"--trainer.default_root_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout
    assert "GradGuard: every parameter received a usable gradient." in proc.stdout
    assert "gradguard check: passed (3 optimizer step(s))" in proc.stdout
    assert (tmp_path / "gradguard_report.json").is_file()
