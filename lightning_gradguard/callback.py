"""``GradGuard``: the Lightning adapter. It only wires Trainer hooks to :class:`~lightning_gradguard.core.GuardCore`."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from .core import DIAGNOSE, GuardCore
from .findings import Finding
from .policy import ACTIONS, Policy
from .report import RunReport

__all__ = ["GradGuard"]

log = logging.getLogger(__name__)

Action = Literal["raise", "warn", "ignore"]


class GradGuard(Callback):
    """Proves, on every optimizer step, that each parameter handed to the optimizer received a usable gradient.

    Each parameter that did not is classified, explained (naming the line of your code that cut its gradient
    path) and, per kind, raised as :class:`~lightning_gradguard.GradGuardError`, warned about once, or ignored:

    ============  ========================================================================  =======
    kind          meaning                                                                   default
    ============  ========================================================================  =======
    ``frozen``    in the optimizer, but ``requires_grad=False``                             warn
    ``unused``    trainable and in the optimizer; the loss does not depend on it at all     raise
    ``detached``  the loss depends on its value, but no gradient path reaches it            raise
    ``orphan``    receives gradients, but no optimizer holds it                             warn
    ``stale``     the optimizer holds a tensor that is not a parameter of the model        raise
    ``nonfinite`` NaN/Inf gradient (not counting AMP overflow steps the scaler skips)       raise
    ``zero``      gradient exactly zero everywhere                                         warn
    ============  ========================================================================  =======

    Gradients are judged at ``on_before_optimizer_step``: accumulated over micro-batches, AMP-unscaled, before
    clipping, for the parameters of the optimizer that steps. The always-on check is one fused norm pass with one
    host sync; the forward pass is traced (to tell *detached* from *unused* and find the line) only on the steps
    that ``diagnose`` selects.

    Args:
        on_frozen: action for a parameter in the optimizer with ``requires_grad=False``.
        on_unused: action for a trainable parameter in the optimizer that the loss does not depend on.
        on_detached: action for a parameter the loss depends on through a cut gradient path.
        on_orphan: action for a trainable parameter that receives gradients but no optimizer holds.
        on_stale: action for an optimizer tensor that is not a parameter of the model.
        on_nonfinite: action for a NaN/Inf gradient.
        on_zero: action for a gradient that is exactly zero everywhere.
        ignore: fnmatch globs on parameter names (as ``named_parameters()`` gives them) never to report,
            e.g. ``["pooler.*", "*.bias"]``.
        diagnose: which steps to trace: ``"first"`` (the first optimizer step), ``"on_finding"`` (the first, and
            the next step after a new problem shows up on an untraced step), ``"always"`` (every step; slower),
            ``"never"`` (no tracing: unused and detached are not told apart).

    Raises:
        ValueError: an option has a value it does not take.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gradguard import GradGuard
        >>> trainer = Trainer(callbacks=[GradGuard(on_zero="ignore", ignore=["aux.*"])], logger=False)
    """

    def __init__(
        self,
        on_frozen: Action = "warn",
        on_unused: Action = "raise",
        on_detached: Action = "raise",
        on_orphan: Action = "warn",
        on_stale: Action = "raise",
        on_nonfinite: Action = "raise",
        on_zero: Action = "warn",
        ignore: list[str] | None = None,
        diagnose: Literal["first", "on_finding", "always", "never"] = "on_finding",
    ) -> None:
        actions = {
            "frozen": on_frozen,
            "unused": on_unused,
            "detached": on_detached,
            "orphan": on_orphan,
            "stale": on_stale,
            "nonfinite": on_nonfinite,
            "zero": on_zero,
        }
        for kind, action in actions.items():
            if action not in ACTIONS:
                raise ValueError(f"`GradGuard(on_{kind}={action!r})` must be one of 'raise', 'warn', 'ignore'.")
        if diagnose not in DIAGNOSE:
            raise ValueError(
                f"`GradGuard(diagnose={diagnose!r})` must be one of 'first', 'on_finding', 'always', 'never'."
            )
        self._policy = Policy(actions, ignore, owner="GradGuard")
        self.on_frozen = on_frozen
        self.on_unused = on_unused
        self.on_detached = on_detached
        self.on_orphan = on_orphan
        self.on_stale = on_stale
        self.on_nonfinite = on_nonfinite
        self.on_zero = on_zero
        self.ignore = list(self._policy.ignore)
        self.diagnose = diagnose
        self._core = GuardCore(self._policy, diagnose)
        self._restored: dict[str, Any] | None = None

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={getattr(self, k)!r}"
            for k in ("on_frozen", "on_unused", "on_detached", "on_orphan", "on_stale", "on_nonfinite", "on_zero",
                      "ignore", "diagnose")  # fmt: skip
        )
        return f"GradGuard({args})"

    @property
    def findings(self) -> list[Finding]:
        """Every finding of the run, each ``(kind, param)`` once, in the order first seen."""
        return self._core.findings

    @property
    def report(self) -> RunReport:
        """The run report: findings with first step and count; ``.table()``, ``.to_dict()``, ``.write_json()``."""
        return self._core.report

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            actions=tuple(self._policy.actions.items()), ignore=tuple(self.ignore), diagnose=self.diagnose
        )

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._core = GuardCore(self._policy, self.diagnose)
        if self._restored is not None:
            self._core.report.load_dict(self._restored)
            self._restored = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._core.bind(pl_module)
        if self._core.compiled and self.diagnose != "never":
            log.info("GradGuard: the model is compiled; findings come from gradients alone (no tracing).")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._core.begin_batch()

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._core.record_loss(loss, trainer.global_step)
        if pl_module.automatic_optimization:
            self._core.pause()  # what follows in this batch is backward and the optimizer step

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        scale = 1.0
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = float(scaler.get_scale())  # fused optimizers unscale inside `step()`
        params = self._core.params_of(optimizer)
        self._core.check(params, trainer.global_step, optimizers=trainer.optimizers, scaler=scaler, scale=scale)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._core.end_batch()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._core.abort()
        try:
            self._core.finish(trainer.global_step)
        finally:
            rank_zero_info(self._core.report.table())

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._core.abort()
        if self._core.findings:
            rank_zero_info(self._core.report.table())

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._core.abort()

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"report": self._core.report.to_dict(), "warned": sorted(list(k) for k in self._policy.warned)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("report")
        if self._restored is not None:
            self._core.report.load_dict(self._restored)
        for kind, param in state_dict.get("warned", []):
            self._policy.warned.add((kind, param))
