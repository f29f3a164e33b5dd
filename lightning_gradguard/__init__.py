"""lightning_gradguard: prove that every parameter you train gets a usable gradient, and say why not.

* :class:`GradGuard`: a Lightning callback that checks every optimizer step.
* :func:`check_step`: the same check for a plain PyTorch loop, as a context manager.
* :class:`Finding`, :class:`GradGuardError`: what they report.

``GradGuard`` is imported on first use, or as soon as Lightning's ``LightningCLI`` module is (so that
``class_path: GradGuard`` and ``--trainer.callbacks+=GradGuard`` work in any LightningCLI script that imports this
package); ``check_step`` in a plain PyTorch program does not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._register import register_when_lightning_loads
from .findings import KINDS, Finding, GradGuardError
from .policy import GradGuardWarning
from .report import RunReport
from .step import check_step

if TYPE_CHECKING:
    from .callback import GradGuard

__all__ = ["KINDS", "Finding", "GradGuard", "GradGuardError", "GradGuardWarning", "RunReport", "check_step"]
__version__ = "0.1.0"

register_when_lightning_loads()


def __getattr__(name: str) -> Any:
    if name == "GradGuard":
        from .callback import GradGuard

        return GradGuard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"GradGuard"})
