"""``check_step``: the guard for plain PyTorch training loops."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .core import GuardCore
from .findings import Finding
from .policy import DEFAULT_ACTIONS, Policy

__all__ = ["check_step"]


class check_step:  # noqa: N801 - used like a function: `with check_step(model, opt):`
    """Check one training step of a plain PyTorch loop: every parameter the optimizer steps must get a usable
    gradient.

    Run the forward pass, the loss, ``backward()`` and ``optimizer.step()`` inside the block. The step is traced,
    so a parameter without a gradient is classified (``frozen``, ``unused``, ``detached``, ``zero``,
    ``nonfinite``, ``orphan``, ``stale``) and a detached one names the line that cut its gradient path.

    The check runs just before each ``optimizer.step()`` in the block (with ``optimizer=None``: of any optimizer).
    With ``optimizer=None`` and no optimizer stepping, it runs when the block ends, over the model's trainable
    parameters. A given optimizer that does not step (a ``GradScaler`` skipped it) leaves nothing to judge. A loss
    without a graph raises :class:`~lightning_gradguard.GradGuardError` at ``backward()`` (torch would fail there
    anyway), naming the parameters that were cut and where.

    Args:
        model: the model whose parameters are checked.
        optimizer: the optimizer that steps them; ``None``: any optimizer that steps inside the block.
        strict: raise :class:`~lightning_gradguard.GradGuardError` for findings whose default action is
            ``"raise"`` (unused, detached, stale, nonfinite). Otherwise every finding is a warning.
        ignore: fnmatch globs on parameter names never to report.
        step: the step number the findings carry.
        trace: trace the forward pass (needed to tell ``detached`` from ``unused`` and to name the line).

    Example::

        >>> import torch
        >>> from lightning_gradguard import check_step
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with check_step(model, opt) as chk:
        ...     loss = model(torch.randn(2, 4)).sum()
        ...     loss.backward()
        ...     opt.step()
        >>> chk.findings
        []
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        strict: bool = False,
        ignore: Sequence[str] | None = None,
        step: int = 0,
        trace: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`check_step(model={model!r})` must be a `torch.nn.Module`.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`check_step(optimizer={optimizer!r})` must be a `torch.optim.Optimizer` or None.")
        actions = DEFAULT_ACTIONS if strict else dict.fromkeys(DEFAULT_ACTIONS, "warn")
        self.model = model
        self.optimizer = optimizer
        self.strict = strict
        self.step = step
        self.trace = trace
        self._core = GuardCore(Policy(actions, ignore, owner="check_step"), "always" if trace else "never")
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._stepped = False
        self._step = step

    @property
    def findings(self) -> list[Finding]:
        """Every finding of the block (each once)."""
        return self._core.findings

    @property
    def report(self):  # noqa: ANN201 - RunReport, imported lazily in docs
        """The :class:`~lightning_gradguard.report.RunReport` of the block."""
        return self._core.report

    def __enter__(self) -> check_step:
        core = self._core
        core.bind(self.model, on_backward=self._on_backward)
        if self.optimizer is not None:
            self._handle = self.optimizer.register_step_pre_hook(self._on_step)
        else:
            self._handle = register_optimizer_step_pre_hook(self._on_step)
        core.begin_batch()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        core = self._core
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if exc_type is not None:
            core.abort()
            return
        core.end_batch()
        try:
            if not self._stepped and self.optimizer is None and core.has_losses:
                params = [p for p in self.model.parameters() if p.requires_grad]
                core.check(params, self._step)
            core.finish(self._step)
        finally:
            core.abort()

    def _on_backward(self, loss: torch.Tensor) -> None:
        self._core.record_loss(loss, self._step)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        core = self._core
        core.pause()
        self._stepped = True
        opts = [optimizer]
        core.check(core.params_of(optimizer), self._step, optimizers=opts)
        self._step += 1
        if core.tracer is not None:
            core.tracer.paused = False  # more forward passes may follow in the same block
