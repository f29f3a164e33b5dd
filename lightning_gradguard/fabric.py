"""Guarding a Lightning Fabric loop: :func:`check_fabric_step`, ``check_step`` for Fabric-wrapped objects.

Fabric calls only ``on_after_setup`` and ``on_after_optimizer_step`` on its callbacks, so a guard cannot follow the
forward pass and the backward from there. Instead, wrap each iteration::

    from lightning_gradguard.fabric import check_fabric_step

    model, optimizer = fabric.setup(model, optimizer)
    for step, (x, y) in enumerate(loader):
        with check_fabric_step(fabric, model, optimizer, step=step):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            fabric.backward(loss)  # the precision plugin's `loss.backward()`: seen by the guard
            optimizer.step()  # Fabric forwards it to your optimizer: checked just before it steps

This module is the only one of the package that imports ``lightning.fabric``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

from . import _compat
from .step import check_step

__all__ = ["check_fabric_step", "unwrap_model", "unwrap_optimizer"]


def check_fabric_step(
    fabric: Fabric,
    model: nn.Module | Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    strict: bool = False,
    ignore: Sequence[str] | None = None,
    step: int = 0,
    trace: bool = True,
) -> check_step:
    """:class:`~lightning_gradguard.check_step` for one iteration of a Fabric loop.

    It takes the objects ``fabric.setup`` returned and checks the user's own: the module inside Fabric's wrapper
    (so findings carry the names of your ``named_parameters()``, without ``_forward_module.``), the optimizers
    inside theirs, and the precision plugin's ``GradScaler`` when it has one (``"16-mixed"`` on a GPU, or a
    ``MixedPrecision`` plugin given a scaler), so that steps the scaler skips for overflow stay silent. With
    ``"bf16-mixed"`` there is no scaler and gradients stay in the parameters' dtype.

    Run the forward pass, ``fabric.backward(loss)`` and ``optimizer.step()`` inside the block; everything
    :class:`~lightning_gradguard.check_step` says about when the check runs applies.

    Args:
        fabric: the :class:`lightning.fabric.Fabric` that set the model up.
        model: the module ``fabric.setup`` returned (or the unwrapped one); for modules set up one by one (a GAN's
            generator and discriminator), a mapping ``{"G": generator, "D": discriminator}``: findings are then
            named ``G.<param>``, ``D.<param>``.
        optimizer: the optimizer(s) ``fabric.setup`` returned (or the unwrapped ones); ``None``: any optimizer
            that steps inside the block.
        strict: raise :class:`~lightning_gradguard.GradGuardError` for findings whose default action is
            ``"raise"``; otherwise every finding is a warning.
        ignore: fnmatch globs on parameter names never to report.
        step: the step number the findings carry.
        trace: trace the forward pass (to tell ``detached`` from ``unused`` and name the line).

    Raises:
        TypeError: ``fabric`` is not a ``Fabric``, or another argument is of the wrong type.

    Example::

        >>> import torch
        >>> from lightning.fabric import Fabric
        >>> from lightning_gradguard.fabric import check_fabric_step
        >>> fabric = Fabric(accelerator="cpu", devices=1)
        >>> net = torch.nn.Linear(4, 1)
        >>> model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
        >>> with check_fabric_step(fabric, model, opt) as chk:
        ...     fabric.backward(model(torch.randn(2, 4)).sum())
        ...     opt.step()
        >>> chk.findings
        []
    """
    if not isinstance(fabric, Fabric):
        raise TypeError(f"`check_fabric_step(fabric={fabric!r})` must be a `lightning.fabric.Fabric`.")
    if isinstance(optimizer, (list, tuple)):
        optimizer = [unwrap_optimizer(o) for o in optimizer]
    elif optimizer is not None:
        optimizer = unwrap_optimizer(optimizer)
    if isinstance(model, Mapping):
        model = nn.ModuleDict({name: unwrap_model(m) for name, m in model.items()})
    else:
        model = unwrap_model(model)
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    return check_step(model, optimizer, scaler=scaler, strict=strict, ignore=ignore, step=step, trace=trace)


def unwrap_model(model: Any) -> Any:
    """The user's module inside Fabric's wrapper (also a ``torch.compile``-d one); anything else unchanged."""
    wrappers = _compat.fabric_wrappers()
    if wrappers is None:
        return model
    inner = _compat.compiled_inner(model)  # `torch.compile(fabric_module)`
    if isinstance(inner, wrappers[0]):
        model = inner
    if isinstance(model, wrappers[0]):
        return model.module
    return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The user's optimizer inside Fabric's wrapper; anything else unchanged."""
    wrappers = _compat.fabric_wrappers()
    if wrappers is not None and isinstance(optimizer, wrappers[1]):
        return optimizer.optimizer
    return optimizer
