"""The dashboard's Lightning side: when and what to log of GradGuard's measurements, on a Trainer's loggers.

:class:`Dashboard` takes what :meth:`~lightning_gradguard.core.GuardCore.check` already measured (one
:class:`~lightning_gradguard.measure.GradStats` per optimizer step: per-parameter norms from the one fused pass) and
writes, on the steps it logs, only on rank zero (through :mod:`~lightning_gradguard.tensorboard`):

* scalars, through ``logger.log_metrics`` of every logger (TensorBoard, CSV, W&B, MLflow, ...), under the tags of
  :mod:`~lightning_gradguard.tags`;
* histograms (:mod:`~lightning_gradguard.histograms`: every tag's values bucketed together on their device, one
  transfer per step), the findings report as markdown text and a custom-scalars layout, to the loggers whose
  ``experiment`` is a TensorBoard ``SummaryWriter``;
* update-to-weight ratios (:mod:`~lightning_gradguard.ratios`: the parameters copied before a logged step, the copy
  dropped at the end of the batch);
* the gradient-flow picture (:mod:`~lightning_gradguard.flow`: per module, gradient norm and update ratio across
  logged steps) to TensorBoard's Images tab on the first and every ``flow_every``-th logged step, and at the end of
  ``fit`` as ``gradguard_flow.png`` beside the JSON report;
* the run report as JSON at the end of ``fit``.

Steps are Lightning's own: the dashboards are written in the batches where Lightning logs ``self.log`` values
(``(step + 1) % log_every_n_steps == 0``, ``step``: the batches that stepped an optimizer so far), at that step.
The histograms' key buffer (4 MiB per device) is kept between logged steps and dropped at the end of ``fit``.

Nothing here runs on steps that are not logged, except a running max/sum/count of the total norm (three Python
floats) for the epoch statistics.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from ._compat import batches_that_stepped
from .flow import FLOW_FILE, FLOW_TAG, FlowHistory, FlowPicture, render_flow, write_png
from .histograms import HistogramBuffers, histogram_counts, histograms_counts
from .measure import GradStats
from .options import GuardOptions
from .params import ParamIndex, optimizer_layout
from .ratios import UpdateSnapshot, update_ratio
from .report import RunReport
from .tags import TAG, TEXT_TAG, chart_of, custom_scalars_layout, group_keys
from .tensorboard import LogTarget, find_targets, write_image, write_layout, write_step, write_text

__all__ = ["FLOW_COLUMNS", "REPORT_FILE", "Dashboard"]

#: At most this many logged steps (columns) in the gradient-flow picture; older ones are merged.
FLOW_COLUMNS = 200
#: The name of the JSON run report.
REPORT_FILE = "gradguard_report.json"


class Dashboard:
    """Writes GradGuard's gradient dashboards and run report to a Trainer's loggers (see ``GradGuard``'s docstring
    for the options and the list of tags).

    Args:
        options: the guard's options (the dashboards read theirs: ``log_every_n_steps``, ``norms``,
            ``max_norm_tags``, ``histograms``, ``value_histograms``, ``update_ratio``, ``write_report``,
            ``report_path``, ``flow_every``); ``changes``: options changed from those, checked as ``GradGuard`` checks
            them.

    Raises:
        ValueError: an option has a value it does not take (the message quotes ``GradGuard(option=value)``).
    """

    def __init__(self, options: GuardOptions | None = None, **changes: Any) -> None:
        options = dataclasses.replace(options or GuardOptions(), **changes)
        self.options = options
        self._reset()

    def _reset(self) -> None:
        self._targets: list[LogTarget] = []
        self._views: dict[int, _View] = {}
        self._layout: _Layout | None = None  # the custom-scalars layout written last
        self._reported = -1  # number of report entries last written as text
        self._snapshots: list[UpdateSnapshot] = []
        self._buffers = HistogramBuffers()  # histograms_counts' key buffers, reused on logged steps
        self._epoch: dict[int, list[float]] = {}  # optimizer index -> [max, sum, count, last step]
        self._metrics: dict[int, tuple[Any, Any]] = {}
        self._finished = False
        self._started = False
        self._informed: set[str] = set()
        self._stepping_batches: int | None = None  # batches so far in which an optimizer stepped
        self._stepped = False  # an optimizer stepped in the current batch
        self._dead: dict[str, None] = {}  # keys that lacked a gradient at every logged step so far
        self._dead_charts: tuple[str, ...] = ()  # the per-module charts made of such keys only
        self._any_no_grad = False  # some key lacked a gradient at a logged step
        self._flow: dict[str, FlowHistory] = {}  # panel -> history (rank zero, while logging)
        self._flow_rank: dict[str, int] = {}  # row key -> position of its first parameter in the model
        self._flow_logged = 0  # logged batch steps so far
        self._flow_last = -1  # the last logged step counted
        self._flow_due: int | None = None  # a logged step whose picture is to be drawn at the end of its batch
        self._flow_drawn: int | None = None  # the step of the last picture written
        self.flow_path: str | None = None  # the PNG written at the end of fit

    # ------------------------------------------------------------------ setup: where, and when
    def start(self, trainer: Trainer) -> None:
        """Find where to write (rank zero only) and say once what the loggers that are not TensorBoard skip."""
        self._reset()
        self._started = True
        if not trainer.is_global_zero:
            return
        self._targets, scalars_only = find_targets(trainer.loggers)
        if scalars_only:
            rank_zero_info(
                f"GradGuard: {', '.join(scalars_only)} take{'s' if len(scalars_only) == 1 else ''} the gradient "
                "scalars only; the histograms, the findings text and the custom-scalars layout go to TensorBoard "
                "loggers."
            )

    def log_interval(self, trainer: Trainer) -> int:
        """Log every this many optimizer steps (0: never)."""
        return trainer.log_every_n_steps if self.options.log_every_n_steps is None else self.options.log_every_n_steps

    def should_log(self, trainer: Trainer) -> bool:
        """Whether the optimizer step about to happen is logged: every step of every n-th batch that steps an
        optimizer (with one optimizer, every n-th optimizer step; with several, the steps they take in the same
        batches, however often each steps)."""
        interval = self.log_interval(trainer)
        if not interval or not self._targets:
            return False
        return (self.step_of(trainer) + 1) % interval == 0 or bool(trainer.should_stop)

    def step_of(self, trainer: Trainer) -> int:
        """The step Lightning logs the current batch's metrics at: the number of earlier batches in which an
        optimizer stepped (:func:`batches_that_stepped`; with one optimizer, the ``global_step`` before the step).
        GradGuard logs at the same steps as ``self.log`` and ``LearningRateMonitor``: those of the batches where
        ``(step + 1) % log_every_n_steps == 0``."""
        n = batches_that_stepped(trainer)
        if n is not None:
            return n
        if self._stepping_batches is None:  # no fit loop (a stand-in Trainer): count stepping batches ourselves
            self._stepping_batches = trainer.global_step // max(1, len(trainer.optimizers))
        return self._stepping_batches

    def slot_of(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """``(k, step)``: where :meth:`record_total` files ``optimizer``'s total norm of the step about to happen
        (``k``: its index in ``trainer.optimizers``; ``step``: :meth:`step_of`)."""
        k = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        return k, self.step_of(trainer)

    def mark_stepped(self) -> None:
        """An optimizer stepped in this batch without :meth:`log_step` (its norms are read later, ``sync="late"``)."""
        self._stepped = True

    # ------------------------------------------------------------------ a checked step
    def log_step(
        self,
        trainer: Trainer,
        optimizer: torch.optim.Optimizer,
        stats: GradStats,
        index: ParamIndex,
        report: RunReport,
        scale: float = 1.0,
        idle: Mapping[str, float] | None = None,
    ) -> None:
        """Called after each check with its :class:`GradStats`: epoch statistics always, the dashboard when logged.

        Args:
            trainer: the Trainer.
            optimizer: the optimizer about to step.
            stats: what the check measured.
            index: the model's parameters.
            report: the run report (its counts per kind, and its text when it changed).
            scale: the loss scale the gradients are still multiplied by.
            idle: per module, the share of checked steps on which it got no gradient (logged as
                ``gradguard/idle/<module>``, one chart in the custom-scalars layout); ``None``: not logged.
        """
        self._stepped = True
        total = stats.total_norm
        k, step = self.slot_of(trainer, optimizer)
        self.record_total(k, step, total)
        if not self._targets:
            return
        if len(report) != self._reported:
            self._write_text(report, step)
        if not self.should_log(trainer):
            return
        view = self._view_of(trainer, optimizer, stats.params, index, report.ignored)
        counts = {kind: n for kind, n in report.counts().items() if n}  # only kinds seen: no flat-zero lines
        norms = stats.norms
        metrics: dict[str, float] = {f"{TAG}/total_norm{view.suffix}": total}
        if self.options.norms != "total":
            for key, idx in view.groups:
                value = _group_norm(norms, idx)
                if value is not None:
                    metrics[f"{TAG}/grad_norm/{key}"] = value
        for key, share in self._no_grad_shares(view.parts, stats.missing).items():
            metrics[f"{TAG}/no_grad/{key}"] = share
        layout = _Layout(idle is not None or (self._layout is not None and self._layout.idle), tuple(counts),
                         self._any_no_grad, self._dead_charts)  # fmt: skip
        if layout != self._layout:
            self._write_layout(trainer, index, layout)
        for kind, n in counts.items():
            metrics[f"{TAG}/findings/{kind}"] = float(n)
        if self.options.flow_every:
            self._record_flow("grad_norm", step, {key: _group_norm(norms, idx) for key, idx in view.flow})
        if idle:
            for module, share in idle.items():
                metrics[f"{TAG}/idle/{module or 'root'}"] = float(share)
        hists: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
        if self.options.histograms:
            finite = [n for n in norms if n is not None and math.isfinite(n)]
            if finite:
                s, c = histogram_counts([torch.tensor(finite, dtype=torch.float32)], finite=False)
                hists.append(([f"{TAG}/grad_norms{view.suffix}"], s[None], c[None]))
        if self.options.value_histograms:
            hists += self._value_histograms(view, stats, scale)
        self._write_step(metrics, hists, step)
        if self.options.update_ratio:
            self._snapshot(k, step, stats, view)

    def _view_of(self, trainer: Trainer, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 index: ParamIndex, ignored: Sequence[str] = ()) -> _View:  # fmt: skip
        """How ``optimizer``'s parameters are logged: made when it is first logged and again when its parameter
        groups change."""
        layout = optimizer_layout(optimizer)
        view = self._views.get(id(optimizer))
        if view is None or view.layout != layout:
            optimizers = list(trainer.optimizers)
            k = next((i for i, o in enumerate(optimizers) if o is optimizer), len(self._views))
            suffix = f"_opt{k}" if len(optimizers) > 1 else ""
            keys, how = group_keys([index.name_of(p) for p in params], self.options.norms, self.options.max_norm_tags)
            groups = _indices_by_key(keys)
            if self.options.norms == "module":
                flow = groups
            else:
                names = [index.name_of(p) for p in params]
                flow = _indices_by_key(group_keys(names, "module", self.options.max_norm_tags)[0])
            for key, idx in flow:  # rows of the picture in model order
                first = min((index.index.get(id(params[i]), len(index)) for i in idx), default=len(index))
                self._flow_rank[key] = min(first, self._flow_rank.get(key, first))
            skip = set(ignored)
            unchecked = [index.name_of(p) in skip for p in params] if skip else None
            parts = _Parts.of(flow if self.options.norms == "total" else groups, params, unchecked)
            if view is not None:  # its param groups changed: what its keys went through so far carries over
                parts.inherit(view.parts)
            view = _View(layout, suffix, groups, how, flow, parts)
            self._views[id(optimizer)] = view
            if "depth" in how or "first" in how:
                self._inform_once(f"GradGuard: {len(params)} parameter tensors are more than max_norm_tags="
                          f"{self.options.max_norm_tags}: their norms are logged {how}.")  # fmt: skip
        return view

    def _no_grad_shares(self, parts: _Parts, missing: Sequence[int]) -> dict[str, float]:
        """The ``no_grad/<key>`` values of a logged step: per key that lacks a gradient now or lacked one at an earlier
        logged step, the share of its parameters' elements without one (``{}`` while every part had one at every
        logged step: nothing but this check on a clean step). Keeps :attr:`_dead` (the keys that lacked a gradient
        at every logged step so far) and the per-module charts made of such keys only."""
        if not missing and not parts.tracked.any() and parts.fed.all():
            return {}
        share = parts.shares(missing) if missing else np.zeros(len(parts.keys))
        parts.fed |= share < 1
        parts.tracked |= share > 0
        tracked = np.flatnonzero(parts.tracked).tolist()
        if tracked:
            self._any_no_grad = True
        dead = dict(self._dead)
        for j in tracked:
            if parts.fed[j]:
                dead.pop(parts.keys[j], None)
            else:
                dead.setdefault(parts.keys[j])
        if dead != self._dead:
            self._dead = dead
            charts: dict[str, list[str]] = {}
            for view in self._views.values():
                for key, _ in view.groups if self.options.norms != "total" else ():
                    charts.setdefault(chart_of(key), []).append(key)
            self._dead_charts = tuple(c for c, keys in charts.items() if all(k in dead for k in keys))
        return {parts.keys[j]: float(share[j]) for j in tracked}

    def _value_histograms(
        self, view: _View, stats: GradStats, scale: float
    ) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
        """The gradient-value histograms of every tag, in one fused pass per device (see :func:`histograms_counts`)."""
        norms = stats.norms
        by_device: dict[torch.device, tuple[list[str], list[list[torch.Tensor]], list[bool], list[float]]] = {}
        for key, idx in self._value_groups(view, stats):
            grads = [g for g in (stats.params[i].grad for i in idx) if g is not None]
            if not grads:
                continue
            present = [n for n in (norms[i] for i in idx) if n is not None]
            tags, groups, finite, squares = by_device.setdefault(grads[0].device, ([], [], [], []))
            tags.append(f"{TAG}/grad_values/{key}")
            groups.append(grads)
            finite.append(all(math.isfinite(n) for n in present))
            squares.append(math.fsum(n * n for n in present))
        out = []
        for tags, groups, finite, squares in by_device.values():
            s, c = histograms_counts(groups, scale, finite, squares if all(finite) else None, buffers=self._buffers)
            out.append((tags, s, c))
        return out

    def _value_groups(self, view: _View, stats: GradStats) -> list[tuple[str, list[int]]]:
        if self.options.norms != "total":
            return view.groups
        return [(f"all{view.suffix}", list(range(len(stats.params))))]

    def _snapshot(self, k: int, step: int, stats: GradStats, view: _View) -> None:
        """Copy the parameters about to be updated (only on logged steps; released at the end of the batch)."""
        self._log_ratios(only=k)
        snap = UpdateSnapshot.capture(stats.params, k, step, view)
        if snap is not None:
            self._snapshots.append(snap)

    # ------------------------------------------------------------------ end of a batch: ratios, flow picture
    def end_batch(self) -> None:
        """Log the update-to-weight ratios of this batch's logged steps and drop the parameter copies; draw the
        gradient-flow picture when due."""
        if self._snapshots:
            self._log_ratios()
        if self._flow_due is not None:
            self._write_flow(self._flow_due)
            self._flow_due = None
        if self._stepped:
            self._stepped = False
            if self._stepping_batches is not None:
                self._stepping_batches += 1

    def _log_ratios(self, only: int | None = None) -> None:
        keep = []
        for snap in self._snapshots:
            if only is None or snap.optimizer == only:
                self._log_ratio(snap)
            else:
                keep.append(snap)
        self._snapshots = keep

    def _log_ratio(self, snap: UpdateSnapshot) -> None:
        """``||w_after - w_before|| / ||w_before||`` per key, from the copies taken before the step (one sync)."""
        weights, updates = snap.squares()
        view: _View = snap.view
        metrics: dict[str, float] = {}
        total = update_ratio(weights, updates, snap.idx)
        if total is not None:
            metrics[f"{TAG}/total_update_ratio{view.suffix}"] = total
        if self.options.norms != "total":
            for key, idx in view.groups:
                ratio = update_ratio(weights, updates, idx)
                if ratio is not None:
                    metrics[f"{TAG}/update_ratio/{key}"] = ratio
        if self.options.flow_every:
            self._record_flow(
                "update_ratio", snap.step, {key: update_ratio(weights, updates, idx) for key, idx in view.flow}
            )
        if metrics:
            self._write_step(metrics, [], snap.step)

    def _record_flow(self, panel: str, step: int, values: Mapping[str, float | None]) -> None:
        """Record one logged step of a panel; a picture is due on the first logged step and every
        ``flow_every``-th after it."""
        history = self._flow.get(panel)
        if history is None:
            history = self._flow[panel] = FlowHistory(FLOW_COLUMNS)
        history.add(step, values)
        if panel == "grad_norm" and step != self._flow_last:
            self._flow_last = step
            self._flow_logged += 1
            if (self._flow_logged - 1) % self.options.flow_every == 0:
                self._flow_due = step

    def flow_picture(self) -> FlowPicture | None:
        """The gradient-flow picture of the run so far (rows in model order), or ``None`` before the first logged
        step."""
        if not any(len(h) for h in self._flow.values()):
            return None
        keys = list(dict.fromkeys(k for h in self._flow.values() for k in h.keys))
        keys.sort(key=lambda k: self._flow_rank.get(k, len(self._flow_rank)))
        return render_flow(self._flow, keys)

    def _write_flow(self, step: int) -> FlowPicture | None:
        picture = self.flow_picture()
        if picture is None:
            return None
        write_image(self._targets, FLOW_TAG, picture.image, step)
        self._flow_drawn = step
        return picture

    # ------------------------------------------------------------------ epoch
    def record_total(self, k: int, step: int, total: float) -> None:
        """Add optimizer ``k``'s total norm of ``step`` to this epoch's running max, sum and count (finite only)."""
        if math.isfinite(total):
            acc = self._epoch.setdefault(k, [-math.inf, 0.0, 0.0, step])
            acc[0] = max(acc[0], total)
            acc[1] += total
            acc[2] += 1
            acc[3] = step

    def epoch_stats(self, n_optimizers: int, device: torch.device) -> tuple[dict[str, float], int]:
        """Max and mean of the total norm over the epoch's steps of every rank, and the epoch's last step; resets.

        A collective under distributed training: every rank calls it, with the same ``n_optimizers``. Each rank's
        running max and (mean, count) go into torchmetrics' ``MaxMetric`` and ``MeanMetric`` (weighted by the
        count), whose ``compute()`` syncs them across ranks.
        """
        from torchmetrics.aggregation import MaxMetric, MeanMetric

        out: dict[str, float] = {}
        step = 0
        for k in range(n_optimizers):
            acc = self._epoch.get(k, [-math.inf, 0.0, 0.0, 0])
            if k not in self._metrics:
                self._metrics[k] = (MaxMetric(nan_strategy="ignore").to(device),
                                    MeanMetric(nan_strategy="ignore").to(device))  # fmt: skip
            mx, mean = self._metrics[k]
            mx.update(torch.tensor(acc[0], dtype=torch.float32, device=device))
            mean.update(torch.tensor(acc[1] / acc[2] if acc[2] else 0.0, device=device), weight=acc[2])
            hi, avg = float(mx.compute()), float(mean.compute())
            mx.reset()
            mean.reset()
            step = max(step, int(acc[3]))
            if math.isfinite(hi) and math.isfinite(avg):
                suffix = f"_opt{k}" if n_optimizers > 1 else ""
                out[f"{TAG}/epoch/total_norm_max{suffix}"] = hi
                out[f"{TAG}/epoch/total_norm_mean{suffix}"] = avg
        self._epoch.clear()
        return out, step

    def end_epoch(self, trainer: Trainer, device: torch.device) -> None:
        """Log :meth:`epoch_stats` (every rank must call this)."""
        out, step = self.epoch_stats(max(1, len(trainer.optimizers)), device)
        if out and self._targets and self.log_interval(trainer):
            self._write_step(out, [], step)

    # ------------------------------------------------------------------ end
    def finish(self, trainer: Trainer, report: RunReport) -> str | None:
        """The findings text (TensorBoard) and the JSON report, once per run; return the JSON's path."""
        self.release()
        if self._finished or not self._started or not trainer.is_global_zero:
            return None
        self._finished = True
        path = (
            os.fspath(self.options.report_path)
            if self.options.report_path is not None
            else os.path.join(_log_dir(trainer), REPORT_FILE)
        )
        last = self._flow_last
        picture = None
        if self._targets and self.options.flow_every and last >= 0:
            picture = self._write_flow(last) if self._flow_drawn != last else self.flow_picture()
        if picture is not None and self.options.write_report:
            self.flow_path = write_png(picture, os.path.join(os.path.dirname(path), FLOW_FILE))
            report.note(f"gradient-flow picture (gradient norm per module across logged steps): {self.flow_path}")
        if self._targets:
            self._write_text(report, self.step_of(trainer))
        if not self.options.write_report:
            return None
        return report.write_json(path)

    def release(self) -> None:
        """Drop parameter copies still held (after an exception, or at teardown), and the histograms' key buffer."""
        self._snapshots.clear()
        self._buffers.clear()

    # ------------------------------------------------------------------ writing
    def _inform_once(self, text: str) -> None:
        """``rank_zero_info(text)``, once per run."""
        if text not in self._informed:
            self._informed.add(text)
            rank_zero_info(text)

    def _write_step(
        self, metrics: dict[str, float], hists: list[tuple[list[str], torch.Tensor, torch.Tensor]], step: int
    ) -> None:
        write_step(self._targets, metrics, hists, step)

    def _write_text(self, report: RunReport, step: int) -> None:
        self._reported = len(report)
        write_text(self._targets, TEXT_TAG, report.markdown(), step)

    def _write_layout(self, trainer: Trainer, index: ParamIndex, layout: _Layout) -> None:
        """Write the custom-scalars layout; again (TensorBoard shows the last) when what it shows changes: a new kind
        of finding, the first part without a gradient, a module without any so far or one that got a gradient."""
        self._layout = layout
        keys: list[str] = []
        for opt in trainer.optimizers:
            params = [p for g in opt.param_groups for p in g["params"]]
            names = [index.name_of(p) for p in params]
            keys += [k for k in group_keys(names, self.options.norms, self.options.max_norm_tags)[0] if k is not None]
        charts = list(dict.fromkeys(chart_of(k) for k in keys))
        extra = (layout.idle, layout.findings, layout.no_grad, layout.dead)
        ratio = self.options.update_ratio
        write_layout(self._targets, lambda prefix: custom_scalars_layout(charts, prefix, ratio, *extra))


@dataclass
class _View:
    """How one optimizer's parameters are logged: its tag suffix and the parameter indices of each key."""

    layout: tuple[Any, ...]
    suffix: str
    groups: list[tuple[str, list[int]]]
    how: str
    flow: list[tuple[str, list[int]]]  # the gradient-flow picture's rows: the `norms="module"` keys
    parts: _Parts  # the keys of `no_grad/<key>`


@dataclass
class _Parts:
    """The keys of one optimizer's ``no_grad/<key>`` tags (those of ``norms``; modules under ``norms="total"``) and,
    per key, whether it ever lacked a gradient (``tracked``) and ever had one (``fed``) at a logged step."""

    keys: list[str]
    owner: np.ndarray  # per parameter, the index of its key (-1: none, or an `ignore`d parameter)
    numels: np.ndarray  # per parameter, its number of elements (float64)
    sizes: np.ndarray  # per key, the elements of its parameters
    tracked: np.ndarray  # per key (bool)
    fed: np.ndarray  # per key (bool)

    @classmethod
    def of(
        cls, groups: list[tuple[str, list[int]]], params: Sequence[torch.Tensor], skip: Sequence[bool] | None = None
    ) -> _Parts:
        """The keys of ``groups``, leaving out the parameters ``skip`` marks (those ``ignore`` matches)."""
        owner = np.full(len(params), -1, dtype=np.int64)
        for j, (_, idx) in enumerate(groups):
            owner[idx] = j
        if skip is not None:
            owner[np.asarray(skip, dtype=bool)] = -1
        numels = np.array([p.numel() for p in params], dtype=np.float64)
        keep = owner >= 0
        sizes = np.bincount(owner[keep], weights=numels[keep], minlength=len(groups))
        n = len(groups)
        return cls([k for k, _ in groups], owner, numels, sizes, np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))

    def inherit(self, old: _Parts) -> None:
        """Take ``tracked`` and ``fed`` of the keys ``old`` had too."""
        at = {k: j for j, k in enumerate(old.keys)}
        for j, key in enumerate(self.keys):
            if key in at:
                self.tracked[j], self.fed[j] = old.tracked[at[key]], old.fed[at[key]]

    def shares(self, missing: Sequence[int]) -> np.ndarray:
        """Per key, the share of its parameters' elements among ``missing`` (0 for a key of ignored parameters)."""
        miss = np.asarray(missing, dtype=np.int64)
        miss = miss[self.owner[miss] >= 0]
        lost = np.bincount(self.owner[miss], weights=self.numels[miss], minlength=len(self.keys))
        return np.divide(lost, self.sizes, out=np.zeros(len(self.keys)), where=self.sizes > 0)


class _Layout(NamedTuple):
    """What the custom-scalars layout shows beyond the norms (written again when it changes)."""

    idle: bool = False
    findings: tuple[str, ...] = ()  # the kinds with a chart
    no_grad: bool = False  # some part lacked a gradient at a logged step
    dead: tuple[str, ...] = ()  # the charts whose every key lacked a gradient at every logged step


def _indices_by_key(keys: Sequence[str | None]) -> list[tuple[str, list[int]]]:
    """The indices of each key, keys in the order first seen (``None``: left out)."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return list(groups.items())


def _group_norm(norms: Sequence[float | None], idx: Sequence[int]) -> float | None:
    """The L2 norm over the tensors ``idx`` that have a gradient (``None``: none has)."""
    present = [norms[i] for i in idx if norms[i] is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else _root(math.fsum(n * n for n in present))  # type: ignore[operator,misc]


def _root(v: float) -> float:
    return math.sqrt(v) if v >= 0 else math.nan


def _log_dir(trainer: Trainer) -> str:
    """The first logger's ``log_dir`` (or ``save_dir``), else the Trainer's ``default_root_dir`` (no collectives)."""
    for logger in trainer.loggers[:1]:
        for attr in ("log_dir", "save_dir"):
            d = getattr(logger, attr, None)
            if d:
                return os.fspath(d)
    return os.fspath(trainer.default_root_dir)
