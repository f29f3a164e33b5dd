"""Reentrant activation checkpointing: a cut only when no input requires grad, located at the `checkpoint(...)` call.

`checkpoint(fn, x, use_reentrant=True)` runs `fn` under `no_grad` and records its graph only in the backward
recompute. When some tensor input requires grad the parameters inside do get gradients: the tracer keeps their
gradient paths. When none does (frozen embeddings), it is a real cut.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import loader, make_trainer, where
from lightning_gradguard import GradGuard, GradGuardError, check_step
from lightning_gradguard.params import ParamIndex
from lightning_gradguard.trace import Tracer


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.gate = nn.Parameter(torch.ones(8))  # multiplied by 0 inside: an all-zero gradient
        self.dead = nn.Linear(8, 8)  # never called by `forward`

    def forward(self, x):
        return torch.tanh(self.lin(x)) + 0 * self.gate * x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 8)
        self.block = Block()
        self.head = nn.Linear(8, 1)


def reentrant(net, x):
    h = checkpoint(net.block, net.emb(x), use_reentrant=True)  # CUT: ckpt
    return net.head(h).mean()


def non_reentrant(net, x):
    h = checkpoint(net.block, net.emb(x), use_reentrant=False)
    return net.head(h).mean()


def _check(forward, *, frozen_emb: bool = False):
    net = Net()
    net.emb.requires_grad_(not frozen_emb)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(net, opt) as chk:
            loss = forward(net, torch.randn(4, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {f.param: f for f in chk.findings}


def test_tracer_keeps_gradient_paths_through_a_reentrant_checkpoint_with_grad_inputs():
    net = Net()
    index = ParamIndex.of(net)
    with Tracer(index) as tracer:
        loss = reentrant(net, torch.randn(4, 8))
    facts = tracer.facts(loss)
    inside = {index.index[id(p)] for p in (net.block.lin.weight, net.block.lin.bias, net.block.gate)}
    assert all(facts.grad >> bit & 1 for bit in inside)
    assert [s.kind for s in tracer.site_bits(facts.cuts)] == []


def test_tracer_still_cuts_at_a_non_differentiable_op_inside_the_checkpoint():
    lin, head = nn.Linear(8, 8), nn.Linear(8, 1)
    index = ParamIndex.of(nn.ModuleDict({"lin": lin, "head": head}))
    x = torch.randn(4, 8, requires_grad=True)
    with Tracer(index) as tracer:
        h = checkpoint(lambda t: nn.functional.one_hot(lin(t).argmax(-1), 8).float(), x, use_reentrant=True)
        loss = head(h).mean()
    facts = tracer.facts(loss)
    assert facts.grad == 0b1100  # only the head
    assert [s.kind for s in tracer.site_bits(facts.cuts)] == ["nondiff"]


def test_unused_parameter_inside_a_reentrant_checkpoint_is_unused():
    found = _check(reentrant)
    assert found["block.dead.weight"].kind == "unused"
    assert found["block.dead.bias"].kind == "unused"
    assert not {"block.lin.weight", "block.lin.bias", "emb.weight", "emb.bias", "head.weight"} & set(found)


def test_all_zero_gradient_inside_a_reentrant_checkpoint_is_zero():
    assert _check(reentrant)["block.gate"].kind == "zero"


def test_all_zero_gradient_inside_a_non_reentrant_checkpoint_is_zero():
    found = _check(non_reentrant)
    assert found["block.gate"].kind == "zero"
    assert {f.kind for p, f in found.items() if p.startswith("block.dead")} == {"unused"}


def test_checkpoint_without_grad_inputs_is_a_cut_at_the_checkpoint_call():
    found = _check(reentrant, frozen_emb=True)
    cut = {p: f for p, f in found.items() if f.kind == "detached"}
    assert set(cut) == {"block.lin.weight", "block.lin.bias", "block.gate"}
    assert {f.where for f in cut.values()} == {where("CUT: ckpt")}
    msg = cut["block.lin.weight"].message
    assert "its only tensor input does not require grad (computed from frozen parameters)" in msg
    assert "use_reentrant=False" in msg
    assert {found["block.dead.weight"].kind, found["block.dead.bias"].kind} == {"unused"}


class LitCheckpointed(LightningModule):
    def __init__(self, frozen_emb: bool) -> None:
        super().__init__()
        self.net = Net()
        del self.net.block.dead
        self.net.emb.requires_grad_(not frozen_emb)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = checkpoint(self.net.block, self.net.emb(x), use_reentrant=True)  # CUT: lit-ckpt
        return ((self.net.head(h).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_gradguard_names_the_checkpoint_call_of_a_real_cut(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GradGuardError) as err:
            make_trainer(tmp_path, [GradGuard()]).fit(LitCheckpointed(frozen_emb=True), loader())
    detached = {f.param: f.where for f in err.value.findings if f.kind == "detached"}
    assert detached == {p: where("CUT: lit-ckpt") for p in ("net.block.lin.weight", "net.block.lin.bias",
                                                             "net.block.gate")}  # fmt: skip


# ---------------------------------------------------------------- transformers
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers (a test-only extra) is not installed"
)


def _checkpoint_call_line() -> str:
    """`path:line` of the `checkpoint(...)` call in transformers' `GradientCheckpointingLayer`."""
    from transformers import modeling_layers

    path = inspect.getsourcefile(modeling_layers)
    assert path is not None
    with open(path, encoding="utf-8") as fh:
        hits = [i for i, line in enumerate(fh, 1) if "self._gradient_checkpointing_func(" in line]
    assert len(hits) == 1
    return f"{path}:{hits[0]}"


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                    patch_size=8, num_labels=3)  # fmt: skip
    return ViTForImageClassification(cfg)


def _step(model, **inputs):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt) as chk:
            loss = model(**inputs).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return chk.findings


@needs_transformers
def test_transformers_vit_frozen_embeddings_reentrant_is_a_cut_at_the_checkpoint_call():
    torch.manual_seed(0)
    vit = _tiny_vit()
    vit.vit.embeddings.requires_grad_(False)
    vit.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    findings = _step(vit, pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]))
    layers = {n for n, _ in vit.named_parameters() if n.startswith("vit.layers.")}
    assert layers
    assert {f.param for f in findings} == layers
    assert {f.kind for f in findings} == {"detached"}
    line = _checkpoint_call_line()
    assert {f"{os.path.abspath(f.where.rsplit(':', 1)[0])}:{f.where.rsplit(':', 1)[1]}" for f in findings} == {line}
    assert "its only tensor input does not require grad (computed from frozen parameters)" in findings[0].message


@needs_transformers
@pytest.mark.parametrize("reentrant_mode", [True, False], ids=["reentrant", "non-reentrant"])
def test_transformers_vit_with_checkpointing_is_silent(reentrant_mode):
    torch.manual_seed(0)
    vit = _tiny_vit()
    vit.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant_mode})
    assert _step(vit, pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1])) == []


class LitBert(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=128, max_position_embeddings=32, num_labels=2)  # fmt: skip
        self.bert = BertForSequenceClassification(cfg)
        self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})

    def training_step(self, batch, batch_idx):
        ids = (batch[0].abs() * 40).long().clamp(max=127)
        return self.bert(input_ids=ids, labels=(batch[1] > 0).long()).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@needs_transformers
def test_transformers_bert_reentrant_checkpointing_is_silent_under_every_policy(tmp_path):
    guard = GradGuard(on_frozen="raise", on_unused="raise", on_detached="raise", on_zero="raise", diagnose="always")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [guard], max_steps=3).fit(LitBert(), loader())
    assert guard.findings == []


def test_two_checkpoints_each_judged_by_their_own_inputs():
    net = Net()
    net.emb.requires_grad_(False)
    second = nn.Linear(8, 8)
    model = nn.ModuleDict({"net": net, "second": second})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt) as chk:
            x = torch.randn(4, 8)
            h = checkpoint(net.block, net.emb(x), use_reentrant=True)  # CUT: first
            h = checkpoint(second, h + x.requires_grad_(), use_reentrant=True)
            loss = net.head(h).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    detached = {f.param: f.where for f in chk.findings if f.kind == "detached"}
    assert detached == {p: where("CUT: first") for p in ("net.block.lin.weight", "net.block.lin.bias",
                                                         "net.block.gate")}  # fmt: skip


def inference_mode_around_checkpoint(net, x, reentrant_flag):
    h = net.emb(x)  # requires grad: the checkpoint's input is not what cuts here
    with torch.inference_mode():
        h = checkpoint(net.block, h, use_reentrant=reentrant_flag)  # CUT: inference ckpt
    return net.head(h.clone()).mean()


@pytest.mark.parametrize("reentrant_flag", [False, True])
def test_inference_mode_around_a_checkpoint_names_the_checkpoint_call(reentrant_flag):
    """The mode's entry is invisible to the tracer: the cut is named at the call in the caller's frame, not at the
    line inside the checkpointed function where the first op ran."""
    found = _check(lambda net, x: inference_mode_around_checkpoint(net, x, reentrant_flag))
    cut = {p: f for p, f in found.items() if f.kind == "detached"}
    assert set(cut) == {"emb.weight", "emb.bias", "block.lin.weight", "block.lin.bias", "block.gate"}
    assert {f.where for f in cut.values()} == {where("CUT: inference ckpt")}
    assert "inference_mode" in cut["block.lin.weight"].message
