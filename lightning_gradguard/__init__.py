"""lightning_gradguard: prove that every parameter you train gets a usable gradient, and say why not.

* :class:`GradGuard`: a Lightning callback that checks every optimizer step.
* :func:`check_step`: the same check for a plain PyTorch loop, as a context manager.
* :class:`Finding`, :class:`GradGuardError`: what they report.
"""

from .callback import GradGuard
from .findings import KINDS, Finding, GradGuardError
from .policy import GradGuardWarning
from .report import RunReport
from .step import check_step

__all__ = ["KINDS", "Finding", "GradGuard", "GradGuardError", "GradGuardWarning", "RunReport", "check_step"]
__version__ = "0.1.0"
