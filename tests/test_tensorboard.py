"""GradGuard's dashboards, read back from the real TensorBoard event files (and CSV files) that a real Trainer wrote.

An independent recorder callback, placed after GradGuard, measures the gradients at the same hook
(``on_before_optimizer_step``) with plain torch (``torch.nn.utils.get_total_norm``); the logged values must equal it.
"""

from __future__ import annotations

import csv
import doctest
import io
import json
import logging
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugin_util import markdown_to_safe_html
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

import lightning_gradguard.histograms as histograms
from conftest import events, fit, scalars
from lightning_gradguard import GradGuard, GradGuardError
from lightning_gradguard.dashboard import REPORT_FILE
from lightning_gradguard.tags import custom_scalars_layout, group_keys

KINDS = ("stale", "detached", "unused", "nonfinite", "frozen", "orphan", "zero")


class Net(LightningModule):
    """``enc`` (Linear-Tanh-Linear) → ``head``, times a root-level ``scale`` parameter; ``aux`` is optional."""

    def __init__(self, *, use_aux: bool = True, nan_at: int | None = None, optimizer: str = "sgd") -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)
        self.aux = nn.Linear(16, 1)
        self.scale = nn.Parameter(torch.ones(()))
        self.use_aux = use_aux
        self.nan_at = nan_at
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.enc(x)
        loss = ((self.head(h).squeeze(-1) * self.scale - y) ** 2).mean()
        if self.use_aux:
            loss = loss + 0.1 * self.aux(h).pow(2).mean()
        if self.nan_at is not None and self.global_step == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        if self.optimizer == "fused_adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(Callback):
    """Measures, at ``on_before_optimizer_step``, what GradGuard should log: with plain torch, independently."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.param: dict[int, dict[str, float]] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.scaled_total: dict[int, float] = {}

    def on_after_backward(self, trainer, pl_module):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # gradients are still multiplied by the loss scale here
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.scaled_total[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads)) / scaler.get_scale()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        self.total[step] = float(torch.nn.utils.get_total_norm([p.grad for _, p in named]))
        self.param[step] = {n: float(p.grad.norm()) for n, p in named}
        self.grads[step] = {n: p.grad.detach().clone() for n, p in named}
        self.weights[step] = {n: p.detach().clone() for n, p in named}


def fit_recorded(tmp_path: Path, guard: GradGuard, model: LightningModule | None = None, **trainer_kwargs):
    """Fit ``model`` (default ``Net()``) under ``guard`` with a :class:`Recorder` after it, logging to TensorBoard
    unless ``logger`` is given: ``(trainer, recorder)``."""
    recorder = Recorder()
    trainer = fit(tmp_path, model or Net(), guard, recorder, n=48, tensorboard=True, **trainer_kwargs)
    return trainer, recorder


def texts(acc: EventAccumulator) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("gradguard/report/text_summary")}


def gradguard_tags(acc: EventAccumulator) -> list[str]:
    return [t for t in acc.Tags()["scalars"] if t.startswith("gradguard/")]


# ---------------------------------------------------------------------------------------------------------------------
# Scalars


def test_dashboard_total_norm_equals_get_total_norm_on_logged_steps(tmp_path):
    trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=2), max_steps=5)
    logged = scalars(events(trainer), "gradguard/total_norm")
    assert sorted(logged) == [1, 3]  # Lightning's own logging steps: (step + 1) % 2 == 0
    for step, value in logged.items():
        assert value == pytest.approx(rec.total[step], rel=1e-6)


def test_dashboard_log_every_n_steps_defaults_to_the_trainers(tmp_path):
    trainer, _ = fit_recorded(tmp_path, GradGuard(), max_steps=6, log_every_n_steps=3)
    assert sorted(scalars(events(trainer), "gradguard/total_norm")) == [2, 5]


def test_dashboard_module_norms_are_the_l2_norm_of_the_modules_own_parameters(tmp_path):
    trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=1), max_steps=2)
    acc = events(trainer)
    norms = {t.removeprefix("gradguard/grad_norm/") for t in gradguard_tags(acc) if "/grad_norm/" in t}
    assert norms == {"enc.0", "enc.2", "head", "aux", "scale"}  # `scale` belongs to the root: its own name
    for step in (0, 1):
        p = rec.param[step]
        assert scalars(acc, "gradguard/grad_norm/enc.0")[step] == pytest.approx(
            math.hypot(p["enc.0.weight"], p["enc.0.bias"]), rel=1e-6
        )
        assert scalars(acc, "gradguard/grad_norm/scale")[step] == pytest.approx(p["scale"], rel=1e-6)


def test_dashboard_param_norms_one_tag_per_tensor(tmp_path):
    trainer, rec = fit_recorded(tmp_path, GradGuard(norms="param", log_every_n_steps=1), max_steps=2)
    acc = events(trainer)
    names = {t.removeprefix("gradguard/grad_norm/") for t in gradguard_tags(acc) if "/grad_norm/" in t}
    assert names == set(rec.param[0])
    for name, value in rec.param[1].items():
        assert scalars(acc, f"gradguard/grad_norm/{name}")[1] == pytest.approx(value, rel=1e-6)


def test_dashboard_param_norms_over_the_cap_merge_into_parent_modules(tmp_path):
    trainer, rec = fit_recorded(tmp_path, GradGuard(norms="param", max_norm_tags=4, log_every_n_steps=1), max_steps=1)
    acc = events(trainer)
    norms = {t.removeprefix("gradguard/grad_norm/") for t in gradguard_tags(acc) if "/grad_norm/" in t}
    assert norms == {"enc", "head", "aux", "scale"}
    p = rec.param[0]
    expected = math.sqrt(sum(v * v for k, v in p.items() if k.startswith("enc.")))
    assert scalars(acc, "gradguard/grad_norm/enc")[0] == pytest.approx(expected, rel=1e-6)


def test_dashboard_total_norms_only(tmp_path):
    trainer, _ = fit_recorded(tmp_path, GradGuard(norms="total", histograms=False, log_every_n_steps=1), max_steps=2)
    tags = gradguard_tags(events(trainer))
    assert "gradguard/total_norm" in tags
    assert not [t for t in tags if "/grad_norm/" in t]
    assert events(trainer).Tags()["histograms"] == []


def test_dashboard_finding_counts_per_kind(tmp_path):
    guard = GradGuard(on_unused="warn", on_nonfinite="warn", log_every_n_steps=1, idle_window=1)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer, _ = fit_recorded(tmp_path, guard, Net(use_aux=False, nan_at=2), max_steps=4)
    acc = events(trainer)
    assert {t for t in gradguard_tags(acc) if "/findings/" in t} == {
        "gradguard/findings/unused",
        "gradguard/findings/nonfinite",
    }  # only the kinds seen: no flat-zero lines
    assert scalars(acc, "gradguard/findings/unused") == {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0}  # aux.weight, aux.bias
    n_used = sum(1 for n, _ in Net().named_parameters() if not n.startswith("aux."))
    assert scalars(acc, "gradguard/findings/nonfinite") == {2: float(n_used), 3: float(n_used)}


def test_dashboard_update_ratio_is_update_norm_over_weight_norm(tmp_path):
    guard = GradGuard(norms="param", update_ratio=True, log_every_n_steps=2)
    trainer, rec = fit_recorded(tmp_path, guard, max_steps=3)
    acc = events(trainer)
    lr = 0.1  # plain SGD: the update is -lr * grad
    for step in (1,):
        w, g = rec.weights[step], rec.grads[step]
        for name in ("enc.0.weight", "head.weight", "scale"):
            expected = lr * float(g[name].norm()) / float(w[name].norm())
            assert scalars(acc, f"gradguard/update_ratio/{name}")[step] == pytest.approx(expected, rel=1e-4)
        total = lr * math.sqrt(sum(float(t.norm()) ** 2 for t in g.values()))
        total /= math.sqrt(sum(float(t.norm()) ** 2 for t in w.values()))
        assert scalars(acc, "gradguard/total_update_ratio")[step] == pytest.approx(total, rel=1e-4)
    assert sorted(scalars(acc, "gradguard/total_update_ratio")) == [1]
    assert guard._dashboard._snapshots == []  # no parameter copy outlives its step


def test_dashboard_epoch_max_and_mean_of_the_total_norm(tmp_path):
    trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=100), max_epochs=2, max_steps=-1)
    acc = events(trainer)
    per_epoch = 48 // 8
    epochs = [[rec.total[s] for s in range(e * per_epoch, (e + 1) * per_epoch)] for e in range(2)]
    last = [per_epoch - 1, 2 * per_epoch - 1]
    assert scalars(acc, "gradguard/epoch/total_norm_max") == pytest.approx({last[e]: max(epochs[e]) for e in (0, 1)})
    means = {last[e]: sum(epochs[e]) / per_epoch for e in (0, 1)}
    assert scalars(acc, "gradguard/epoch/total_norm_mean") == pytest.approx(means, rel=1e-6)


def test_dashboard_accumulated_gradients(tmp_path):
    trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=1), max_steps=2, accumulate_grad_batches=3)
    logged = scalars(events(trainer), "gradguard/total_norm")
    assert logged == pytest.approx(rec.total, rel=1e-6)
    assert sorted(logged) == [0, 1]


def test_dashboard_bf16_mixed_logs_the_fp32_gradient_norms(tmp_path):
    trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=1), max_steps=3, precision="bf16-mixed")
    assert scalars(events(trainer), "gradguard/total_norm") == pytest.approx(rec.total, rel=1e-6)


def test_dashboard_grad_scaler_logs_unscaled_norms(tmp_path):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=1), max_steps=3, plugins=[plugin])
    logged = scalars(events(trainer), "gradguard/total_norm")
    assert sorted(logged) == [0, 1, 2]
    assert logged == pytest.approx(rec.total, rel=1e-6)
    assert logged == pytest.approx(rec.scaled_total, rel=1e-5)  # scaled at backward, divided by the scale


def test_dashboard_grad_scaler_with_fused_optimizer_divides_by_the_scale(tmp_path):
    """``Adam(fused=True)`` unscales inside ``step()``: gradients are still scaled at the hook."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    guard = GradGuard(value_histograms=True, norms="param", log_every_n_steps=1)
    trainer, rec = fit_recorded(tmp_path, guard, Net(optimizer="fused_adam"), max_steps=2, plugins=[plugin])
    acc = events(trainer)
    logged = scalars(acc, "gradguard/total_norm")
    assert logged == pytest.approx(rec.scaled_total, rel=1e-5)
    assert logged[0] == pytest.approx(rec.total[0] / 2.0**10, rel=1e-6)  # the hook saw scaled gradients
    hist = acc.Histograms("gradguard/grad_values/head.weight")[0].histogram_value
    assert hist.max == pytest.approx(float(rec.grads[0]["head.weight"].max()) / 2.0**10, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Histograms


def test_dashboard_norm_histogram_counts_every_parameter_with_a_gradient(tmp_path):
    guard = GradGuard(on_unused="warn", log_every_n_steps=2)
    with pytest.warns(UserWarning, match="aux"):
        trainer, rec = fit_recorded(tmp_path, guard, Net(use_aux=False), max_steps=3)
    acc = events(trainer)
    assert acc.Tags()["histograms"] == ["gradguard/grad_norms"]  # value histograms are opt-in
    hists = {e.step: e.histogram_value for e in acc.Histograms("gradguard/grad_norms")}
    assert sorted(hists) == [1]
    for step, h in hists.items():
        norms = list(rec.param[step].values())
        assert len(norms) == 7  # aux has no gradient
        assert h.num == 7
        assert sum(h.bucket) == 7
        assert h.min == pytest.approx(min(norms), rel=1e-6)
        assert h.max == pytest.approx(max(norms), rel=1e-6)
        assert h.sum == pytest.approx(sum(norms), rel=1e-6)
        assert h.sum_squares == pytest.approx(rec.total[step] ** 2, rel=1e-5)
        # each norm falls in the bucket whose right limit is the first one at or above it
        limits = list(h.bucket_limit)
        assert limits == sorted(limits)
        for n in norms:
            i = next(i for i, lim in enumerate(limits) if n <= lim)
            assert h.bucket[i] >= 1


def test_dashboard_value_histograms_count_every_gradient_value(tmp_path):
    trainer, rec = fit_recorded(tmp_path, GradGuard(value_histograms=True, log_every_n_steps=1), max_steps=2)
    acc = events(trainer)
    assert {t for t in acc.Tags()["histograms"] if "/grad_values/" in t} == {
        f"gradguard/grad_values/{k}" for k in ("enc.0", "enc.2", "head", "aux", "scale")
    }
    for step in (0, 1):
        g = rec.grads[step]
        h = next(e for e in acc.Histograms("gradguard/grad_values/enc.0") if e.step == step).histogram_value
        values = torch.cat([g["enc.0.weight"].flatten(), g["enc.0.bias"]])
        assert h.num == values.numel() == sum(h.bucket)
        assert h.min == pytest.approx(float(values.min()), rel=1e-6)
        assert h.max == pytest.approx(float(values.max()), rel=1e-6)
        assert h.sum == pytest.approx(float(values.double().sum()), abs=1e-6 * float(values.abs().sum()))
        # bucket i holds the values in (limit[i-1], limit[i]]: compare the counts with torch's own bucketing
        limits = torch.tensor(list(h.bucket_limit), dtype=torch.float64)
        idx = torch.bucketize(values.double(), limits)
        assert torch.bincount(idx, minlength=len(limits)).tolist() == [int(c) for c in h.bucket]


def reference_histogram(values: torch.Tensor, h: dict) -> None:
    """``h`` (HistogramProto arguments) describes exactly the finite ``values``: checked with torch's bucketize."""
    values = values[torch.isfinite(values)].double()
    assert h["num"] == values.numel() == sum(h["bucket"])
    assert h["min"] == pytest.approx(float(values.min()), rel=1e-6)
    assert h["max"] == pytest.approx(float(values.max()), rel=1e-6)
    assert h["sum"] == pytest.approx(float(values.sum()), abs=1e-5 * float(values.abs().sum()))
    assert h["sum_squares"] == pytest.approx(float(values.square().sum()), rel=1e-5)
    limits = torch.tensor(h["bucket_limit"], dtype=torch.float64)
    idx = torch.bucketize(values, limits)
    assert torch.bincount(idx, minlength=len(limits)).tolist() == [int(c) for c in h["bucket"]]


def test_fused_value_histograms_match_a_reference_per_group():
    from lightning_gradguard.histograms import fetch_histograms, histograms_counts

    torch.manual_seed(0)
    a = [torch.randn(40, 8), torch.randn(8) * 1e-3]
    b = [torch.randn(5000).half() * 4]  # half precision, measured in float32
    c = [torch.tensor([1.0, math.nan, -2.0, math.inf, 0.0, 0.25, -0.0, 1.125])]  # non-finite values are left out; edges
    d = [torch.sparse_coo_tensor([[1, 3, 1]], torch.tensor([2.0, -1.0, 0.5]), (6,), check_invariants=True)]
    e = [torch.empty(0)]
    groups = [a, b, c, d, e]
    for scale in (1.0, 8.0):
        stats, counts = histograms_counts(groups, scale, finite=[True, True, False, True, True])
        assert counts.shape == (5, histograms._NBINS)
        protos = fetch_histograms([(stats, counts)])
        for group, h in zip(groups[:4], protos[:4], strict=True):
            assert h is not None
            dense = [t.to_dense() if t.is_sparse else t for t in group]
            if group is d:
                dense = [group[0].coalesce().values()]  # its stored values: duplicates summed, no implicit zeros
            reference_histogram(torch.cat([t.float().flatten() for t in dense]) / scale, h)
        assert protos[4] is None  # no values


def test_histograms_of_a_check_step_written_with_a_plain_summary_writer(tmp_path):
    """The bucketing works without Lightning: a `check_step` user's gradients, counted by `histograms_counts` and
    brought to the host by `fetch_histograms`, go to `SummaryWriter.add_histogram_raw` as they are."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard import check_step
    from lightning_gradguard.histograms import fetch_histograms, histograms_counts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with check_step(model):
        model(torch.randn(4, 8)).square().mean().backward()
    grads = [[p.grad for p in model[0].parameters()], [p.grad for p in model[2].parameters()]]
    protos = fetch_histograms([histograms_counts(grads)])
    writer = SummaryWriter(str(tmp_path))
    for tag, p in zip(["grads/0", "grads/2"], protos, strict=True):
        writer.add_histogram_raw(tag, global_step=0, bucket_limits=p["bucket_limit"], bucket_counts=p["bucket"],
                                 **{k: p[k] for k in ("min", "max", "num", "sum", "sum_squares")})  # fmt: skip
    writer.close()
    acc = events(tmp_path)
    for tag, group in zip(["grads/0", "grads/2"], grads, strict=True):
        (event,) = acc.Histograms(tag)
        reference_histogram(torch.cat([g.flatten() for g in group]), {
            "min": event.histogram_value.min, "max": event.histogram_value.max, "num": event.histogram_value.num,
            "sum": event.histogram_value.sum, "sum_squares": event.histogram_value.sum_squares,
            "bucket_limit": list(event.histogram_value.bucket_limit), "bucket": list(event.histogram_value.bucket),
        })  # fmt: skip


def test_measurement_bucketing_tags_ratios_and_writing_import_neither_lightning_nor_tensorboard():
    code = (
        "import sys\n"
        "import lightning_gradguard.audit, lightning_gradguard.flow, lightning_gradguard.histograms\n"
        "import lightning_gradguard.measure, lightning_gradguard.ratios, lightning_gradguard.tags\n"
        "import lightning_gradguard.tensorboard\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'tensorboard')))\n"
    )
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                         check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_fused_value_histograms_use_the_given_sums_of_squares():
    from lightning_gradguard.histograms import histograms_counts

    stats, _ = histograms_counts([[torch.ones(4)], [torch.ones(9)]], squares=[4.0, 123.0])
    assert stats[:, 4].tolist() == [4.0, 123.0]
    assert stats[:, 2].tolist() == [4.0, 9.0]


def test_single_histogram_counts_agrees_with_the_fused_one():
    from lightning_gradguard.histograms import histogram_counts, histograms_counts

    tensors = [torch.randn(100), torch.randn(3, 3)]
    s1, c1 = histogram_counts(tensors)
    s2, c2 = histograms_counts([tensors, [torch.ones(2)]])
    assert torch.equal(c1, c2[0])
    assert torch.allclose(s1, s2[0])


def reference_bin_counts(values: torch.Tensor) -> list[int]:
    """Straightforward bucketing of the finite ``values``: numpy's ``searchsorted`` of each value (float64) in the
    sorted right edges of all 8-per-octave buckets, so that bucket ``i`` holds the values in ``(edge[i-1], edge[i]]``
    (TensorBoard's reading); one count per bucket, in value order. The bucket whose right edge is -0.0 is counted
    with the next one (TensorBoard would count +0.0 in it too)."""
    from lightning_gradguard.histograms import _RIGHT_ORDERED

    v = values.detach().double().flatten().numpy()
    v = v[np.isfinite(v)]
    counts = np.bincount(np.searchsorted(_RIGHT_ORDERED, v, side="left"), minlength=len(_RIGHT_ORDERED))
    (minus_zero,) = np.flatnonzero(_RIGHT_ORDERED == 0.0)[:1]
    counts[minus_zero + 1] += counts[minus_zero]
    counts[minus_zero] = 0
    return counts.tolist()


def fast_bin_counts(counts: torch.Tensor) -> list[int]:
    """The counts of :func:`histograms_counts` (one per key) in the reference's value order, -0.0 with +0.0."""
    from lightning_gradguard.histograms import _ORDER_NP, _PER_SIGN

    row = counts.numpy().copy()
    row[_PER_SIGN] += row[0]
    row[0] = 0
    return row[_ORDER_NP].tolist()


def test_fast_value_histograms_count_like_a_straightforward_reference(monkeypatch):
    """Every bucket of every histogram equals a plain ``searchsorted`` of the values, through every path of the fast
    one: a tensor split across key buffers, small tensors batched by size and every histogram's counted at once, one
    histogram per large ``bincount``, the buffer reused by a second call."""
    monkeypatch.setattr(histograms, "_CHUNK", 1000)  # 3 tensors and more per buffer, and splits
    monkeypatch.setattr(histograms, "_SMALL", 64)
    monkeypatch.setattr(histograms, "_SLOTS", 1)  # one histogram per count of large keys
    from lightning_gradguard.histograms import HistogramBuffers, histograms_counts

    torch.manual_seed(0)
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.125, -1.125, 2.0**-130, -(2.0**-130), 3e38, -3e38, 2.0**-149])
    groups = [
        [torch.randn(2500) * 1e-3, torch.randn(16)],  # 2500 values: split across three buffers
        [torch.randn(16) * 10],  # small, the same size as one in the first group: one 2-D block
        [torch.randn(40, 30).bfloat16(), torch.randn(7, dtype=torch.float64)],
        [edges, torch.tensor([math.nan, math.inf, -math.inf, 5.0])],  # non-finite values are left out
        [],
        [torch.zeros(300), torch.full((64,), -(2.0**-3))],
    ]
    finite = [True, True, True, False, True, True]
    buffers = HistogramBuffers()
    results = [histograms_counts(groups, finite=finite, buffers=buffers) for _ in range(2)]
    assert buffers.keys(torch.device("cpu"), 1).numel() == 1000  # one bounded buffer, reused
    for stats, counts in results:
        assert counts.shape == (len(groups), histograms._NBINS)
        for k, group in enumerate(groups):
            values = torch.cat([t.float().flatten() for t in group]) if group else torch.empty(0)
            assert fast_bin_counts(counts[k]) == reference_bin_counts(values)
            finite_values = values[torch.isfinite(values)].double()
            assert stats[k, 2] == finite_values.numel()
            if finite_values.numel():
                assert stats[k, :2].tolist() == [float(finite_values.min()), float(finite_values.max())]
                total = float(finite_values.abs().sum())
                assert float(stats[k, 3]) == pytest.approx(float(finite_values.sum()), abs=1e-6 * total)
                squares = float(finite_values.square().sum())
                if squares < torch.finfo(torch.float32).max:  # summed in float32, as the values are
                    assert float(stats[k, 4]) == pytest.approx(squares, rel=1e-5)
            else:
                assert math.isnan(stats[k, 0])
                assert math.isnan(stats[k, 1])


def test_small_tensors_of_many_histograms_over_several_buffers_count_like_the_reference(monkeypatch):
    """Small tensors (biases, norms) of every histogram are counted together, each key carrying its histogram's row:
    when they fill the key buffer more than once, the counts of each buffer add up; half precision and a loss scale
    divided out, interleaved with large tensors, each bucket equals the reference."""
    monkeypatch.setattr(histograms, "_CHUNK", 100)
    monkeypatch.setattr(histograms, "_SMALL", 40)
    from lightning_gradguard.histograms import HistogramBuffers, histograms_counts

    torch.manual_seed(0)
    groups = [
        [torch.randn(33) * 3, torch.randn(250).half()],  # one small, one large (split over three buffers)
        [torch.randn(40).bfloat16(), torch.randn(7) * 1e-4],
        [torch.tensor([0.0, -0.0, 2.0**-8, -(2.0**-8), 1.125, -1.125, 65504.0]).half()],  # edges, exact in fp16
        [torch.randn(33)],
        [torch.randn(40) * 1e3, torch.randn(120)],
    ]
    scale = 1024.0
    stats, counts = histograms_counts(groups, scale, buffers=HistogramBuffers())
    for k, group in enumerate(groups):
        values = torch.cat([t.float().flatten() / scale for t in group])
        assert fast_bin_counts(counts[k]) == reference_bin_counts(values)
        assert stats[k, 2] == values.numel()
        assert stats[k, :2].tolist() == [float(values.min()), float(values.max())]


def test_accelerator_counting_without_sync_equals_bincount():
    """On an accelerator the keys are counted with ``index_add_`` (``bincount`` syncs there): same counts."""
    from lightning_gradguard.histograms import _add_counts

    keys = torch.randint(0, 3 * 4096, (5000,), dtype=torch.int32)
    assert torch.equal(_add_counts(keys, 4 * 4096), torch.bincount(keys, minlength=4 * 4096))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_value_histograms_on_cuda_sync_once_and_match_the_cpu():
    from lightning_gradguard.histograms import fetch_histograms, histograms_counts

    torch.manual_seed(0)
    groups = [[torch.randn(3000) * 1e-3, torch.randn(16)], [torch.randn(16) * 10], [torch.randn(300, 70)]]
    cpu = fetch_histograms([histograms_counts(groups)])
    cuda_groups = [[t.cuda() for t in g] for g in groups]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as bucketing:
            warnings.simplefilter("always")
            stats, counts = histograms_counts(cuda_groups, squares=[1.0, 2.0, 3.0])
        with warnings.catch_warnings(record=True) as fetching:
            warnings.simplefilter("always")
            protos = fetch_histograms([(stats, counts)])
    finally:
        torch.cuda.set_sync_debug_mode(0)

    def syncs(caught: list) -> int:
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(bucketing) == 0
    assert syncs(fetching) == 1  # the one transfer
    for a, b in zip(cpu, protos, strict=True):
        assert a["bucket_limit"] == b["bucket_limit"]
        assert a["bucket"] == b["bucket"]
        assert (a["min"], a["max"], a["num"]) == (b["min"], b["max"], b["num"])


def test_fast_value_histograms_of_a_model_match_torch_histc_per_tensor():
    """A transformer layer's gradients (12 tensors, default buffer sizes): per tensor and sign, the fast counts summed
    over each power of two's 8 buckets equal ``torch.histc`` of ``floor(log2|g|)``, one bin per power of two."""
    from lightning_gradguard.histograms import _PER_SIGN, histograms_counts

    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model(torch.randn(4, 8, 32)).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    _, counts = histograms_counts([[g] for g in grads])
    for g, row in zip(grads, counts, strict=True):
        g = g.flatten()
        for sign, part in ((1, row[_PER_SIGN:]), (-1, row[:_PER_SIGN])):
            v = g[(g * sign > 0)].abs()
            octaves = part[8:2040].reshape(-1, 8).sum(1)  # exponents 1..254: the normal floats, by power of two
            lo, hi = -126, 128
            reference = torch.histc(torch.log2(v.double()).floor(), bins=hi - lo, min=lo, max=hi)
            assert octaves.tolist() == reference.long().tolist()


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard's record checksums in C


def test_c_checksums_give_tensorboards_pure_python_bytes():
    """`checksum_in_c` swaps the `write` of one writer's record writer: the bytes equal TensorBoard's own (a record
    writer reached through the attribute chain of a torch `SummaryWriter`; the real chain: the next test)."""
    pytest.importorskip("google_crc32c")
    from tensorboard.summary.writer.record_writer import RecordWriter

    from lightning_gradguard.tensorboard import checksum_in_c

    fast, python = RecordWriter(io.BytesIO()), RecordWriter(io.BytesIO())
    chain = SimpleNamespace(file_writer=SimpleNamespace(event_writer=SimpleNamespace(_async_writer=SimpleNamespace(
        _writer=fast))))  # fmt: skip
    assert checksum_in_c(chain)
    write = fast.write
    assert checksum_in_c(chain)  # idempotent: the same function
    assert fast.write is write
    assert python.write.__func__ is RecordWriter.write  # only that record writer
    g = torch.Generator().manual_seed(0)
    payloads = [b"", b"a", bytes(range(256)), bytes(bytearray(b"gradguard" * 1000))]
    payloads += [bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()) for n in (7, 4096, 65537)]
    for data in payloads:
        fast.write(data)
        python.write(data)
    assert fast._writer.getvalue() == python._writer.getvalue()
    assert not checksum_in_c(SimpleNamespace())  # not a torch SummaryWriter: left alone


def test_event_files_checksummed_in_c_read_back_with_tensorboards_pure_python_crc(tmp_path):
    """Only GradGuard's writer checksums in C: TensorBoard's module-level `crc32c` (every other writer and reader of
    the process) is the pure-Python one after a run, and every record GradGuard's writer wrote reads back with it."""
    pytest.importorskip("google_crc32c")
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as pw
    from tensorboard.summary.writer import record_writer
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard import _compat

    crc32c, masked = pw.crc32c, record_writer.masked_crc32c
    logger = TensorBoardLogger(tmp_path, name="tb")
    own = _compat.record_writer(logger.experiment)  # the record writer of the SummaryWriter GradGuard will write to
    assert not hasattr(own.write, "checksum_in_c")
    guard = GradGuard(value_histograms=True, norms="param", log_every_n_steps=1)
    trainer, rec = fit_recorded(tmp_path, guard, max_steps=3, logger=logger)
    assert pw.crc32c is crc32c
    assert record_writer.masked_crc32c is masked is pw.masked_crc32c
    assert own.write.checksum_in_c  # GradGuard's writer
    other = SummaryWriter(str(tmp_path / "other"))
    assert not hasattr(_compat.record_writer(other).write, "checksum_in_c")  # another writer of the process: untouched
    other.close()
    files = list(Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))
    assert files
    records = 0
    for path in files:
        reader = pw.PyRecordReader_New(str(path))
        while True:
            try:
                reader.GetNext()  # raises DataLossError on a checksum mismatch (pure-Python CRC)
            except pw.errors.OutOfRangeError:
                break
            records += 1
    assert records >= 3
    acc = events(trainer)
    assert scalars(acc, "gradguard/total_norm") == pytest.approx(rec.total, rel=1e-6)
    assert len(acc.Histograms("gradguard/grad_values/head.weight")) == 3


# ---------------------------------------------------------------------------------------------------------------------
# Text report and layout


def test_dashboard_text_report_when_findings_change_and_at_the_end(tmp_path):
    guard = GradGuard(on_unused="warn", on_nonfinite="warn", log_every_n_steps=50, idle_window=1)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer, _ = fit_recorded(tmp_path, guard, Net(use_aux=False, nan_at=3), max_steps=5)
    text = texts(events(trainer))
    assert sorted(text) == [0, 3, 5]  # a new finding on step 0 and step 3; the end of fit at global_step 5
    # aux.weight and aux.bias: one item
    assert "\n- **unused**: module `aux` (2 tensors, 17 parameters), first step 0, count 1  \n" in text[0]
    assert "nonfinite" not in text[0]
    # the NaN reaches every tensor with a gradient (all but aux's two): one cause, one item
    assert "\n- **nonfinite**: the model (7 of its 9 tensors, 434 parameters), first step 3, count 1  \n" in text[3]
    assert "- **nonfinite**: the model (7 of its 9 tensors, 434 parameters), first step 3, count 2" in text[5]
    assert "- **unused**: module `aux` (2 tensors, 17 parameters), first step 0, count 5" in text[5]
    for step, groups in ((0, 1), (3, 2), (5, 2)):  # as TensorBoard's Text tab renders it: one list item per group,
        html = markdown_to_safe_html(text[step])  # no table (it breaks words inside narrow table columns)
        assert html.count("<li>") == groups
        assert "<table" not in html


def test_dashboard_text_report_without_findings(tmp_path):
    trainer, _ = fit_recorded(tmp_path, GradGuard(), max_steps=2)
    text = texts(events(trainer))
    assert sorted(text) == [0, 2]  # the first check, and the end of fit
    assert all("every parameter received a usable gradient" in t for t in text.values())


def test_dashboard_custom_scalars_layout_groups_every_gradguard_chart(tmp_path):
    guard = GradGuard(update_ratio=True, log_every_n_steps=1)
    trainer, _ = fit_recorded(tmp_path, guard, max_epochs=1, max_steps=-1)
    acc = events(trainer)
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["GradGuard"]
    charts = {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}
    assert set(charts) == {
        "total gradient norm",
        "total gradient norm per epoch: max, mean",
        "gradient norm: enc",
        "gradient norm: head",
        "gradient norm: aux",
        "gradient norm: scale",
        "update / weight: total",
        "update / weight: enc",
        "update / weight: head",
        "update / weight: aux",
        "update / weight: scale",
    }  # no findings chart in a clean run
    tags = gradguard_tags(acc)
    matched: set[str] = set()
    for title, regexes in charts.items():  # TensorBoard matches each regex with `re.match`
        hits = {t for t in tags for r in regexes if re.match(r, t)}
        assert hits, f"chart {title!r} ({regexes}) matches no logged tag"
        matched |= hits
    assert matched == set(tags)  # every GradGuard scalar is on some chart
    assert {t for t in tags if re.match(charts["gradient norm: enc"][0], t)} == {
        "gradguard/grad_norm/enc.0",
        "gradguard/grad_norm/enc.2",
    }


def test_dashboard_logs_idle_shares_per_module_when_given(tmp_path, monkeypatch):
    guard = GradGuard(log_every_n_steps=2)
    shares = {1: {"enc.0": 0.0, "aux": 1.0}, 3: {"enc.0": 0.25, "aux": 0.5, "": 0.125}}
    log_step = guard._dashboard.log_step

    def with_idle(trainer, *args, **kwargs):  # what the core's idle shares give the dashboard, step by step
        kwargs["idle"] = shares.get(trainer.global_step, {})
        log_step(trainer, *args, **kwargs)

    monkeypatch.setattr(guard._dashboard, "log_step", with_idle)
    trainer, _ = fit_recorded(tmp_path, guard, max_steps=4)
    acc = events(trainer)
    assert scalars(acc, "gradguard/idle/enc.0") == {1: 0.0, 3: 0.25}
    assert scalars(acc, "gradguard/idle/aux") == {1: 1.0, 3: 0.5}
    assert scalars(acc, "gradguard/idle/root") == {3: 0.125}  # parameters of the root module
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}
    (regex,) = charts["share of steps without a gradient, per module"]
    idle_tags = {t for t in gradguard_tags(acc) if "/idle/" in t}
    assert idle_tags == {"gradguard/idle/enc.0", "gradguard/idle/aux", "gradguard/idle/root"}
    assert {t for t in gradguard_tags(acc) if re.match(regex, t)} == idle_tags


def test_dashboard_without_idle_shares_has_no_idle_chart():
    assert "share of steps without a gradient, per module" not in custom_scalars_layout(["enc"])["GradGuard"]
    assert "share of steps without a gradient, per module" in custom_scalars_layout(["enc"], idle=True)["GradGuard"]


def test_custom_scalars_layout_honours_the_logger_prefix(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", prefix="run")
    trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=1), max_steps=2, logger=logger)
    acc = events(trainer)
    assert scalars(acc, "run-gradguard/total_norm") == pytest.approx(rec.total, rel=1e-6)
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    (total,) = (c for c in layout.category[0].chart if c.title == "total gradient norm")
    assert re.match(total.multiline.tag[0], "run-gradguard/total_norm")


def test_custom_scalars_layout_one_chart_per_module_list_entry():
    keys = [f"blocks.{i}.attn" for i in range(3)] + ["emb", "blocks.0.mlp"]
    charts = list(dict.fromkeys(k if not k.startswith("blocks.") else ".".join(k.split(".")[:2]) for k in keys))
    layout = custom_scalars_layout(charts)["GradGuard"]
    assert [t for t in layout if t.startswith("gradient norm")] == [
        "gradient norm: blocks.0",
        "gradient norm: blocks.1",
        "gradient norm: blocks.2",
        "gradient norm: emb",
    ]
    (regex,) = layout["gradient norm: blocks.1"][1]
    assert re.match(regex, "gradguard/grad_norm/blocks.1.attn")
    assert not re.match(regex, "gradguard/grad_norm/blocks.10.attn")


# ---------------------------------------------------------------------------------------------------------------------
# Loggers


class Messages(logging.Handler):
    """Collects the messages of Lightning's ``rank_zero_info`` (which GradGuard uses for what the user should see)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Messages:
        logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        self._level = logger.level
        logger.setLevel(logging.INFO)  # other test modules quiet Lightning's loggers
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        logger.removeHandler(self)
        logger.setLevel(self._level)


def test_dashboard_csv_logger_gets_the_scalars(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    with Messages() as said:
        trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=2), max_steps=5, logger=logger)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    logged = {int(r["step"]): float(r["gradguard/total_norm"]) for r in rows if r.get("gradguard/total_norm")}
    assert logged == pytest.approx({s: rec.total[s] for s in (1, 3)}, rel=1e-6)
    assert any(r.get("gradguard/grad_norm/enc.0") for r in rows)
    (skipped,) = [m for m in said.messages if "CSVLogger" in m]  # one message about what CSV does not take
    assert "histograms" in skipped
    assert "text" in skipped


def test_dashboard_writes_to_several_loggers(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb2 = TensorBoardLogger(tmp_path, name="tb2")
    trainer, rec = fit_recorded(tmp_path, GradGuard(log_every_n_steps=1), max_steps=2, logger=[tb, csv_logger, tb2])
    for log_dir in (tb.log_dir, tb2.log_dir):
        acc = events(log_dir)
        assert scalars(acc, "gradguard/total_norm") == pytest.approx(rec.total, rel=1e-6)
        assert texts(acc)
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as fh:
        assert [float(r["gradguard/total_norm"]) for r in csv.DictReader(fh) if r["gradguard/total_norm"]] == (
            pytest.approx([rec.total[0], rec.total[1]], rel=1e-6)
        )


def test_dashboard_without_logger_checks_still_run_and_nothing_is_logged(tmp_path):
    guard = GradGuard(on_unused="warn")
    with pytest.warns(UserWarning, match="aux"):
        trainer, _ = fit_recorded(tmp_path, guard, Net(use_aux=False), max_steps=2, logger=False)
    assert {f.param for f in guard.findings} == {"aux.weight", "aux.bias"}
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    report = json.loads((tmp_path / REPORT_FILE).read_text())  # no logger: the Trainer's default_root_dir
    assert {r["param"] for r in report["findings"]} == {"aux.weight", "aux.bias"}


def test_dashboard_log_every_n_steps_zero_logs_no_scalars(tmp_path):
    trainer, _ = fit_recorded(tmp_path, GradGuard(log_every_n_steps=0), max_epochs=1, max_steps=-1)
    acc = events(trainer)
    assert gradguard_tags(acc) == []
    assert acc.Tags()["histograms"] == []
    assert texts(acc)  # the run report is still written


# ---------------------------------------------------------------------------------------------------------------------
# The JSON run report


def test_report_json_in_the_loggers_log_dir(tmp_path):
    guard = GradGuard(on_unused="warn")
    with pytest.warns(UserWarning, match="aux"):
        trainer, _ = fit_recorded(tmp_path, guard, Net(use_aux=False), max_steps=3)
    report = json.loads((Path(trainer.logger.log_dir) / REPORT_FILE).read_text())
    rows = {r["param"]: r for r in report["findings"]}
    assert set(rows) == {"aux.weight", "aux.bias"}
    assert rows["aux.weight"]["kind"] == "unused"
    assert rows["aux.weight"]["first_step"] == 0
    assert rows["aux.weight"]["count"] == 3
    assert "optimizer" in rows["aux.weight"]["hint"]
    assert report["counts"]["unused"] == 2


def test_report_json_at_report_path_or_not_at_all(tmp_path):
    path = tmp_path / "out" / "guard.json"
    fit_recorded(tmp_path, GradGuard(report_path=str(path)), max_steps=1)
    assert json.loads(path.read_text())["findings"] == []
    trainer, _ = fit_recorded(tmp_path / "b", GradGuard(write_report=False), max_steps=1)
    assert not list((tmp_path / "b").rglob(REPORT_FILE))


def test_report_json_and_text_when_fit_fails(tmp_path, capsys):
    guard = GradGuard(idle_window=1)  # unused parameters raise at once
    with pytest.raises(GradGuardError, match="aux"):
        fit_recorded(tmp_path, guard, Net(use_aux=False), max_steps=3)
    (path,) = tmp_path.rglob(REPORT_FILE)
    assert {r["param"] for r in json.loads(path.read_text())["findings"]} == {"aux.weight", "aux.bias"}
    acc = events(path.parent)
    (final,) = texts(acc).values()
    assert "- **unused**: module `aux` (2 tensors, 17 parameters), first step 0" in final


# ---------------------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norms": "layer"}, r"`GradGuard\(norms='layer'\)` must be one of 'param', 'module', 'total'"),
        ({"max_norm_tags": 0}, r"`GradGuard\(max_norm_tags=0\)` must be an int >= 1"),
        ({"log_every_n_steps": -1}, r"`GradGuard\(log_every_n_steps=-1\)` must be None"),
        ({"log_every_n_steps": 2.5}, r"`GradGuard\(log_every_n_steps=2.5\)`"),
        ({"histograms": "yes"}, r"`GradGuard\(histograms='yes'\)` must be True or False"),
        ({"value_histograms": 1}, r"`GradGuard\(value_histograms=1\)` must be True or False"),
        ({"update_ratio": None}, r"`GradGuard\(update_ratio=None\)` must be True or False"),
        ({"report_path": 3}, r"`GradGuard\(report_path=3\)` must be a path or None"),
    ],
)
def test_gradguard_rejects_bad_dashboard_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradGuard(**kwargs)


def test_gradguard_keeps_dashboard_options_as_attributes():
    guard = GradGuard(log_every_n_steps=7, norms="param", max_norm_tags=9, value_histograms=True, update_ratio=True)
    assert (guard.log_every_n_steps, guard.norms, guard.max_norm_tags) == (7, "param", 9)
    assert (guard.histograms, guard.value_histograms, guard.update_ratio) == (True, True, True)
    assert "norms='param'" in repr(guard)


# ---------------------------------------------------------------------------------------------------------------------
# Several optimizers


class TwoOptimizers(LightningModule):
    """The discriminator steps every batch, the generator every ``gen_every``-th batch."""

    gen_every = 1

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Linear(8, 8)
        self.disc = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        d_loss = self.disc(x).pow(2).mean() + self.disc(self.gen(x).detach()).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        if batch_idx % self.gen_every == 0:
            g_loss = -self.disc(self.gen(x)).mean()
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
        return d_loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.01), torch.optim.SGD(self.disc.parameters(), lr=0.01)


def test_dashboard_several_optimizers_get_their_own_total_norm(tmp_path):
    guard = GradGuard(on_orphan="ignore", log_every_n_steps=2)
    trainer, rec = fit_recorded(tmp_path, guard, TwoOptimizers(), max_steps=8)
    acc = events(trainer)
    # logged at Lightning's step, the batch index (batches 1 and 3), not at global_step, which counts both
    # optimizers' steps: batch b steps disc at global step 2b and gen at 2b + 1
    assert sorted(scalars(acc, "gradguard/total_norm_opt1")) == [1, 3]  # disc
    assert sorted(scalars(acc, "gradguard/total_norm_opt0")) == [1, 3]  # gen
    disc = scalars(acc, "gradguard/total_norm_opt1")[3]
    assert disc == pytest.approx(math.hypot(rec.param[6]["disc.weight"], rec.param[6]["disc.bias"]), rel=1e-6)
    assert {"gradguard/grad_norm/gen", "gradguard/grad_norm/disc"} <= set(gradguard_tags(acc))


class GenEveryOtherBatch(TwoOptimizers):
    """The generator steps every other batch only (global_step then mixes both optimizers unevenly)."""

    gen_every = 2


def test_dashboard_optimizers_stepping_at_different_rates_are_logged_in_the_same_batches(tmp_path):
    guard = GradGuard(on_orphan="ignore", log_every_n_steps=3)
    trainer, _ = fit_recorded(tmp_path, guard, GenEveryOtherBatch(), max_steps=9)
    acc = events(trainer)
    # global steps per batch: b0: disc 0, gen 1; b1: disc 2; b2: disc 3, gen 4; b3: disc 5; b4: disc 6, gen 7;
    # b5: disc 8. Logged: batches 2 and 5 ((b + 1) % 3 == 0), at step b, whichever optimizers step in them.
    assert sorted(scalars(acc, "gradguard/total_norm_opt1")) == [2, 5]  # disc
    assert sorted(scalars(acc, "gradguard/total_norm_opt0")) == [2]  # gen steps in batch 2, not in batch 5


# ---------------------------------------------------------------------------------------------------------------------
# Grouping (pure)


def test_group_keys_modes():
    names = ["enc.0.weight", "enc.0.bias", "enc.2.weight", "head.weight", "scale", None]
    assert group_keys(names, "param", 10) == (names, "per parameter")
    assert group_keys(names, "module", 10)[0] == ["enc.0", "enc.0", "enc.2", "head", "scale", None]
    assert group_keys(names, "total", 10)[0] == [None] * 6


def test_group_keys_cap_merges_modules_into_parents_then_keeps_the_first():
    names = [f"blocks.{i}.{m}.weight" for i in range(3) for m in ("attn", "mlp")] + ["emb.weight"]
    keys, how = group_keys(names, "module", 4)
    assert keys == ["blocks.0", "blocks.0", "blocks.1", "blocks.1", "blocks.2", "blocks.2", "emb"]
    assert how == "per module at depth 2"
    keys, how = group_keys(names, "module", 1)
    assert keys == ["blocks"] * 6 + [None]
    assert "the first 1 of 2" in how


def test_tag_docstring_examples_run():
    import lightning_gradguard.tags

    result = doctest.testmod(lightning_gradguard.tags, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3
    assert result.failed == 0


def test_histogram_buckets_merge_to_at_most_max_buckets_and_keep_counts():
    from lightning_gradguard.histograms import histogram_counts, histogram_proto_args

    values = torch.cat([torch.randn(5000) * 1e-4, torch.randn(5000) * 10, torch.zeros(7), torch.tensor([-3e30])])
    stats, counts = histogram_counts([values])
    bins = counts.nonzero().flatten().tolist()
    for cap in (1000, 64, 5):
        h = histogram_proto_args(stats.tolist(), bins, counts[bins].tolist(), max_buckets=cap)
        assert h is not None
        assert len(h["bucket"]) <= cap + 1  # plus the empty first bucket that carries the left edge
        assert h["bucket_limit"] == sorted(h["bucket_limit"])
        assert (h["min"], h["max"], h["num"]) == (float(values.min()), float(values.max()), values.numel())
        # bucket i holds the values in (limit[i-1], limit[i]]
        idx = torch.bucketize(values.double(), torch.tensor(h["bucket_limit"], dtype=torch.float64))
        assert torch.bincount(idx, minlength=len(h["bucket"])).tolist() == [int(c) for c in h["bucket"]]


# ---------------------------------------------------------------------------------------------------------------------
# Epoch statistics across ranks (2 CPU processes, gloo)


def _epoch_stats_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lightning_gradguard.dashboard import Dashboard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dashboard = Dashboard()
        totals = {0: [1.0, 3.0, 2.0], 1: [5.0]}[rank]  # rank 1 saw fewer steps, and a larger norm
        for step, total in enumerate(totals):
            dashboard.record_total(0, step, total)
        dashboard.record_total(0, 9, math.inf)  # an overflow step the scaler skipped: left out
        out, _ = dashboard.epoch_stats(1, torch.device("cpu"))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_dashboard_epoch_stats_are_synced_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_epoch_stats_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = {"gradguard/epoch/total_norm_max": 5.0, "gradguard/epoch/total_norm_mean": (1 + 3 + 2 + 5) / 4}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(expected)
