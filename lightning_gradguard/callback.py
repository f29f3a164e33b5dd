"""``GradGuard``: the Lightning adapter. It only wires Trainer hooks to :class:`~lightning_gradguard.core.GuardCore`."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from .core import DIAGNOSE, GuardCore
from .dashboard import Dashboard
from .distributed import RankSync, rank_zero_warnings
from .findings import Finding
from .history import DEFAULT_WINDOW
from .measure import loss_scale
from .policy import Policy, function_site
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

    Idle is not dead: a missing or all-zero gradient becomes ``unused`` or ``zero`` only after ``idle_window``
    checked steps in a row (routing, LayerDrop and stochastic depth skip parts on some steps by design); until then
    the part is *idle*, and the run report shows each idle module's share of steps (``report.idle_shares()``).

    Gradients are judged at ``on_before_optimizer_step``: accumulated over micro-batches, AMP-unscaled, before
    clipping, for the parameters of the optimizer that steps (not on a skipped batch, for which ``training_step``
    returned ``None``). The always-on check is one fused norm pass with one
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
            e.g. ``["pooler.*", "*.bias"]``, or one glob as a string (``"pooler.*"``).
        diagnose: which steps to trace: ``"first"`` (the first optimizer step), ``"on_finding"`` (the first, and
            the next step after a new problem shows up on an untraced step), ``"always"`` (every step; slower),
            ``"never"`` (no tracing: unused and detached are not told apart). A traced step runs code compiled by
            ``torch.compile`` eagerly (torch >= 2.6), so that its cuts are named too; the other steps run it compiled.
        log_every_n_steps: log the dashboards in every n-th batch that steps an optimizer, at the same steps as
            Lightning's own ``self.log`` (steps n-1, 2n-1, ...: ``(step + 1) % n == 0``); ``None``: the Trainer's
            ``log_every_n_steps``; ``0``: never (the checks and the run report stay).
        norms: which gradient norms to log besides the total: ``"param"`` (one per parameter tensor), ``"module"``
            (one per module, over its own parameters) or ``"total"`` (the total only).
        max_norm_tags: at most this many norm tags per optimizer; beyond, modules are merged into their parents
            until they fit (a model with thousands of tensors gets one tag per block).
        histograms: log the distribution of the per-parameter gradient norms (TensorBoard; cheap).
        value_histograms: log a histogram of the gradient values per tag of ``norms`` (TensorBoard; costs a pass
            over every gradient on logged steps).
        update_ratio: log ``||w_after - w_before|| / ||w_before||`` of each logged step per tag of ``norms`` (copies
            the updated parameters on logged steps, until the end of the batch).
        write_report: write the run report as JSON at the end of ``fit`` and when it fails.
        report_path: where to write it; ``None``: ``gradguard_report.json`` in the first logger's ``log_dir``, else
            in the Trainer's ``default_root_dir``.
        idle_window: idle is not dead: a parameter without a usable gradient (``None`` or all zero) on fewer than
            this many checked steps in a row is *idle* on those steps (MoE routing, LayerDrop, stochastic depth),
            shown in the report's idle shares, not a finding; a run of this many steps (counting from the start of
            training) makes it ``unused`` or ``zero``. A parameter that gets no usable gradient on any step of a
            shorter run is reported at the end of ``fit``. Reported at once whatever the window: ``detached`` (a
            traced step shows the cut), an all-zero gradient caused by a traced zero-derivative op, and a part that
            never had a gradient whose output a traced step shows logged or ``.item()``-ed, not in the loss. With the
            default 16, a LayerDrop-0.1 layer raises a false alarm with a chance of about 1e-10 in a million steps.
            ``1``: judge every step on its own.
        flow_every: draw the gradient-flow picture (TensorBoard's Images tab) on the first logged step and every
            this many logged steps after it, and at the end of ``fit`` (then also as ``gradguard_flow.png`` beside
            the JSON report); ``0``: never.
        sync: when the check reads the gradients' norms. ``"step"``: at once, one device→host sync per optimizer
            step, so that ``raise`` stops a NaN before the optimizer applies it. ``"late"`` (for accelerators,
            where that sync stalls the queue of kernels): the norms are copied to pinned host memory without
            waiting and judged at the next optimizer step (or at the end of the epoch or of ``fit``); a NaN is then
            raised one step late, with ``Finding.step`` the step that produced it, after its update was applied.
            Missing gradients and ``requires_grad=False`` are seen on the host and judged at once. Read at once all
            the same: steps that log dashboards or are traced, while a trace is pending or a run of all-zero
            gradients lasts (one read late is confirmed on the next step, with its graph), and with a grad scaler
            or several ranks (which synchronise anyway).

    Dashboards, written on rank zero only at ``on_before_optimizer_step`` (accumulated, AMP-unscaled, before
    clipping) at Lightning's own logging step (the number of earlier batches that stepped an optimizer: with one
    optimizer, ``trainer.global_step``). Scalars go to every logger (``log_metrics``); histograms, text, images and
    a custom-scalars layout (one ``GradGuard`` section in TensorBoard's Custom Scalars tab) to TensorBoard loggers:

    ======================================  =========  =============================================================
    key                                     type       value
    ======================================  =========  =============================================================
    ``gradguard/total_norm``                scalar     L2 norm of all gradients of the stepping optimizer
    ``gradguard/grad_norm/<name>``          scalar     L2 norm per parameter or module (``norms``)
    ``gradguard/total_update_ratio``        scalar     ``||w_after - w_before|| / ||w_before||`` (``update_ratio``)
    ``gradguard/update_ratio/<name>``       scalar     the same per parameter or module (``update_ratio``)
    ``gradguard/no_grad/<name>``            scalar     share of the parameters (elements) of ``<name>`` without a
                                                       gradient, from the first logged step it lacks one (modules
                                                       with ``norms="total"``; ``ignore`` matches left out)
    ``gradguard/findings/<kind>``           scalar     distinct findings of a kind so far, only for kinds seen (a
                                                       chart per kind, added to the layout with its first finding)
    ``gradguard/epoch/total_norm_max``      scalar     max of the total norm over the epoch, synced across ranks
    ``gradguard/epoch/total_norm_mean``     scalar     mean of the total norm over the epoch, synced across ranks
    ``gradguard/grad_norms``                histogram  the per-parameter gradient norms (``histograms``)
    ``gradguard/grad_values/<name>``        histogram  gradient values per parameter or module (``value_histograms``)
    ``gradguard/report``                    text       the run report as a markdown list, when it changes and at the
                                                       end (TensorBoard stores it as ``gradguard/report/text_summary``)
    ``gradguard/gradient_flow``             image      per module (rows, model order) the gradient norm across logged
                                                       steps (columns), on a fixed log colour scale; a second panel
                                                       of update ratios with ``update_ratio`` (``flow_every``)
    ======================================  =========  =============================================================

    ``<name>`` is a module (``norms="module"``), a parameter (``"param"``), or a parent module when the tags are
    merged to fit ``max_norm_tags``. A module that has parameters of its own *and* children with parameters gets
    ``<module>.(own)`` for its own ones (``self_attn.(own)``: ``in_proj_weight``, ``in_proj_bias``; beside
    ``self_attn.out_proj``), so that no tag is both a module and a part of its parent's tag.

    With several optimizers, ``total_norm``, ``total_update_ratio``, ``grad_norms`` and the epoch keys end in
    ``_opt<k>`` (``k``: the optimizer's index in ``trainer.optimizers``). The epoch statistics cover the steps
    whose total norm is finite (the scaler's skipped overflow steps are not).

    One GradGuard per Trainer: of several (a YAML's and ``--trainer.callbacks+=GradGuard``), the first whose options
    are not all the defaults, else the first, runs; at ``setup`` it takes the first one's place in
    ``trainer.callbacks``, the others leave the list, and a warning says so. Two with the same options are refused
    by Lightning itself ("more than one stateful callback"): their ``state_key`` is the same.

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
        ignore: str | list[str] | None = None,
        diagnose: Literal["first", "on_finding", "always", "never"] = "on_finding",
        log_every_n_steps: int | None = None,
        norms: Literal["param", "module", "total"] = "module",
        max_norm_tags: int = 100,
        histograms: bool = True,
        value_histograms: bool = False,
        update_ratio: bool = False,
        write_report: bool = True,
        report_path: str | None = None,
        idle_window: int = DEFAULT_WINDOW,
        flow_every: int = 10,
        sync: Literal["step", "late"] = "step",
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
        self._policy = Policy(actions, ignore, owner="GradGuard")  # checks each action, and the globs
        if diagnose not in DIAGNOSE:
            raise ValueError(
                f"`GradGuard(diagnose={diagnose!r})` must be one of 'first', 'on_finding', 'always', 'never'."
            )
        if sync not in ("step", "late"):
            raise ValueError(f"`GradGuard(sync={sync!r})` must be one of 'step', 'late'.")
        if isinstance(idle_window, bool) or not isinstance(idle_window, int) or idle_window < 1:
            raise ValueError(f"`GradGuard(idle_window={idle_window!r})` must be an integer >= 1 (checked steps).")
        self._dashboard = Dashboard(
            log_every_n_steps=log_every_n_steps,
            norms=norms,
            max_norm_tags=max_norm_tags,
            histograms=histograms,
            value_histograms=value_histograms,
            update_ratio=update_ratio,
            write_report=write_report,
            report_path=report_path,
            flow_every=flow_every,
        )
        self.on_frozen = on_frozen
        self.on_unused = on_unused
        self.on_detached = on_detached
        self.on_orphan = on_orphan
        self.on_stale = on_stale
        self.on_nonfinite = on_nonfinite
        self.on_zero = on_zero
        self.ignore = list(self._policy.ignore)
        self.diagnose = diagnose
        self.log_every_n_steps = log_every_n_steps
        self.norms = norms
        self.max_norm_tags = max_norm_tags
        self.histograms = histograms
        self.value_histograms = value_histograms
        self.update_ratio = update_ratio
        self.write_report = write_report
        self.report_path = report_path
        self.idle_window = idle_window
        self.flow_every = flow_every
        self.sync = sync
        self._core = GuardCore(self._policy, diagnose, idle_window)
        self._restored: dict[str, Any] | None = None
        self._restored_history: dict[str, Any] | None = None
        self._restored_pending: list[list[Any]] = []
        self._reported = False

    def __repr__(self) -> str:
        return f"GradGuard({', '.join(f'{k}={v!r}' for k, v in self._options().items())})"

    def _options(self) -> dict[str, Any]:
        """Every option by name, as the constructor stored it (``ignore`` as a list)."""
        return {k: getattr(self, k) for k in inspect.signature(GradGuard.__init__).parameters if k != "self"}

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
        guards = [cb for cb in trainer.callbacks if isinstance(cb, GradGuard)]
        if len(guards) > 1 and guards[0] is self:  # the first of them to be set up decides, once per Trainer
            kept = _keep_one(trainer, guards)
            if kept is not self:  # it took this guard's place in the list, after the loop had passed it
                kept.setup(trainer, pl_module, stage)
                return
        self._core = GuardCore(self._policy, self.diagnose, self.idle_window)
        self._reported = False
        if self._restored is not None:
            self._core.report.load_dict(self._restored)
            self._restored = None
        if self._restored_history is not None:
            self._core.history.load_state_dict(self._restored_history)
            self._restored_history = None
        if self._restored_pending:
            self._core.load_pending_state(self._restored_pending)
            self._restored_pending = []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._core.bind(pl_module)
        # Warnings about frozen/orphan/stale parameters point at the user's `configure_optimizers`, not at `fit`.
        self._policy.optimizer_site = function_site(type(pl_module).configure_optimizers)
        self._core.dist = RankSync.of(trainer.strategy.model, trainer.strategy.root_device)  # None: one process
        self._dashboard.start(trainer)
        if self._core.compiled and self.diagnose != "never":
            log.info(
                "GradGuard: the model is compiled, and torch < 2.6 cannot run it eagerly for a traced step: findings "
                "come from gradients alone (unused and detached are not told apart)."
            )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._core.begin_batch()

    @override
    def on_before_zero_grad(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._core.grads_cleared()  # automatic optimization, before each closure's training_step

    @override
    @torch.compiler.disable  # run by `manual_backward` inside a compiled `training_step`: dynamo must not trace it
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._core.record_loss(loss, trainer.global_step)
        if pl_module.automatic_optimization:
            self._core.pause()  # what follows in this batch is backward and the optimizer step

    @override
    @torch.compiler.disable  # run by `opt.step()` inside a compiled `training_step` (manual optimization)
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        scale: float | torch.Tensor = 1.0
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = loss_scale(scaler)  # fused optimizers unscale inside `step()`; read with the norms, no own sync
        params = self._core.params_of(optimizer)
        logged = self._dashboard.should_log(trainer)
        late = self.sync == "late" and not logged
        tag = self._dashboard.slot_of(trainer, optimizer) if late else None  # where its total norm is filed later
        try:
            with rank_zero_warnings(trainer.global_rank):
                stats = self._core.check(params, trainer.global_step, optimizers=trainer.optimizers, scaler=scaler,
                                         scale=scale, late=late, tag=tag)  # fmt: skip
        finally:
            self._record_late()
        if stats.late or stats.skipped:  # norms read later, or none to show (a skipped batch)
            self._dashboard.mark_stepped()
        elif self._core.index is not None:
            idle = (self._core.report.idle_shares() or None) if logged else None
            with torch._C.DisableTorchFunction():  # no function mode still on the stack sees the dashboard's ops
                self._dashboard.log_step(
                    trainer, optimizer, stats, self._core.index, self._core.report, stats.scale, idle=idle
                )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._core.end_batch()
        self._dashboard.end_batch()

    def _resolve_late(self, trainer: Trainer) -> None:
        """Judge the late reads (``sync="late"``) still waiting, and record their totals."""
        try:
            with rank_zero_warnings(trainer.global_rank):
                self._core.resolve_late()
        finally:
            self._record_late()

    def _record_late(self) -> None:
        for (k, step), _, stats in self._core.take_resolved():
            self._dashboard.record_total(k, step, stats.total_norm)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resolve_late(trainer)
        self._dashboard.end_epoch(trainer, pl_module.device)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._core.abort()
        try:
            self._resolve_late(trainer)
            with rank_zero_warnings(trainer.global_rank):
                self._core.finish(trainer.global_step)
        finally:
            self._publish_report(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._core.drop_late()
        self._core.abort()
        if not self._reported:  # `on_train_end` may have published it already, then raised
            self._publish_report(trainer, quiet_if_clean=True)

    def _publish_report(self, trainer: Trainer, quiet_if_clean: bool = False) -> None:
        """Write the JSON report and print the table (rank zero), once per run."""
        self._reported = True
        path = self._dashboard.finish(trainer, self._core.report)
        if self._core.findings or not quiet_if_clean:
            rank_zero_info(self._core.report.table() + (f"\nGradGuard: report written to {path}" if path else ""))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._core.drop_late()
        self._core.abort()
        self._dashboard.release()

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "report": self._core.report.to_dict(),
            "warned": sorted(list(k) for k in self._policy.warned),
            "history": self._core.history.state_dict(),
            "pending": self._core.pending_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("report")
        if self._restored is not None:
            self._core.report.load_dict(self._restored)
        for kind, param in state_dict.get("warned", []):
            self._policy.warned.add((kind, param))
        self._restored_history = state_dict.get("history")
        if self._restored_history is not None:
            self._core.history.load_state_dict(self._restored_history)
        self._restored_pending = state_dict.get("pending", [])
        self._core.load_pending_state(self._restored_pending)


def _keep_one(trainer: Trainer, guards: list[GradGuard]) -> GradGuard:
    """Keep one of several GradGuards in ``trainer.callbacks`` and say so once; return the one kept.

    Two guards would check every step twice, print two reports and write one JSON twice. The one kept is the first
    whose options are not all the defaults (the configured one, wherever the bare one came from: a YAML's
    ``class_path: GradGuard`` beside ``--trainer.callbacks+=GradGuard``), else the first. It takes the first guard's
    place in the list and the others leave it, so their state is neither saved nor restored. The list is edited in
    place while Lightning's ``setup`` loop runs over it (at the first guard): only items after the first guard move.
    """
    defaults = GradGuard()._options()
    kept = next((g for g in guards if g._options() != defaults), guards[0])
    first, left_out = trainer.callbacks.index(guards[0]), {id(g) for g in guards}
    trainer.callbacks[:] = [
        kept if i == first else cb for i, cb in enumerate(trainer.callbacks) if i == first or id(cb) not in left_out
    ]

    def own(guard: GradGuard) -> str:
        return f"GradGuard({', '.join(f'{k}={v!r}' for k, v in guard._options().items() if v != defaults[k])})"

    options, dropped = kept._options(), []
    for guard in guards:
        if guard is not kept:
            diff = [f"{k} ({v!r} vs {options[k]!r})" for k, v in guard._options().items() if v != options[k]]
            dropped.append(f"{own(guard)}, which differs in {', '.join(diff)}")  # Lightning refuses identical ones
    rank_zero_warn(
        f"This Trainer has {len(guards)} GradGuard callbacks: only {own(kept)} runs "
        f"({'the first with options of its own' if kept._options() != defaults else 'the first'}), so that each step "
        f"is checked once, with one report and one JSON. Left out: {'; '.join(dropped)}. Configure GradGuard once: "
        "drop the extra `--trainer.callbacks+=GradGuard`, the YAML's entry under `trainer.callbacks`, or the second "
        "GradGuard in `Trainer(callbacks=...)`."
    )
    return kept
