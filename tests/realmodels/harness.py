"""The real-model sweep: ground truth by construction, compared with ``check_step`` and ``GradGuard``.

For one configuration (an architecture of :mod:`realmodels.zoo`, optionally wrapped in a PEFT adapter (LoRA, see
:data:`ADAPTERS`), optionally with gradient checkpointing, optionally with a planted bug):

1. **Ground truth, without the guard.** A Lightning run of :data:`STEPS` seeded steps with a recording callback
   that, before every optimizer step, files each parameter of the optimizer as ``frozen`` (``requires_grad=False``),
   ``nonfinite``, ``zero`` (all-zero gradient) or missing, and each parameter outside the optimizer that got a
   gradient as ``orphan``; a missing one is ``detached`` if the loss's *value* changes when the parameter is
   perturbed (same batch, same random state, so the same dropout masks), ``unused`` if not. A parameter filed on
   some steps and healthy on others is **idle** (LayerDrop, MoE routing, drop_path). The same for one plain step,
   the ground truth of ``check_step``.
2. **check_step** on that plain step (every finding a warning): each parameter of the truth must be reported with
   its kind, nothing else.
3. **GradGuard** (every action ``"warn"``, so the run goes on) in the same Trainer run, ``diagnose`` default and
   ``"always"``: each parameter filed on every step must be reported with (one of) its kinds; no other finding.
   Idle parameters reported are counted apart ("idle flagged"). Parameters after the run must be bit-identical
   to those of the run without the guard.
4. **GradGuard()** with pure defaults: it raises if and only if the truth holds a parameter whose kind raises by
   default (``unused``, ``detached``, ``nonfinite``) on every step.

A configuration whose loss has no autograd graph at all (LoRA adapters only inside reentrant checkpoints that no
input requiring grad enters) cannot train: without the guard, ``backward()`` fails with torch's "element 0 of tensors
does not require grad". Its truth is then filed from that step's loss (the recorder's ``on_before_backward``), and
every guarded run, check_step included, must raise :class:`GradGuardError` at that step listing exactly the truth's
parameters, in place of torch's error.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from helpers import make_trainer
from lightning_gradguard import Finding, GradGuard, GradGuardError, check_step

from .zoo import ARCHS, Arch, Batch, Built, build

__all__ = ["STEPS", "Config", "Outcome", "Result", "configs", "run_config", "table"]

#: Optimizer steps of each Lightning run: more than GradGuard's default ``idle_window`` (16), so that a parameter
#: without a usable gradient on every step must be reported within the run, and an idle one must stay silent over a
#: run longer than the window.
STEPS = 20
#: Kinds whose default action is "raise".
RAISING = frozenset({"unused", "detached", "stale", "nonfinite"})
#: Gradient checkpointing: none, reentrant, non-reentrant, and reentrant on every other layer only (as
#: ``every_n_layers=2``; used by the LoRA configurations).
VARIANTS = ("", "ckpt-reentrant", "ckpt", "ckpt-reentrant-2")
#: GradGuard's default ``idle_window``: fewer steps in a row without a usable gradient are idle, not a finding.
WINDOW: int = inspect.signature(GradGuard).parameters["idle_window"].default
ALL_WARN = {f"on_{k}": "warn" for k in ("frozen", "unused", "detached", "orphan", "stale", "nonfinite", "zero")}

for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@dataclass(frozen=True)
class Config:
    """An architecture, a PEFT adapter (``""`` none; see :data:`ADAPTERS`), a gradient-checkpointing mode (see
    :data:`VARIANTS`) and a planted bug (``""`` none; see :data:`PLANTS`).

    Named ``arch[+adapter][+variant][/plant]``: ``"llama+lora+ckpt-reentrant/no-input-grads"``."""

    arch: Arch
    variant: str = ""
    plant: str = ""
    adapter: str = ""

    @property
    def name(self) -> str:
        name = "+".join(p for p in (self.arch.name, self.adapter, self.variant) if p)
        return f"{name}/{self.plant}" if self.plant else name

    @property
    def optimize(self) -> str:
        """What the optimizer is built over (see :func:`select_params`): the adapter's choice, else ``"all"``."""
        return ADAPTERS[self.adapter].optimize if self.adapter else "all"

    def optimizer_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """What the configuration's optimizer is built over."""
        return select_params(model, self.optimize)

    def build(self) -> Built:
        built = build(self.arch)
        if self.adapter:  # `get_peft_model(model)`, then `model.gradient_checkpointing_enable()`
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft reads transformers' deprecated `is_gradient_checkpointing`
                built = Built(ADAPTERS[self.adapter].wrap(built.model, self.arch.name), built.batch)
        if self.variant:
            every = {"every_n_layers": 2} if self.variant.endswith("-2") else {}  # layers 0, 2, ... only
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": self.variant.startswith("ckpt-reentrant")},
                    **every,
                )
        if self.plant:
            PLANTS[self.plant](built.model)
        built.model.train()
        return built


def wrong_where(config: Config, findings: Iterable[Finding]) -> list[str]:
    """For a planted ``.detach()``: the embedding's finding must name the planted line (``where``)."""
    if config.plant != "detach-emb":
        return []
    line = inspect.getsourcelines(_detach_embeddings)[1] + 1
    expected = f"realmodels/harness.py:{line}"
    emb = {f.param for f in findings if f.param.removeprefix("model.").endswith("embed_tokens.weight")}
    emb |= {f.param for f in findings if f.param.removeprefix("model.").endswith("word_embeddings.weight")}
    return [
        f"{f.param.removeprefix('model.')} where {f.where}≠{expected}"
        for f in findings
        if f.param in emb and not (f.where or "").endswith(expected)
    ]


def wrong_message(config: Config, findings: Iterable[Finding]) -> list[str]:
    """For reentrant checkpoints without ``enable_input_require_grads()``: each ``detached`` finding must say that
    the checkpoint cut the path, and give the fix (``enable_input_require_grads()`` or ``use_reentrant=False``)."""
    if config.plant != "no-input-grads":
        return []
    out = []
    for f in findings:
        text = f"{f.message} {f.hint}"
        if f.kind == "detached" and not ("checkpoint" in text and "enable_input_require_grads" in text):
            out.append(f"{f.param.removeprefix('model.')} message names no checkpoint or fix: {f.message[:80]}")
    return out


def _dead_head(model: torch.nn.Module) -> None:
    model.dead_head = torch.nn.Linear(8, 2)  # handed to the optimizer by model.parameters(), never called


def _detach_embeddings(model: torch.nn.Module) -> None:
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.detach())


def _freeze_embeddings(model: torch.nn.Module) -> None:
    model.get_input_embeddings().requires_grad_(False)


def _freeze_embeddings_module(model: torch.nn.Module) -> None:
    model.base_model.embeddings.requires_grad_(False)  # ViT: patches, [CLS] and positions: nothing requires grad


def _no_input_grads(model: torch.nn.Module) -> None:
    # `gradient_checkpointing_enable()` in transformers (and `get_peft_model` on a checkpointing model) call
    # `enable_input_require_grads()`; older versions did not, and hand-written checkpointing never does. Without it,
    # nothing that enters a reentrant checkpoint requires grad when the embeddings are frozen (LoRA, say).
    model.disable_input_require_grads()


#: Bugs planted in real models, so that the sweep also has true `unused`, `detached` and `frozen` findings beside
#: idle-by-design parts, and cuts inside checkpointed models.
PLANTS: dict[str, Callable[[torch.nn.Module], None]] = {
    "dead-head": _dead_head,
    "detach-emb": _detach_embeddings,
    "frozen-emb": _freeze_embeddings,
    "frozen-emb-all": _freeze_embeddings_module,
    "no-input-grads": _no_input_grads,
}


def select_params(model: torch.nn.Module, optimize: str) -> list[torch.nn.Parameter]:
    """The parameters an optimizer is built over: ``"all"`` (``model.parameters()``), ``"trainable"`` (those that
    require grad: PEFT's recipe), ``"frozen"`` (those that do not: with PEFT, the base model's, as an optimizer built
    before ``get_peft_model`` holds them)."""
    if optimize not in ("all", "trainable", "frozen"):
        raise ValueError(f"optimize={optimize!r}")
    return [p for p in model.parameters() if optimize == "all" or p.requires_grad == (optimize == "trainable")]


@dataclass(frozen=True)
class Adapter:
    """A PEFT wrapping of a model, and what its optimizer is built over (see :func:`select_params`)."""

    wrap: Callable[[torch.nn.Module, str], torch.nn.Module]
    optimize: str = "trainable"


#: Per architecture with LoRA configurations: the attention projections LoRA adapts, PEFT's task type, and the
#: classification head (for ``modules_to_save``).
LORA_TARGETS: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {
    "llama": (("q_proj", "k_proj", "v_proj", "o_proj"), "CAUSAL_LM", None),
    "bert-cls": (("query", "key", "value"), None, "classifier"),
    "roberta": (("query", "key", "value"), None, "classifier"),
}


def _lora(save_head: bool = False, **kw: object) -> Callable[[torch.nn.Module, str], torch.nn.Module]:
    def wrap(model: torch.nn.Module, arch: str) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        targets, task, head = LORA_TARGETS[arch]
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(targets),
            lora_dropout=0.1,
            task_type=task,
            modules_to_save=[head] if save_head and head else None,
            **kw,
        )
        torch.manual_seed(1)  # the adapters' initialisation
        return get_peft_model(model, config)

    return wrap


#: IA3 on Llama: the key and value projections and the MLP's down projection (PEFT's defaults for Llama).
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]


def _peft(kind: str, **kw: object) -> Callable[[torch.nn.Module, str], torch.nn.Module]:
    """Another PEFT method (``"IA3Config"``, ``"PromptTuningConfig"``, ...) with PEFT's task type of the arch."""

    def wrap(model: torch.nn.Module, arch: str) -> torch.nn.Module:
        import peft

        _, task, _ = LORA_TARGETS[arch]
        torch.manual_seed(1)
        return peft.get_peft_model(model, getattr(peft, kind)(task_type=task, **kw))

    return wrap


#: PEFT adapters (``peft`` is needed only for these): LoRA (r=4, dropout 0.1) on the attention projections with the
#: base model frozen, the optimizer over the trainable parameters (``lora``), or over ``model.parameters()``, frozen
#: base included (``lora-all-params``), or built before ``get_peft_model`` (``lora-opt-first``: it holds the base
#: model's parameters, now frozen, and none of the adapters), or with the classification head trained too
#: (``lora-head``: ``modules_to_save=[head]``); DoRA; and three other PEFT methods: IA3 (learned scaling vectors inside
#: the layers), prompt tuning (virtual token embeddings prepended to the input) and prefix tuning (per-layer virtual
#: keys and values; it does not run under transformers' checkpointing).
ADAPTERS: dict[str, Adapter] = {
    "lora": Adapter(_lora()),
    "lora-all-params": Adapter(_lora(), optimize="all"),
    "lora-opt-first": Adapter(_lora(), optimize="frozen"),
    "lora-head": Adapter(_lora(save_head=True)),
    "dora": Adapter(_lora(use_dora=True)),
    "ia3": Adapter(_peft("IA3Config", target_modules=IA3_TARGETS, feedforward_modules=["down_proj"])),
    "prompt": Adapter(_peft("PromptTuningConfig", num_virtual_tokens=4)),
    "prefix": Adapter(_peft("PrefixTuningConfig", num_virtual_tokens=4)),
}
PLANTED = (
    "bert-cls/detach-emb",
    "llama/detach-emb",
    "llama+ckpt-reentrant/detach-emb",
    "llama+ckpt-reentrant/frozen-emb",
    "vit+ckpt-reentrant/frozen-emb",
    "vit+ckpt-reentrant/frozen-emb-all",
    "vit+ckpt/frozen-emb-all",
    "t5+ckpt-reentrant/frozen-emb",
    "gpt2/dead-head",
    "wav2vec2/dead-head",
    "switch/dead-head",
    "mixtral/dead-head",
    "convnext/dead-head",
)
#: LoRA, the most common "why no gradients?" of parameter-efficient fine-tuning: healthy with a filtered optimizer,
#: ``frozen`` base weights with ``model.parameters()``, ``frozen`` + ``orphan`` adapters with an optimizer built before
#: ``get_peft_model``, and reentrant checkpointing with and without ``enable_input_require_grads()`` (without it, the
#: adapters inside get no gradient: silently where the head trains, and with nothing trainable outside the
#: checkpoints the loss has no graph at all; on every other layer only, half of them). Non-reentrant checkpointing
#: and prompt tuning (whose virtual tokens require grad) need no input hook: healthy without it.
PEFT = (
    "llama+lora",
    "llama+lora-all-params",
    "llama+lora-opt-first",
    "llama+lora+ckpt-reentrant",
    "llama+lora+ckpt-reentrant/no-input-grads",
    "llama+lora+ckpt",
    "llama+lora+ckpt/no-input-grads",
    "llama+lora+ckpt-reentrant-2/no-input-grads",
    "llama+dora",
    "llama+dora+ckpt-reentrant/no-input-grads",
    "llama+ia3",
    "llama+ia3+ckpt-reentrant/no-input-grads",
    "llama+prompt",
    "llama+prompt+ckpt-reentrant/no-input-grads",
    "llama+prefix",
    "bert-cls+lora",
    "bert-cls+lora-all-params",
    "bert-cls+lora-opt-first",
    "bert-cls+lora-head",
    "bert-cls+lora+ckpt-reentrant",
    "bert-cls+lora-head+ckpt-reentrant",
    "bert-cls+lora-head+ckpt-reentrant/no-input-grads",
    "bert-cls+lora+ckpt-reentrant/no-input-grads",
    "bert-cls+lora+ckpt",
    "bert-cls+lora-head+ckpt/no-input-grads",
    "roberta+lora-head",
    "roberta+lora-head+ckpt-reentrant",
    "roberta+lora-head+ckpt-reentrant/no-input-grads",
    "roberta+lora-head+ckpt",
)


def _parse(name: str, by_arch: dict[str, Arch]) -> Config:
    """``arch[+adapter][+variant][/plant]`` as a :class:`Config`."""
    base, _, plant = name.partition("/")
    arch, *mods = base.split("+")
    unknown = [m for m in mods if m not in VARIANTS and m not in ADAPTERS] + [plant] * (plant not in ("", *PLANTS))
    if unknown:
        raise ValueError(f"{name}: unknown {unknown}; adapters {sorted(ADAPTERS)}, variants {VARIANTS[1:]}")
    variant = next((m for m in mods if m in VARIANTS), "")
    adapter = next((m for m in mods if m in ADAPTERS), "")
    return Config(by_arch[arch], variant, plant, adapter)


def configs(names: Iterable[str] | None = None) -> list[Config]:
    """Every configuration of the sweep (each architecture, both checkpointing modes where supported, the planted
    bugs of :data:`PLANTED` and the adapters of :data:`PEFT`), or those named (``"llama"``,
    ``"llama+ckpt-reentrant/detach-emb"``)."""
    out = []
    by_arch = {a.name: a for a in ARCHS}
    for arch in ARCHS:
        out.append(Config(arch))
        model_cls_supports = _supports_checkpointing(arch)
        if model_cls_supports:
            out += [Config(arch, v) for v in ("ckpt-reentrant", "ckpt") if v not in dict(arch.broken)]
    out += [_parse(name, by_arch) for name in (*PLANTED, *PEFT)]
    if names is None:
        return out
    by_name = {c.name: c for c in out}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"unknown sweep configurations {missing}; known: {sorted(by_name)}")
    return [by_name[n] for n in names]


_SUPPORTS: dict[str, bool] = {}


def _supports_checkpointing(arch: Arch) -> bool:
    if arch.name not in _SUPPORTS:
        try:
            _SUPPORTS[arch.name] = bool(getattr(build(arch).model, "supports_gradient_checkpointing", False))
        except Exception:  # noqa: BLE001 - a model that does not build is reported by run_config, once
            _SUPPORTS[arch.name] = False
    return _SUPPORTS[arch.name]


# ---------------------------------------------------------------------------------------------- ground truth
def _rng_state() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


#: Relative sizes of the perturbations that test whether the loss's value depends on a parameter. Several, because
#: a change that cancels mathematically (an attention key bias shifts every logit of a row alike) can still show in
#: the rounding on one draw and not on another.
PERTURBATIONS = (1.0, 10.0, 0.1)


def grad_status(
    model: torch.nn.Module, named: Sequence[tuple[str, torch.Tensor]], loss_of: Callable[[], torch.Tensor]
) -> dict[str, str]:
    """The parameters of ``named`` without a usable gradient, each with its kind.

    ``loss_of()`` recomputes the step's loss (same batch, same random state); a parameter without a gradient is
    ``detached`` if perturbing it changes that loss (alone, or once every other parameter without a gradient is
    perturbed too), else ``unused``. The model's state is restored exactly.
    """
    status: dict[str, str] = {}
    missing = []
    for name, p in named:
        if not p.requires_grad:
            status[name] = "frozen"
        elif p.grad is None:
            missing.append((name, p))
        elif not torch.isfinite(p.grad).all():
            status[name] = "nonfinite"
        elif not p.grad.any():
            status[name] = "zero"
    if not missing:
        return status
    saved = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    rng = _rng_state()
    gen = torch.Generator().manual_seed(0)

    def restore() -> None:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(saved[k])

    def nudge(p: torch.Tensor, scale: float) -> None:
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        p.add_(noise * scale * (p.detach().abs().max() + 1))

    def moved(loss: torch.Tensor, base: torch.Tensor) -> bool:
        return not (torch.equal(loss, base) or bool(torch.isnan(loss).all() and torch.isnan(base).all()))

    try:
        with torch.no_grad():
            base = loss_of()
            restore()
            for name, p in missing:
                status[name] = "unused"
                for scale in PERTURBATIONS:  # several draws: one that changes the loss's value is enough
                    nudge(p, scale)
                    loss = loss_of()
                    restore()
                    if moved(loss, base):
                        status[name] = "detached"
                        break
            # A factor that is zero hides the dependence on its partner: LoRA's `lora_B` starts at zero, so moving
            # `lora_A` alone cannot move the loss. Each parameter still `unused` is moved again with every other
            # parameter without a gradient moved too: if the loss moves then, it depends on the parameter.
            for name, p in missing:
                if status[name] != "unused" or len(missing) == 1:
                    continue
                for _, q in missing:
                    if q is not p:
                        nudge(q, PERTURBATIONS[0])
                shifted = loss_of()
                nudge(p, PERTURBATIONS[0])
                loss = loss_of()
                restore()
                if moved(loss, shifted):
                    status[name] = "detached"
    finally:
        restore()
        _set_rng_state(rng)
    return status


def orphans(model: torch.nn.Module, named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """The parameters of ``model`` that got a gradient but are not among the optimizer's (``named``): ``orphan``."""
    held = {id(p) for _, p in named}
    return {n: "orphan" for n, p in model.named_parameters() if id(p) not in held and p.grad is not None}


class SweepModule(LightningModule):
    """A `transformers` model trained on fixed batches with its own loss (AdamW over ``model.parameters()``, or as
    ``optimize`` says: see :func:`select_params`)."""

    def __init__(self, model: torch.nn.Module, optimize: str = "all") -> None:
        super().__init__()
        self.model = model
        self.optimize = optimize
        self.step_rng: tuple | None = None
        self.step_batch: Batch | None = None

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(**batch).loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.step_rng = _rng_state()
        self.step_batch = batch
        return self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(select_params(self.model, self.optimize), lr=1e-3)


def has_graph(loss: torch.Tensor) -> bool:
    """Whether ``backward()`` can run on ``loss``."""
    return loss.requires_grad or loss.grad_fn is not None


class Recorder(Callback):
    """Files, before every optimizer step, each parameter of the optimizer lacking a usable gradient; and, when a
    step's loss has no graph (``backward()`` is about to fail), that step's parameters before the failure
    (``no_graph_step``)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, str]] = []
        self.no_graph_step: int | None = None

    def _file(self, pl_module: SweepModule, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): n for n, p in pl_module.model.named_parameters()}  # the model's own names
        named = [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"]]

        def loss_of() -> torch.Tensor:
            _set_rng_state(pl_module.step_rng)
            return pl_module(pl_module.step_batch)

        self.steps.append({**grad_status(pl_module, named, loss_of), **orphans(pl_module.model, named)})

    def on_before_backward(self, trainer: Trainer, pl_module: SweepModule, loss: torch.Tensor) -> None:
        if not has_graph(loss):  # no gradient at all: every parameter of the optimizer is filed now
            (optimizer,) = trainer.optimizers
            self.no_graph_step = trainer.global_step
            self._file(pl_module, optimizer)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: SweepModule, optimizer: object) -> None:
        self._file(pl_module, optimizer)


def fit(config: Config, tmp: str, callbacks: list[Callback], tensorboard: bool = False) -> dict[str, torch.Tensor]:
    """Train ``config`` for :data:`STEPS` seeded steps; the final parameters (re-raises what the run raised).
    ``tensorboard``: log to a TensorBoard logger (GradGuard then draws its dashboards too)."""
    built = config.build()
    module = SweepModule(built.model, config.optimize)
    loader = torch.utils.data.DataLoader([built.batch(i) for i in range(STEPS)], batch_size=None)
    seed_all(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = TensorBoardLogger(tmp, name="sweep") if tensorboard else False
        make_trainer(tmp, callbacks, max_steps=STEPS, logger=logger, log_every_n_steps=4).fit(module, loader)
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


@dataclass
class PlainStep:
    """One step of a plain loop: the truth (``status``) or check_step's findings, the parameters after it, and
    whether the loss had no graph (without the guard: ``backward()`` would fail; with it: check_step raised
    :class:`GradGuardError`, whose findings are ``findings``)."""

    status: dict[str, str]
    findings: list[Finding]
    params: dict[str, torch.Tensor]
    no_graph: bool = False


def plain_step(config: Config, guard: bool) -> PlainStep:
    """One step of a plain loop: without the guard, the ground truth; with it, ``check_step``'s findings."""
    built = config.build()
    model, batch = built.model, built.batch(0)
    opt = torch.optim.AdamW(config.optimizer_params(model), lr=1e-3)
    out = PlainStep({}, [], {})
    seed_all(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if guard:
            try:
                with check_step(model, opt) as chk:
                    loss = model(**batch).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                out.findings = list(chk.findings)
            except GradGuardError as err:
                out.findings, out.no_graph = list(err.findings), True
        else:
            rng = _rng_state()
            loss = model(**batch).loss
            opt.zero_grad()
            out.no_graph = not has_graph(loss)
            if not out.no_graph:
                loss.backward()

            def loss_of() -> torch.Tensor:
                _set_rng_state(rng)
                return model(**batch).loss

            ids = {id(p) for p in config.optimizer_params(model)}
            named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
            out.status = {**grad_status(model, named, loss_of), **orphans(model, named)}
            if not out.no_graph:
                opt.step()
    out.params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


# ---------------------------------------------------------------------------------------------- comparison
@dataclass
class Outcome:
    """How one guarded run compares with the truth."""

    crash: str | None = None
    fp: list[str] = field(default_factory=list)  # reported, but not true (or a wrong kind)
    miss: list[str] = field(default_factory=list)  # true, but not reported
    idle: list[str] = field(default_factory=list)  # idle by design, reported
    changed: list[str] = field(default_factory=list)  # parameters not bit-identical to the run without the guard
    shares: list[str] = field(default_factory=list)  # idle shares of the report that disagree with the truth
    note: str = ""

    @property
    def ok(self) -> bool:
        return not (self.crash or self.fp or self.miss or self.changed or self.shares)

    def cell(self) -> str:
        if self.crash:
            return f"CRASH {self.crash}"
        parts = []
        for label, items in (("FP", self.fp), ("miss", self.miss), ("changed", self.changed), ("shares", self.shares)):
            if items:
                parts.append(f"{label} {len(items)}: {_short(items)}")
        if self.idle:
            parts.append(f"idle flagged {len(self.idle)}: {_short(self.idle)}")
        body = "; ".join(parts) if parts else "ok"
        return f"{body} ({self.note})" if self.note else body


def _short(items: Sequence[str], n: int = 2) -> str:
    items = sorted(items)
    more = f" +{len(items) - n}" if len(items) > n else ""
    return ", ".join(items[:n]) + more


@dataclass
class Truth:
    """Per parameter, the kinds it was filed under, on how many steps it was healthy, and its longest run of steps
    without a usable gradient."""

    kinds: dict[str, set[str]]
    healthy: dict[str, int]
    streak: dict[str, int] = field(default_factory=dict)
    window: int = WINDOW

    @classmethod
    def of(cls, steps: Sequence[dict[str, str]], names: Iterable[str], window: int = WINDOW) -> Truth:
        kinds: dict[str, set[str]] = {}
        healthy = dict.fromkeys(names, 0)
        streak = dict.fromkeys(healthy, 0)
        run = dict.fromkeys(healthy, 0)
        for status in steps:
            for n in healthy:
                if n in status:
                    kinds.setdefault(n, set()).add(status[n])
                    run[n] += 1
                    streak[n] = max(streak[n], run[n])
                else:
                    healthy[n] += 1
                    run[n] = 0
        return cls(kinds, healthy, streak, window)

    def dead(self) -> dict[str, set[str]]:
        """True findings: parameters filed on every step, or on ``window`` steps in a row (GradGuard's documented
        rule: a shorter run of steps without a usable gradient is idle, not dead)."""
        return {n: k for n, k in self.kinds.items() if self.healthy[n] == 0 or self.streak[n] >= self.window}

    def idle(self) -> dict[str, set[str]]:
        """Idle by design: filed on some steps only, never ``window`` steps in a row."""
        dead = self.dead()
        return {n: k for n, k in self.kinds.items() if n not in dead}

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for kinds in self.dead().values():
            for k in kinds:
                counts[k] = counts.get(k, 0) + 1
        parts = [f"{k} {v}" for k, v in sorted(counts.items())]
        if self.idle():
            parts.append(f"idle {len(self.idle())}")
        return ", ".join(parts) or "healthy"


#: Attention key biases: their value flows into the loss, but softmax cancels it exactly (it shifts every logit of
#: a row alike), so when their gradient path is cut the perturbation truth files them `unused` while the tracer,
#: which follows values, says `detached`. Both are right answers for them.
KEY_BIASES = ("*k_proj.bias", "*key.bias")


def compare(truth: Truth, reported: Iterable[tuple[str, str]]) -> Outcome:
    """Reported ``(param, kind)`` pairs against the truth."""
    out = Outcome()
    dead, idle = truth.dead(), truth.idle()
    for param, kinds in dead.items():
        if "unused" in kinds and any(fnmatch.fnmatchcase(param, g) for g in KEY_BIASES):
            dead[param] = kinds | {"detached"}
    got: dict[str, set[str]] = {}
    for param, kind in reported:
        got.setdefault(param, set()).add(kind)
    for param, kinds in got.items():
        allowed = dead.get(param) or idle.get(param) or set()
        wrong = kinds - allowed
        if wrong:
            out.fp += [f"{param} {k}" + (f"≠{'/'.join(sorted(allowed))}" if allowed else "") for k in sorted(wrong)]
        elif param in idle:
            out.idle.append(f"{param} {'/'.join(sorted(kinds))}")
    for param, kinds in dead.items():
        if not (got.get(param, set()) & kinds):
            out.miss.append(f"{param} {'/'.join(sorted(kinds))}")
    return out


def wrong_shares(steps: Sequence[dict[str, str]], truth: Truth, shares: dict[str, float]) -> list[str]:
    """The report's idle share per module against the truth: between the share of steps on which all of the
    module's parameters, and on which any of them, lacked a usable gradient; every idle parameter under some module
    of the report."""
    out = []
    shares = {m.removeprefix("model."): v for m, v in shares.items()}
    names = list(truth.healthy)
    for module, share in shares.items():
        under = [n for n in names if n.startswith(module + ".") or n == module]
        if not under:
            out.append(f"{module}: no such module")
            continue
        all_ = sum(all(n in st for n in under) for st in steps) / len(steps)
        any_ = sum(any(n in st for n in under) for st in steps) / len(steps)
        if not (all_ - 1e-9 <= share <= any_ + 1e-9):
            out.append(f"{module} {share:.2f} not in [{all_:.2f}, {any_:.2f}]")
    for n in truth.idle():
        if not any(n.startswith(m + ".") or n == m for m in shares):
            out.append(f"{n}: idle, in no module's share")
    return out


def _reported(findings: Iterable[Finding]) -> list[tuple[str, str]]:
    """``(param, kind)`` of GradGuard's findings, named as in the `transformers` model (``model.`` stripped)."""
    return [(f.param.removeprefix("model."), f.kind) for f in findings]


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


def _crash(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:160]}"


@dataclass
class Result:
    """Everything measured for one configuration."""

    config: str
    family: str
    params: int = 0
    truth: str = ""
    step_truth: str = ""
    idle: int = 0  # parameters the truth measured idle (no usable gradient on some steps, not on all)
    harness_error: str | None = None
    check_step: Outcome = field(default_factory=Outcome)
    on_finding: Outcome = field(default_factory=Outcome)
    always: Outcome = field(default_factory=Outcome)
    defaults: Outcome = field(default_factory=Outcome)
    seconds: float = 0.0

    @property
    def outcomes(self) -> dict[str, Outcome]:
        return {
            "check_step": self.check_step,
            "GradGuard": self.on_finding,
            "GradGuard(diagnose='always')": self.always,
            "GradGuard() defaults": self.defaults,
        }

    @property
    def ok(self) -> bool:
        return self.harness_error is None and all(o.ok for o in self.outcomes.values())

    @property
    def idle_flagged(self) -> bool:
        return any(o.idle for o in self.outcomes.values())


def run_config(config: Config, tmp: str) -> Result:
    """Measure one configuration (see the module docstring)."""
    t0 = time.perf_counter()
    res = Result(config.name, config.arch.family)
    try:
        res.params = sum(p.numel() for p in config.build().model.parameters())
        plain = plain_step(config, guard=False)
        recorder = Recorder()
        try:
            ref_params: dict[str, torch.Tensor] | None = fit(config, tmp, [recorder])
        except RuntimeError:
            if recorder.no_graph_step is None:
                raise
            ref_params = None  # torch's "element 0 of tensors does not require grad": the truth is that step's
        if ref_params is not None and len(recorder.steps) != STEPS:
            raise RuntimeError(f"the run without the guard made {len(recorder.steps)} optimizer steps, not {STEPS}")
    except Exception as err:  # noqa: BLE001 - a model that does not train without the guard is the harness's problem
        res.harness_error = _crash(err)
        res.seconds = time.perf_counter() - t0
        return res
    if ref_params is None:
        return _run_no_graph(config, tmp, res, plain, recorder, t0)
    names = list(ref_params)
    truth = Truth.of(recorder.steps, names)
    res.truth = truth.summary()
    res.idle = len(truth.idle())
    res.step_truth = _status_text(plain.status)

    # check_step on the plain step
    try:
        guarded = plain_step(config, guard=True)
        step_truth = Truth.of([plain.status], list(plain.params))
        res.check_step = compare(step_truth, [(f.param, f.kind) for f in guarded.findings])
        res.check_step.fp += wrong_where(config, guarded.findings) + wrong_message(config, guarded.findings)
        res.check_step.changed = _changed(plain.params, guarded.params)
        if guarded.no_graph != plain.no_graph:
            res.check_step.fp.append("raised: the loss has a graph")
    except Exception as err:  # noqa: BLE001 - a crash is a result
        res.check_step = Outcome(crash=_crash(err))

    # GradGuard, every action "warn"
    for attr, diagnose in (("on_finding", "on_finding"), ("always", "always")):
        guard = GradGuard(**ALL_WARN, diagnose=diagnose, write_report=False)
        try:
            params = fit(config, tmp, [guard])
            outcome = compare(truth, _reported(guard.findings))
            outcome.fp += wrong_where(config, guard.findings) + wrong_message(config, guard.findings)
            outcome.shares = wrong_shares(recorder.steps, truth, guard.report.idle_shares())
            outcome.changed = _changed(ref_params, params)
        except Exception as err:  # noqa: BLE001 - a crash is a result
            outcome = Outcome(crash=_crash(err))
        setattr(res, attr, outcome)

    # GradGuard() with pure defaults: raises if and only if a raising kind is true on every step
    expect_raise = any(kinds & RAISING for kinds in truth.dead().values())
    guard = GradGuard()
    try:
        params = fit(config, tmp, [guard], tensorboard=True)  # its dashboards on a real model, too
        res.defaults = Outcome(changed=_changed(ref_params, params))
        if expect_raise:
            res.defaults.miss.append("no raise")
    except GradGuardError as err:
        out = compare(truth, _reported(err.findings))
        out.miss = []  # a raise lists one step's findings only
        out.fp += wrong_message(config, err.findings)
        out.note = f"raised at step {min((f.step for f in err.findings), default=0)}"
        if not expect_raise and not out.fp and not out.idle:
            out.fp.append("raised")
        res.defaults = out
    except Exception as err:  # noqa: BLE001 - a crash is a result
        res.defaults = Outcome(crash=_crash(err))
    if any(o.changed for o in res.outcomes.values()) and not _reproducible(config, tmp, ref_params, plain.params):
        for o in res.outcomes.values():
            if o.changed:
                o.changed = []
                o.note = "bit-identity not checkable: two runs without the guard differ"
    res.seconds = time.perf_counter() - t0
    return res


def _run_no_graph(config: Config, tmp: str, res: Result, plain: PlainStep, recorder: Recorder, t0: float) -> Result:
    """A configuration whose loss has no graph: without the guard, ``backward()`` fails at step
    ``recorder.no_graph_step``; every guarded run must raise :class:`GradGuardError` there instead, listing exactly
    the parameters of the truth of that step (nothing trains, so nothing can change)."""
    names = list(recorder.steps[-1])
    truth = Truth.of(recorder.steps, names)
    res.truth = f"{truth.summary()}; backward() fails at step {recorder.no_graph_step} (the loss has no graph)"
    res.step_truth = _status_text(plain.status)

    def judge(findings: Sequence[Finding], raised: bool, on: Truth) -> Outcome:
        out = compare(on, _reported(findings))
        out.fp += wrong_where(config, findings) + wrong_message(config, findings)
        if not raised:
            out.miss.append("no GradGuardError: torch's error instead")
        else:
            out.note = f"raised at step {min((f.step for f in findings), default=0)}"
        return out

    try:
        guarded = plain_step(config, guard=True)
        res.check_step = judge(guarded.findings, guarded.no_graph, Truth.of([plain.status], list(plain.status)))
    except Exception as err:  # noqa: BLE001 - a crash is a result
        res.check_step = Outcome(crash=_crash(err))
    runs = (
        ("on_finding", GradGuard(**ALL_WARN, write_report=False)),
        ("always", GradGuard(**ALL_WARN, diagnose="always", write_report=False)),
        ("defaults", GradGuard()),
    )
    for attr, guard in runs:
        try:
            fit(config, tmp, [guard], tensorboard=attr == "defaults")
            outcome = Outcome(miss=["no error at all"])
        except GradGuardError as err:
            outcome = judge(err.findings, True, truth)
        except Exception as err:  # noqa: BLE001 - torch's own error (or a crash): the guard did not catch it
            outcome = judge([], False, truth)
            outcome.crash = _crash(err)
        setattr(res, attr, outcome)
    res.seconds = time.perf_counter() - t0
    return res


def _status_text(status: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(_count(status.values()).items())) or "healthy"


def _reproducible(
    config: Config, tmp: str, ref_params: dict[str, torch.Tensor], plain_params: dict[str, torch.Tensor]
) -> bool:
    """Whether the model itself trains the same twice without the guard (Reformer reseeds with `torch.seed()`)."""
    again = plain_step(config, False).params
    return not _changed(ref_params, fit(config, tmp, [])) and not _changed(plain_params, again)


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------- the table
def table(results: Sequence[Result]) -> str:
    """The results as a markdown table, with a summary line above it."""
    archs = {r.config.split("+")[0].split("/")[0] for r in results}
    n_ok = sum(r.ok for r in results)
    crashes = sum(bool(o.crash) for r in results for o in r.outcomes.values())
    fps = sum(bool(o.fp) for r in results for o in r.outcomes.values())
    misses = sum(bool(o.miss) for r in results for o in r.outcomes.values())
    changed = sum(bool(o.changed) for r in results for o in r.outcomes.values())
    shares = sum(bool(o.shares) for r in results for o in r.outcomes.values())
    idle = sum(r.idle_flagged for r in results)
    harness = sum(r.harness_error is not None for r in results)
    lines = [
        f"{len(results)} configurations of {len(archs)} architectures: {n_ok} fully right; runs with a crash: "
        f"{crashes}, with a false positive: {fps}, with a miss: {misses}, changing training: {changed}, "
        f"with wrong idle shares: {shares}; configurations where idle-by-design parameters were flagged: {idle}; "
        f"harness errors: {harness}.",
        "",
        "| configuration | family | params | truth over "
        f"{STEPS} steps | check_step | GradGuard (all warn) | GradGuard (all warn, diagnose='always') | "
        "GradGuard() defaults | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.harness_error:
            cells = [f"harness error: {r.harness_error}", "", "", "", ""]
        else:
            cells = [r.truth, *(o.cell() for o in r.outcomes.values())]
        cells = [c.replace("|", "\\|") for c in cells]
        lines.append(f"| {r.config} | {r.family} | {r.params:,} | " + " | ".join(cells) + f" | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def configs_by_name() -> dict[str, Config]:
    return {c.name: c for c in configs()}


__all__ += ["ARCHS", "PEFT", "Truth", "compare", "configs_by_name", "grad_status", "plain_step", "fit"]
