"""``gradguard check`` / ``gradguard report`` (``python -m lightning_gradguard``), as subprocesses on the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_python

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
    """`gradguard check` of the demo script, in the README's form (`--cli examples/train.py`)."""
    return gradguard(
        tmp_path,
        "check",
        "--config",
        config,
        "--cli",
        "examples/train.py",
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
    # LightningCLI parses the check's arguments, not `gradguard check ...`: Lightning's warning about getting both
    assert "args parameter is intended" not in proc.stdout


@pytest.mark.slow
def test_a_script_named_without_cli_is_a_usage_error_that_says_cli(tmp_path: Path) -> None:
    proc = gradguard(tmp_path, "check", "--config", "configs/demo.yaml", "examples/train.py")
    assert proc.returncode == 2, proc.stdout
    assert "gradguard: error: 'examples/train.py': name the script with `--cli examples/train.py`" in proc.stdout


def test_a_py_file_given_as_an_options_value_is_not_taken_for_a_script(tmp_path: Path, monkeypatch) -> None:
    from lightning_gradguard import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.py").write_text("")
    cli._refuse_a_bare_script(["--model.source", "x.py"])  # the value of `--model.source`
    with pytest.raises(cli.UsageError, match="--cli x.py"):
        cli._refuse_a_bare_script(["--model.source=a.py", "x.py"])


# ---------------------------------------------------------------------------------------------------------------------
# `--cli` on the usual LightningCLI scripts: each builds its CLI its own way, and the check runs that construction.
# The YAML sets `model.bug`, an option only the script's `Net` knows: exit 1 with the planted detach proves that the
# script's classes got the YAML, and that the check (not training) ran. `validation_step` raises: no validation runs.

PROJECT = """
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(LightningModule):
    def __init__(self, bug: str = "none", hidden: int = 8, num_classes: int = 2) -> None:
        super().__init__()
        if bug == "crash_init":
            raise ValueError("planted crash in __init__")
        self.bug = bug
        self.body = nn.Linear(4, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.body(x)
        if self.bug == "detach":
            h = h.detach()  # BUG: preflight detach
        if self.bug == "crash" and batch_idx == 1:
            raise ValueError("planted crash on the second batch")
        loss = nn.functional.cross_entropy(self.head(h), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        raise AssertionError("validation ran during the check")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(LightningDataModule):
    def __init__(self, batch_size: int = 4, num_classes: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_classes = num_classes

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 4, generator=g), torch.randint(0, self.num_classes, (32,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

    val_dataloader = train_dataloader
"""

HEAD = "from lightning.pytorch.cli import LightningCLI\nfrom proj import Data, Net\n"

#: name -> (files besides proj.py, the --cli argument, the YAML). `{bug}` is the planted bug.
PATTERNS: dict[str, tuple[dict[str, str], str, str]] = {
    "module_level": (
        {"train.py": HEAD + 'if __name__ == "__main__":\n    cli = LightningCLI(Net, Data)\n'},
        "train.py",
        "model:\n  bug: {bug}\n",
    ),
    "subclass_with_classes_in_the_script": (  # the issue: `MyCLI` alone does not know `Net`
        {
            "train.py": HEAD
            + 'class MyCLI(LightningCLI):\n    pass\n\nif __name__ == "__main__":\n    MyCLI(Net, Data)\n'
        },
        "train.py:MyCLI",
        "model:\n  bug: {bug}\n",
    ),
    "main_function": (
        {
            "train.py": HEAD
            + "def main(args=None):\n    LightningCLI(Net, Data, args=args, seed_everything_default=7, "
            'parser_kwargs={"default_env": True}, save_config_kwargs={"overwrite": True})\n\n'
            'if __name__ == "__main__":\n    main()\n'
        },
        "train.py:main",
        "model:\n  bug: {bug}\n",
    ),
    "function_in_a_module_without_main_block": (
        {"cli_lib.py": HEAD + "def cli_main():\n    LightningCLI(Net, Data)\n"},
        "cli_lib.py:cli_main",
        "model:\n  bug: {bug}\n",
    ),
    "run_false_then_fit": (
        {
            "train.py": HEAD + "from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint\n\n"
            "cli = LightningCLI(Net, Data, run=False, trainer_defaults={'callbacks': [ModelCheckpoint(dirpath='ckpts', "
            "save_last=True), LearningRateMonitor()]})\n"
            "cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path='missing.ckpt')\n"
            "print('AFTER FIT')\ncli.trainer.test(cli.model, datamodule=cli.datamodule)\n"
        },
        "train.py",
        "model:\n  bug: {bug}\n",
    ),
    "subclass_mode_model": (
        {"train.py": HEAD + 'if __name__ == "__main__":\n    LightningCLI(Net, Data, subclass_mode_model=True)\n'},
        "train.py",
        "model:\n  class_path: proj.Net\n  init_args:\n    bug: {bug}\n",
    ),
    "no_classes_at_all": (
        {"train.py": HEAD + 'if __name__ == "__main__":\n    LightningCLI()\n'},
        "train.py",
        "model:\n  class_path: proj.Net\n  init_args:\n    bug: {bug}\ndata:\n  class_path: proj.Data\n",
    ),
    "links_callbacks_and_ckpt_path_in_the_yaml": (
        {
            "train.py": HEAD + "class MyCLI(LightningCLI):\n"
            "    def add_arguments_to_parser(self, parser):\n"
            "        parser.link_arguments('data.num_classes', 'model.num_classes')\n\n"
            'if __name__ == "__main__":\n    MyCLI(Net, Data, trainer_defaults={"max_epochs": 100})\n'
        },
        "train.py:MyCLI",
        "model:\n  bug: {bug}\ndata:\n  num_classes: 3\nckpt_path: missing.ckpt\ntrainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args: {{dirpath: ckpts}}\n"
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
        "    - class_path: lightning.pytorch.callbacks.RichProgressBar\n"
        "  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n    init_args: {{save_dir: csv_logs}}\n",
    ),
    "package_module_with_relative_imports": (
        {
            "pkg/__init__.py": "",
            "pkg/cli.py": "from lightning.pytorch.cli import LightningCLI\nfrom .model import Data, Net\n\n"
            'if __name__ == "__main__":\n    LightningCLI(Net, Data)\n',
            "pkg/model.py": "from proj import Data, Net\n",
        },
        "pkg.cli",
        "model:\n  bug: {bug}\n",
    ),
}


def write_project(tmp_path: Path, files: dict[str, str], config: str, bug: str) -> None:
    (tmp_path / "proj.py").write_text(PROJECT)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "base.yaml").write_text(config.format(bug=bug))


def check_in(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python("-m", "lightning_gradguard", "check", "--config", "base.yaml", *args, cwd=tmp_path,
                      timeout=TIMEOUT_S, PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_check_runs_the_scripts_own_cli(tmp_path: Path, pattern: str) -> None:
    files, spec, config = PATTERNS[pattern]
    write_project(tmp_path, files, config, bug="detach")
    proc = check_in(tmp_path, "--cli", spec, "--steps", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"gradguard check: 2 optimizer step(s) of base.yaml through {spec}, every step traced" in out
    assert "body.weight: detached" in out
    assert f"proj.py:{PROJECT.splitlines().index('            h = h.detach()  # BUG: preflight detach') + 1}" in out
    assert "gradguard check: FAILED" in out
    assert "AFTER FIT" not in out  # the check unwinds the script: nothing after its `fit` runs
    # The check writes its report, and nothing else of a training run: no checkpoint, logs or saved config.
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"gradguard_report.json"} == written - {"base.yaml", "proj.py", *files} - {
        p for p in written if "__pycache__" in p
    }, out


@pytest.mark.slow
def test_check_of_a_clean_script_exits_0_and_drops_ckpt_path(tmp_path: Path) -> None:
    files, spec, config = PATTERNS["links_callbacks_and_ckpt_path_in_the_yaml"]
    write_project(tmp_path, files, config, bug="none")
    proc = check_in(tmp_path, "--cli", spec, "--steps", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "gradguard check: ckpt_path='missing.ckpt' is not restored: the check runs the model as built" in out
    assert "gradguard check: passed (2 optimizer step(s))" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bug", "script", "when"),
    [
        ("crash", HEAD + 'if __name__ == "__main__":\n    LightningCLI(Net, Data)\n', "on optimizer step 1"),
        # the script's own `except Exception` neither hides the crash nor turns it into a usage error
        (
            "crash",
            HEAD + "try:\n    LightningCLI(Net, Data)\nexcept Exception:\n    print('CAUGHT')\n",
            "on optimizer step 1",
        ),
        (
            "crash_init",
            HEAD + 'if __name__ == "__main__":\n    LightningCLI(Net, Data)\n',
            "while building the model, data and Trainer",
        ),
    ],
    ids=["in_training_step", "script_catches_exceptions", "in_model_init"],
)
def test_a_crash_of_the_users_code_exits_3_with_its_traceback(tmp_path: Path, bug: str, script: str, when: str):
    """Exit 1 means "a finding": a script that raises must not look like one (nor like a pass, nor bad usage)."""
    write_project(tmp_path, {"train.py": script}, "model:\n  bug: {bug}\n", bug=bug)
    proc = check_in(tmp_path, "--cli", "train.py", "--steps", "3")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: planted crash" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"gradguard check: ERROR: your code raised ValueError {when} (traceback above): no verdict; fix "
                    "it and run the check again."), proc.stderr  # fmt: skip
    assert "CAUGHT" not in proc.stdout
    assert "gradguard check: passed" not in proc.stdout
    assert "FAILED" not in proc.stdout


def usage_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines from `gradguard: error:` on: the usage error, as the user sees it."""
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("gradguard: error:")]
    assert starts, proc.stdout + proc.stderr
    return lines[starts[0] :]


@pytest.mark.slow
def test_a_rejected_config_is_a_short_usage_error(tmp_path: Path) -> None:
    files, spec, _ = PATTERNS["module_level"]
    write_project(tmp_path, files, "model:\n  bug: detach\n  hiden: 8\n", bug="")
    proc = check_in(tmp_path, "--cli", spec)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = usage_lines(proc)
    assert lines[0].startswith("gradguard: error: LightningCLI (built by train.py) rejects the configuration:")
    assert "hiden" in "\n".join(lines)
    assert len(lines) <= 3, lines
    assert "usage:" not in proc.stderr  # not the whole usage of the CLI


@pytest.mark.slow
def test_a_cli_that_does_not_know_the_model_says_what_to_do(tmp_path: Path) -> None:
    """The issue's case as a module that only defines the class: `MyCLI()` knows no `Net`."""
    write_project(tmp_path, {"cli_lib.py": HEAD + "class MyCLI(LightningCLI):\n    pass\n"}, "model:\n  bug: x\n", "")
    proc = check_in(tmp_path, "--cli", "cli_lib.py:MyCLI")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = "\n".join(usage_lines(proc))
    assert "MyCLI (built by cli_lib.py:MyCLI) rejects the configuration" in text
    assert "MyCLI was built without a model class, so the YAML's `model:` needs a `class_path`" in text
    assert "usage:" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("import proj\n", "train.py built no LightningCLI. Name what builds it: `--cli train.py:main`"),
        (
            HEAD + "cli = LightningCLI(Net, Data, run=False)\n",
            "train.py built LightningCLI but never called `trainer.fit`: with `run=False`, call",
        ),
        (
            "from lightning.pytorch import Trainer\nfrom proj import Data, Net\n"
            "Trainer(max_steps=1000, logger=False).fit(Net(), datamodule=Data())\n",
            "train.py calls `fit` on a Trainer that no LightningCLI built",
        ),
    ],
    ids=["no_cli", "never_fits", "own_trainer"],
)
def test_a_script_the_check_cannot_run_is_a_usage_error(tmp_path: Path, script: str, message: str) -> None:
    write_project(tmp_path, {"train.py": script}, "model:\n  bug: none\n", bug="")
    proc = check_in(tmp_path, "--cli", "train.py")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = usage_lines(proc)
    assert message in lines[0]
    assert len(lines) == 1, lines
    assert "Epoch" not in proc.stdout  # the script's own Trainer did not train


@pytest.mark.slow
def test_check_with_a_yaml_guard_and_a_command_line_guard_reports_once(tmp_path: Path) -> None:
    """demo.yaml's GradGuard has the default options; the one added on the command line has one of its own, so it
    is the one kept (chosen before the check sets `diagnose` on it)."""
    proc = check(tmp_path, "configs/demo.yaml", "--trainer.callbacks+=GradGuard", "--trainer.callbacks.on_zero=ignore")
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout.count("2 GradGuard callbacks: only GradGuard(on_zero='ignore') runs") == 1
    assert proc.stdout.count("GradGuard run report") == 1
    assert proc.stdout.count("GradGuardError: ") == 1


@pytest.mark.slow
def test_a_multi_device_config_is_a_usage_error_and_one_device_runs(tmp_path: Path) -> None:
    """Lightning's launcher would start the script again for rank 1, outside the check (which killed the run)."""
    files, spec, config = PATTERNS["module_level"]
    write_project(tmp_path, files, config, bug="none")
    devices = ("--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2")
    proc = check_in(tmp_path, "--cli", spec, "--steps", "1", *devices)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = usage_lines(proc)
    assert "train.py's Trainer runs 2 processes (2 device(s) x 1 node(s)); the check runs in this one" in line
    assert line.endswith("add `--trainer.devices=1` (and `--trainer.num_nodes=1`).")
    proc = check_in(tmp_path, "--cli", spec, "--steps", "1", *devices, "--trainer.devices=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
