"""What to do with findings: raise, warn (once per kind and module group) or ignore; ignore globs."""

from __future__ import annotations

import fnmatch
import inspect
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

from ._frames import is_library_file, user_stacklevel
from .findings import Finding, GradGuardError, group_findings
from .options import DEFAULT_ACTIONS

__all__ = ["CONFIG_KINDS", "GradGuardWarning", "Policy", "function_site"]

#: Kinds that come from how the optimizer was built: their warnings point at the line that built it, when known.
CONFIG_KINDS = frozenset({"frozen", "orphan", "stale"})


class GradGuardWarning(UserWarning):
    """The warning category of every finding whose action is ``"warn"``."""


class Policy:
    """Maps each finding to an action, drops ignored parameters, warns once and raises.

    Args:
        actions: ``{kind: action}``; missing kinds take :data:`~lightning_gradguard.options.DEFAULT_ACTIONS`. The
            callers checked them (:class:`~lightning_gradguard.options.GuardOptions`).
        ignore: fnmatch globs on parameter names (checked: :func:`~lightning_gradguard.options.check_globs`);
            matching parameters are never reported.
    """

    def __init__(self, actions: Mapping[str, str] | None = None, ignore: Sequence[str] = ()) -> None:
        self.actions: dict[str, str] = {**DEFAULT_ACTIONS, **(actions or {})}
        self.ignore: list[str] = list(ignore)
        self._warned: set[tuple[str, str]] = set()
        self._ignored_names: dict[str, bool] = {}
        #: Every checked tensor of the model, ``name -> numel``, for grouping findings by module (see
        #: :func:`~lightning_gradguard.findings.group_findings`); set when the guard binds to a model.
        self.sizes: dict[str, int] | None = None
        #: ``(filename, line)`` that built the optimizer (the user's ``configure_optimizers``), where warnings about
        #: frozen, orphan and stale parameters point; ``None``: the innermost frame of the user's code.
        self.optimizer_site: tuple[str, int] | None = None

    def is_ignored(self, name: str) -> bool:
        """Whether ``name`` matches one of the ignore globs (cached per name)."""
        hit = self._ignored_names.get(name)
        if hit is None:
            hit = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore)
            self._ignored_names[name] = hit
        return hit

    def keep(self, findings: Iterable[Finding]) -> list[Finding]:
        """The findings that are neither of an ignored kind nor on an ignored parameter."""
        return [f for f in findings if self.actions[f.kind] != "ignore" and not self.is_ignored(f.param)]

    def enforce(self, findings: Sequence[Finding], step: int | None, context: str = "") -> None:
        """Raise :class:`GradGuardError` listing all of ``findings`` if any of them is to raise; else warn once per
        group of findings not warned about yet (one kind on every checked tensor of a module, see
        :func:`~lightning_gradguard.findings.group_findings`).

        ``findings`` must already have passed :meth:`keep`.
        """
        if any(self.actions[f.kind] == "raise" for f in findings):
            raise GradGuardError.from_findings(findings, step, context, self.sizes)
        new = [f for f in findings if f.key not in self._warned]
        for group in group_findings(new, self.sizes):
            self._warned.update(f.key for f in group.findings)
            text = "GradGuard: " + "\n".join(group.lines())
            if group.kind in CONFIG_KINDS and self.optimizer_site is not None:
                filename, lineno = self.optimizer_site
                module = os.path.splitext(os.path.basename(filename))[0]
                warnings.warn_explicit(text, GradGuardWarning, filename, lineno, module=module)
            else:
                warnings.warn(text, GradGuardWarning, stacklevel=user_stacklevel(2))

    @property
    def warned(self) -> set[tuple[str, str]]:
        """The ``(kind, param)`` pairs already warned about in this run."""
        return self._warned


def function_site(fn: object) -> tuple[str, int] | None:
    """``(filename, line)`` in the user's code of the line in ``fn`` that builds an optimizer (the first line of its
    body that mentions one), else of ``fn``'s ``def``; ``None`` when ``fn`` is not the user's Python function.

    Example::

        >>> def configure_optimizers(self):
        ...     params = list(self.parameters())
        ...     return torch.optim.Adam(params)
        >>> function_site(configure_optimizers)[1] - configure_optimizers.__code__.co_firstlineno
        2
    """
    fn = inspect.unwrap(getattr(fn, "__func__", fn))  # type: ignore[arg-type]
    code = getattr(fn, "__code__", None)
    if code is None or is_library_file(code.co_filename):
        return None
    try:
        lines, start = inspect.getsourcelines(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return code.co_filename, code.co_firstlineno
    body = 0
    for i, line in enumerate(lines):
        if line.lstrip().startswith("def "):
            body = i + 1
            break
    for i, line in enumerate(lines[body:], body):
        text = line.split("#", 1)[0]
        if _OPTIMIZER_RE.search(text):
            return code.co_filename, start + i
    return code.co_filename, code.co_firstlineno


_OPTIMIZER_RE = re.compile(r"\boptim\.|\b(Adam\w*|SGD|RMSprop|Adagrad|Adadelta|Adafactor|Lion|LBFGS|\w*Optimizer)\s*\(")
