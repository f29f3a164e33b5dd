"""Make ``GradGuard`` known to LightningCLI by its short name, without importing Lightning for ``check_step`` users.

LightningCLI (jsonargparse) resolves ``class_path: GradGuard`` and ``--trainer.callbacks.help GradGuard`` by walking
``Callback.__subclasses__()``: the class must have been imported before the command line is parsed. So:

* if ``lightning.pytorch`` is already imported when ``lightning_gradguard`` is, :mod:`.callback` is imported at
  once (about 40 ms: Lightning itself is loaded);
* otherwise a one-shot import hook imports :mod:`.callback` right after ``lightning.pytorch.cli`` (the module that
  defines ``LightningCLI``) has been imported, whenever that happens. A plain PyTorch program that never imports
  ``lightning.pytorch.cli`` never imports Lightning through this package (importing it costs 2-3 s).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["register_when_lightning_loads"]

#: The module whose import makes GradGuard's registration worth its cost.
TRIGGER = "lightning.pytorch.cli"


def _import_callback() -> None:
    # A broken Lightning/TensorBoard install: naming GradGuard will raise the real error later.
    with contextlib.suppress(ImportError):
        importlib.import_module("lightning_gradguard.callback")


class _ThenLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs ``then`` once the module has executed."""

    def __init__(self, loader: Any, then: Callable[[], None]) -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._then()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot ``sys.meta_path`` entry: after module ``target`` is imported, call ``then``."""

    def __init__(self, target: str, then: Callable[[], None]) -> None:
        self.target = target
        self.then = then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.target:
            return None
        self.remove()
        spec = importlib.util.find_spec(fullname)  # the real finders (this one is gone)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenLoader(spec.loader, self.then)
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def register_when_lightning_loads() -> None:
    """Import ``GradGuard`` now if Lightning is loaded, else as soon as ``lightning.pytorch.cli`` is imported."""
    if "lightning.pytorch" in sys.modules:
        _import_callback()
        return
    if any(isinstance(f, _AfterImport) and f.target == TRIGGER for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _AfterImport(TRIGGER, _import_callback))
