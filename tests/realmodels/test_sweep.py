"""The fast subset of the real-model sweep (``make sweep`` runs all of it), and the harness's own checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradguard import Finding

from .harness import (
    PEFT,
    Result,
    Truth,
    compare,
    configs,
    grad_status,
    run_config,
    wrong_message,
    wrong_shares,
    wrong_where,
)
from .zoo import ARCHS

pytest.importorskip("transformers")

#: A representative subset: true `unused` (BigBird's unused projections, DINOv2's mask token), true `frozen`
#: (Pegasus' sinusoidal positions), reentrant checkpoints (Llama, whose inputs require grad through
#: `enable_input_require_grads`; Longformer, whose all-zero global-attention gradients inside it must stay `zero`),
#: a non-reentrant one (GPT-2), and idle by design: LayerDrop (wav2vec2), MoE routing (Switch), drop_path
#: (ConvNeXt), CLIP's text pooling (the last layer's attention projections get an all-zero gradient on some steps);
#: planted: a detached embedding feeding reentrant checkpoints (every layer inside is `detached`), ViT's frozen
#: embeddings feeding reentrant checkpoints (a real cut at the checkpoint call), a never-called head
#: beside LayerDrop (raised, while the idle layers are not); LoRA (PEFT): adapters inside reentrant checkpoints with
#: `enable_input_require_grads()` (healthy), and without it: Llama, whose loss then has no graph at all (a
#: GradGuardError in place of torch's "element 0 of tensors does not require grad"), and BERT with its head trained,
#: which trains on silently while every adapter gets no gradient.
SUBSET = [
    "bigbird",
    "pegasus",
    "llama+ckpt-reentrant",
    "longformer+ckpt-reentrant",
    "gpt2+ckpt",
    "dinov2",
    "wav2vec2",
    "switch",
    "convnext",
    "clip",
    "llama+ckpt-reentrant/detach-emb",
    "vit+ckpt-reentrant/frozen-emb-all",
    "wav2vec2/dead-head",
    "llama+lora+ckpt-reentrant",
    "llama+lora+ckpt-reentrant/no-input-grads",
    "bert-cls+lora-head+ckpt-reentrant/no-input-grads",
]


_RESULTS: dict[str, Result] = {}


@pytest.fixture
def sweep(tmp_path_factory: pytest.TempPathFactory):
    """Runs a configuration once per session (both tests below read the same result)."""

    def run(name: str) -> Result:
        if name not in _RESULTS:
            (config,) = configs([name])
            if config.adapter:
                pytest.importorskip("peft")
            _RESULTS[name] = run_config(config, str(tmp_path_factory.mktemp("sweep")))
        return _RESULTS[name]

    return run


def test_sweep_covers_at_least_40_architectures() -> None:
    assert len({a.name for a in ARCHS}) >= 40
    assert len(configs()) > len(ARCHS)  # checkpointing variants


@pytest.mark.parametrize("name", SUBSET)
def test_sweep_config(name: str, sweep) -> None:
    res = sweep(name)
    assert res.harness_error is None, res.harness_error
    failures = {label: o.cell() for label, o in res.outcomes.items() if not o.ok}
    assert not failures, f"{name} (truth: {res.truth}): {failures}"


@pytest.mark.parametrize("name", ["wav2vec2", "switch", "convnext", "clip"])
def test_sweep_idle_by_design_not_flagged(name: str, sweep) -> None:
    """The parameters the truth measured idle in this run (LayerDrop, routing, drop_path; CLIP's last-layer
    projections, whose all-zero gradients depend on the release and the CPU's numerics) are not reported. Which
    parameters are idle is a fact about the model, measured here, never assumed: without any the run has nothing to
    say about idleness (the configuration's verdicts are still checked by ``test_sweep_config``)."""
    res = sweep(name)
    if not res.idle:
        import transformers

        pytest.skip(f"{name} has no idle parameters under transformers {transformers.__version__} on this machine")
    flagged = {label: o.idle for label, o in res.outcomes.items() if o.idle and label != "check_step"}
    assert not flagged, f"idle-by-design parameters reported as findings: {flagged}"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 1)
        self.cut = nn.Linear(4, 1)
        self.dead = nn.Linear(4, 1)
        self.zeroed = nn.Linear(4, 1)
        self.frozen = nn.Linear(4, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dead(x)  # computed, discarded
        return (self.used(x) + self.cut(x).detach() + 0 * self.zeroed(x) + self.frozen(x)).sum()


def test_grad_status_files_each_kind_by_construction() -> None:
    net, x = _Net(), torch.randn(3, 4)
    net(x).backward()
    status = grad_status(net, list(net.named_parameters()), lambda: net(x))
    assert status == {
        "cut.weight": "detached",
        "cut.bias": "detached",
        "dead.weight": "unused",
        "dead.bias": "unused",
        "zeroed.weight": "zero",
        "zeroed.bias": "zero",
        "frozen.weight": "frozen",
        "frozen.bias": "frozen",
    }


class _LowRank(nn.Module):
    """A LoRA-like pair: ``b(a(x))`` with ``b`` zero (as LoRA initialises ``lora_B``), cut by ``.detach()``; and a
    head never called."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.a = nn.Linear(4, 2, bias=False)
        self.b = nn.Linear(2, 4, bias=False)
        nn.init.zeros_(self.b.weight)
        self.dead = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.base(x) + self.b(self.a(x)).detach()).pow(2).sum()


def test_grad_status_sees_through_a_zero_factor() -> None:
    """Moving `a` alone cannot move the loss while `b` is zero; moved with `b` it does: `a` is detached, not unused.
    The never-called head stays unused whatever else moves."""
    net, x = _LowRank(), torch.randn(3, 4)
    net(x).backward()
    status = grad_status(net, list(net.named_parameters()), lambda: net(x))
    assert status == {"a.weight": "detached", "b.weight": "detached", "dead.weight": "unused", "dead.bias": "unused"}
    assert not net.b.weight.any()  # the model is restored exactly


def test_peft_configurations_are_named_and_parsed_back() -> None:
    by_name = {c.name: c for c in configs()}
    assert set(PEFT) <= set(by_name)
    star = by_name["llama+lora+ckpt-reentrant/no-input-grads"]
    assert (star.adapter, star.variant, star.plant) == ("lora", "ckpt-reentrant", "no-input-grads")
    assert star.optimize == "trainable"
    assert by_name["llama+lora-all-params"].optimize == "all"
    assert by_name["llama+lora-opt-first"].optimize == "frozen"
    assert by_name["llama+ckpt-reentrant"].optimize == "all"  # no adapter: `model.parameters()`
    partial = by_name["llama+lora+ckpt-reentrant-2/no-input-grads"]
    assert (partial.adapter, partial.variant, partial.plant) == ("lora", "ckpt-reentrant-2", "no-input-grads")


def test_wrong_message_wants_the_checkpoint_and_its_fix_named() -> None:
    (config,) = configs(["bert-cls+lora-head+ckpt-reentrant/no-input-grads"])
    name = "model.base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    vague = Finding("detached", name, "The loss depends on it, but its gradient path is cut.")
    good = Finding(
        "detached",
        name,
        "... `checkpoint(..., use_reentrant=True)` at x.py:1 ... cuts its gradient path",
        hint="in `transformers`: `model.enable_input_require_grads()`",
    )
    assert wrong_message(config, [vague])
    assert not wrong_message(config, [good])
    assert not wrong_message(configs(["llama"])[0], [vague])  # asked of this plant only


def test_compare_counts_misses_false_positives_and_idle() -> None:
    steps = [{"a": "unused", "b": "zero"}, {"a": "unused"}]
    truth = Truth.of(steps, ["a", "b", "c"])
    assert truth.dead() == {"a": {"unused"}}
    assert truth.idle() == {"b": {"zero"}}
    assert compare(truth, [("a", "unused")]).ok
    out = compare(truth, [("a", "detached"), ("b", "zero"), ("c", "orphan")])
    assert out.fp == ["a detached≠unused", "c orphan"]
    assert out.miss == ["a unused"]
    assert out.idle == ["b zero"]
    assert not compare(truth, []).ok


def test_truth_counts_a_run_as_long_as_the_idle_window_as_dead() -> None:
    steps = [{}, {"a": "zero", "b": "unused"}, {"a": "zero"}, {"a": "zero", "b": "unused"}]
    truth = Truth.of(steps, ["a", "b"], window=3)
    assert truth.dead() == {"a": {"zero"}}
    assert truth.idle() == {"b": {"unused"}}


def test_wrong_where_names_a_detached_embedding_blamed_on_another_line() -> None:
    (config,) = configs(["llama/detach-emb"])
    same_file = Finding("detached", "model.model.embed_tokens.weight", "", where=wrong_where.__code__.co_filename)
    assert wrong_where(config, [same_file])  # the file, but not the planted line
    assert wrong_where(config, [Finding("detached", "model.model.embed_tokens.weight", "", where=None)])
    assert not wrong_where(config, [Finding("unused", "model.lm_head.weight", "", where=None)])


def test_wrong_shares_checks_the_reported_idle_share_against_the_truth() -> None:
    steps = [{"layer.0.w": "unused", "layer.0.b": "unused"}, {}, {}, {"layer.0.w": "unused"}]
    truth = Truth.of(steps, ["layer.0.w", "layer.0.b", "head.w"], window=3)
    assert wrong_shares(steps, truth, {"model.layer.0": 0.25}) == []  # all of it on 1 step, some of it on 2
    assert wrong_shares(steps, truth, {"model.layer.0": 0.5}) == []
    assert wrong_shares(steps, truth, {"model.layer.0": 0.75}) == ["layer.0 0.75 not in [0.25, 0.50]"]
    assert wrong_shares(steps, truth, {}) == [
        "layer.0.w: idle, in no module's share",
        "layer.0.b: idle, in no module's share",
    ]
