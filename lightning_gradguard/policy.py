"""What to do with findings: raise, warn (once per kind and parameter) or ignore; ignore globs."""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from ._frames import user_stacklevel
from .findings import KINDS, Finding, GradGuardError

__all__ = ["ACTIONS", "DEFAULT_ACTIONS", "Action", "GradGuardWarning", "Policy"]

log = logging.getLogger(__name__)

Action = Literal["raise", "warn", "ignore"]
ACTIONS: tuple[str, ...] = ("raise", "warn", "ignore")

#: The action for each kind when the user does not say.
DEFAULT_ACTIONS: dict[str, str] = {
    "frozen": "warn",
    "unused": "raise",
    "detached": "raise",
    "orphan": "warn",
    "stale": "raise",
    "nonfinite": "raise",
    "zero": "warn",
}


class GradGuardWarning(UserWarning):
    """The warning category of every finding whose action is ``"warn"``."""


class Policy:
    """Maps each finding to an action, drops ignored parameters, warns once and raises.

    Args:
        actions: ``{kind: action}`` for the seven kinds; missing kinds take :data:`DEFAULT_ACTIONS`.
        ignore: fnmatch globs on parameter names; matching parameters are never reported.
        owner: the name used in error messages about bad options (``"GradGuard"`` or ``"check_step"``).

    Raises:
        ValueError: an action is not one of ``"raise"``, ``"warn"``, ``"ignore"``, or ``ignore`` is not a
            list of strings.
    """

    def __init__(
        self, actions: Mapping[str, str] | None = None, ignore: Sequence[str] | None = None, owner: str = "GradGuard"
    ) -> None:
        merged = dict(DEFAULT_ACTIONS)
        for kind, action in (actions or {}).items():
            if kind not in KINDS:
                raise ValueError(f"`{owner}` has no finding kind {kind!r}; the kinds are {', '.join(KINDS)}.")
            if action not in ACTIONS:
                raise ValueError(f"`{owner}(on_{kind}={action!r})` must be one of 'raise', 'warn', 'ignore'.")
            merged[kind] = action
        self.actions: dict[str, str] = merged
        self.ignore: list[str] = validate_globs(ignore, owner)
        self._warned: set[tuple[str, str]] = set()
        self._ignored_names: dict[str, bool] = {}

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
        """Raise :class:`GradGuardError` listing all of ``findings`` if any of them is to raise; else warn once each.

        ``findings`` must already have passed :meth:`keep`.
        """
        if any(self.actions[f.kind] == "raise" for f in findings):
            raise GradGuardError.from_findings(findings, step, context)
        for f in findings:
            if f.key not in self._warned:
                self._warned.add(f.key)
                fix = f"\n  fix: {f.hint}" if f.hint and f.hint not in f.message else ""
                warnings.warn(f"GradGuard: {f}{fix}", GradGuardWarning, stacklevel=user_stacklevel(2))

    @property
    def warned(self) -> set[tuple[str, str]]:
        """The ``(kind, param)`` pairs already warned about in this run."""
        return self._warned


def validate_globs(ignore: object, owner: str) -> list[str]:
    """``ignore`` as a list of strings, or a ``ValueError`` naming the option and the bad value."""
    if ignore is None:
        return []
    if isinstance(ignore, str):
        raise ValueError(f"`{owner}(ignore={ignore!r})` must be a list of glob strings, e.g. ignore=[{ignore!r}].")
    try:
        patterns = list(ignore)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"`{owner}(ignore={ignore!r})` must be a list of glob strings.") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"`{owner}(ignore=...)` must hold non-empty glob strings, got {p!r} in {ignore!r}.")
    return patterns
