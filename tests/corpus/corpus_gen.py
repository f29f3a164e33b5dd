"""A seeded generator of small models with one planted gradient bug (or none), and the ground truth.

Each case is Python source written to a file (so that the ``path:line`` of every cut is known exactly): a ``Net``
built from blocks (linear, conv, residual, attention, recurrent, embedding with a tied head, routing, BatchNorm /
LayerNorm, dropout, activation checkpointing) and ``make_optimizers(model)``. :func:`generate` returns the
:class:`Case`: source, training setup and the expected findings ``{(kind, param)}`` with, for each ``detached``
parameter, the line that cut it. Everything follows from the generator's choices, never from running the guard.

The trunk maps ``h`` ([B, D]) to ``h``; a cut planted after trunk block ``k`` severs the parameters of blocks
``0..k`` (all their paths to the loss go through ``h``) except a tied embedding weight, which also reaches the loss
through the tied head. A cut after the head leaves the loss without a graph, unless the tied head keeps one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

__all__ = ["BUG_KINDS", "N_SEEDS", "SETUPS", "VARIANTS", "Case", "generate"]

D, V = 16, 12  # features, vocabulary

#: Training setups: plain loops under ``check_step`` and Lightning Trainers under ``GradGuard``.
SETUPS = (
    "plain",
    "plain-bf16",
    "plain-accum",
    "plain-clip",
    "plain-2opt",
    "plain-2opt-list",
    "plain-fp16-scaler",
    "lit",
    "lit-bf16",
    "lit-accum",
    "lit-clip",
    "lit-manual2",
    "lit-long",
    "lit-always",
    "lit-window1",
)

HEADER = '''"""Generated corpus case {name}: {title}"""
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

D, V = {D}, {V}


class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class ZeroGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
'''


@dataclass
class Line:
    """One line of ``Net.forward``: its code and the parameters (short names) it uses first."""

    code: str
    params: tuple[str, ...] = ()
    view: bool = False  # only a view of `h`: under no_grad a view still requires grad, so it cuts nothing


@dataclass
class Block:
    kind: str
    name: str
    init: list[str]
    params: list[str]
    lines: list[Line]
    ends_affine: bool = False  # ends with a bias added per feature (no BatchNorm right after it)
    tied: str | None = None  # a tied embedding weight (also reaches the loss through the head)
    sparse: bool = False
    linear: str | None = None  # the nn.Linear of a plain linear block (param-level cuts)
    checkpointed: bool = False
    inner: tuple[int, str, tuple[str, ...]] | None = None  # a cut inside the block: (line, code with {cut}, params)
    method: tuple[str, str] | None = None  # a method of Net the block calls through checkpoint: (def line, return line)
    reentrant: bool = False


@dataclass
class Case:
    """One generated model, its training setup and the ground truth.

    Attributes:
        name: ``c0042``.
        seed: the generator seed.
        setup: one of :data:`SETUPS`.
        kind: the planted kind (``"none"`` for a healthy model).
        variant: the planted bug's variant (``"item_arith"``, ...).
        source: the Python source of the module (``Net``, ``make_optimizers``).
        expected: ``{(kind, param)}`` with param names as ``Net.named_parameters()`` gives them.
        cut_lines: ``{param: line}`` for the detached parameters (line numbers in ``source``).
        call_lines: ``{param: line}`` for the parameters of a module whose output is discarded: the line that first
            uses each, where GradGuard names the module's call.
        steps: optimizer steps to run.
        graphless: the loss has no graph (``GradGuardError`` at backward).
        blocks: the trunk's block kinds (for the report).
    """

    name: str
    seed: int
    setup: str
    kind: str
    variant: str
    source: str = ""
    expected: set[tuple[str, str]] = field(default_factory=set)
    cut_lines: dict[str, int] = field(default_factory=dict)
    call_lines: dict[str, int] = field(default_factory=dict)
    steps: int = 1
    graphless: bool = False
    blocks: list[str] = field(default_factory=list)
    at: int | None = None  # the trunk block after which a cut / NaN / zero is planted
    unfollowable: bool = False  # the value truly leaves torch (through `str`): `unused` must then hedge


# --------------------------------------------------------------------------- blocks
def _block(kind: str, name: str, rng: random.Random, *, sparse_ok: bool, bf16: bool = False) -> Block:
    p = name
    if kind == "linear":
        act = rng.choice(["torch.tanh", "F.gelu", "torch.sigmoid"])
        ckpt = rng.random() < 0.3
        call = f"checkpoint(self.{p}_lin, h, use_reentrant=False)" if ckpt else f"self.{p}_lin(h)"
        return Block(kind, p, [f"self.{p}_lin = nn.Linear(D, D)"], [f"{p}_lin.weight", f"{p}_lin.bias"],
                     [Line(f"h = {act}({call})", (f"{p}_lin.weight", f"{p}_lin.bias"))],
                     linear=None if ckpt else f"{p}_lin", checkpointed=ckpt)  # fmt: skip
    if kind == "residual":
        ps = (f"{p}_fc1.weight", f"{p}_fc1.bias", f"{p}_fc2.weight", f"{p}_fc2.bias")
        return Block(kind, p, [f"self.{p}_fc1 = nn.Linear(D, D)", f"self.{p}_fc2 = nn.Linear(D, D)"], list(ps),
                     [Line(f"h = h + self.{p}_fc2(F.gelu(self.{p}_fc1(h)))", ps)], ends_affine=True,
                     inner=(0, f"h = h + self.{p}_fc2(F.gelu(self.{p}_fc1(h))){{cut}}", ps))  # fmt: skip
    if kind == "ckpt_residual":  # a residual branch in a method, under activation checkpointing
        ps = (f"{p}_fc1.weight", f"{p}_fc1.bias", f"{p}_fc2.weight", f"{p}_fc2.bias")
        reentrant = rng.random() < 0.5  # kept only where `h` requires grad (see _grad_inputs)
        return Block(kind, p, [f"self.{p}_fc1 = nn.Linear(D, D)", f"self.{p}_fc2 = nn.Linear(D, D)"], list(ps),
                     [Line(f"h = checkpoint(self.{p}_fn, h, use_reentrant={{reentrant}})", ps)], ends_affine=True,
                     reentrant=reentrant,
                     checkpointed=True, inner=(-1, f"return h + self.{p}_fc2(F.gelu(self.{p}_fc1(h))){{cut}}", ps),
                     method=(f"def {p}_fn(self, h):", f"return h + self.{p}_fc2(F.gelu(self.{p}_fc1(h)))"))  # fmt: skip
    if kind == "conv":
        ps = (f"{p}_conv.weight", f"{p}_conv.bias")
        return Block(kind, p, [f"self.{p}_conv = nn.Conv1d(4, 4, 3, padding=1)"], list(ps),
                     [Line("c = h.reshape(-1, 4, 4)", view=True),
                      Line(f"h = torch.tanh(self.{p}_conv(c)).reshape(-1, D)", ps)])  # fmt: skip
    if kind == "attention":
        ps = (f"{p}_attn.in_proj_weight", f"{p}_attn.in_proj_bias", f"{p}_attn.out_proj.weight",
              f"{p}_attn.out_proj.bias")  # fmt: skip
        return Block(kind, p, [f"self.{p}_attn = nn.MultiheadAttention(4, 2, batch_first=True)"], list(ps),
                     [Line("a = h.reshape(-1, 4, 4)", view=True),
                      Line(f"a = a + self.{p}_attn(a, a, a, need_weights=False)[0]", ps),
                      Line("h = a.reshape(-1, D)")], ends_affine=True,
                     inner=(1, f"a = a + self.{p}_attn(a, a, a, need_weights=False)[0]{{cut}}", ps))  # fmt: skip
    if kind == "recurrent":
        cell = rng.choice(["GRU", "LSTM", "RNN"])
        if bf16 and cell == "LSTM":  # oneDNN's bfloat16 LSTM needs AVX-512 BF16: fails on many CPUs (the same draws)
            cell = "GRU"
        ps = (f"{p}_rnn.weight_ih_l0", f"{p}_rnn.weight_hh_l0", f"{p}_rnn.bias_ih_l0", f"{p}_rnn.bias_hh_l0")
        return Block(kind, p, [f"self.{p}_rnn = nn.{cell}(4, 4, batch_first=True)"], list(ps),
                     [Line("s = h.reshape(-1, 4, 4)", view=True), Line(f"s, _ = self.{p}_rnn(s)", ps),
                      Line("h = s.reshape(-1, D)")])  # fmt: skip
    if kind == "embedding":
        sparse = sparse_ok and rng.random() < 0.35
        tied = not sparse and rng.random() < 0.6
        opt = ", sparse=True" if sparse else ""
        w = f"{p}_emb.weight"
        return Block(kind, p, [f"self.{p}_emb = nn.Embedding(V, D{opt})"], [w],
                     [Line(f"h = h + self.{p}_emb(tok).mean(1)", (w,))], tied=w if tied else None,
                     sparse=sparse,
                     inner=None if tied else (0, f"h = h + self.{p}_emb(tok).mean(1){{cut}}", (w,)))  # fmt: skip
    if kind == "routing":
        ps_gate = (f"{p}_gate.weight", f"{p}_gate.bias")
        ps_e = (f"{p}_e0.weight", f"{p}_e0.bias", f"{p}_e1.weight", f"{p}_e1.bias")
        return Block(kind, p, [f"self.{p}_gate = nn.Linear(D, 2)", f"self.{p}_e0 = nn.Linear(D, D)",
                               f"self.{p}_e1 = nn.Linear(D, D)"], [*ps_gate, *ps_e],
                     [Line("r = h.clone()"), Line(f"g = torch.softmax(self.{p}_gate(r), -1)", ps_gate),
                      Line(f"h = torch.tanh(g[:, :1] * self.{p}_e0(r) + g[:, 1:] * self.{p}_e1(r))",
                           ps_e)], inner=(1, f"g = torch.softmax(self.{p}_gate(r), -1){{cut}}", ps_gate))  # fmt: skip
    if kind == "layernorm":
        ps = (f"{p}_ln.weight", f"{p}_ln.bias")
        return Block(kind, p, [f"self.{p}_ln = nn.LayerNorm(D)"], list(ps), [Line(f"h = self.{p}_ln(h)", ps)],
                     ends_affine=True)  # fmt: skip
    if kind == "batchnorm":
        ps = (f"{p}_bn.weight", f"{p}_bn.bias")
        return Block(kind, p, [f"self.{p}_bn = nn.BatchNorm1d(D)"], list(ps), [Line(f"h = self.{p}_bn(h)", ps)],
                     ends_affine=True)  # fmt: skip
    if kind == "dropout":
        return Block(kind, p, [], [], [Line("h = F.dropout(h, 0.1, self.training)")])
    raise ValueError(kind)


BLOCK_KINDS = ("linear", "residual", "ckpt_residual", "conv", "attention", "recurrent", "embedding", "routing",
               "layernorm", "batchnorm", "dropout")  # fmt: skip


def _trunk(rng: random.Random, *, sparse_ok: bool, fp16: bool = False, bf16: bool = False) -> list[Block]:
    n = rng.randint(2, 4)
    blocks: list[Block] = []
    for i in range(n):
        choices = [k for k in BLOCK_KINDS if not (k == "embedding" and any(b.kind == "embedding" for b in blocks))]
        if fp16:  # oneDNN has no float16 LSTM on the CPU: the model itself would fail
            choices.remove("recurrent")
        if blocks and blocks[-1].ends_affine:  # a per-feature bias right before BatchNorm has a zero gradient
            choices.remove("batchnorm")
        if blocks and blocks[-1].kind in ("dropout", "layernorm", "batchnorm"):
            choices = [k for k in choices if k not in ("dropout", "layernorm", "batchnorm")]
        blocks.append(_block(rng.choice(choices), f"b{i}", rng, sparse_ok=sparse_ok, bf16=bf16))
    if not any(p != b.tied for b in blocks for p in b.params):
        blocks.append(_block("linear", f"b{n}", rng, sparse_ok=sparse_ok, bf16=bf16))
    return blocks


# --------------------------------------------------------------------------- bugs
#: Cuts planted on `h` after a trunk block: (variant, lines, index of the cut line). `x` is the raw input [B, D].
CUTS: dict[str, list[str]] = {
    "detach": ["h = h.detach()"],
    "data": ["h = h.data"],
    "numpy_from": ["h = torch.from_numpy(h.detach().float().numpy())"],
    "numpy_as_tensor": ["h = torch.as_tensor(h.detach().float().cpu().numpy())"],
    "numpy_asarray": ["h = torch.tensor(np.asarray(h.detach().float()))"],
    "numpy_math_tensor": ["h = torch.tensor(np.tanh(h.detach().float().numpy()) * 2.0)"],
    "numpy_math_from": ["h = torch.from_numpy(h.detach().float().numpy() * 2.0)"],
    "numpy_math_2line": ["a = h.detach().float().numpy()", "h = torch.from_numpy(np.tanh(a) + 1.0)"],
    "item": ["h = x * torch.tensor(h.abs().mean().item())"],
    "item_arith": ["h = x * torch.tensor(h.abs().mean().item() * 0.5 + 1.0)"],
    "item_2line": ["s = h.abs().mean().item()", "h = x * (s + 1.0)"],
    "float": ["h = x * torch.tensor(float(h.abs().mean()))"],
    "float_arith": ["h = x * (float(h.abs().mean()) + 1.0)"],
    "tolist": ["h = torch.tensor(h.tolist())"],
    "tolist_arith": ["h = torch.tensor([[v * 2.0 for v in row] for row in h.tolist()])"],
    "legacy_tensor": ["h = torch.Tensor(h.tolist())"],
    "parameter_leaf": ["h = nn.Parameter(h.detach().clone())"],
    "copy_leaf": ["h = h.detach().clone().requires_grad_()"],
    "compare": ["h = x * (h > 0).to(x.dtype)"],
    "compare_mean": ["h = x * (h > h.mean()).float()"],
    "argmax": ["h = x * F.one_hot(h.argmax(-1), D).to(x.dtype)"],
    "topk": ["_, idx = h.topk(2, dim=-1)", "h = x * F.one_hot(idx[:, 0], D).to(x.dtype)"],
    "int_cast": ["h = (h * 4).long().to(x.dtype)"],
    "detach_inplace": ["h = h * 1.0", "h.detach_()"],
    "math_item": ["h = x * torch.tensor(math.tanh(h.abs().mean().item()))"],
    "np_scalar_item": ["h = x * torch.tensor(np.float32(h.abs().mean().item()) * 2)"],
    "as_tensor_tolist": ["h = torch.as_tensor(h.tolist())"],
    "new_tensor_tolist": ["h = x.new_tensor(h.tolist())"],
    "np_array_tolist": ["h = torch.from_numpy(np.array(h.tolist(), dtype=np.float32))"],
    "numpy_clip_from": ["h = torch.from_numpy(np.clip(h.detach().float().numpy(), -1.0, 1.0))"],
    "stack_rows": ["h = torch.stack([torch.tensor(row) for row in h.tolist()])"],
    "where_compare": ["h = torch.where(h > 0, x, -x)"],
    "gather_argmax": ["h = x * torch.gather(x, 1, h.argmax(-1, keepdim=True))"],
    "deepcopy_detach": ["h = copy.deepcopy(h.detach())"],
    "item_str": ["h = x * float(str(round(h.abs().mean().item(), 4)))"],
    "item_format": ['h = x * float(f"{h.abs().mean().item():.4f}")'],
}
#: Values that truly leave torch (through text): a guard cannot follow them, and its `unused` must say so.
UNFOLLOWABLE = {"item_str", "item_format"}
#: Which line of a multi-line cut the guard should name (default: the first).
CUT_LINE = {"numpy_math_2line": 0, "item_2line": 0, "topk": 0, "detach_inplace": 1}
#: Cuts inside a block's branch (residual branch, attention, embedding term, router): only its parameters.
INNER_CUTS = {"inner_detach": ".detach()", "inner_data": ".data"}

#: Healthy decoys after a trunk block: look like bugs, are not (the gradient still flows through `h`).
DECOYS = {
    "decoy_center": ["h = h - h.detach().mean(0, keepdim=True)"],
    "decoy_item_log": ["self.last = h.abs().mean().item()"],
    "decoy_no_grad_stat": ["with torch.no_grad():", "    self.stat = h.abs().mean()"],
    "decoy_leaky": ["h = torch.where(h > 0, h, 0.1 * h)"],
    "decoy_onehot_gate": ["h = h + h * F.one_hot(h.argmax(-1), D).to(h.dtype)"],
    "decoy_numpy_log": ["self.last = float(np.asarray(h.detach().float()).mean())"],
}

NONFINITE = {
    "nan_fn": ["h = NanGrad.apply(h)"],
    "sqrt_zero": ["h = h + torch.sqrt(h - h.detach())"],
    "nan_forward": ['h = h + float("nan")'],  # the loss is NaN: every gradient is
}
ZERO = {
    "zero_fn": ["h = ZeroGrad.apply(h)"],
    "times_zero": ["h = h.detach() + h * 0"],
    "round": ["h = torch.round(h * 8) / 8"],
    "sign": ["h = x * torch.sign(h)"],
    "floor": ["h = torch.floor(h * 4) / 4"],
}
NO_GRAD = {
    "no_grad": "with torch.no_grad():",
    "set_grad_enabled": "with torch.set_grad_enabled(False):",
    "inference_mode": "with torch.inference_mode():",
}

BUG_KINDS = ("detached", "unused", "frozen", "orphan", "stale", "nonfinite", "zero")
#: Seeds below this draw kind and setup at random; from it on, they walk every (kind, setup) pair in turn.
N_RANDOM = 1600


def _grad_inputs(blocks: list[Block], plan: dict, kind: str, variant: str) -> list[bool]:
    """Per trunk block, whether `h` requires grad where it enters (a reentrant checkpoint without such an input
    records no graph: a cut of its own, which only the `checkpoint_reentrant` variant plants)."""
    frozen = set(plan.get("frozen", []))
    out = []
    rg = False
    for i, b in enumerate(blocks):
        out.append(rg)
        wrap, pc, inner = plan.get("wrap"), plan.get("param_cut"), plan.get("inner")
        if (wrap and wrap[0] == i) or (i == 0 and plan.get("reentrant")):
            rg = False
        elif inner and inner[0] == i:  # the block's own contribution is cut; a router's experts still count
            rg = rg or (b.kind == "routing" and any(p not in frozen for p in b.params))
        elif pc and pc[0] == i:
            rg = True  # the bias still has its path
        else:
            rg = rg or any(p not in frozen for p in b.params)
        if plan.get("after") == i and kind == "detached":
            rg = variant in ("copy_leaf", "parameter_leaf")  # a new leaf that requires grad
    return out


def _affected(blocks: list[Block], k: int) -> list[str]:
    """Trainable parameters of blocks 0..k whose every path to the loss goes through `h` after block k."""
    out = []
    for b in blocks[: k + 1]:
        out += [p for p in b.params if p != b.tied]
    return out


def _bug(kind: str, rng: random.Random, blocks: list[Block], case: Case) -> dict:
    """Choose and describe the planted bug. Returns the plan the writer follows."""
    plan: dict = {"inner": None, "after": None, "cut": None, "wrap": None, "extra": None, "frozen": [], "exclude": [],
                  "copy": None, "head_cut": None, "param_cut": None, "reentrant": False}  # fmt: skip
    with_params = [i for i, b in enumerate(blocks) if _affected(blocks, i)]
    if kind == "detached":
        r = rng.random()
        linear_blocks = [i for i, b in enumerate(blocks) if b.linear]
        if r < 0.1:
            case.variant = "head_detach"
            plan["head_cut"] = rng.choice(["out = out.detach()", "out = out.data", "out = torch.tensor(out.tolist())"])
            return plan
        if r < 0.2 and linear_blocks:
            k = rng.choice(linear_blocks)
            case.variant = rng.choice(["weight_data", "weight_copy"])
            plan["param_cut"] = (k, case.variant)
            return plan
        inner = [i for i, b in enumerate(blocks) if b.inner]
        if r < 0.32 and inner:
            k = rng.choice(inner)
            case.variant = rng.choice(list(INNER_CUTS))
            plan["inner"] = (k, INNER_CUTS[case.variant])
            return plan
        if r < 0.37 and blocks[0].linear and not blocks[0].checkpointed:
            case.variant = "checkpoint_reentrant"
            plan["reentrant"] = True
            return plan
        if r < 0.52:
            k = rng.choice([i for i in with_params if not blocks[i].checkpointed] or with_params)
            case.variant = rng.choice(list(NO_GRAD))
            plan["wrap"] = (k, NO_GRAD[case.variant])
            return plan
        case.variant = rng.choice(list(CUTS))
        plan["after"] = rng.choice(with_params)
        plan["cut"] = CUTS[case.variant]
        return plan
    if kind == "nonfinite":
        case.variant = rng.choice([v for v in NONFINITE if v != "nan_forward" or not any(b.sparse for b in blocks)])
        plan["after"] = rng.choice(with_params)
        plan["cut"] = NONFINITE[case.variant]
        return plan
    if kind == "zero":
        case.variant = rng.choice(list(ZERO))
        plan["after"] = rng.choice(with_params)
        plan["cut"] = ZERO[case.variant]
        return plan
    if kind == "none":
        r = rng.random()
        if r < 0.15 and case.setup.startswith("lit") and case.setup != "lit-window1":
            case.variant = "idle_branch"  # taken on every other forward: idle, not unused, under GradGuard
            plan["extra"] = (rng.choice(["linear", "residual", "conv", "routing"]), "idle_branch",
                             rng.randrange(len(blocks) + 1))  # fmt: skip
        elif r < 0.25:
            b = blocks[rng.choice([i for i, b in enumerate(blocks) if b.params])]
            case.variant = "frozen_filtered"  # frozen, and left out of the optimizer: silent
            plan["frozen"] = list(b.params)
            plan["filtered"] = True
        elif r < 0.33:
            case.variant = "ema"  # a trainable EMA copy of the head, updated under no_grad, in no optimizer: silent
            plan["ema"] = True
        elif r < 0.6:
            case.variant = rng.choice(list(DECOYS))
            plan["after"] = rng.randrange(len(blocks))
            plan["cut"] = DECOYS[case.variant]
        return plan
    if kind == "unused":
        case.variant = rng.choice(["never_called", "untaken_branch", "discarded"])
        kinds = ["linear", "residual", "conv", "attention", "recurrent", "routing", "layernorm"]
        if case.setup == "plain-fp16-scaler":  # no float16 LSTM on the CPU
            kinds.remove("recurrent")
        plan["extra"] = (rng.choice(kinds), case.variant, rng.randrange(len(blocks) + 1))
        return plan
    if kind == "frozen":
        b = blocks[rng.choice([i for i, b in enumerate(blocks) if b.params])]
        case.variant = rng.choice(["frozen_block", "frozen_tensor"])
        plan["frozen"] = list(b.params) if case.variant == "frozen_block" else [rng.choice(b.params)]
        return plan
    if kind == "orphan":
        case.variant = rng.choice(["head_missing", "block_missing"])
        if case.variant == "head_missing":
            plan["exclude"] = ["head.weight", "head.bias"]
        else:
            b = blocks[rng.choice([i for i, b in enumerate(blocks) if b.params])]
            plan["exclude"] = list(b.params)
        return plan
    if kind == "stale":  # a GradScaler asserts on an optimizer none of whose tensors has a gradient: copy the head
        case.variant = "copy_head" if case.setup == "plain-fp16-scaler" else rng.choice(["copy_head", "copy_model"])
        plan["copy"] = "head" if case.variant == "copy_head" else "model"
        return plan
    raise ValueError(kind)


# --------------------------------------------------------------------------- writer
VARIANTS: dict[str, list[str]] = {
    "none": ["healthy", "idle_branch", "frozen_filtered", "ema", *DECOYS],
    "detached": ["head_detach", "weight_data", "weight_copy", "checkpoint_reentrant", *INNER_CUTS, *NO_GRAD, *CUTS],
    "unused": ["never_called", "untaken_branch", "discarded"],
    "frozen": ["frozen_block", "frozen_tensor"],
    "orphan": ["head_missing", "block_missing"],
    "stale": ["copy_head", "copy_model"],
    "nonfinite": list(NONFINITE),
    "zero": list(ZERO),
}
#: Every (kind, variant, setup) a case can have: seeds from WALK_START on take them in turn.
WALK = [(k, v, s) for k, vs in VARIANTS.items() for v in vs for s in SETUPS
        if not (v == "idle_branch" and (not s.startswith("lit") or s == "lit-window1"))
        and not (v == "copy_model" and "scaler" in s)]  # fmt: skip
WALK_START = N_RANDOM + 4 * len(SETUPS) * (len(BUG_KINDS) + 1)
N_SEEDS = WALK_START + len(WALK)


def generate(seed: int, kind: str | None = None, setup: str | None = None) -> Case:
    """The case of ``seed``: its kind (``None``: drawn, ~30 % healthy, ~40 % of the rest ``detached`` since cuts
    have the most variants) and setup (``None``: drawn). Seeds from ``N_RANDOM`` on walk every (kind, setup) pair;
    from ``WALK_START`` on, every (kind, variant, setup) of :data:`WALK` (drawn until the variant comes)."""
    if WALK_START <= seed < N_SEEDS and kind is None and setup is None:
        kind, want, setup = WALK[seed - WALK_START]
        for attempt in range(5000):
            case = _generate(seed, kind, setup, random.Random(seed * 10_000 + attempt))
            if case.variant == want:
                return case
        raise RuntimeError(f"corpus_gen: no {kind}/{want} under {setup} in 5000 draws")
    return _generate(seed, kind, setup, random.Random(seed))


def _generate(seed: int, kind: str | None, setup: str | None, rng: random.Random) -> Case:
    if N_RANDOM <= seed < WALK_START and kind is None and setup is None:
        j = seed - N_RANDOM
        setup = SETUPS[j % len(SETUPS)]
        kind = ("none", *BUG_KINDS)[j // len(SETUPS) % (len(BUG_KINDS) + 1)]
    if kind is None:
        kind = "none" if rng.random() < 0.3 else rng.choices(BUG_KINDS, weights=[5, 1, 1, 1, 1, 1, 1])[0]
    if setup is None:
        setup = rng.choices(SETUPS, weights=[14, 8, 8, 8, 6, 4, 5, 6, 4, 4, 4, 4, 4, 4, 4])[0]
    case = Case(f"c{seed:04d}", seed, setup, kind, "healthy" if kind == "none" else "")
    sparse_ok = "clip" not in setup and "2opt" not in setup
    bf16 = setup in ("plain-bf16", "lit-bf16")
    blocks = _trunk(rng, sparse_ok=sparse_ok, fp16=setup == "plain-fp16-scaler", bf16=bf16)
    case.blocks = [b.kind + ("(ckpt)" if b.checkpointed else "") + ("(sparse)" if b.sparse else "") for b in blocks]
    plan = _bug(kind, rng, blocks, case)
    case.unfollowable = case.variant in UNFOLLOWABLE
    placed = [plan.get("wrap"), plan.get("inner"), plan.get("param_cut")]
    case.at = plan.get("after") if plan.get("after") is not None else next((p[0] for p in placed if p), None)
    tied = next((b.tied for b in blocks if b.tied), None)
    sparse = any(b.sparse for b in blocks)
    cut_lines: dict[str, int] = {}
    expected: set[tuple[str, str]] = set()
    nan_forward = False
    src = HEADER.format(name=case.name, title=f"{kind}/{case.variant} under {setup}", D=D, V=V).splitlines()
    init = src  # __init__ body follows
    for b in blocks:
        init += [f"        {line}" for line in b.init]
    extra = plan.get("extra")
    extra_block = _block(extra[0], "extra", rng, sparse_ok=False, bf16=bf16) if extra else None
    if extra_block is not None:
        init += [f"        {line}" for line in extra_block.init]
    init.append("        self.head = nn.Linear(D, 1)")
    if plan.get("ema"):
        init.append("        self.ema_head = copy.deepcopy(self.head)")
    init.append("        self.calls = 0")
    for p in plan.get("frozen", []):
        init.append(f"        self.{p}.requires_grad_(False)")
    src.append("")
    for i, b in enumerate(blocks):
        if b.method:
            src.append(f"    {b.method[0]}")
            inner = plan.get("inner")
            if inner and inner[0] == i:
                src.append(f"        {b.inner[1].format(cut=inner[1])}")
                for p in b.inner[2]:
                    cut_lines[p] = len(src)
            else:
                src.append(f"        {b.method[1]}")
            src.append("")
    src.append("    def forward(self, x, tok):")
    src.append("        h = x")

    def emit(code: str, indent: int = 8) -> int:
        src.append(" " * indent + code)
        return len(src)  # 1-based line number

    grad_in = _grad_inputs(blocks, plan, kind, case.variant)
    for i, b in enumerate(blocks):
        if b.method:
            b.lines = [replace(b.lines[0], code=b.lines[0].code.format(reentrant=b.reentrant and grad_in[i]))]
        wrap = plan.get("wrap")
        if extra and extra[2] == i:
            case.call_lines = _emit_extra(extra_block, extra[1], emit)
        if wrap and wrap[0] == i:
            emit(wrap[1])
            first = None
            for line in b.lines:
                n = emit(line.code, 12)
                if first is None and not line.view:
                    first = n
                for p in line.params:
                    if p != b.tied:
                        cut_lines.setdefault(p, n)
            if "inference_mode" in wrap[1]:
                emit("h = h.clone()")
            for p in _affected(blocks, i):
                cut_lines.setdefault(p, first)  # upstream parameters: the block's first line (`h` enters)
            continue
        pc = plan.get("param_cut")
        if pc and pc[0] == i:
            w = f"self.{b.linear}.weight"
            w = f"{w}.data" if pc[1] == "weight_data" else f"{w}.detach().clone().requires_grad_()"
            act = b.lines[0].code.split("(")[0].removeprefix("h = ")
            n = emit(f"h = {act}(F.linear(h, {w}, self.{b.linear}.bias))")
            cut_lines[f"{b.linear}.weight"] = n
            continue
        if i == 0 and plan.get("reentrant"):
            act = b.lines[0].code.split("(")[0].removeprefix("h = ")
            n = emit(f"h = {act}(checkpoint(self.{b.linear}, x, use_reentrant=True))")
            for p in b.params:
                cut_lines[p] = n
            continue
        inner = plan.get("inner")
        for j, line in enumerate(b.lines):
            if inner and inner[0] == i and b.inner and b.inner[0] == j and not b.method:
                n = emit(b.inner[1].format(cut=inner[1]))
                for p in b.inner[2]:
                    cut_lines[p] = n
            else:
                emit(line.code)
        if plan.get("after") == i:
            cut = plan["cut"]
            lines = [emit(c) for c in cut]
            if kind == "detached":
                at = lines[CUT_LINE.get(case.variant, 0)]
                for p in _affected(blocks, i):
                    cut_lines[p] = at
            elif kind == "nonfinite" and case.variant == "nan_forward":
                nan_forward = True
            elif kind == "nonfinite":  # a tied weight's other path adds a finite gradient to a NaN one: still NaN
                expected |= {("nonfinite", p) for b in blocks[: i + 1] for p in b.params}
            elif kind == "zero":
                expected |= {("zero", p) for p in _affected(blocks, i)}
    if extra and extra[2] == len(blocks):
        case.call_lines = _emit_extra(extra_block, extra[1], emit)
    emit("out = self.head(h).squeeze(-1)")
    if plan.get("ema"):
        emit("with torch.no_grad():")
        emit("for e, p in zip(self.ema_head.parameters(), self.head.parameters()):", 12)
        emit("e.mul_(0.9).add_(p, alpha=0.1)", 16)
    if plan.get("head_cut"):
        n = emit(plan["head_cut"])
        cut_lines = {"head.weight": n, "head.bias": n}
        if not tied:
            for b in blocks:
                for p in b.params:
                    cut_lines[p] = n
            case.graphless = True
    if tied:
        emit(f"lm = h @ self.{tied}.t()")
        emit("return out, lm")
    else:
        emit("return out, None")
    expected |= {("detached", p) for p in cut_lines}
    if extra_block is not None and extra[1] != "idle_branch":
        expected |= {("unused", p) for p in extra_block.params}
    if not plan.get("filtered"):
        expected |= {("frozen", p) for p in plan.get("frozen", [])}

    # the optimizers
    names = [p for b in blocks for p in b.params]
    if extra_block is not None:
        names += extra_block.params
    names += ["head.weight", "head.bias"]
    two = setup in ("plain-2opt", "plain-2opt-list", "lit-manual2")
    optim = "torch.optim.SGD(params, lr=0.01)" if sparse else rng.choice(
        ["torch.optim.SGD(params, lr=0.01)", "torch.optim.SGD(params, lr=0.01, momentum=0.9)",
         "torch.optim.Adam(params, lr=1e-3)", "torch.optim.AdamW(params, lr=1e-3)"])  # fmt: skip
    src += ["", "", "def make_optimizers(model):", "    named = dict(model.named_parameters())"]
    exclude = plan.get("exclude", [])
    expected |= {("orphan", p) for p in exclude}
    if plan.get("copy") == "head":
        src.append("    copies = dict(zip(['head.weight', 'head.bias'], copy.deepcopy(model.head).parameters()))")
        expected |= {("stale", "head.weight"), ("stale", "head.bias"), ("orphan", "head.weight"),
                     ("orphan", "head.bias")}  # fmt: skip
    elif plan.get("copy") == "model":
        src.append("    copies = dict(copy.deepcopy(model).named_parameters())")
        expected |= {("stale", p) for p in names} | {("orphan", p) for p in names}
        expected -= {("orphan", p) for p in cut_lines}
    else:
        src.append("    copies = {}")
    if plan.get("ema"):
        exclude = [*exclude, "ema_head.weight", "ema_head.bias"]
    src.append(f"    exclude = {exclude!r}")
    if plan.get("filtered"):
        src.append("    named = {n: p for n, p in named.items() if p.requires_grad}")
    src.append("    chosen = [(n, copies.get(n, p)) for n, p in named.items() if n not in exclude]")
    if two:
        src.append("    groups = [[p for n, p in chosen if not n.startswith('head.')],")
        src.append("              [p for n, p in chosen if n.startswith('head.')]]")
    else:
        src.append("    groups = [[p for n, p in chosen]]")
    src.append("    return [make(params) for params in groups if params]")
    src += ["", "", "def make(params):", f"    return {optim}", ""]
    if (kind == "nonfinite" and setup == "plain-clip") or nan_forward:
        # clip_grad_norm_ before the step multiplies every gradient by max_norm / nan: all are NaN by then
        expected = {("nonfinite", p) for p in names}
    case.source = "\n".join(src)
    case.expected = expected
    case.cut_lines = cut_lines
    case.steps = 1 if kind == "nonfinite" else (4 if setup.startswith("lit") else rng.choice([1, 2]))
    if case.variant == "idle_branch":
        case.steps = 6
    if setup == "plain-fp16-scaler":
        case.steps = 20  # a NaN is an overflow the scaler skips until the scale has fallen to 1 (16 halvings)
    if setup == "lit-long" and kind != "nonfinite":
        case.steps = 20  # longer than GradGuard's idle window (16): `unused` is judged during the run
    return case


def _emit_extra(block: Block, variant: str, emit) -> dict[str, int]:  # noqa: ANN001
    """The unused module: never called, behind a branch never taken, or its output discarded (then ``{param: the
    line that first uses it}``)."""
    if variant == "never_called":
        return {}
    if variant == "idle_branch":
        emit("self.calls += 1")
        emit("if self.calls % 2 == 0:")
        for line in block.lines:
            emit(line.code, 12)
        return {}
    if variant == "untaken_branch":
        emit("if h.shape[0] > 10_000:")
        for line in block.lines:
            emit(line.code, 12)
        return {}
    emit("keep = h")
    calls: dict[str, int] = {}
    for line in block.lines:
        n = emit(line.code)
        for p in line.params:
            calls.setdefault(p, n)
    emit("h = keep  # the block's output is discarded")
    return calls
