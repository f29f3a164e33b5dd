"""Where in the user's code: stack frames outside torch, Lightning, torchmetrics, numpy, the stdlib and this package."""

from __future__ import annotations

import importlib.util
import os
import sysconfig
import warnings
from types import CodeType, FrameType
from typing import Any, TextIO

from . import _compat

__all__ = [
    "code_line",
    "format_where",
    "frame_where",
    "is_library_file",
    "user_frame",
    "user_stacklevel",
    "warnings_at_user_begin",
    "warnings_at_user_end",
]

#: Packages whose frames are never "the user's line".
_LIBRARIES = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "numpy",
              "lightning_utilities", "jsonargparse", "typing_extensions")  # fmt: skip

_ROOTS: tuple[tuple[str, ...], str] | None = None


def _library_roots() -> tuple[tuple[str, ...], str]:
    """(package folders whose frames are not the user's, the standard library's folder).

    Packages are located with ``find_spec`` (nothing is imported), so a library imported later still counts.
    """
    global _ROOTS
    if _ROOTS is None:
        roots = {os.path.dirname(os.path.abspath(__file__)) + os.sep}
        for name in _LIBRARIES:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                continue
            if spec is None:
                continue
            if spec.submodule_search_locations:  # a package: its folder
                roots.update(os.path.abspath(loc) + os.sep for loc in spec.submodule_search_locations)
            elif spec.origin:  # a one-file module: the file
                roots.add(os.path.abspath(spec.origin))
        stdlib = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
        _ROOTS = (tuple(sorted(roots)), stdlib)
    return _ROOTS


_LIB_CACHE: dict[str, bool] = {}


def is_library_file(filename: str) -> bool:
    """Whether ``filename`` belongs to torch, lightning, torchmetrics, numpy, the stdlib or this package."""
    hit = _LIB_CACHE.get(filename)
    if hit is None:
        if filename.startswith("<"):
            hit = filename.startswith("<frozen")
        else:
            path = os.path.abspath(filename)
            packages, stdlib = _library_roots()
            hit = path.startswith(packages) or (
                path.startswith(stdlib) and "site-packages" not in path and "dist-packages" not in path
            )
        _LIB_CACHE[filename] = hit
    return hit


def user_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost frame from ``frame`` outwards whose file is not a library's (:func:`is_library_file`), or
    ``None``."""
    known = _LIB_CACHE
    while frame is not None:
        lib = known.get(frame.f_code.co_filename)
        if lib is None:
            lib = is_library_file(frame.f_code.co_filename)
        if not lib:
            return frame
        frame = frame.f_back
    return None


#: (working directory, file name) -> the path :func:`format_where` shows (``relpath`` costs ~20 µs a call).
_SHOWN: dict[tuple[str, str], str] = {}


def format_where(filename: str, lineno: int) -> str:
    """``path:line``, the path relative to the working directory when it lies below it."""
    try:
        cwd = os.getcwd()
    except OSError:  # the working directory was removed
        cwd = ""
    path = _SHOWN.get((cwd, filename))
    if path is None:
        path = filename
        try:
            rel = os.path.relpath(filename, cwd) if cwd else filename
            if not rel.startswith(".."):
                path = rel
        except ValueError:  # another drive on Windows
            pass
        if len(_SHOWN) < 4096:
            _SHOWN[(cwd, filename)] = path
    return f"{path}:{lineno}"


def frame_where(frame: FrameType) -> str:
    return format_where(frame.f_code.co_filename, frame.f_lineno)


def code_line(code: CodeType, offset: int) -> int:
    """The line of the instruction at byte ``offset`` of ``code`` (a frame's ``f_lasti``): its ``f_lineno``, read
    later from the code's line table (``co_lines``, PEP 626) instead of while the frame runs."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def user_stacklevel(start: int = 2) -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the innermost frame of the user's code.

    ``start`` is the stacklevel of the caller of the function that calls this (2 = its caller).
    """
    frame = _compat.getframe(start)
    level = start
    while frame is not None and is_library_file(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level if frame is not None else start


# ---------------------------------------------------------------------- warnings raised under GradGuard's modes
#: The files of GradGuard's torch-function modes (the tracer, ``check_step``'s backward spy). Such a mode calls each
#: torch function for the user's code, so a warning torch raises there (from C++, or a Python ``warn`` with
#: ``stacklevel=2``) names the mode's frame: "trace.py:659: UserWarning: Using a target size ...".
_HERE = os.path.dirname(os.path.abspath(__file__))
_MODE_FILES = {os.path.join(_HERE, f"{name}.py"): f"{__package__}.{name}" for name in ("trace", "step")}
_depth = 0
_previous: Any = None


def _show_at_user(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` while a mode is on: a warning that names a mode's frame names the user's instead."""
    if filename in _MODE_FILES:
        frame = user_frame(_compat.getframe(1))
        if frame is not None:
            _compat.mark_warning_shown(frame, message, category, _MODE_FILES[filename], lineno)
            filename, lineno, line = frame.f_code.co_filename, frame.f_lineno, None
    show = _previous if _previous is not None else _compat.default_showwarning()
    show(message, category, filename, lineno, file, line)


def warnings_at_user_begin() -> None:
    """A mode goes on: show the warnings raised under it at the user's line (nested calls count)."""
    global _depth, _previous
    _depth += 1
    if _depth == 1 and warnings.showwarning is not _show_at_user:
        _previous = warnings.showwarning
        warnings.showwarning = _show_at_user


def warnings_at_user_end() -> None:
    """A mode goes off: after the last one, ``warnings.showwarning`` is what it was (unless someone replaced it
    meanwhile: then theirs stays, and ours, if it comes back, only passes warnings on)."""
    global _depth, _previous
    if _depth == 0:
        return
    _depth -= 1
    if _depth == 0 and warnings.showwarning is _show_at_user:
        warnings.showwarning = _previous
        _previous = None
