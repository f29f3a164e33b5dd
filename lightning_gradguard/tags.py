"""GradGuard's TensorBoard tags: their names (one per parameter, module or group of modules, under ``gradguard/``)
and the custom-scalars layout that arranges them in charts (no Lightning, no TensorBoard import).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any

from .params import module_of

__all__ = [
    "TAG",
    "TEXT_TAG",
    "chart_of",
    "custom_scalars_layout",
    "group_keys",
    "own_keys",
]

#: Every tag starts with this.
TAG = "gradguard"
#: The text tag of the findings report (``torch`` appends ``/text_summary``).
TEXT_TAG = f"{TAG}/report"


def group_keys(names: Sequence[str | None], norms: str, max_tags: int) -> tuple[list[str | None], str]:
    """The tag key each parameter's norm is logged under, and a phrase saying how they were grouped.

    ``norms="param"``: the parameter's name; ``"module"``: the owning module's name (a parameter of the root module
    keeps its own name); ``"total"``: none. When there would be more than ``max_tags`` keys, modules are merged into
    their parents (``layers.0.attn.out_proj`` → ``layers.0.attn`` → ``layers.0`` ...) until they fit; if even the
    top-level modules do not, the first ``max_tags`` of them are logged. ``None``: not logged (a tensor that is not a
    parameter of the model, or cut off by the cap).

    Example::

        >>> group_keys(["enc.0.weight", "enc.0.bias", "head.weight", "scale"], "module", 10)[0]
        ['enc.0', 'enc.0', 'head', 'scale']
        >>> group_keys(["enc.0.weight", "enc.1.weight", "head.weight"], "param", 2)
        (['enc', 'enc', 'head'], 'per module at depth 1')
    """
    if norms == "total":
        return [None] * len(names), "total only"
    keys: list[str | None] = list(names)
    how = "per parameter"
    if norms == "module" or len({k for k in keys if k is not None}) > max_tags:
        modules = [None if n is None else module_of(n) for n in names]
        depth = max((len(m.split(".")) for m in modules if m), default=0)
        keys = [None if n is None else (m or n) for n, m in zip(names, modules, strict=True)]
        how = "per module"
        while len({k for k in keys if k is not None}) > max_tags and depth > 1:
            depth -= 1
            keys = [
                None if n is None else (".".join(m.split(".")[:depth]) if m else n)
                for n, m in zip(names, modules, strict=True)
            ]
            how = f"per module at depth {depth}"
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    if len(distinct) > max_tags:
        allowed = set(distinct[:max_tags])
        keys = [k if k in allowed else None for k in keys]
        how += f", the first {max_tags} of {len(distinct)}"
    return own_keys(keys), how


def own_keys(keys: Sequence[str | None]) -> list[str | None]:
    """Rename a key that is also the parent of another key to ``<key>.(own)``: a module's own parameters, apart
    from those of its children (so ``self_attn`` and ``self_attn.out_proj`` never both appear as tags, one of them
    silently a part of the other).

    Example::

        >>> own_keys(["attn", "attn.out_proj", "attn", "mlp.0", None])
        ['attn.(own)', 'attn.out_proj', 'attn.(own)', 'mlp.0', None]
    """
    distinct = {k for k in keys if k is not None}
    prefixes = set()
    for k in distinct:
        parts = k.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    parents = distinct & prefixes
    if not parents:
        return list(keys)
    return [f"{k}.(own)" if k in parents else k for k in keys]


def chart_of(key: str) -> str:
    """The custom-scalars chart a key goes to: its top-level module, with the index of a ``ModuleList`` entry."""
    parts = key.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0] if len(parts) > 1 else key


def custom_scalars_layout(
    charts: Sequence[str],
    prefix: str = "",
    update_ratio: bool = False,
    idle: bool = False,
    findings: Sequence[str] = (),
    no_grad: bool = False,
    dead: Collection[str] = (),
) -> dict[str, Any]:
    """The ``add_custom_scalars`` layout: one ``GradGuard`` section with, first, what needs attention (the shares of
    parameters without a gradient, ``no_grad``; one chart of finding counts per kind in ``findings``), then the total
    norm, one chart of gradient norms per top-level module (or ``ModuleList`` entry), the update ratios and the idle
    shares per module (``idle``).

    A module chart in ``dead`` (none of its parameters had a gradient at any logged step) shows the module's
    ``no_grad`` share under a title that says so, instead of an empty norm chart; it has no update-ratio chart.

    Example::

        >>> layout = custom_scalars_layout(["encoder", "head"])
        >>> list(layout["GradGuard"])[1:4]
        ['total gradient norm per epoch: max, mean', 'gradient norm: encoder', 'gradient norm: head']
        >>> list(custom_scalars_layout(["encoder", "head"], findings=["detached"], no_grad=True, dead=["encoder"])
        ...      ["GradGuard"])[:4]  # doctest: +NORMALIZE_WHITESPACE
        ['share of parameters without a gradient', 'findings so far: detached (parameter tensors)',
         'total gradient norm', 'total gradient norm per epoch: max, mean']
    """
    p = re.escape(prefix + TAG + "/")
    section: dict[str, list[Any]] = {}
    if no_grad:
        section["share of parameters without a gradient"] = ["Multiline", [rf"{p}no_grad/.*"]]
    for kind in findings:
        section[f"findings so far: {kind} (parameter tensors)"] = ["Multiline", [rf"{p}findings/{re.escape(kind)}$"]]
    section["total gradient norm"] = ["Multiline", [rf"{p}total_norm(_opt\d+)?$"]]
    section["total gradient norm per epoch: max, mean"] = ["Multiline", [rf"{p}epoch/total_norm_.*"]]
    many = len(charts) > 24
    if many:
        section["gradient norm per group"] = ["Multiline", [rf"{p}grad_norm/.*"]]
    else:
        for c in charts:
            if c in dead:
                section[f"NO GRADIENT: {c} (share of parameters)"] = ["Multiline", [rf"{p}no_grad/{_key(c)}"]]
            else:
                section[f"gradient norm: {c}"] = ["Multiline", [rf"{p}grad_norm/{_key(c)}"]]
    if update_ratio:
        section["update / weight: total"] = ["Multiline", [rf"{p}total_update_ratio.*"]]
        if many:
            section["update / weight per group"] = ["Multiline", [rf"{p}update_ratio/.*"]]
        else:
            for c in charts:
                if c not in dead:
                    section[f"update / weight: {c}"] = ["Multiline", [rf"{p}update_ratio/{_key(c)}"]]
    if idle:
        section["share of steps without a gradient, per module"] = ["Multiline", [rf"{p}idle/.*"]]
    return {"GradGuard": section}


def _key(chart: str) -> str:
    """A regex matching the keys of ``chart``: the chart's module and its submodules or parameters."""
    return rf"{re.escape(chart)}(\..*)?$"
