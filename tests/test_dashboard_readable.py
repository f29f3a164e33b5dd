"""A dashboard a person can read: GradGuard's points at Lightning's own steps, one findings chart only once there is
something to show, no tag that is both a module and a part of its parent. Read back from real TensorBoard files."""

from __future__ import annotations

import math
import re

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from test_tensorboard import TwoOptimizers
from torch import nn

from conftest import events, fit, loader, make_trainer
from lightning_gradguard import GradGuard
from lightning_gradguard.tags import custom_scalars_layout, group_keys, own_keys


class Logs(LightningModule):
    """A small regression model that logs its loss with ``self.log`` (Lightning's own logging steps)."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x).squeeze(-1) - y) ** 2).mean()
        self.log("train_loss", loss)
        if self.nan_at is not None and self.global_step == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TwoOptimizersLogs(TwoOptimizers):
    """Manual optimization with two optimizers (``global_step`` advances twice per batch); logs with ``self.log``."""

    def training_step(self, batch, batch_idx):
        self.log("d_loss", super().training_step(batch, batch_idx))


#: The runs here (``fit(..., **LOGGED)``): 12 batches of 8 an epoch, logged to TensorBoard.
LOGGED = {"n": 96, "tensorboard": True}


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return sorted(e.step for e in acc.Scalars(tag))


def charts_of(event) -> dict[str, list[str]]:
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}


# ---------------------------------------------------------------------------------------------------------------------
# Steps


@pytest.mark.parametrize(
    ("every", "kwargs"),
    [(3, {"max_steps": 10}), (4, {"max_steps": 6, "accumulate_grad_batches": 2}), (50, {"max_steps": 120, "n": 960})],
)
def test_dashboard_logs_at_the_steps_lightning_logs_self_log(tmp_path, every, kwargs):
    trainer = fit(tmp_path, Logs(), GradGuard(), log_every_n_steps=every, **{**LOGGED, **kwargs})
    acc = events(trainer)
    lightning = steps(acc, "train_loss")
    assert lightning  # Lightning logged something: the comparison below means something
    assert steps(acc, "gradguard/total_norm") == lightning
    assert steps(acc, "gradguard/grad_norm/net.0") == lightning
    assert lightning[0] == every - 1  # not 0, n, 2n: Lightning's (step + 1) % n == 0


def test_dashboard_logs_at_lightnings_steps_with_two_optimizers(tmp_path):
    guard = GradGuard(on_orphan="ignore")
    trainer = fit(tmp_path, TwoOptimizersLogs(), guard, max_steps=12, log_every_n_steps=2, **LOGGED)
    acc = events(trainer)
    lightning = steps(acc, "d_loss")
    assert lightning == [1, 3, 5]  # the batch index, though global_step advances twice per batch
    assert steps(acc, "gradguard/total_norm_opt0") == lightning
    assert steps(acc, "gradguard/total_norm_opt1") == lightning


def test_dashboard_explicit_log_every_n_steps_uses_the_same_rule(tmp_path):
    trainer = fit(tmp_path, Logs(), GradGuard(log_every_n_steps=4), max_steps=9, log_every_n_steps=2, **LOGGED)
    acc = events(trainer)
    assert steps(acc, "train_loss") == [1, 3, 5, 7]
    assert steps(acc, "gradguard/total_norm") == [3, 7]  # a subset of Lightning's points


# ---------------------------------------------------------------------------------------------------------------------
# Findings chart


def test_dashboard_clean_run_has_no_findings_scalars_and_no_findings_chart(tmp_path):
    trainer = fit(tmp_path, Logs(), GradGuard(), max_steps=4, log_every_n_steps=1, **LOGGED)
    acc = events(trainer)
    assert not [t for t in acc.Tags()["scalars"] if "/findings/" in t]
    layouts = acc.Tensors("custom_scalars__config__")
    assert len(layouts) == 1
    assert not [title for title in charts_of(layouts[0]) if "findings" in title]


def test_dashboard_findings_chart_appears_with_the_first_finding_and_holds_only_seen_kinds(tmp_path):
    guard = GradGuard(on_nonfinite="warn", log_every_n_steps=1)
    with pytest.warns(UserWarning, match="nonfinite|NaN"):
        trainer = fit(tmp_path, Logs(nan_at=2), guard, max_steps=4, log_every_n_steps=1, **LOGGED)
    acc = events(trainer)
    findings = [t for t in acc.Tags()["scalars"] if "/findings/" in t]
    assert findings == ["gradguard/findings/nonfinite"]
    assert steps(acc, "gradguard/findings/nonfinite") == [2, 3]
    layouts = acc.Tensors("custom_scalars__config__")
    assert len(layouts) == 2  # written again when the first finding shows up (add_custom_scalars has no step)
    assert not [title for title in charts_of(layouts[0]) if "findings" in title]
    final = charts_of(layouts[-1])  # TensorBoard shows the last layout
    assert list(final)[0] == "findings so far: nonfinite (parameter tensors)"  # a chart per kind, first: its title
    (regex,) = final["findings so far: nonfinite (parameter tensors)"]  # is the line's label and says what it counts
    assert [t for t in acc.Tags()["scalars"] if re.match(regex, t)] == findings
    assert [title for title in final if "findings" in title] == ["findings so far: nonfinite (parameter tensors)"]


def test_custom_scalars_layout_one_findings_chart_per_kind():
    layout = custom_scalars_layout(["enc"], findings=["detached", "unused"])["GradGuard"]
    titles = [t for t in layout if t.startswith("findings")]
    assert titles == ["findings so far: detached (parameter tensors)", "findings so far: unused (parameter tensors)"]
    (regex,) = layout[titles[0]][1]
    assert re.match(regex, "gradguard/findings/detached")
    assert not re.match(regex, "gradguard/findings/unused")


# ---------------------------------------------------------------------------------------------------------------------
# Parts without a gradient


class Cut(LightningModule):
    """``net`` regresses; ``side`` (an input branch) is ``.detach()``-ed from the loss, ``late`` joins it from step
    ``late_from`` on, ``net.2.extra`` (3 of ``net.2``'s 20 elements) is never used."""

    def __init__(self, late_from: int | None = None, extra: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.side = nn.Linear(8, 1)
        self.late = nn.Linear(8, 1) if late_from is not None else None
        self.late_from = late_from
        if extra:
            self.net[2].register_parameter("extra", nn.Parameter(torch.zeros(3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x).squeeze(-1) + self.side(x).detach().squeeze(-1)
        if self.late is not None and self.global_step >= self.late_from:
            out = out + self.late(x).squeeze(-1)
        return ((out - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def matches(acc: EventAccumulator, regexes: list[str]) -> set[str]:
    return {t for t in acc.Tags()["scalars"] if any(re.match(r, t) for r in regexes)}


def test_dashboard_a_module_without_a_gradient_has_a_no_gradient_chart_not_an_empty_one(tmp_path):
    guard = GradGuard(on_detached="warn", log_every_n_steps=2, update_ratio=True)
    with pytest.warns(UserWarning, match="detached"):
        trainer = fit(tmp_path, Cut(), guard, max_steps=6, log_every_n_steps=2, **LOGGED)
    acc = events(trainer)
    assert {e.step: e.value for e in acc.Scalars("gradguard/no_grad/side")} == {1: 1.0, 3: 1.0, 5: 1.0}
    assert "gradguard/grad_norm/side" not in acc.Tags()["scalars"]
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("gradguard/no_grad/net")]  # only what lacks one
    (layout,) = acc.Tensors("custom_scalars__config__")  # known at the first logged step: written once
    charts = charts_of(layout)
    assert "gradient norm: side" not in charts
    assert "update / weight: side" not in charts
    assert matches(acc, charts["NO GRADIENT: side (share of parameters)"]) == {"gradguard/no_grad/side"}
    assert matches(acc, charts["share of parameters without a gradient"]) == {"gradguard/no_grad/side"}
    empty = [title for title, regexes in charts.items() if not matches(acc, regexes)]
    assert not empty  # TensorBoard would show each as "Matches (0)", which reads as "no data yet"


def test_dashboard_no_gradient_share_counts_the_elements_of_a_partly_dead_module(tmp_path):
    guard = GradGuard(on_detached="warn", on_unused="warn", log_every_n_steps=1, idle_window=1)
    with pytest.warns(UserWarning, match="unused"):
        trainer = fit(tmp_path, Cut(extra=True), guard, max_steps=2, log_every_n_steps=1, **LOGGED)
    acc = events(trainer)
    shares = {e.step: e.value for e in acc.Scalars("gradguard/no_grad/net.2")}
    assert shares == {0: pytest.approx(3 / 20), 1: pytest.approx(3 / 20)}  # extra: 3 of weight 16 + bias 1 + 3
    assert "gradguard/grad_norm/net.2" in acc.Tags()["scalars"]  # the rest of it has a gradient: its norm chart stays
    (layout,) = acc.Tensors("custom_scalars__config__")
    assert "gradient norm: net" in charts_of(layout)


def test_dashboard_a_module_that_gets_a_gradient_later_gets_its_norm_chart_back(tmp_path):
    guard = GradGuard(on_detached="warn", log_every_n_steps=1)  # late: idle for 2 steps, not a finding
    with pytest.warns(UserWarning, match="detached"):
        trainer = fit(tmp_path, Cut(late_from=2), guard, max_steps=4, log_every_n_steps=1, **LOGGED)
    acc = events(trainer)
    assert {e.step: e.value for e in acc.Scalars("gradguard/no_grad/late")} == {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}
    assert steps(acc, "gradguard/grad_norm/late") == [2, 3]
    layouts = [charts_of(e) for e in acc.Tensors("custom_scalars__config__")]
    assert "NO GRADIENT: late (share of parameters)" in layouts[0]
    assert "gradient norm: late" in layouts[-1]
    assert "NO GRADIENT: late (share of parameters)" not in layouts[-1]
    assert "NO GRADIENT: side (share of parameters)" in layouts[-1]


def test_dashboard_no_gradient_leaves_out_ignored_parameters_and_clean_runs(tmp_path):
    guard = GradGuard(log_every_n_steps=1, ignore=["side.*"])
    trainer = fit(tmp_path / "ignored", Cut(), guard, max_steps=2, log_every_n_steps=1, **LOGGED)
    acc = events(trainer)
    assert not [t for t in acc.Tags()["scalars"] if "/no_grad/" in t]
    (layout,) = acc.Tensors("custom_scalars__config__")
    assert "share of parameters without a gradient" not in charts_of(layout)
    assert not [title for title in charts_of(layout) if title.startswith("NO GRADIENT")]
    assert "gradient norm: side" in charts_of(layout)  # an ignored part keeps its (empty) chart, as before
    trainer = fit(tmp_path / "clean", Logs(), GradGuard(), max_steps=4, log_every_n_steps=1, **LOGGED)
    assert not [t for t in events(trainer).Tags()["scalars"] if "/no_grad/" in t]


# ---------------------------------------------------------------------------------------------------------------------
# Parent and child tags


class Encoder(LightningModule):
    """A real ``nn.TransformerEncoderLayer``: ``self_attn`` owns ``in_proj_*`` and has a child ``out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.layer(x.view(-1, 2, 4))
        return ((self.head(h.mean(1)).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Grads(Callback):
    def __init__(self) -> None:
        self.norms: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms[trainer.global_step] = {n: float(p.grad.norm()) for n, p in pl_module.named_parameters()}


def test_dashboard_names_a_modules_own_parameters_apart_from_its_childrens(tmp_path):
    grads = Grads()
    trainer = make_trainer(
        tmp_path, [GradGuard(log_every_n_steps=1), grads], max_steps=2, logger=TensorBoardLogger(tmp_path, name="tb")
    )
    trainer.fit(Encoder(), loader(n=32))
    acc = events(trainer)
    tags = {t.removeprefix("gradguard/grad_norm/") for t in acc.Tags()["scalars"] if "/grad_norm/" in t}
    assert tags == {
        "layer.self_attn.(own)",
        "layer.self_attn.out_proj",
        "layer.linear1",
        "layer.linear2",
        "layer.norm1",
        "layer.norm2",
        "head",
    }
    for step in (0, 1):
        g = grads.norms[step]
        own = math.hypot(g["layer.self_attn.in_proj_weight"], g["layer.self_attn.in_proj_bias"])
        logged = {e.step: e.value for e in acc.Scalars("gradguard/grad_norm/layer.self_attn.(own)")}
        assert logged[step] == pytest.approx(own, rel=1e-5)
    (layout,) = acc.Tensors("custom_scalars__config__")
    (regex,) = charts_of(layout)["gradient norm: layer"]
    assert {t for t in acc.Tags()["scalars"] if re.match(regex, t)} == {f"gradguard/grad_norm/{k}" for k in tags} - {
        "gradguard/grad_norm/head"
    }


def test_own_keys_leaves_keys_without_children_alone():
    assert own_keys(["enc.0", "enc.1", "head", None]) == ["enc.0", "enc.1", "head", None]
    assert own_keys(["a", "a.b", "a.b.c"]) == ["a.(own)", "a.b.(own)", "a.b.c"]


def test_group_keys_never_gives_a_parent_and_its_child():
    names = ["blk.scale", "blk.attn.w", "blk.attn.out.w", "blk.mlp.w"]
    for norms, cap in (("module", 100), ("param", 100), ("param", 3), ("module", 2)):
        keys = {k for k in group_keys(names, norms, cap)[0] if k is not None}
        assert not [(a, b) for a in keys for b in keys if b.startswith(a + ".")], (norms, cap, keys)
    assert group_keys(names, "module", 100)[0] == ["blk.(own)", "blk.attn.(own)", "blk.attn.out", "blk.mlp"]
