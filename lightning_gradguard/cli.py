"""``gradguard``: check a LightningCLI configuration before a long job, and print saved run reports.

::

    gradguard check --config train.yaml [--steps N] [--cli module:Class] [overrides ...]
    gradguard report path/to/gradguard_report.json
    python -m lightning_gradguard ...   # the same

``check`` builds model, data and Trainer from the YAML exactly as the user's ``LightningCLI`` would (``--cli`` names
that class, or a ``LightningCLI`` subclass that knows its model; by default the YAML's ``model``/``data`` need
``class_path``), runs ``N`` optimizer steps with every step traced, prints the run report and exits 1 when a finding's
action is ``"raise"`` (0 otherwise). A part that got no usable gradient on any of the ``N`` steps, fewer than the idle
window, counts as such a finding unless it looks routed (see :meth:`~lightning_gradguard.core.GuardCore.unrouted`):
a preflight cannot wait for the window. The config's own ``GradGuard`` (its ``on_*`` actions and ``ignore``) is used, or
a default one is added. Like ``callback.py``, this is an adapter: it only drives a Trainer with the callback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

#: Exit codes.
OK, FOUND, USAGE = 0, 1, 2


def load_object(spec: str) -> Any:
    """``module:Name`` or ``path/to/file.py:Name`` -> the object.

    Raises:
        ValueError: ``spec`` has no ``:``, the module cannot be imported, or it has no such name.
    """
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--cli {spec!r} must look like `package.module:ClassName` or `path/to/train.py:ClassName`.")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name).resolve()
        if not path.is_file():
            raise ValueError(f"--cli {spec!r}: no file {path}.")
        sys.path.insert(0, str(path.parent))  # the script's own imports of its neighbours keep working
        mod_name = f"_gradguard_cli_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert loader_spec is not None
        assert loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # jsonargparse resolves the classes' type hints through sys.modules
        loader_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"--cli {spec!r}: cannot import {module_name!r}: {err}") from err
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"--cli {spec!r}: {module_name} has no {name!r}.") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Check that every optimized parameter gets a usable gradient, before a long training job.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check",
        help="run a few traced optimizer steps of a LightningCLI configuration and report (exit 1 on a 'raise')",
        description="Build model, data and Trainer from a LightningCLI YAML, run --steps optimizer steps with every "
        "step traced, print GradGuard's report. Exit status: 1 when a finding's action is 'raise' (a part that got "
        "no gradient on any step is one, unless it looks routed: one of several alike items of a ModuleList), else 0. "
        "Arguments it does not know (e.g. --model.lr=0.1) go to LightningCLI.",
    )
    check.add_argument("--config", "-c", action="append", required=True, help="LightningCLI YAML (repeatable)")
    check.add_argument("--steps", type=int, default=3, help="optimizer steps to run (default: 3)")
    check.add_argument(
        "--cli",
        default=None,
        help="your LightningCLI subclass, `module:Class` or `path/to/train.py:Class` (default: LightningCLI, with "
        "`class_path` for model and data in the YAML)",
    )
    check.add_argument("--model", default=None, help="the LightningModule class, `module:Class` (optional)")
    check.add_argument("--data", default=None, help="the LightningDataModule class, `module:Class` (optional)")
    check.add_argument("--report", default=None, help="also write the run report as JSON to this path")
    report = sub.add_parser("report", help="print a saved gradguard_report.json", description="Print a run report.")
    report.add_argument("path", help="a gradguard_report.json written by GradGuard")
    report.add_argument("--markdown", action="store_true", help="print it as markdown (a list, as in TensorBoard)")
    return parser


def run_check(
    configs: Sequence[str],
    steps: int,
    cli: str | None = None,
    model: str | None = None,
    data: str | None = None,
    report_path: str | None = None,
    overrides: Sequence[str] = (),
) -> int:
    """``gradguard check``: see the module docstring. Returns the exit status."""
    if steps < 1:
        raise ValueError(f"--steps {steps} must be at least 1.")
    from lightning.pytorch.cli import LightningCLI

    from .callback import GradGuard
    from .findings import GradGuardError

    cli_class = load_object(cli) if cli else LightningCLI
    if not (isinstance(cli_class, type) and issubclass(cli_class, LightningCLI)):
        raise ValueError(f"--cli {cli!r} is not a LightningCLI subclass.")
    kwargs: dict[str, Any] = {"run": False, "save_config_callback": None}
    if model:
        kwargs["model_class"] = load_object(model)
    if data:
        kwargs["datamodule_class"] = load_object(data)
    if not cli and not model:
        kwargs["subclass_mode_model"] = True
    if not cli and not data:
        kwargs["subclass_mode_data"] = True
    args = [a for c in configs for a in ("--config", c)]
    args += list(overrides)
    args += [
        f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=-1",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=false",  # the report goes to the Trainer's default_root_dir (or --report)
    ]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it gets `args` and sys.argv holds others
    try:
        parsed = cli_class(args=args, **kwargs)
    finally:
        sys.argv = argv
    trainer = parsed.trainer
    guards = [cb for cb in trainer.callbacks if isinstance(cb, GradGuard)]
    if not guards:
        guards = [GradGuard()]
        trainer.callbacks.append(guards[0])
    for guard in guards:
        guard.diagnose = "always"  # every step of the check is traced (the core is rebuilt at `setup`)
        if report_path:
            guard.report_path = guard._dashboard.report_path = report_path
    print(f"gradguard check: {steps} optimizer step(s) of {', '.join(configs)}, every step traced", flush=True)
    failed: GradGuardError | None = None
    try:
        trainer.fit(parsed.model, datamodule=parsed.datamodule)  # GradGuard prints its report at the end
    except GradGuardError as err:
        failed = err
    if failed is not None:
        print(f"\nGradGuardError: {failed}")
        print("gradguard check: FAILED (a finding whose action is 'raise')")
        return FOUND
    steps_run = trainer.global_step
    dead = [
        f for guard in guards for f in guard._core.unrouted(parsed.model) if guard._policy.actions[f.kind] == "raise"
    ]
    if dead:
        modules = ", ".join(f"`{m}`" if m else "the root module" for m in dict.fromkeys(f.module for f in dead))
        print(
            f"\ngradguard check: FAILED: {len({f.param for f in dead})} parameter tensor(s) got no usable gradient on "
            f"any of the {steps_run} step(s) (the warnings above), in {modules}: not items of a ModuleList or "
            "ModuleDict whose other items of their class got one (as experts and LayerDrop layers take turns), so "
            "dead rather than idle."
        )
        return FOUND
    print(f"gradguard check: passed ({steps_run} optimizer step(s))")
    short = [f for guard in guards for f in guard._core.short]
    if short:
        window = max(guard.idle_window for guard in guards)
        n = len({f.param for f in short})
        print(
            f"gradguard check: but {n} parameter tensor(s) got no usable gradient on any step (the warnings above): "
            f"{steps_run} step(s) are fewer than idle_window={window}, too few to tell a part idle by design "
            f"(routing, LayerDrop) from a dead one. Run with --steps {window} to have them judged."
        )
    return OK


def run_report(path: str, markdown: bool = False) -> int:
    """``gradguard report``: print a saved report. Returns the exit status."""
    from .report import RunReport

    report = RunReport.read_json(path)
    print(report.markdown() if markdown else report.table())
    return OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``gradguard`` console script. Returns the exit status: 0 clean, 1 a finding to raise, 2 bad usage."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "report":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            return run_report(args.path, args.markdown)
        return run_check(args.config, args.steps, args.cli, args.model, args.data, args.report, rest)
    except (ValueError, OSError) as err:
        print(f"gradguard: error: {err}", file=sys.stderr)
        return USAGE


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
