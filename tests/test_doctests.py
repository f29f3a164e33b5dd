"""The `Example::` blocks in the package's docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["params", "report", "step", "callback"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"lightning_gradguard.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
