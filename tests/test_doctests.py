"""The `Example::` blocks in the package's docstrings run: every module of the package that has one."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import lightning_gradguard

PACKAGE = Path(lightning_gradguard.__file__).parent


def modules_with_examples() -> list[str]:
    """Every module of the package (private ones too) whose source has a doctest prompt."""
    names = [m.name for m in pkgutil.iter_modules([str(PACKAGE)])]
    return sorted(n for n in names if ">>> " in (PACKAGE / f"{n}.py").read_text(encoding="utf-8"))


MODULES = modules_with_examples()


def test_the_modules_with_examples_are_found():
    assert {"callback", "distributed", "params", "report", "step"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"lightning_gradguard.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"lightning_gradguard.{name} has `>>>` lines but doctest found no example"
    assert result.failed == 0
