"""Each finding kind under a real Trainer: the true positive, and the nearest correct code that must stay silent."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from conftest import fit, kinds, loader, make_trainer, where
from lightning_gradguard import GradGuard, GradGuardError, GradGuardWarning, check_step


class Net(LightningModule):
    """encoder → head regression; subclasses plant one bug each."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out.squeeze(-1) - y) ** 2).mean()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self.head(self.features(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit_silently(tmp_path, model: LightningModule, **trainer_kwargs) -> GradGuard:
    """Fit with every kind set to raise; assert that nothing was found."""
    guard = GradGuard(on_frozen="raise", on_orphan="raise", on_zero="raise")
    fit(tmp_path, model, guard, error=GradGuardWarning, **trainer_kwargs)
    assert guard.findings == []
    return guard


def test_correct_model_is_silent(tmp_path):
    fit_silently(tmp_path, Net())


# ---------------------------------------------------------------- frozen
class FrozenInOptimizer(Net):
    def __init__(self):
        super().__init__()
        self.encoder[0].weight.requires_grad_(False)


def test_frozen_param_in_optimizer_warns_once(tmp_path):
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="encoder.0.weight") as record:
        fit(tmp_path, FrozenInOptimizer(), guard)
    assert kinds(guard.findings) == {("frozen", "encoder.0.weight")}
    assert sum("encoder.0.weight" in str(w.message) for w in record) == 1  # 3 steps, warned once
    assert guard.report.entries[0].count == 3


class FrozenBackboneLeftOut(Net):
    """Fine-tuning: the frozen backbone is not handed to the optimizer."""

    def __init__(self):
        super().__init__()
        self.encoder.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.05)


def test_frozen_backbone_left_out_of_optimizer_is_silent(tmp_path):
    fit_silently(tmp_path, FrozenBackboneLeftOut())


# ---------------------------------------------------------------- unused
class NeverCalled(Net):
    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(16, 1)  # defined, handed to the optimizer, never called


class OutputDiscarded(Net):
    def __init__(self):
        super().__init__()
        self.pooler = nn.Linear(16, 16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        _pooled = self.pooler(h)  # CALL: pooler (computed, never read)
        return self.loss(self.head(h), y)


class AuxLogged(Net):
    """An auxiliary head whose output is only logged (`self.log` detaches it), never added to the loss."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        aux_loss = self.loss(self.aux(h), y)  # CALL: aux
        self.log("aux_loss", aux_loss)  # DROP: self.log
        return self.loss(self.head(h), y)


class AuxPrinted(AuxLogged):
    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        aux = self.aux(h)  # CALL: aux printed
        self.printed = aux.abs().mean().item()  # DROP: item
        return self.loss(self.head(h), y)


def test_module_never_called_is_unused_and_raises(tmp_path):
    with pytest.raises(GradGuardError, match=r"aux\.weight: unused") as err:
        fit(tmp_path, NeverCalled(), GradGuard(idle_window=1))
    assert kinds(err.value.findings) == {("unused", "aux.weight"), ("unused", "aux.bias")}
    assert "never took part in the forward pass" in err.value.findings[0].message
    assert all(f.step == 0 and f.where is None for f in err.value.findings)


def test_discarded_output_is_unused_not_detached(tmp_path):
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, OutputDiscarded(), GradGuard(idle_window=1))
    assert kinds(err.value.findings) == {("unused", "pooler.weight"), ("unused", "pooler.bias")}
    assert "nothing it computed reached the loss" in err.value.findings[0].message
    assert err.value.findings[0].module == "pooler"


@pytest.mark.parametrize(("model", "call", "drop"), [
    (AuxLogged, "CALL: aux", "`.detach()` at {}"),  # Lightning's `self.log` detaches what it logs
    (AuxPrinted, "CALL: aux printed", "`.item()` at {}"),
])  # fmt: skip
def test_an_output_put_to_another_use_than_the_loss_raises_at_the_first_step(tmp_path, model, call, drop):
    """Not control flow: the traced first step shows the head ran and its value went elsewhere (logged, `.item()`-ed),
    never into the loss; it is reported at once, at the line that called it, naming where its value went."""
    trainer = make_trainer(tmp_path, [GradGuard()], max_steps=20)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(model(), loader())
    assert trainer.global_step == 0
    assert kinds(err.value.findings) == {("unused", "aux.weight"), ("unused", "aux.bias")}
    marker = "DROP: self.log" if model is AuxLogged else "DROP: item"
    for f in err.value.findings:
        assert (f.step, f.where) == (0, where(call))
        assert drop.format(where(marker)) in f.message


@pytest.mark.parametrize("module", [nn.Linear(8, 8), nn.LSTM(8, 8, batch_first=True), nn.Conv1d(1, 2, 3)])
def test_a_discarded_module_is_named_at_the_line_that_called_it(module):
    """Whatever the module hands its parameters to the op as (an LSTM's are a list: `_flat_weights`)."""
    net = nn.ModuleDict({"body": nn.Linear(8, 8), "extra": module})
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    with check_step(net, opt, strict=False) as chk, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _ = net["extra"](x[:, None] if isinstance(module, nn.Conv1d) else x)  # CALL: extra
        opt.zero_grad()
        net["body"](x).sum().backward()
        opt.step()
    names = {n for n, _ in module.named_parameters(prefix="extra")}
    assert {(f.kind, f.param, f.where) for f in chk.findings} == {("unused", n, where("CALL: extra")) for n in names}


def test_an_output_simply_dropped_is_reported_within_the_window_at_its_call(tmp_path):
    """Computed and dropped, nowhere else: as a task head chosen per batch would be on a step, so the window decides;
    the finding names the line that called it."""
    trainer = make_trainer(tmp_path, [GradGuard()], max_steps=40)
    with pytest.raises(GradGuardError) as err:
        trainer.fit(OutputDiscarded(), loader(n=320))
    assert trainer.global_step == 15
    assert kinds(err.value.findings) == {("unused", "pooler.weight"), ("unused", "pooler.bias")}
    assert {(f.step, f.where) for f in err.value.findings} == {(0, where("CALL: pooler (computed, never read)"))}
    assert "took part in the forward pass at " in err.value.findings[0].message


class SometimesSkipped(Net):
    """A data-dependent branch skips `extra` on step 2 only (an untraced step under diagnose='on_finding')."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        out = self.head(h)
        if batch_idx != 2:
            out = out + self.extra(h)
        return self.loss(out, y)


def test_param_skipped_on_one_untraced_step_is_explained_by_the_next_traced_step(tmp_path):
    guard = GradGuard(on_unused="warn", idle_window=1)
    fit(tmp_path, SometimesSkipped(), guard, max_steps=4)
    by_key = {f.key: f for f in guard.findings}
    assert set(by_key) == {("unused", "extra.weight"), ("unused", "extra.bias")}
    f = by_key[("unused", "extra.weight")]
    assert f.step == 2
    assert "on step 2 only left it out" in f.message


def test_param_skipped_on_an_untraced_step_raises_at_the_next_step(tmp_path):
    with pytest.raises(GradGuardError, match="extra.weight"):
        fit(tmp_path, SometimesSkipped(), GradGuard(idle_window=1), max_steps=4)


# ---------------------------------------------------------------- detached
class DetachedEncoder(Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x).detach()  # CUT: detach
        return self.loss(self.head(h), y)


def test_detached_encoder_raises_naming_the_line(tmp_path):
    with pytest.raises(GradGuardError, match="remove the `.detach\\(\\)`") as err:
        fit(tmp_path, DetachedEncoder(), GradGuard())
    assert kinds(err.value.findings) == {("detached", "encoder.0.weight"), ("detached", "encoder.0.bias")}
    assert {f.where for f in err.value.findings} == {where("CUT: detach")}


def test_detached_is_judged_on_untraced_steps_too_but_without_where(tmp_path):
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, DetachedEncoder(), GradGuard(diagnose="never", idle_window=1))
    assert {f.kind for f in err.value.findings} == {"unused"}  # cannot be told apart without a trace
    assert "not traced" in err.value.findings[0].message
    assert "remove what cuts its gradient path" in err.value.findings[0].hint  # the fix for either case


# ---------------------------------------------------------------- orphan
class HeadNotInOptimizer(Net):
    def configure_optimizers(self):
        return torch.optim.SGD(self.encoder.parameters(), lr=0.05)


def test_head_missing_from_optimizer_is_orphan(tmp_path):
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="no optimizer holds it"):
        fit(tmp_path, HeadNotInOptimizer(), guard)
    assert kinds(guard.findings) == {("orphan", "head.weight"), ("orphan", "head.bias")}


class WithEma(Net):
    """An EMA copy: trainable flags left on (as `AveragedModel` does), updated by hand, never by an optimizer."""

    def __init__(self):
        super().__init__()
        self.ema = torch.optim.swa_utils.AveragedModel(nn.Sequential(self.encoder, self.head))

    def configure_optimizers(self):
        return torch.optim.SGD(list(self.encoder.parameters()) + list(self.head.parameters()), lr=0.05)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(nn.Sequential(self.encoder, self.head))


def test_ema_copy_outside_optimizer_is_silent(tmp_path):
    fit_silently(tmp_path, WithEma())


# ---------------------------------------------------------------- stale
class OptimizerOverCopy(Net):
    def configure_optimizers(self):
        return torch.optim.SGD(copy.deepcopy(self).parameters(), lr=0.05)


def test_optimizer_over_a_copy_is_stale(tmp_path):
    with pytest.raises(GradGuardError, match="stale") as err:
        fit(tmp_path, OptimizerOverCopy(), GradGuard(on_orphan="ignore"))
    names = ["encoder.0.weight", "encoder.0.bias", "head.weight", "head.bias"]
    assert kinds(err.value.findings) == {("stale", n) for n in names}
    assert "copy" in err.value.findings[0].message


def test_stale_also_reports_the_real_params_as_orphans(tmp_path):
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, OptimizerOverCopy(), GradGuard())
    assert ("orphan", "head.weight") in kinds(err.value.findings)


# ---------------------------------------------------------------- nonfinite
class SqrtAtZero(Net):
    """The distance of a point to itself: the value is 0, its gradient through sqrt is NaN."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        dist = torch.sqrt(((h - h) ** 2).sum())
        return self.loss(self.head(h), y) + dist


def test_nan_gradient_raises_nonfinite(tmp_path):
    with pytest.raises(GradGuardError, match="nonfinite") as err:
        fit(tmp_path, SqrtAtZero(), GradGuard())
    assert {f.kind for f in err.value.findings} == {"nonfinite"}
    assert {f.param for f in err.value.findings} >= {"encoder.0.weight"}


def test_large_finite_gradient_is_not_nonfinite(tmp_path):
    class Huge(Net):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1e25  # norm overflows float32, elements do not

    guard = GradGuard()
    fit(tmp_path, Huge(), guard, max_steps=1)
    assert guard.findings == []


# ---------------------------------------------------------------- zero
class TimesZero(Net):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        return self.loss(self.head(h) + self.gate(h) * 0.0, y)


def test_zero_gradient_warns(tmp_path):
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="exactly zero"):
        fit(tmp_path, TimesZero(), guard)
    assert kinds(guard.findings) == {("zero", "gate.weight"), ("zero", "gate.bias")}


class SetToNoneFalse(Net):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)


def test_set_to_none_false_zeroing_is_silent(tmp_path):
    fit_silently(tmp_path, SetToNoneFalse(), max_steps=4)


def test_set_to_none_false_unused_is_unused_not_zero(tmp_path):
    class Both(NeverCalled):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            optimizer.zero_grad(set_to_none=False)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if batch_idx == 0:
                loss = loss + self.aux(batch[0][:, :16].repeat(1, 2)).sum() * 0  # gives aux a zero grad tensor once
            return loss

    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, Both(), GradGuard(on_zero="ignore", idle_window=1), max_steps=3)
    assert ("unused", "aux.weight") in kinds(err.value.findings)
    assert err.value.findings[0].step == 1


# ---------------------------------------------------------------- nearest correct architectures
class TiedEmbeddings(LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def training_step(self, batch, batch_idx):
        x, _ = batch
        tokens = (x.abs() * 3).long().clamp(max=19)
        logits = self.out(self.emb(tokens))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_tied_embeddings_are_silent(tmp_path):
    fit_silently(tmp_path, TiedEmbeddings())


def test_tied_weight_is_reported_once_under_its_first_name(tmp_path):
    class TiedUnused(TiedEmbeddings):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return (self.emb.weight.sum() * 0 + x.sum()).detach().requires_grad_() * 0 + ((x * 0).sum() - y.sum())

    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, TiedUnused(), GradGuard())
    assert [f.param for f in err.value.findings] == ["emb.weight"]


class WithBatchNorm(Net):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())


def test_batchnorm_is_silent(tmp_path):
    fit_silently(tmp_path, WithBatchNorm())


class WithLSTM(Net):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=2, batch_first=True)

    def features(self, x):
        out, (h, c) = self.rnn(x.view(x.shape[0], 2, 4).repeat(1, 1, 2))
        return out[:, -1]

    def configure_optimizers(self):
        return torch.optim.SGD(list(self.rnn.parameters()) + list(self.head.parameters()), lr=0.05)


def test_lstm_is_silent(tmp_path):
    fit_silently(tmp_path, WithLSTM())


class WithTransformer(Net):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.proj = nn.Linear(2, 16)
        self.transformer = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def features(self, x):
        return self.transformer(self.proj(x.view(x.shape[0], 4, 2))).mean(1)

    def configure_optimizers(self):
        params = [*self.proj.parameters(), *self.transformer.parameters(), *self.head.parameters()]
        return torch.optim.AdamW(params, lr=1e-3)


def test_transformer_encoder_is_silent(tmp_path):
    fit_silently(tmp_path, WithTransformer())


class AlternateMicroBatches(Net):
    """`extra` is used on every other micro-batch only: with 2-batch accumulation every step still sees it."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        out = self.head(h) + (self.extra(h) if batch_idx % 2 else 0.0)
        return self.loss(out, y)


def test_gradient_accumulation_with_alternate_use_is_silent(tmp_path):
    fit_silently(tmp_path, AlternateMicroBatches(), accumulate_grad_batches=2, max_steps=2)


def test_gradient_accumulation_without_that_param_is_unused(tmp_path):
    class Never(AlternateMicroBatches):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, 0)

    with pytest.raises(GradGuardError, match="extra.weight"):
        fit(tmp_path, Never(), GradGuard(idle_window=1), accumulate_grad_batches=2, max_steps=2)


class GAN(LightningModule):
    def __init__(self, toggle: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.toggle = toggle
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(x.shape[0], 4)
        if self.toggle:
            self.toggle_optimizer(opt_g)
        g_loss = -self.D(self.G(z)).mean()
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(opt_g)
            self.toggle_optimizer(opt_d)
        d_loss = nn.functional.softplus(self.D(self.G(z).detach())).mean() + nn.functional.softplus(-self.D(x)).mean()
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return torch.optim.Adam(self.G.parameters(), 1e-3), torch.optim.Adam(self.D.parameters(), 1e-3)


@pytest.mark.parametrize("toggle", [True, False])
def test_gan_manual_optimization_is_silent(tmp_path, toggle):
    guard = fit_silently(tmp_path, GAN(toggle), max_steps=6)
    assert guard._core.checks == 6  # both optimizers were judged, every step


class TwoOptimizersOneBackward(LightningModule):
    """Manual optimization: one backward, then the trunk's and the head's optimizers step (in ``order``)."""

    def __init__(self, order: str = "trunk-head", bug: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.order, self.bug = order, bug
        self.trunk = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_trunk, opt_head = self.optimizers()
        out = self.head(self.trunk(x)).squeeze(-1)
        if self.bug:
            # trunk.weight keeps a gradient path through `.sum()`; trunk.bias and the head do not
            out = out.detach() * self.trunk.weight.sum()  # CUT: two-opt
        self.manual_backward(((out - y) ** 2).mean())
        for opt in (opt_trunk, opt_head) if self.order == "trunk-head" else (opt_head, opt_trunk):
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.trunk.parameters(), 0.1), torch.optim.SGD(self.head.parameters(), 0.1)


@pytest.mark.parametrize("order", ["trunk-head", "head-trunk"])
def test_two_optimizers_stepping_on_one_backward_both_see_the_trace(tmp_path, order):
    """The second optimizer's parameters are judged with the same step's trace: `detached` at the line."""
    fit_silently(tmp_path, TwoOptimizersOneBackward(order), max_steps=4)
    guard = GradGuard(on_detached="warn")
    with pytest.warns(GradGuardWarning, match="detached"):
        fit(tmp_path, TwoOptimizersOneBackward(order, bug=True), guard, max_steps=2)
    assert {(f.kind, f.param, f.where) for f in guard.findings} == {
        ("detached", p, where("CUT: two-opt")) for p in ("trunk.bias", "head.weight", "head.bias")
    }


def test_gan_with_detached_generator_output_raises_for_generator(tmp_path):
    class Broken(GAN):
        def training_step(self, batch, batch_idx):
            g = self.G
            self.G = nn.Sequential(g, Detach())
            try:
                return super().training_step(batch, batch_idx)
            finally:
                self.G = g

    class Detach(nn.Module):
        def forward(self, x):
            return x.detach()  # CUT: gan

    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, Broken(), GradGuard(), max_steps=2)
    assert {f.kind for f in err.value.findings} == {"detached"}
    assert {f.param for f in err.value.findings} == {"G.0.weight", "G.0.bias", "G.2.weight", "G.2.bias"}
    assert {f.where for f in err.value.findings} == {where("CUT: gan")}


# ---------------------------------------------------------------- mixed precision
def test_bf16_mixed_is_silent(tmp_path):
    fit_silently(tmp_path, WithTransformer(), precision="bf16-mixed")


def test_bf16_mixed_still_finds_detached(tmp_path):
    with pytest.raises(GradGuardError, match="encoder.0.weight: detached"):
        fit(tmp_path, DetachedEncoder(), GradGuard(), precision="bf16-mixed")


class BigLoss(Net):
    """Gradients large enough that fp16 overflows at the scaler's initial scale of 65536."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 1000.0


def test_fp16_grad_scaler_overflow_steps_are_not_nonfinite(tmp_path):
    model = BigLoss()
    plugin = MixedPrecision("16-mixed", "cpu")
    guard = fit_silently(tmp_path, model, plugins=[plugin], max_steps=6)
    assert plugin.scaler.get_scale() < 65536.0  # overflow happened and the scaler skipped steps
    assert guard.findings == []


def test_fp16_persistent_nan_under_grad_scaler_is_nonfinite(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    with pytest.raises(GradGuardError, match="nonfinite"):
        fit(tmp_path, SqrtAtZero(), GradGuard(), plugins=[plugin], max_steps=6)


# ---------------------------------------------------------------- policy
def test_ignore_globs_silence_matching_params(tmp_path):
    guard = GradGuard(ignore=["aux.*"])
    fit(tmp_path, NeverCalled(), guard)
    assert guard.findings == []


def test_ignore_action_silences_a_kind(tmp_path):
    guard = GradGuard(on_unused="ignore")
    fit(tmp_path, NeverCalled(), guard)
    assert guard.findings == []


def test_raise_lists_every_finding_of_the_step(tmp_path):
    class Two(NeverCalled, FrozenInOptimizer):
        pass

    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, Two(), GradGuard(idle_window=1))
    assert kinds(err.value.findings) == {("unused", "aux.weight"), ("unused", "aux.bias"),
                                         ("frozen", "encoder.0.weight")}  # fmt: skip
    text = str(err.value)
    assert "aux.weight: unused" in text
    assert "encoder.0.weight: frozen" in text
    assert "fix:" in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_unused": "explode"}, r"on_unused='explode'"),
        ({"on_zero": None}, r"on_zero=None"),
        ({"ignore": [3]}, r"ignore=.*3"),
        ({"diagnose": "sometimes"}, r"diagnose='sometimes'"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradGuard(**kwargs)


# ---------------------------------------------------------------- the guard never changes training
@pytest.mark.parametrize("diagnose", ["always", "on_finding"])
def test_parameters_are_bit_identical_with_and_without_guard(tmp_path, diagnose):
    def train(callbacks):
        torch.manual_seed(1)
        model = WithTransformer()
        make_trainer(tmp_path, callbacks, max_steps=5).fit(model, loader())
        return model.state_dict()

    without = train([])
    with_guard = train([GradGuard(diagnose=diagnose)])
    assert without.keys() == with_guard.keys()
    for k in without:
        assert torch.equal(without[k], with_guard[k]), k


def test_no_tracer_mode_is_left_active_after_fit(tmp_path):
    from torch.overrides import _get_current_function_mode_stack

    with pytest.raises(GradGuardError):
        fit(tmp_path, DetachedEncoder(), GradGuard())
    assert _get_current_function_mode_stack() == []


def test_state_dict_round_trip_keeps_findings(tmp_path):
    guard = GradGuard(on_zero="warn")
    fit(tmp_path, TimesZero(), guard)
    state = guard.state_dict()
    fresh = GradGuard()
    fresh.load_state_dict(state)
    assert kinds(fresh.findings) == kinds(guard.findings)
    assert fresh._policy.warned == guard._policy.warned


def test_report_has_a_module_level_view(tmp_path):
    class Both(OutputDiscarded):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(16, 1)

    guard = GradGuard(on_unused="warn")
    fit(tmp_path, Both(), guard, max_steps=1)
    assert set(guard.report.notes) == {
        "module `pooler` ran, but its output never reached the loss",
        "module `aux` was never called",
    }
    assert "module `aux` was never called" in guard.report.table()


def test_tiny_gradient_whose_norm_underflows_is_not_zero(tmp_path):
    class Tiny(Net):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1e-30  # squares of the gradients underflow float32

    guard = GradGuard(on_zero="raise")
    fit(tmp_path, Tiny(), guard, max_steps=1)
    assert guard.findings == []


def test_sparse_embedding_gradients_are_measured(tmp_path):
    class Sparse(TiedEmbeddings):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8, sparse=True)
            self.out = nn.Linear(8, 20)

    fit_silently(tmp_path, Sparse())


def test_report_is_printed_once_when_the_end_of_fit_raises(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lightning.pytorch")  # other test modules quiet Lightning's loggers
    with pytest.raises(GradGuardError):  # skipped on the last step, a step with no next traced step
        fit(tmp_path, SometimesSkipped(), GradGuard(idle_window=1), max_steps=3)
    assert caplog.text.count("GradGuard run report") == 1


def test_resume_from_checkpoint_keeps_findings_and_does_not_warn_again(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    first = GradGuard(idle_window=1)
    with pytest.warns(GradGuardWarning, match="exactly zero"):
        make_trainer(tmp_path, [first, ckpt], max_steps=2, enable_checkpointing=True).fit(TimesZero(), loader())
    assert first.findings
    resumed = GradGuard(idle_window=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)  # warned before the checkpoint: not again
        make_trainer(tmp_path, [resumed], max_steps=4, enable_checkpointing=True).fit(
            TimesZero(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    assert kinds(resumed.findings) == {("zero", "gate.weight"), ("zero", "gate.bias")}
    assert resumed.report.entries[0].count == 4  # 2 steps before the checkpoint, 2 after


class DetachedOnStep2(Net):
    """The encoder is cut on batch 2 only: an untraced step unless every step is traced."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        if batch_idx == 2:
            h = h.detach()  # CUT: step2
        return self.loss(self.head(h), y)


def test_diagnose_always_names_the_line_on_the_step_itself(tmp_path):
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, DetachedOnStep2(), GradGuard(diagnose="always"), max_steps=4)
    assert {(f.kind, f.step, f.where) for f in err.value.findings} == {("detached", 2, where("CUT: step2"))}


def test_diagnose_first_reports_a_later_problem_at_once_without_a_trace(tmp_path):
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, DetachedOnStep2(), GradGuard(diagnose="first", idle_window=1), max_steps=4)
    assert {(f.kind, f.step, f.where) for f in err.value.findings} == {("unused", 2, None)}
    assert "not traced" in err.value.findings[0].message


def test_diagnose_on_finding_explains_a_later_problem_on_the_next_step(tmp_path):
    guard = GradGuard(on_detached="warn", on_unused="warn", idle_window=1)
    fit(tmp_path, DetachedOnStep2(), guard, max_steps=4)
    # step 2 is untraced and held back; step 3 (traced) does not reproduce it: a branch skipped it on step 2
    assert {(f.kind, f.step) for f in guard.findings} == {("unused", 2)}
    assert "a cut taken on that step only" in guard.findings[0].message


# ---------------------------------------------------------------- mutation campaign (tests/mutation/run.py)
class SameShapes(LightningModule):
    """Two layers of one shape: a stale tensor's twin is told by its position, not by its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.head(self.b(self.a(x))).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SameShapesOverCopy(SameShapes):
    def configure_optimizers(self):
        return torch.optim.SGD(copy.deepcopy(self).parameters(), lr=0.05)


def test_stale_copies_of_same_shaped_layers_are_named_by_position(tmp_path):
    with pytest.raises(GradGuardError, match="stale") as err:
        fit(tmp_path, SameShapesOverCopy(), GradGuard(on_orphan="ignore"))
    names = [n for n, _ in SameShapes().named_parameters()]
    assert [f.param for f in err.value.findings] == names  # not `optimizer.param_groups[0][0]` for `a.weight`
    assert "it looks like a copy of `a.weight`" in err.value.findings[0].message
    fit_silently(tmp_path, SameShapes())  # nearest correct: the optimizer over the model's own tensors


class TwoOptimizersCutFromBatch1(TwoOptimizersOneBackward):
    """The cut of :class:`TwoOptimizersOneBackward` from batch 1 on: an untraced step on which both optimizers step."""

    def training_step(self, batch, batch_idx):
        self.bug = batch_idx >= 1
        return super().training_step(batch, batch_idx)


def test_a_cut_held_for_the_next_trace_is_not_explained_by_the_second_optimizer_of_the_same_step(tmp_path):
    # batch 1 is untraced: the trunk's optimizer holds trunk.bias back for a trace; the head's optimizer, stepping on
    # the same untraced backward, must not explain it ("did at the next (traced) step") before that trace came
    guard = GradGuard(idle_window=1, on_detached="warn")
    with pytest.warns(GradGuardWarning, match="detached"):
        fit(tmp_path, TwoOptimizersCutFromBatch1(), guard, max_steps=8)
    assert {(f.kind, f.param, f.where) for f in guard.findings} == {
        ("detached", p, where("CUT: two-opt")) for p in ("trunk.bias", "head.weight", "head.bias")
    }


class CutInFirstMicroBatch(Net):
    """Gradient accumulation over 2 batches: the encoder is cut in the first micro-batch and not used in the second
    (``cut=False``: used in the first, the nearest correct code)."""

    def __init__(self, cut: bool = True) -> None:
        super().__init__()
        self.cut = cut

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx % 2 == 0:
            h = self.features(x)
            return self.loss(self.head(h.detach() if self.cut else h), y)  # CUT: micro0
        return self.loss(self.head(torch.ones(x.shape[0], 16)), y)


def test_a_cut_in_the_first_micro_batch_is_detached_at_its_line(tmp_path):
    with pytest.raises(GradGuardError) as err:
        fit(tmp_path, CutInFirstMicroBatch(), GradGuard(), accumulate_grad_batches=2, max_steps=2)
    assert {(f.kind, f.where) for f in err.value.findings} == {("detached", where("CUT: micro0"))}
    assert kinds(err.value.findings) == {("detached", "encoder.0.weight"), ("detached", "encoder.0.bias")}
    fit_silently(tmp_path, CutInFirstMicroBatch(cut=False), accumulate_grad_batches=2, max_steps=2)


class TwoStepsPerBatch(LightningModule):
    """Manual optimization, two updates of one optimizer per batch; ``extra`` is cut from batch 1 on."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Linear(8, 1)
        self.extra = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        for _ in range(2):
            e = self.extra(x)
            if batch_idx >= 1:
                e = e.detach()  # CUT: two-steps
            self.manual_backward((((self.body(x) + e).squeeze(-1) - y) ** 2).mean())
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)


def test_a_cut_held_for_the_next_trace_is_not_explained_by_a_second_untraced_update_of_the_batch(tmp_path):
    guard = GradGuard(idle_window=1, on_detached="warn")
    with pytest.warns(GradGuardWarning, match="detached"):
        fit(tmp_path, TwoStepsPerBatch(), guard, max_steps=8)
    assert {(f.kind, f.param, f.where) for f in guard.findings} == {
        ("detached", p, where("CUT: two-steps")) for p in ("extra.weight", "extra.bias")
    }
