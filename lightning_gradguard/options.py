"""Every option of the guard, its choices and defaults, defined once and validated once.

:class:`GuardOptions` holds the options of :class:`~lightning_gradguard.GradGuard` (the checks and the dashboards):
built, and checked, when the callback is; ``check_step``, ``check_fabric_step`` and ``assert_gradients_flow`` use
the same choices and the same checks (:func:`check_choice`, :func:`check_int`, :func:`check_globs`), so that every
bad value gets the same kind of message, quoting the option and the value:
``"`GradGuard(on_unused='RAISE')` must be one of 'raise', 'warn', 'ignore'."``
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

__all__ = [
    "ACTIONS",
    "DEFAULT_ACTIONS",
    "DEFAULT_WINDOW",
    "DIAGNOSE",
    "Action",
    "Diagnose",
    "GuardOptions",
    "Norms",
    "Sync",
    "check_bool",
    "check_choice",
    "check_globs",
    "check_int",
]

#: What to do with a finding of a kind.
Action = Literal["raise", "warn", "ignore"]
#: Which optimizer steps are traced (see ``GradGuard``'s ``diagnose``).
Diagnose = Literal["first", "on_finding", "always", "never"]
#: Which gradient norms the dashboards log besides the total.
Norms = Literal["param", "module", "total"]
#: When the check reads the gradients' norms.
Sync = Literal["step", "late"]

ACTIONS: tuple[str, ...] = get_args(Action)
DIAGNOSE: tuple[str, ...] = get_args(Diagnose)

#: The action for each kind when the user does not say.
DEFAULT_ACTIONS: dict[str, Action] = {
    "frozen": "warn",
    "unused": "raise",
    "detached": "raise",
    "orphan": "warn",
    "stale": "raise",
    "nonfinite": "raise",
    "zero": "warn",
}

#: Default length (checked steps) of a run without a usable gradient that makes an idle parameter a finding.
DEFAULT_WINDOW = 16


def check_choice(owner: str, option: str, value: object, choices: Sequence[str]) -> None:
    """Raise a ``ValueError`` quoting ``owner(option=value)`` unless ``value`` is one of ``choices``.

    Example::

        >>> check_choice("GradGuard", "sync", "later", ("step", "late"))
        Traceback (most recent call last):
        ...
        ValueError: `GradGuard(sync='later')` must be one of 'step', 'late'.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{owner}({option}={value!r})` must be one of {', '.join(map(repr, choices))}.")


def check_int(owner: str, option: str, value: object, minimum: int, *, none: str = "", note: str = "") -> None:
    """Raise a ``ValueError`` quoting ``owner(option=value)`` unless ``value`` is an ``int`` (not a ``bool``) of at
    least ``minimum``, or ``None`` when ``none`` says what ``None`` means; ``note`` says what a value means."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        head = f"None ({none}) or an int" if none else "an int"
        raise ValueError(f"`{owner}({option}={value!r})` must be {head} >= {minimum}{f' ({note})' if note else ''}.")


def check_bool(owner: str, option: str, value: object) -> None:
    """Raise a ``ValueError`` quoting ``owner(option=value)`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{owner}({option}={value!r})` must be True or False.")


def check_globs(owner: str, ignore: object) -> tuple[str, ...]:
    """``ignore`` (one fnmatch glob, or several) as a tuple of strings, or a ``ValueError`` quoting
    ``owner(ignore=...)`` and the bad value."""
    if ignore is None:
        return ()
    if isinstance(ignore, str):
        ignore = [ignore]  # one glob
    try:
        patterns = tuple(ignore)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"`{owner}(ignore={ignore!r})` must be a list of glob strings.") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"`{owner}(ignore=...)` must hold non-empty glob strings, got {p!r} in {ignore!r}.")
    return patterns


@dataclass(frozen=True)
class GuardOptions:
    """The options of one :class:`~lightning_gradguard.GradGuard`, checked when built (each is documented there).

    Immutable: the guard, its policy and its dashboards read the same object for the whole run. ``ignore`` is kept
    as a tuple of globs.

    Raises:
        ValueError: an option has a value it does not take (the message quotes ``GradGuard(option=value)``).

    Example::

        >>> GuardOptions(on_zero="ignore", ignore="aux.*").actions["zero"], GuardOptions(ignore="aux.*").ignore
        ('ignore', ('aux.*',))
    """

    on_frozen: Action = DEFAULT_ACTIONS["frozen"]
    on_unused: Action = DEFAULT_ACTIONS["unused"]
    on_detached: Action = DEFAULT_ACTIONS["detached"]
    on_orphan: Action = DEFAULT_ACTIONS["orphan"]
    on_stale: Action = DEFAULT_ACTIONS["stale"]
    on_nonfinite: Action = DEFAULT_ACTIONS["nonfinite"]
    on_zero: Action = DEFAULT_ACTIONS["zero"]
    ignore: tuple[str, ...] = ()
    diagnose: Diagnose = "on_finding"
    log_every_n_steps: int | None = None
    norms: Norms = "module"
    max_norm_tags: int = 100
    histograms: bool = True
    value_histograms: bool = False
    update_ratio: bool = False
    write_report: bool = True
    report_path: str | os.PathLike[str] | None = None
    idle_window: int = DEFAULT_WINDOW
    flow_every: int = 10
    sync: Sync = "step"

    def __post_init__(self) -> None:
        owner = "GradGuard"
        for kind in DEFAULT_ACTIONS:
            check_choice(owner, f"on_{kind}", getattr(self, f"on_{kind}"), ACTIONS)
        object.__setattr__(self, "ignore", check_globs(owner, self.ignore))
        check_choice(owner, "diagnose", self.diagnose, DIAGNOSE)
        check_int(owner, "log_every_n_steps", self.log_every_n_steps, 0, none="the Trainer's", note="0: no dashboards")
        check_choice(owner, "norms", self.norms, get_args(Norms))
        check_int(owner, "max_norm_tags", self.max_norm_tags, 1)
        for option in ("histograms", "value_histograms", "update_ratio", "write_report"):
            check_bool(owner, option, getattr(self, option))
        if self.report_path is not None and not isinstance(self.report_path, (str, os.PathLike)):
            raise ValueError(f"`{owner}(report_path={self.report_path!r})` must be a path or None.")
        check_int(owner, "idle_window", self.idle_window, 1, note="checked steps")
        check_int(owner, "flow_every", self.flow_every, 0, note="0: no gradient-flow picture")
        check_choice(owner, "sync", self.sync, get_args(Sync))

    @property
    def actions(self) -> dict[str, str]:
        """``{kind: action}`` for every finding kind."""
        return {kind: getattr(self, f"on_{kind}") for kind in DEFAULT_ACTIONS}

    def as_kwargs(self) -> dict[str, Any]:
        """Every option by name, as ``GradGuard(**options.as_kwargs())`` takes them (``ignore`` as a list)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["ignore"] = list(self.ignore)
        return out

    def changed(self) -> dict[str, Any]:
        """The options whose value is not the default, by name (``ignore`` as a list)."""
        defaults = GuardOptions().as_kwargs()
        return {k: v for k, v in self.as_kwargs().items() if v != defaults[k]}
