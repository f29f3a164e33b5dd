"""``gradguard``: check a LightningCLI training script before a long job, and print saved run reports.

::

    gradguard check --config train.yaml [--cli train.py | train.py:main | package.module:MyCLI] [--steps N] [...]
    gradguard report path/to/gradguard_report.json
    python -m lightning_gradguard ...   # the same

``check`` builds model, data and Trainer the way your script does: ``--cli train.py`` (or ``package.module``) runs it
as ``python train.py`` would, its ``if __name__ == "__main__":`` block included; ``--cli train.py:NAME`` also calls
``NAME()`` (your ``LightningCLI`` subclass, or a function like ``main``) when running the script built no LightningCLI;
no ``--cli``: ``LightningCLI`` with the YAML's ``class_path``s, or with ``--model``/``--data``. Whatever builds it, the
``LightningCLI`` parses the configs and overrides given here (with ``fit`` first when it has subcommands) plus the
check's Trainer settings, instead of ``sys.argv``, and its Trainer's ``fit`` runs ``N`` optimizer steps with every
step traced instead of training (no validation, no checkpoints, no progress bar, Lightning's ``DummyLogger`` for the
loggers, no resume), prints the run report and exits 1 when a finding's action is ``"raise"`` (0 otherwise, 2 for bad
usage, 3 when the user's code raised: no verdict). A part that got no usable gradient on any of the ``N`` steps, fewer
than the idle window, counts as such a finding unless it looks routed (see
:meth:`~lightning_gradguard.core.GuardCore.unrouted`): a preflight cannot wait for the window. The config's own
``GradGuard`` is used, or a default one is added. Like ``callback.py``, this is an adapter: it only drives a Trainer
with the callback.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

#: Exit codes.
OK, FOUND, USAGE, CRASHED = 0, 1, 2, 3

#: What the check gives the LightningCLI after the user's configs and overrides (the last value of a key wins), besides
#: ``--trainer.max_steps``. Loggers, checkpoints and progress bars are dealt with on the Trainer (``check_trainer``): as
#: arguments they would clash with a YAML's ``LearningRateMonitor``, ``ModelCheckpoint`` or ``RichProgressBar``.
CHECK_ARGS = (
    "--trainer.max_epochs=-1",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
)


class UsageError(Exception):
    """``gradguard`` was called in a way it cannot follow; the message says what to do instead (exit status 2)."""


class _Stop(BaseException):
    """Unwinds the user's script once the check has run, or when it cannot: not an ``Exception``, so that the
    script's own ``except Exception`` does not swallow it."""

    def __init__(self, status: int = USAGE, usage: str = "") -> None:
        super().__init__(usage or status)
        self.status = status
        self.usage = usage


def load_object(spec: str) -> Any:
    """``module:Name`` or ``path/to/file.py:Name`` -> the object (the module is imported, not run as a script).

    Raises:
        UsageError: ``spec`` has no ``:``, the module cannot be imported, or it has no such name.
    """
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name.isidentifier():
        raise UsageError(f"{spec!r} must look like `package.module:Name` or `path/to/train.py:Name`.")
    if _is_path(module_name):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise UsageError(f"{spec!r}: no file {path}.")
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
            raise UsageError(f"{spec!r}: cannot import {module_name!r}: {err}") from err
    try:
        return getattr(module, name)
    except AttributeError:
        raise UsageError(f"{spec!r}: {module_name} has no {name!r}.") from None


def _is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _split_cli(spec: str) -> tuple[str, str | None]:
    """``train.py:main`` -> ``("train.py", "main")``; ``train.py`` or ``C:\\train.py`` -> ``(spec, None)``."""
    target, sep, name = spec.rpartition(":")
    return (target, name) if sep and target and name.isidentifier() else (spec, None)


@contextlib.contextmanager
def _as_main(target: str, spec: str) -> Iterator[dict[str, Any]]:
    """Run ``target`` (a ``.py`` path or a module name) as ``__main__``, as ``python train.py`` / ``python -m`` would,
    and yield its namespace, with ``sys.modules["__main__"]``, ``sys.argv`` and ``sys.path`` set as for that run
    until the block ends (jsonargparse resolves the script's classes through ``sys.modules``)."""
    if _is_path(target):
        path = Path(target).resolve()
        if not path.is_file():
            raise UsageError(f"--cli {spec!r}: no file {path}.")
        loader_spec = importlib.util.spec_from_file_location("__main__", path)
        search, package, module_spec = str(path.parent), None, None
    else:
        sys.path.insert(0, os.getcwd())
        try:
            loader_spec = importlib.util.find_spec(target)
            if loader_spec is not None and loader_spec.submodule_search_locations is not None:
                loader_spec = importlib.util.find_spec(f"{target}.__main__")  # a package runs its __main__
        except ImportError as err:
            raise UsageError(f"--cli {spec!r}: cannot import {target!r}: {err}") from err
        finally:
            sys.path.pop(0)
        if loader_spec is None:
            raise UsageError(f"--cli {spec!r}: no module {target!r} (nor a file: a script's path ends in `.py`).")
        search, package, module_spec = os.getcwd(), loader_spec.parent, loader_spec
    assert loader_spec is not None
    assert loader_spec.loader is not None
    code = loader_spec.loader.get_code(loader_spec.name)  # type: ignore[attr-defined]
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=loader_spec.origin, __spec__=module_spec, __package__=package,
                           __loader__=loader_spec.loader, __builtins__=builtins)  # fmt: skip
    saved = sys.modules.get("__main__"), sys.argv, list(sys.path)
    sys.modules["__main__"], sys.argv = module, [str(loader_spec.origin)]
    sys.path.insert(0, search)
    try:
        with contextlib.suppress(SystemExit):  # a script that exits ends its run here; what it built is judged
            exec(code, module.__dict__)
        yield module.__dict__
    finally:
        sys.modules["__main__"], sys.argv, sys.path[:] = saved
        if saved[0] is None:
            del sys.modules["__main__"]


class _Interceptor:
    """While :meth:`active`, every ``LightningCLI`` parses the check's arguments instead of its own, and the ``fit``
    of the Trainer it built runs the check instead of training, then unwinds the script (:class:`_Stop`)."""

    def __init__(
        self, args: Sequence[str], steps: int, report_path: str | None, what: str, configs: Sequence[str]
    ) -> None:
        self.args = list(args)
        self.steps = steps
        self.report_path = report_path
        self.what = what  # the script, function or class that builds the CLI, for messages
        self.configs = list(configs)
        self.unnamed = _unnamed(configs)  # "model"/"data": the configs set them without a `class_path`
        self.cli: Any = None  # the last LightningCLI built (or being built)
        self.bare: list[str] = []  # "model"/"data": the CLI was built without that class

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        from lightning.pytorch import Trainer
        from lightning.pytorch.cli import LightningCLI

        init, fit = LightningCLI.__init__, Trainer.fit

        @functools.wraps(init)
        def cli_init(cli: Any, *args: Any, **kwargs: Any) -> None:
            self._build(init, cli, args, kwargs)

        @functools.wraps(fit)
        def trainer_fit(trainer: Any, *args: Any, **kwargs: Any) -> None:
            self._fit(fit, trainer, args, kwargs)

        LightningCLI.__init__, Trainer.fit = cli_init, trainer_fit  # type: ignore[method-assign]
        try:
            yield
        finally:
            LightningCLI.__init__, Trainer.fit = init, fit  # type: ignore[method-assign]

    def _build(self, init: Callable[..., None], cli: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = inspect.signature(init).bind(cli, *args, **kwargs)
        subcommands = bound.arguments.get("run", True)
        bound.arguments["args"] = (["fit"] if subcommands else []) + self.args
        bound.arguments["save_config_callback"] = None  # no config.yaml written into the run's log directory
        self.cli = cli
        classes = {"model": bound.arguments.get("model_class"), "data": bound.arguments.get("datamodule_class")}
        self.bare = [key for key, cls in classes.items() if cls is None and key in self.unnamed]
        make_parser = cli.init_parser  # the user's override, if any

        def init_parser(**parser_kwargs: Any) -> Any:
            parser = make_parser(**parser_kwargs)
            parser.exit_on_error = False  # a rejected config raises (one line) instead of printing the usage
            return parser

        cli.init_parser = init_parser
        try:
            init(*bound.args, **bound.kwargs)
        except argparse.ArgumentError as err:
            raise _Stop(usage=self._rejected(cli, err)) from None
        except SystemExit as done:
            if done.code in (0, None):  # `--print_config` and the like: the CLI printed what was asked for
                raise _Stop(status=OK) from None
            raise _Stop(usage=f"{type(cli).__name__} (built by {self.what}) exited with status {done.code}.") from None

    def _rejected(self, cli: Any, err: argparse.ArgumentError) -> str:
        name = type(cli).__name__
        text = f"{name} (built by {self.what}) rejects the configuration: {err}"
        if self.bare:
            missing = " and ".join(f"`{k}:`" for k in self.bare)
            text += (
                f"\n  {name} was built without a {' or '.join(self.bare)} class, so the YAML's {missing} "
                f"need{'s' if len(self.bare) == 1 else ''} a `class_path`. Let your script build it with its classes "
                "(`--cli train.py`, or `--cli train.py:main` for a function that builds it), or name them: "
                "`--model module:Net --data module:Data`."
            )
        return text

    def _fit(self, fit: Callable[..., None], trainer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.cli is None or getattr(self.cli, "trainer", None) is not trainer:
            raise _Stop(
                usage=f"{self.what} calls `fit` on a Trainer that no LightningCLI built; gradguard check runs the "
                "Trainer of your LightningCLI (with `run=False`: "
                "`cli.trainer.fit(cli.model, datamodule=cli.datamodule)`)."
            )
        environment = getattr(trainer.strategy, "cluster_environment", None)
        processes = trainer.num_devices * trainer.num_nodes
        if processes > 1 and not getattr(environment, "creates_processes_externally", False):
            raise _Stop(
                usage=f"{self.what}'s Trainer runs {processes} processes ({trainer.num_devices} device(s) x "
                f"{trainer.num_nodes} node(s)); the check runs in this one, and Lightning would start your script "
                "again for the others, outside the check: add `--trainer.devices=1` (and `--trainer.num_nodes=1`)."
            )
        bound = inspect.signature(fit).bind(trainer, *args, **kwargs)
        ckpt_path = bound.arguments.pop("ckpt_path", None)
        if ckpt_path:
            print(f"gradguard check: ckpt_path={ckpt_path!r} is not restored: the check runs the model as built")
        run_fit = functools.partial(fit, *bound.args, **bound.kwargs)
        title = f"{', '.join(self.configs)} through {self.what}"
        raise _Stop(status=check_trainer(trainer, run_fit, self.steps, self.report_path, title))


def check_trainer(trainer: Any, run_fit: Callable[[], None], steps: int, report_path: str | None, title: str) -> int:
    """Run ``fit`` (``run_fit``) as the check: ``trainer`` made quiet, every step of its GradGuard traced; return the
    exit status."""
    from lightning.pytorch.callbacks import Checkpoint, ModelSummary, ProgressBar
    from lightning.pytorch.loggers.logger import DummyLogger

    from .callback import GradGuard, _keep_one
    from .findings import GradGuardError

    # Callbacks that only write or draw are dropped (a ModelCheckpoint would write into the run's directory);
    # the loggers are replaced as `fast_dev_run` does, so that callbacks which log still run.
    quiet = (Checkpoint, ProgressBar, ModelSummary)
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, quiet)]
    trainer.loggers = [DummyLogger()]
    guards = [cb for cb in trainer.callbacks if isinstance(cb, GradGuard)]
    if not guards:
        guards = [GradGuard()]
        trainer.callbacks.append(guards[0])
    elif len(guards) > 1:  # before their options change here, as `GradGuard.setup` would
        guards = [_keep_one(trainer, guards)]
    changes = {"diagnose": "always", **({"report_path": report_path} if report_path else {})}  # every step traced
    for i, guard in enumerate(guards):
        guards[i] = guard.replace(**changes)
        trainer.callbacks[trainer.callbacks.index(guard)] = guards[i]
    print(f"gradguard check: {steps} optimizer step(s) of {title}, every step traced", flush=True)
    failed: GradGuardError | None = None
    try:
        run_fit()  # GradGuard prints its report at the end
    except GradGuardError as err:
        failed = err
    except Exception as err:  # the user's code (or Lightning) raised: no verdict, whatever the report says so far
        traceback.print_exc()
        print(_crashed(err, f"on optimizer step {trainer.global_step}"), file=sys.stderr)
        return CRASHED
    if failed is not None:
        print(f"\nGradGuardError: {failed}")
        print("gradguard check: FAILED (a finding whose action is 'raise')")
        return FOUND
    steps_run = trainer.global_step
    model = trainer.lightning_module
    dead = [f for guard in guards for f in guard._core.unrouted(model) if guard.options.actions[f.kind] == "raise"]
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


def _unnamed(configs: Sequence[str]) -> list[str]:
    """``"model"``/``"data"`` where a config sets them without a ``class_path`` (for the hint of a rejected config)."""
    import yaml

    found = []
    for config in configs:
        with contextlib.suppress(OSError, yaml.YAMLError):  # the CLI's own parser says what is wrong with the file
            content = yaml.safe_load(Path(config).read_text())
            for key in ("model", "data"):
                entry = content.get(key) if isinstance(content, dict) else None
                if isinstance(entry, dict) and "class_path" not in entry and key not in found:
                    found.append(key)
    return found


def _build_cli(cli: str | None, model: str | None, data: str | None, interceptor: _Interceptor) -> None:
    """Build the user's LightningCLI as ``--cli`` says (inside ``interceptor.active()``: even importing a module may
    build one)."""
    from lightning.pytorch.cli import LightningCLI

    if cli is None or model or data:
        cli_class = load_object(cli) if cli else LightningCLI
        if not (isinstance(cli_class, type) and issubclass(cli_class, LightningCLI)):
            raise UsageError(f"--cli {cli!r} with --model/--data must name a LightningCLI subclass.")
        saved, sys.argv = sys.argv, sys.argv[:1]  # it parses the check's arguments, not `gradguard check ...`
        try:  # (Lightning warns when a LightningCLI gets both)
            cli_class(
                model_class=load_object(model) if model else None, datamodule_class=load_object(data) if data else None
            )
        finally:
            sys.argv = saved
        return
    target, name = _split_cli(cli)
    with _as_main(target, cli) as namespace:
        if name is None or interceptor.cli is not None:
            return
        built = namespace.get(name)  # the script built no LightningCLI: `NAME()` builds it
        if not callable(built):
            raise UsageError(
                f"--cli {cli!r}: {target} has no {name!r} to call (a LightningCLI subclass or a function)."
            )
        built()


def run_check(
    configs: Sequence[str],
    steps: int,
    cli: str | None = None,
    model: str | None = None,
    data: str | None = None,
    report_path: str | None = None,
    overrides: Sequence[str] = (),
) -> int:
    """``gradguard check``: see the module docstring. Returns the exit status.

    Raises:
        UsageError: bad arguments, or the script cannot be run as a check (the message says why).
    """
    if steps < 1:
        raise UsageError(f"--steps {steps} must be at least 1.")
    if cli is None:
        _refuse_a_bare_script(overrides)
    args = [*(a for c in configs for a in ("--config", c)), *overrides, f"--trainer.max_steps={steps}", *CHECK_ARGS]
    what = cli or "LightningCLI"
    interceptor = _Interceptor(args, steps, report_path, what, configs)
    try:
        with interceptor.active():
            _build_cli(cli, model, data, interceptor)
    except _Stop as stop:
        if stop.usage:
            raise UsageError(stop.usage) from None
        return stop.status
    if interceptor.cli is None:
        raise UsageError(
            f"{what} built no LightningCLI. Name what builds it: `--cli train.py:main` (a function that builds it) "
            "or `--cli train.py:MyCLI` (your LightningCLI subclass)."
        )
    raise UsageError(
        f"{what} built {type(interceptor.cli).__name__} but never called `trainer.fit`: with `run=False`, call "
        "`cli.trainer.fit(cli.model, datamodule=cli.datamodule)`."
    )


def _refuse_a_bare_script(overrides: Sequence[str]) -> None:
    """A script named without ``--cli`` (``gradguard check --config c.yaml train.py``) would reach LightningCLI as an
    argument it rejects: say how to name it. A ``.py`` file after an option without ``=`` is that option's value."""
    for before, arg in zip([None, *overrides], overrides, strict=False):
        value = before is not None and before.startswith("-") and "=" not in before
        if arg.endswith(".py") and not value and Path(arg).is_file():
            raise UsageError(f"{arg!r}: name the script with `--cli {arg}` (the other arguments go to LightningCLI).")


def run_report(path: str, markdown: bool = False) -> int:
    """``gradguard report``: print a saved report. Returns the exit status."""
    from .report import RunReport

    report = RunReport.read_json(path)
    print(report.markdown() if markdown else report.table())
    return OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Check that every optimized parameter gets a usable gradient, before a long training job.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check",
        help="run a few traced optimizer steps of your LightningCLI script and report (exit 1 on a 'raise')",
        description="Build model, data and Trainer as your LightningCLI script does, from a YAML, run --steps "
        "optimizer steps with every step traced, print GradGuard's report. Exit status: 1 when a finding's action is "
        "'raise' (a part that got no gradient on any step is one, unless it looks routed: one of several alike items "
        "of a ModuleList), 2 for bad usage, 3 when your code raised (no verdict), else 0. Arguments it does not know "
        "(e.g. --model.lr=0.1) go to LightningCLI.",
    )
    check.add_argument("--config", "-c", action="append", required=True, help="LightningCLI YAML (repeatable)")
    check.add_argument("--steps", type=int, default=3, help="optimizer steps to run (default: 3)")
    check.add_argument(
        "--cli",
        default=None,
        help="what builds your LightningCLI: a script `path/to/train.py` or module `package.train` (run as "
        "`python train.py` would), optionally `:NAME` to call when it builds none (your LightningCLI subclass, or a "
        "function such as `main`). Default: LightningCLI, with `class_path` for model and data in the YAML",
    )
    check.add_argument("--model", default=None, help="the LightningModule class, `module:Class` (optional)")
    check.add_argument("--data", default=None, help="the LightningDataModule class, `module:Class` (optional)")
    check.add_argument("--report", default=None, help="also write the run report as JSON to this path")
    report = sub.add_parser("report", help="print a saved gradguard_report.json", description="Print a run report.")
    report.add_argument("path", help="a gradguard_report.json written by GradGuard")
    report.add_argument("--markdown", action="store_true", help="print it as a markdown table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``gradguard`` console script. Returns the exit status: 0 clean, 1 a finding to raise, 2 bad usage, 3 the
    user's code raised (no verdict)."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "report":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            try:
                return run_report(args.path, args.markdown)
            except (ValueError, OSError) as err:
                raise UsageError(str(err)) from err
        return run_check(args.config, args.steps, args.cli, args.model, args.data, args.report, rest)
    except UsageError as err:
        print(f"gradguard: error: {err}", file=sys.stderr)
        return USAGE
    except Exception as err:  # raised while the script built its CLI, model or data: before any step
        traceback.print_exc()
        print(_crashed(err, "while building the model, data and Trainer"), file=sys.stderr)
        return CRASHED


def _crashed(err: Exception, when: str) -> str:
    """The last line of a check that the user's code stopped (exit status 3)."""
    return (
        f"gradguard check: ERROR: your code raised {type(err).__name__} {when} (traceback above): no verdict; fix "
        "it and run the check again."
    )


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
