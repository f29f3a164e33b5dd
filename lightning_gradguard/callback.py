"""``GradGuard``: the Lightning adapter. It only wires Trainer hooks to :class:`~lightning_gradguard.core.GuardCore`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from . import _compat
from .core import GuardCore
from .dashboard import Dashboard
from .distributed import RankSync
from .findings import Finding
from .measure import amp_scale
from .options import DEFAULT_ACTIONS, DEFAULT_WINDOW, Action, Diagnose, GuardOptions, Norms, Sync
from .policy import GradGuardWarning, Policy, function_site
from .report import RunReport

__all__ = ["GradGuard", "rank_zero_warnings"]

log = logging.getLogger(__name__)


def _read_only(name: str) -> property:
    """The option ``name`` of :attr:`GradGuard.options` as an attribute that cannot be set."""

    def get(self: GradGuard) -> Any:
        value = getattr(self._options, name)
        return list(value) if name == "ignore" else value

    def refuse(self: GradGuard, value: Any) -> None:
        raise AttributeError(
            f"`GradGuard.{name}` is fixed when the guard is built: pass `GradGuard({name}={value!r})`, or use "
            f"`guard.replace({name}={value!r})` for a new guard with it changed."
        )

    return property(get, refuse, doc=f"The ``{name}`` option (read-only).")


class GradGuard(Callback):
    """Proves, on every optimizer step, that each parameter handed to the optimizer received a usable gradient.

    Each parameter that did not is classified (``frozen``, ``unused``, ``detached``, ``orphan``, ``stale``,
    ``nonfinite``, ``zero``; the README's kinds table), explained (naming the line of your code that cut its gradient
    path) and, per kind, raised as :class:`~lightning_gradguard.GradGuardError`, warned about once, or ignored.
    Gradient dashboards go to the Trainer's loggers (the README lists every tag), and the run report is printed and
    written as JSON at the end of ``fit``. The options are fixed when the guard is built (:meth:`replace`).

    Args:
        on_frozen: action for a parameter in the optimizer with ``requires_grad=False``.
        on_unused: action for a trainable parameter in the optimizer that the loss does not depend on.
        on_detached: action for a parameter the loss depends on through a cut gradient path.
        on_orphan: action for a trainable parameter that receives gradients but no optimizer holds.
        on_stale: action for an optimizer tensor that is not a parameter of the model.
        on_nonfinite: action for a NaN/Inf gradient (not counting AMP overflow steps the grad scaler skips).
        on_zero: action for a gradient that is exactly zero everywhere.
        ignore: fnmatch globs on parameter names never to report, e.g. ``["pooler.*", "*.bias"]``, or one glob.
        diagnose: which steps to trace, to tell *detached* from *unused* and name the line: ``"first"``,
            ``"on_finding"`` (the first, and the step after a new problem shows up untraced), ``"always"``, ``"never"``.
        log_every_n_steps: log the dashboards in every n-th batch that steps an optimizer; ``None``: the Trainer's
            ``log_every_n_steps``; ``0``: never (the checks and the run report stay).
        norms: gradient norms to log besides the total: ``"param"`` (per tensor), ``"module"`` or ``"total"`` (none).
        max_norm_tags: at most this many norm tags per optimizer; beyond, modules are merged into their parents.
        histograms: log the distribution of the per-parameter gradient norms (TensorBoard).
        value_histograms: log a histogram of the gradient values per tag of ``norms`` (a pass over every gradient).
        update_ratio: log ``||w_after - w_before|| / ||w_before||`` per tag of ``norms`` on logged steps.
        write_report: write the run report as JSON at the end of ``fit`` and when it fails.
        report_path: where to write it; ``None``: ``gradguard_report.json`` in the first logger's ``log_dir``, else
            in the Trainer's ``default_root_dir``.
        idle_window: a parameter without a usable gradient on fewer than this many checked steps in a row is idle
            (routing, LayerDrop), not a finding; ``1`` judges every step on its own.
        flow_every: draw the gradient-flow picture on the first logged step and every this many logged steps after
            it, and at the end of ``fit``; ``0``: never.
        sync: ``"step"``: read the gradients' norms at once (one host sync per step); ``"late"``: read them at the
            next step without waiting for the device (a NaN is then raised one step late).

    Raises:
        ValueError: an option has a value it does not take (the message quotes the option and the value).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gradguard import GradGuard
        >>> trainer = Trainer(callbacks=[GradGuard(on_zero="ignore", ignore=["aux.*"])], logger=False)
    """

    def __init__(
        self,
        on_frozen: Action = DEFAULT_ACTIONS["frozen"],
        on_unused: Action = DEFAULT_ACTIONS["unused"],
        on_detached: Action = DEFAULT_ACTIONS["detached"],
        on_orphan: Action = DEFAULT_ACTIONS["orphan"],
        on_stale: Action = DEFAULT_ACTIONS["stale"],
        on_nonfinite: Action = DEFAULT_ACTIONS["nonfinite"],
        on_zero: Action = DEFAULT_ACTIONS["zero"],
        ignore: str | list[str] | None = None,
        diagnose: Diagnose = "on_finding",
        log_every_n_steps: int | None = None,
        norms: Norms = "module",
        max_norm_tags: int = 100,
        histograms: bool = True,
        value_histograms: bool = False,
        update_ratio: bool = False,
        write_report: bool = True,
        report_path: str | None = None,
        idle_window: int = DEFAULT_WINDOW,
        flow_every: int = 10,
        sync: Sync = "step",
    ) -> None:
        options = GuardOptions(
            on_frozen=on_frozen,
            on_unused=on_unused,
            on_detached=on_detached,
            on_orphan=on_orphan,
            on_stale=on_stale,
            on_nonfinite=on_nonfinite,
            on_zero=on_zero,
            ignore=ignore,  # type: ignore[arg-type]  # checked and made a tuple
            diagnose=diagnose,
            log_every_n_steps=log_every_n_steps,
            norms=norms,
            max_norm_tags=max_norm_tags,
            histograms=histograms,
            value_histograms=value_histograms,
            update_ratio=update_ratio,
            write_report=write_report,
            report_path=report_path,
            idle_window=idle_window,
            flow_every=flow_every,
            sync=sync,
        )
        self._options = options
        self._policy = Policy(options.actions, options.ignore)
        self._dashboard = Dashboard(options)
        self._core = GuardCore(self._policy, options.diagnose, options.idle_window)
        self._restored: dict[str, Any] | None = None
        self._restored_core: dict[str, Any] | None = None
        self._reported = False
        # Lightning reads `state_key` around every hook it calls (its profiler's action names): made once, since the
        # options it is made of are read-only.
        self._state_key = self._generate_state_key(
            actions=tuple(self._policy.actions.items()), ignore=tuple(self.ignore), diagnose=self.diagnose
        )
        self._scaler: Any = None  # the precision plugin's grad scaler, read at `on_train_start`
        self._rank = 0  # the process's rank, read at `setup`

    on_frozen = _read_only("on_frozen")
    on_unused = _read_only("on_unused")
    on_detached = _read_only("on_detached")
    on_orphan = _read_only("on_orphan")
    on_stale = _read_only("on_stale")
    on_nonfinite = _read_only("on_nonfinite")
    on_zero = _read_only("on_zero")
    ignore = _read_only("ignore")
    diagnose = _read_only("diagnose")
    log_every_n_steps = _read_only("log_every_n_steps")
    norms = _read_only("norms")
    max_norm_tags = _read_only("max_norm_tags")
    histograms = _read_only("histograms")
    value_histograms = _read_only("value_histograms")
    update_ratio = _read_only("update_ratio")
    write_report = _read_only("write_report")
    report_path = _read_only("report_path")
    idle_window = _read_only("idle_window")
    flow_every = _read_only("flow_every")
    sync = _read_only("sync")

    @property
    def options(self) -> GuardOptions:
        """Every option, as checked when the guard was built."""
        return self._options

    def replace(self, **changes: Any) -> GradGuard:
        """A new guard of this class with the same options but ``changes`` (checked as in the constructor); it holds
        nothing of this one's run. A subclass whose constructor takes other arguments overrides it.

        Example::

            >>> GradGuard(on_zero="ignore").replace(diagnose="always")
            GradGuard(on_frozen='warn', on_unused='raise', ..., on_zero='ignore', ignore=[], diagnose='always', ...)
        """
        return type(self)(**{**self._options.as_kwargs(), **changes})

    def __repr__(self) -> str:
        return f"GradGuard({', '.join(f'{k}={v!r}' for k, v in self._options.as_kwargs().items())})"

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
        return self._state_key  # saved checkpoints are keyed by this text

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
        self._rank = trainer.global_rank  # warnings are shown on rank 0 only, from here to the end of `fit`
        if self._restored is not None:  # a checkpoint loaded before `setup`
            self._core.report.load_dict(self._restored)
            self._restored = None
        if self._restored_core is not None:
            self._core.load_state_dict(self._restored_core)
            self._restored_core = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._core.bind(pl_module)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)  # one plugin for the whole fit
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
        scaler, scale = amp_scale(self._scaler, optimizer)
        params = self._core.params_of(optimizer)
        logged = self._dashboard.should_log(trainer)
        late = self.sync == "late" and not logged
        tag = self._dashboard.slot_of(trainer, optimizer) if late else None  # where its total norm is filed later
        try:
            with rank_zero_warnings(self._rank):
                stats = self._core.check(params, trainer.global_step, optimizers=trainer.optimizers, scaler=scaler,
                                         scale=scale, late=late, tag=tag)  # fmt: skip
        finally:
            self._record_late()
        if stats.late or stats.skipped:  # norms read later, or none to show (a skipped batch)
            self._dashboard.mark_stepped()
        elif self._core.index is not None:
            idle = (self._core.report.idle_shares() or None) if logged else None
            with _compat.torch_function_disabled():  # no function mode still on the stack sees the dashboard's ops
                self._dashboard.log_step(
                    trainer, optimizer, stats, self._core.index, self._core.report, stats.scale, idle=idle
                )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._core.end_batch()
        self._dashboard.end_batch()

    def _resolve_late(self) -> None:
        """Judge the late reads (``sync="late"``) still waiting, and record their totals."""
        try:
            with rank_zero_warnings(self._rank):
                self._core.resolve_late()
        finally:
            self._record_late()

    def _record_late(self) -> None:
        for (k, step), _, stats in self._core.pop_resolved():
            self._dashboard.record_total(k, step, stats.total_norm)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resolve_late()
        self._dashboard.end_epoch(trainer, pl_module.device)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._core.abort()
        try:
            self._resolve_late()
            with rank_zero_warnings(self._rank):
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
            **self._core.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("report")
        if self._restored is not None:
            self._core.report.load_dict(self._restored)
        for kind, param in state_dict.get("warned", []):
            self._policy.warned.add((kind, param))
        self._restored_core = state_dict
        self._core.load_state_dict(state_dict)


def _keep_one(trainer: Trainer, guards: list[GradGuard]) -> GradGuard:
    """Keep one of several GradGuards in ``trainer.callbacks`` and say so once; return the one kept.

    Two guards would check every step twice, print two reports and write one JSON twice. The one kept is the first
    whose options are not all the defaults (the configured one, wherever the bare one came from: a YAML's
    ``class_path: GradGuard`` beside ``--trainer.callbacks+=GradGuard``), else the first. It takes the first guard's
    place in the list and the others leave it, so their state is neither saved nor restored. The list is edited in
    place while Lightning's ``setup`` loop runs over it (at the first guard): only items after the first guard move.
    """
    kept = next((g for g in guards if g.options.changed()), guards[0])
    first, left_out = trainer.callbacks.index(guards[0]), {id(g) for g in guards}
    trainer.callbacks[:] = [
        kept if i == first else cb for i, cb in enumerate(trainer.callbacks) if i == first or id(cb) not in left_out
    ]

    def own(guard: GradGuard) -> str:
        return f"GradGuard({', '.join(f'{k}={v!r}' for k, v in guard.options.changed().items())})"

    options, dropped = kept.options.as_kwargs(), []
    for guard in guards:
        if guard is not kept:
            diff = [f"{k} ({v!r} vs {options[k]!r})" for k, v in guard.options.as_kwargs().items() if v != options[k]]
            dropped.append(f"{own(guard)}, which differs in {', '.join(diff)}")  # Lightning refuses identical ones
    rank_zero_warn(
        f"This Trainer has {len(guards)} GradGuard callbacks: only {own(kept)} runs "
        f"({'the first with options of its own' if kept.options.changed() else 'the first'}), so that each step "
        f"is checked once, with one report and one JSON. Left out: {'; '.join(dropped)}. Configure GradGuard once: "
        "drop the extra `--trainer.callbacks+=GradGuard`, the YAML's entry under `trainer.callbacks`, or the second "
        "GradGuard in `Trainer(callbacks=...)`."
    )
    return kept


def rank_zero_warnings(rank: int) -> AbstractContextManager[None]:
    """Silence :class:`~lightning_gradguard.GradGuardWarning` inside the block on every rank but zero.

    Findings are the same on every rank; one copy of each warning is enough. On rank zero (every step of a
    single-process run) a context manager that does nothing, made once.
    """
    return _NOTHING if rank == 0 else _silenced()


_NOTHING = nullcontext()


@contextmanager
def _silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        yield
