"""Every private torch / Lightning / standard-library name the package touches is registered in `_compat.PRIVATES`
with a check of its shape; each check passes on the installed versions, and one that fails names the private. A
missing private never breaks `import lightning_gradguard`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lightning_gradguard import _compat


@pytest.mark.parametrize("name", sorted(_compat.PRIVATES))
def test_each_private_has_the_shape_the_package_expects(name):
    entry = _compat.PRIVATES[name]
    problem = entry.check()
    assert problem is None, (
        f"private `{name}` (used for {entry.feature}) changed: {problem}; without it, {entry.without}"
    )


def test_the_registry_covers_the_privates_named_in_the_issue():
    names = " ".join(_compat.PRIVATES)
    for part in ("_push_mode", "CheckpointFunction", "_compiler_ctx", "_step_supports_amp_scaling", "warnings",
                 "fabric", "DistributedDataParallel"):  # fmt: skip
        assert part in names


def test_a_missing_private_is_said_once_naming_it_and_its_feature(caplog):
    name = next(iter(_compat.PRIVATES))
    _compat._said.discard(name)
    with caplog.at_level("WARNING", logger="lightning_gradguard"):
        _compat.warn_missing(name)
        _compat.warn_missing(name)
    said = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(said) == 1
    assert _compat.PRIVATES[name].feature in said[0]


def test_import_survives_missing_privates():
    """torch without its function-mode stack internals and reentrant checkpoint class, and `warnings` without
    `_showwarning_orig` (deleted once torch's own modules that use them are loaded): the package still imports, and
    the features that need them see them missing."""
    code = textwrap.dedent(
        """
        import warnings, torch, torch.overrides, torch.utils.checkpoint, torch._dynamo
        del torch.overrides._push_mode
        del torch.utils.checkpoint.CheckpointFunction
        if hasattr(warnings, "_showwarning_orig"):
            del warnings._showwarning_orig
        import lightning_gradguard
        from lightning_gradguard import GradGuard, _compat, check_step
        GradGuard()
        assert _compat.function_mode_stack() is None
        assert _compat.PRIVATES["torch.overrides._push_mode"].check() is not None
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
