"""GradGuard through LightningCLI: the YAML configs, command-line overrides, ``--help``, and the demo script.

Real LightningCLI, real Trainer, CPU. The demo module ``examples/train.py`` is loaded from its path.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, get_args, get_type_hints

import pytest
import yaml
from docstring_parser import parse as parse_docstring
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from conftest import make_trainer
from lightning_gradguard import GradGuard, GradGuardError

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "examples" / "train.py"
DEMO_YAML = REPO / "configs" / "demo.yaml"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DEMO_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    """``examples/train.py`` as a module (registered in ``sys.modules`` so jsonargparse can resolve its hints)."""
    name = "gradguard_examples_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TRAIN_PY)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(autouse=True)
def _wide_help_and_scratch_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # argparse wraps help at $COLUMNS (and may break words at hyphens): keep each doc line on one line.
    monkeypatch.setenv("COLUMNS", "1000")
    # LightningCLI(args=...) warns when sys.argv also holds arguments (pytest's own).
    monkeypatch.setattr(sys, "argv", ["train.py"])
    # Whatever a config writes relative to the working directory lands in the test's scratch folder.
    monkeypatch.chdir(tmp_path)


def make_cli(demo: ModuleType, tmp_path: Path, *args: str) -> LightningCLI:
    """Parse ``args`` (``--config`` first, overrides after) and instantiate model, data and trainer."""
    return LightningCLI(
        demo.DemoModel,
        demo.DemoData,
        run=False,
        save_config_kwargs={"overwrite": True},
        args=[*args, f"--trainer.default_root_dir={tmp_path / 'logs'}"],
    )


def guards_of(trainer: Trainer) -> list[GradGuard]:
    return [cb for cb in trainer.callbacks if isinstance(cb, GradGuard)]


def gradguard_entries(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``trainer.callbacks`` entries of a parsed YAML whose class is GradGuard, in order."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    return [cb for cb in callbacks if str(cb.get("class_path", "")).rsplit(".", 1)[-1] == "GradGuard"]


def plain(value: Any) -> Any:
    """Compare sequences by their items: ``ignore: []`` may be kept as a list or a tuple."""
    return list(value) if isinstance(value, (list, tuple)) else value


def write_demo_yaml(tmp_path: Path, **init_args: Any) -> Path:
    """A copy of configs/demo.yaml with the GradGuard ``init_args`` updated."""
    config = yaml.safe_load(DEMO_YAML.read_text())
    (entry,) = gradguard_entries(config)
    entry.setdefault("init_args", {}).update(init_args)
    path = tmp_path / "demo_modified.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bug_line(bug: str) -> int:
    """1-based line number of the ``# BUG: <bug>`` marker in examples/train.py."""
    lines = [i for i, line in enumerate(TRAIN_PY.read_text().splitlines(), 1) if f"# BUG: {bug} " in line]
    assert len(lines) == 1, f"expected one `# BUG: {bug}` marker in {TRAIN_PY}, found lines {lines}"
    return lines[0]


def findings_section(output: str) -> list[str]:
    """The finding lines examples/train.py prints between its ``== GradGuard findings`` header and footer."""
    match = re.search(
        r"^== GradGuard findings \((\d+) guard\(s\)\) ==\n(.*?)^== (?:no findings|\d+ finding\(s\)) ==$",
        output,
        re.MULTILINE | re.DOTALL,
    )
    assert match is not None, f"no findings summary in the demo output:\n{output}"
    assert int(match.group(1)) >= 1, "the demo's trainer has no GradGuard callback"
    return [line for line in match.group(2).splitlines() if line and not line.startswith(" ")]


# ---------------------------------------------------------------------------------------------------------------------
# configs/*.yaml


def test_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "strict.yaml", "lenient.yaml"} <= names


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_sets_gradguard_attributes(demo: ModuleType, tmp_path: Path, config_path: Path) -> None:
    entries = gradguard_entries(yaml.safe_load(config_path.read_text()))
    assert entries, f"{config_path.name} configures no GradGuard under trainer.callbacks"

    cli = make_cli(demo, tmp_path, "--config", str(config_path))

    guards = guards_of(cli.trainer)
    assert len(guards) == len(entries)
    for guard, entry in zip(guards, entries, strict=True):
        for name, value in (entry.get("init_args") or {}).items():
            assert plain(getattr(guard, name)) == plain(value), f"{config_path.name}: GradGuard.{name}"


def test_strict_config_raises_on_every_kind(demo: ModuleType, tmp_path: Path) -> None:
    (guard,) = guards_of(make_cli(demo, tmp_path, "--config", str(REPO / "configs" / "strict.yaml")).trainer)
    on_args = [name for name in inspect.signature(GradGuard).parameters if name.startswith("on_")]
    assert on_args
    assert {name: getattr(guard, name) for name in on_args} == dict.fromkeys(on_args, "raise")


def test_lenient_config_warns_on_every_kind_and_ignores_aux(demo: ModuleType, tmp_path: Path) -> None:
    (guard,) = guards_of(make_cli(demo, tmp_path, "--config", str(REPO / "configs" / "lenient.yaml")).trainer)
    on_args = [name for name in inspect.signature(GradGuard).parameters if name.startswith("on_")]
    assert {name: getattr(guard, name) for name in on_args} == dict.fromkeys(on_args, "warn")
    assert plain(guard.ignore) == ["aux.*"]


# ---------------------------------------------------------------------------------------------------------------------
# Overrides


@pytest.mark.parametrize(
    "override",
    ["--trainer.callbacks.init_args.on_unused=warn", "--trainer.callbacks.on_unused=warn"],
)
def test_cli_override_on_unused_from_command_line(demo: ModuleType, tmp_path: Path, override: str) -> None:
    (guard,) = guards_of(make_cli(demo, tmp_path, "--config", str(DEMO_YAML), override).trainer)
    assert guard.on_unused == "warn"
    # The rest of the YAML's init_args survive the override.
    assert guard.on_detached == "raise"
    assert guard.on_frozen == "warn"


def test_cli_override_on_unused_from_yaml(demo: ModuleType, tmp_path: Path) -> None:
    path = write_demo_yaml(tmp_path, on_unused="warn", ignore=["aux.*", "head.bias"])
    (guard,) = guards_of(make_cli(demo, tmp_path, "--config", str(path)).trainer)
    assert guard.on_unused == "warn"
    assert plain(guard.ignore) == ["aux.*", "head.bias"]


def test_cli_defaults_without_init_args(demo: ModuleType, tmp_path: Path) -> None:
    cli = make_cli(demo, tmp_path, "--trainer.callbacks+=lightning_gradguard.GradGuard")
    (guard,) = guards_of(cli.trainer)
    for name, param in inspect.signature(GradGuard).parameters.items():
        if name == "ignore":  # `None` may be kept as an empty sequence
            assert list(guard.ignore or []) == list(param.default or [])
        else:
            assert getattr(guard, name) == param.default, f"GradGuard.{name}"


@pytest.mark.parametrize(
    "how",
    ["yaml", "command_line"],
)
def test_cli_rejects_invalid_action(demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture, how: str) -> None:
    args = (
        ["--config", str(write_demo_yaml(tmp_path, on_unused="explode"))]
        if how == "yaml"
        else ["--config", str(DEMO_YAML), "--trainer.callbacks.on_unused=explode"]
    )
    with pytest.raises(SystemExit) as exc_info:
        make_cli(demo, tmp_path, *args)
    assert exc_info.value.code != 0
    err = capsys.readouterr().err
    assert "on_unused" in err
    assert "explode" in err
    assert "'raise', 'warn', 'ignore'" in err  # the allowed values are named


# ---------------------------------------------------------------------------------------------------------------------
# --help


def run_main(demo: ModuleType, capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exc_info:
        demo.main(list(args))
    assert exc_info.value.code in (0, None)
    return capsys.readouterr().out


def squash(text: str) -> str:
    return " ".join(text.split())


def test_help_lists_gradguard_as_callback(demo: ModuleType, capsys: pytest.CaptureFixture) -> None:
    out = run_main(demo, capsys, "fit", "--help")
    assert "--trainer.callbacks.help" in out
    assert "lightning_gradguard.GradGuard" in out


@pytest.mark.parametrize("class_name", ["GradGuard", "lightning_gradguard.GradGuard"])
def test_help_shows_every_gradguard_option_with_its_doc(
    demo: ModuleType, capsys: pytest.CaptureFixture, class_name: str
) -> None:
    out = squash(run_main(demo, capsys, "fit", "--trainer.callbacks.help", class_name))

    docs = {p.arg_name: p.description for p in parse_docstring(inspect.getdoc(GradGuard) or "").params}
    params = list(inspect.signature(GradGuard).parameters)
    assert {"on_unused", "on_detached", "ignore"} <= set(params)
    for name in params:
        assert f"--trainer.callbacks.{name}" in out
        assert docs.get(name), f"GradGuard's docstring has no `Args:` entry for {name!r}"
        assert squash(docs[name]) in out, f"help for {name!r} lacks its doc line"
    actions = get_args(get_type_hints(GradGuard.__init__)["on_unused"])
    assert set(actions) == {"raise", "warn", "ignore"}
    assert "{raise,warn,ignore}" in out


# ---------------------------------------------------------------------------------------------------------------------
# The demo model's bugs, in process: each is reported as the kind the `Args:` of DemoModel promises.

EXPECTED = {
    "frozen": ("frozen", "encoder.0.weight"),
    "detach": ("detached", "encoder.0."),
    "data": ("detached", "encoder.0."),
    "numpy": ("detached", "encoder.0."),
    "no_grad": ("detached", "encoder.0."),
    "argmax": ("detached", "encoder.0."),
    "item": ("detached", "aux."),
    "unused": ("unused", "aux."),
    "orphan": ("orphan", "head."),
    "stale": ("stale", ""),
}


def test_demo_marks_each_bug_on_one_line(demo: ModuleType) -> None:
    bugs = get_args(get_type_hints(demo.DemoModel.__init__)["bug"])
    assert set(bugs) == {"none", *EXPECTED}
    for bug in EXPECTED:
        bug_line(bug)


@pytest.mark.filterwarnings("ignore::lightning_gradguard.GradGuardWarning")
@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_demo_bug_is_reported(demo: ModuleType, tmp_path: Path, bug: str) -> None:
    guard = GradGuard(**{name: "warn" for name in inspect.signature(GradGuard).parameters if name.startswith("on_")})
    trainer = make_trainer(tmp_path, [guard], max_steps=2)
    trainer.fit(demo.DemoModel(bug=bug), datamodule=demo.DemoData(num_samples=64))

    kind, prefix = EXPECTED[bug]
    hits = [f for f in guard.findings if f.kind == kind and f.param.startswith(prefix)]
    assert hits, f"bug={bug}: no {kind!r} finding for {prefix or 'any'}* in {guard.findings}"


def test_demo_without_bug_has_no_findings(demo: ModuleType, tmp_path: Path) -> None:
    guard = GradGuard(**{name: "raise" for name in inspect.signature(GradGuard).parameters if name.startswith("on_")})
    trainer = make_trainer(tmp_path, [guard], max_steps=4)
    trainer.fit(demo.DemoModel(bug="none"), datamodule=demo.DemoData(num_samples=64))
    assert trainer.global_step == 4
    assert guard.findings == []


# ---------------------------------------------------------------------------------------------------------------------
# The demo end to end: `python examples/train.py fit --config configs/demo.yaml`


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "examples/train.py",
            "fit",
            "--config",
            "configs/demo.yaml",
            *args,
            f"--trainer.default_root_dir={tmp_path / 'logs'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )


@pytest.mark.slow
def test_demo_script_reports_detach_line(tmp_path: Path) -> None:
    proc = run_demo(tmp_path, "--model.bug=detach")
    out = proc.stdout
    assert proc.returncode == 0, out
    assert GradGuardError.__name__ in out  # demo.yaml raises on detached parameters
    line = bug_line("detach")
    rows = findings_section(out)
    pattern = re.compile(rf"^detached\s+encoder\.0\.(weight|bias)\s+\S*train\.py:{line}$")
    assert any(pattern.match(row.rstrip()) for row in rows), f"no detached row pointing at train.py:{line}:\n{out}"


@pytest.mark.slow
def test_demo_script_without_bug_trains_cleanly(tmp_path: Path) -> None:
    proc = run_demo(tmp_path, "--model.bug=none")
    out = proc.stdout
    assert proc.returncode == 0, out
    assert findings_section(out) == []
    assert "== no findings ==" in out
    assert GradGuardError.__name__ not in out
    assert "max_steps=20" in out  # trained to the end


# ---------------------------------------------------------------------------------------------------------------------
# Short names in any user's LightningCLI script: the script imports `lightning_gradguard` but never names GradGuard.

SHORT_NAME_SCRIPT = """
import contextlib, io, sys
{imports}
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

def callbacks(*args):
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=[*args, "--trainer.logger=false"])
    return [type(c).__name__ for c in cli.trainer.callbacks]

print("plus", callbacks("--trainer.callbacks+=GradGuard"))
print("yaml", callbacks("--config", sys.argv[1]))
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    LightningCLI(BoringModel, BoringDataModule, run=False, args=["--trainer.callbacks.help", "GradGuard"])
print("help", "--trainer.callbacks.on_unused" in out.getvalue())
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import lightning_gradguard\nfrom lightning.pytorch.cli import LightningCLI",
        "from lightning.pytorch.cli import LightningCLI\nimport lightning_gradguard",
    ],
    ids=["package_first", "lightning_first"],
)
def test_short_name_resolves_in_a_fresh_script(tmp_path: Path, imports: str) -> None:
    """The choice: `import lightning_gradguard` alone never imports Lightning (tests/test_check_step.py checks that
    `check_step` keeps it out); GradGuard is imported right after `lightning.pytorch.cli` is (import hook), or at once
    when Lightning is already loaded, so the parser built afterwards knows the short name in either import order."""
    script = tmp_path / "user_train.py"
    script.write_text(SHORT_NAME_SCRIPT.format(imports=imports))
    config = tmp_path / "short.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: GradGuard\n      init_args:\n        on_zero: ignore\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(
        line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in {"plus", "yaml", "help"}
    )
    assert "'GradGuard'" in lines["plus"], proc.stdout
    assert "'GradGuard'" in lines["yaml"], proc.stdout
    assert lines["help"] == "True", proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Overrides when GradGuard is not the last callback, and `ignore` as one string


def write_two_callbacks_yaml(tmp_path: Path, guard_last: bool) -> Path:
    config = yaml.safe_load(DEMO_YAML.read_text())
    monitor = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [*callbacks, monitor] if not guard_last else [monitor, *callbacks]
    path = tmp_path / "two_callbacks.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_short_override_reaches_gradguard_when_it_is_last(demo: ModuleType, tmp_path: Path) -> None:
    path = write_two_callbacks_yaml(tmp_path, guard_last=True)
    (guard,) = guards_of(make_cli(demo, tmp_path, "--config", str(path), "--trainer.callbacks.on_unused=warn").trainer)
    assert guard.on_unused == "warn"
    assert guard.on_detached == "raise"  # the YAML's other init_args stay


def test_short_override_fails_when_gradguard_is_not_last(demo: ModuleType, tmp_path: Path) -> None:
    """The documented limit: the override goes to the last callback (here LearningRateMonitor), which rejects it."""
    path = write_two_callbacks_yaml(tmp_path, guard_last=False)
    with pytest.raises(SystemExit):
        make_cli(demo, tmp_path, "--config", str(path), "--trainer.callbacks.on_unused=warn")


def test_restating_the_callback_list_overrides_gradguard_anywhere(demo: ModuleType, tmp_path: Path) -> None:
    path = write_two_callbacks_yaml(tmp_path, guard_last=False)
    listing = "[{class_path: GradGuard, init_args: {on_unused: warn}}, {class_path: LearningRateMonitor}]"
    cli = make_cli(demo, tmp_path, "--config", str(path), f"--trainer.callbacks={listing}")
    (guard,) = guards_of(cli.trainer)
    assert guard.on_unused == "warn"
    assert [type(cb).__name__ for cb in cli.trainer.callbacks][:2] == ["GradGuard", "LearningRateMonitor"]


def test_yaml_ignore_takes_one_string(demo: ModuleType, tmp_path: Path) -> None:
    path = write_demo_yaml(tmp_path, ignore="aux.*")
    (guard,) = guards_of(make_cli(demo, tmp_path, "--config", str(path)).trainer)
    assert guard.ignore == ["aux.*"]


# ---------------------------------------------------------------------------------------------------------------------
# A YAML GradGuard plus `--trainer.callbacks+=GradGuard`: one runs (the YAML's, which has options of its own).


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_yaml_guard_plus_command_line_guard_run_as_the_yamls(demo: ModuleType, tmp_path: Path) -> None:
    path = write_demo_yaml(tmp_path, on_zero="ignore")
    cli = make_cli(demo, tmp_path, "--config", str(path), "--trainer.callbacks+=GradGuard", "--model.bug=none",
                   "--trainer.max_steps=2", "--trainer.logger=false")  # fmt: skip
    yaml_guard, added = guards_of(cli.trainer)
    assert (yaml_guard.on_zero, added.on_zero) == ("ignore", "warn")
    with pytest.warns(UserWarning, match=r"2 GradGuard callbacks: only GradGuard\(on_zero='ignore'\) runs") as rec:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert guards_of(cli.trainer) == [yaml_guard]
    assert len([w for w in rec if "GradGuard callbacks" in str(w.message)]) == 1


def test_yaml_guard_plus_the_same_guard_is_refused_by_lightning(demo: ModuleType, tmp_path: Path) -> None:
    """configs/demo.yaml's GradGuard has the default options: a second default one clashes in `state_key`."""
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `GradGuard`"):
        make_cli(demo, tmp_path, "--config", str(DEMO_YAML), "--trainer.callbacks+=GradGuard")
