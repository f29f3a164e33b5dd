"""Distributed training: findings that every rank agrees on, and decisions to raise that all ranks take together.

Under DDP a parameter without a gradient is worse than wasted: with ``find_unused_parameters=False`` DDP's reducer
waits *inside* ``loss.backward()`` for every trainable parameter's gradient, so a parameter that one rank skips
hangs the ranks that used it until the process-group timeout, and one that every rank skips makes DDP run the step
with un-synchronised gradients and fail on the next one with a message that names no parameter. A rank that raises
on its own leaves the others waiting in their next collective. So every decision here is collective.

:class:`RankSync` is what :class:`~lightning_gradguard.core.GuardCore` calls under distributed training (its
``dist`` attribute; ``None`` in a single process, which then pays nothing):

* :meth:`RankSync.before_backward` (from ``GuardCore.record_loss``, before ``backward()`` runs) does, on every
  backward that synchronises gradients, **one** ``all_reduce`` of a small int64 tensor. Each row is one fact and
  each rank sets its own bit in it; since no two ranks set the same bit, the sum is their OR and names the ranks:

  - per parameter: "my losses do not reach it" (the graph walk of
    :func:`~lightning_gradguard.audit.reached_params`): with ``find_unused_parameters=False`` for this backward's
    loss, else for every loss of the optimizer step so far;
  - per parameter, on traced steps and only with ``find_unused_parameters=True``: "my loss's value depends on it"
    (so that every rank tells *unused* from *detached* alike);
  - "my loss has no graph" (``backward()`` is about to fail), "my step was traced", "a loss of my step was NaN/Inf".

  Every rank then takes the same decision from the same numbers. When that decision is to raise, one more
  collective (``all_gather_object`` of each rank's own explanations) makes the error text identical on every rank;
  the :class:`Agreement` it returns holds that error, and every rank's core raises it: nobody is left waiting.
* :meth:`RankSync.merge_facts` and :meth:`RankSync.combine` (from ``GuardCore.check`` at the optimizer step) use the
  agreed facts, so that gradients that DDP has already averaged (identical on every rank) are classified identically
  on every rank, and a NaN/Inf gradient names the ranks whose loss was not finite.

Gradients held in shards (FSDP) are measured by :mod:`~lightning_gradguard.shards`. This module uses
``torch.distributed`` only; the Lightning callback passes in the wrapped model and its device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from . import _compat
from .audit import StepFacts, explain_missing, reached_params
from .findings import Finding, GradGuardError, format_findings
from .measure import GradStats, measure_grads
from .shards import ShardWeights, is_dtensor, measure_shards

if TYPE_CHECKING:
    from .params import ParamIndex
    from .trace import LossFacts

__all__ = ["BITS", "Agreement", "RankSync", "decode_ranks", "encode_ranks", "format_ranks"]

#: Rank bits per int64 word of the flags tensor (the sign bit stays clear).
BITS = 63


def encode_ranks(flags: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``flags`` (one bool per row) as rows of int64 words in which ``rank`` sets its own bit where a flag is true.

    Summing these tensors over the ranks (``all_reduce``) ORs the bits, since no two ranks set the same bit:
    :func:`decode_ranks` reads back which ranks raised each flag.

    Example::

        >>> t = encode_ranks(torch.tensor([True, False]), 1, 2) + encode_ranks(torch.tensor([True, True]), 0, 2)
        >>> decode_ranks(t)
        {0: (0, 1), 1: (0,)}
    """
    words = (world_size + BITS - 1) // BITS
    out = torch.zeros(flags.shape[0], words, dtype=torch.int64, device=flags.device)
    out[:, rank // BITS] = flags.to(torch.int64) << (rank % BITS)
    return out


def decode_ranks(reduced: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """``{row: ranks}`` for every row of a summed :func:`encode_ranks` tensor in which some rank set its bit."""
    cpu = reduced.cpu()  # the one host sync of the collective
    out: dict[int, tuple[int, ...]] = {}
    for row in cpu.ne(0).any(1).nonzero().flatten().tolist():
        ranks = []
        for word, value in enumerate(cpu[row].tolist()):
            while value:
                low = value & -value
                ranks.append(word * BITS + low.bit_length() - 1)
                value ^= low
        out[row] = tuple(ranks)
    return out


def format_ranks(ranks: Sequence[int]) -> str:
    """``"rank 1"`` / ``"ranks 0, 2"``."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


_FSDP_ZERO = (
    " Under FSDP (FullyShardedDataParallel) a parameter that no rank's loss uses gets an all-zero gradient, not "
    "none: it may be unused."
)


@dataclass
class Agreement:
    """What the ranks agreed at a backward (:meth:`RankSync.before_backward`), for the core to apply.

    Attributes:
        notes: lines for the run report (parameters some ranks skipped, with ``find_unused_parameters=True``).
        error: the error every rank raises now (the same text on every rank), or ``None``.
    """

    notes: list[str] = field(default_factory=list)
    error: GradGuardError | None = None


@dataclass
class _Agreed:
    """What the ranks agreed on at the last synchronising backward of the step."""

    unreached: dict[int, tuple[int, ...]]  # parameter bit -> ranks whose losses do not reach it
    received: set[int] | None  # id() of the parameters some rank's losses reach (find_unused_parameters=True)
    dep: int | None  # union of the ranks' value dependences, when every rank traced the step
    loss_bad: tuple[int, ...]  # ranks with a NaN/Inf loss in the step


@dataclass
class _StepState:
    """This rank's facts about the losses of the current optimizer step."""

    reached: set[int] = field(default_factory=set)  # find_unused_parameters=True: every loss walked as it comes
    fns: list[Any] = field(default_factory=list)  # find_unused_parameters=False: grad_fns, walked on error only
    dep: int = 0
    traced: bool = True
    loss_bad: torch.Tensor | None = None


class RankSync:
    """The distributed side of a :class:`~lightning_gradguard.core.GuardCore`: agrees facts and decisions.

    Build it with :meth:`of`; it is ``None`` when training runs in one process.

    Args:
        group: the process group of the collectives (DDP's own).
        rank: this process's rank in ``group``.
        world_size: the number of ranks in ``group``.
        device: where the flags tensor lives (a CUDA device for NCCL, the CPU for gloo).
        ddp: the ``DistributedDataParallel`` wrapper, or ``None``.
        strict: DDP's reducer needs a gradient for every expected parameter in every synchronising backward
            (``find_unused_parameters=False`` and no static graph).
        expected: ``id()`` of the parameters DDP's reducer synchronises (all trainable ones it did not ignore).
        sharded: ``"fsdp"`` (FSDP1 with ``use_orig_params=True``: parameters are flat shards of which a rank may
            hold none), ``"dtensor"`` (FSDP2 / ``fully_shard`` / Lightning's ``ModelParallelStrategy``: parameters
            are ``DTensor``), or ``None`` (replicated parameters, as under DDP).
        replicas: for ``"fsdp"``, how many ranks hold each shard (``world_size`` over the sharding group's size;
            more than 1 under ``HYBRID_SHARD``).

    Attributes:
        collectives: how many collectives GradGuard itself ran (the cost it adds: one per optimizer step).
    """

    def __init__(
        self,
        *,
        group: Any,
        rank: int,
        world_size: int,
        device: torch.device,
        ddp: nn.Module | None = None,
        strict: bool = False,
        expected: frozenset[int] | None = None,
        sharded: str | None = None,
        replicas: float = 1.0,
    ) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.ddp = ddp
        self.strict = strict
        self.expected = expected
        self.sharded = sharded
        self.replicas = replicas
        self.collectives = 0
        self._weights = ShardWeights(world_size, replicas)
        self._state = _StepState()
        self._agreed: _Agreed | None = None
        self._noted: set[str] = set()

    @classmethod
    def of(cls, model: nn.Module, device: torch.device | str) -> RankSync | None:
        """The sync for ``model`` as the strategy wrapped it (e.g. Lightning's ``trainer.strategy.model``).

        Returns ``None`` in a single process, and for models that neither ``DistributedDataParallel`` nor FSDP
        (``FullyShardedDataParallel``, ``fully_shard``) wrap: their gradients are not GradGuard's business to agree.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return None
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            return cls._of_sharded(model, device)
        group, ignored, find_unused, static_graph = _compat.ddp_facts(model)
        world_size = dist.get_world_size(group)
        if world_size < 2:
            return None
        expected = frozenset(id(p) for n, p in model.module.named_parameters() if p.requires_grad and n not in ignored)
        strict = not find_unused and not static_graph
        return cls(
            group=group,
            rank=dist.get_rank(group),
            world_size=world_size,
            device=torch.device(device),
            ddp=model,
            strict=strict,
            expected=expected,
        )

    @classmethod
    def _of_sharded(cls, model: nn.Module, device: torch.device | str) -> RankSync | None:
        world_size = dist.get_world_size()
        if world_size < 2:
            return None
        from torch.distributed.fsdp import FullyShardedDataParallel

        roots = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
        if roots:
            return cls(group=None, rank=dist.get_rank(), world_size=world_size, device=torch.device(device),
                       sharded="fsdp", replicas=_compat.fsdp_replicas(roots[0], world_size))  # fmt: skip
        if any(is_dtensor(p) for p in model.parameters()):
            return cls(group=None, rank=dist.get_rank(), world_size=world_size, device=torch.device(device),
                       sharded="dtensor")  # fmt: skip
        return None

    @property
    def traceable(self) -> bool:
        """Whether the tracer can follow the parameters: not under FSDP, which swaps them for unsharded copies."""
        return self.sharded is None

    def __repr__(self) -> str:
        if self.sharded:
            return f"RankSync(rank={self.rank}, world_size={self.world_size}, sharded={self.sharded!r})"
        mode = "find_unused_parameters=False" if self.strict else "find_unused_parameters=True"
        return f"RankSync(rank={self.rank}, world_size={self.world_size}, {mode})"

    # ------------------------------------------------------------------ backward
    def syncs_backward(self) -> bool:
        """Whether the coming ``backward()`` synchronises gradients (not a ``no_sync`` micro-batch).

        DDP decides it in the forward pass: it prepares its reducer only when ``require_backward_grad_sync`` was set
        then, and records that in ``require_forward_param_sync``.
        """
        return self.ddp is not None and _compat.ddp_syncs_backward(self.ddp)

    def before_backward(
        self,
        index: ParamIndex,
        loss: torch.Tensor,
        facts: LossFacts | None,
        step: int,
        error: GradGuardError | None,
        why: StepFacts,
        sizes: Mapping[str, int] | None = None,
    ) -> Agreement:
        """Note ``loss``'s facts; on a synchronising backward, agree them with every rank.

        Args:
            index: the model's parameters.
            loss: the loss about to go through ``backward()``.
            facts: the tracer's facts about ``loss`` on a traced step, else ``None``.
            step: the optimizer step.
            error: the error this rank is about to raise because ``loss`` has no graph, or ``None``.
            why: what explains a parameter this rank's loss does not reach (the trace, or that there is none).
            sizes: the model's checked tensors, to group findings in the error text.

        Returns:
            What the ranks agreed: report notes, and the error that every rank raises now (when some rank's loss has
            no graph, or, with ``find_unused_parameters=False``, some rank's loss does not reach a parameter DDP
            synchronises), the same on every rank.
        """
        if self.sharded:
            return Agreement()  # FSDP has no reducer that waits for every parameter: the optimizer-step check agrees
        state = self._state
        bad = ~torch.isfinite(loss.detach()).all()
        state.loss_bad = bad if state.loss_bad is None else state.loss_bad | bad
        state.traced = state.traced and facts is not None
        if facts is not None:
            state.dep |= facts.dep
        if self.strict:
            state.fns.append(loss.grad_fn)
        else:
            state.reached |= reached_params([loss.grad_fn])
        if not self.syncs_backward():
            return Agreement()  # a no_sync micro-batch: DDP waits for nobody, and neither do we
        params = index.params
        n = len(params)
        if error is not None:  # a loss without a graph reaches nothing: the error explains it, not a flag per parameter
            rows = [False] * (n if self.strict else 2 * n)
        elif self.strict:
            expected = self.expected or frozenset()
            reached = reached_params([loss.grad_fn])
            rows = [id(p) in expected and p.requires_grad and id(p) not in reached for p in params]
        else:
            reached = state.reached
            rows = [p.requires_grad and id(p) not in reached for p in params]
            dep = state.dep if state.traced else 0
            rows += [bool(dep >> i & 1) for i in range(n)]
        rows += [error is not None, state.traced, False]
        flags = torch.tensor(rows, dtype=torch.bool, device=self.device)
        flags[-1] = state.loss_bad.to(self.device)
        agreed = self._all_reduce(flags)
        base = n if self.strict else 2 * n
        unreached = {row: ranks for row, ranks in agreed.items() if row < n}
        error_ranks = agreed.get(base, ())
        traced_everywhere = len(agreed.get(base + 1, ())) == self.world_size
        loss_bad = agreed.get(base + 2, ())
        if error_ranks or (self.strict and unreached):
            skipped = unreached if self.strict else {}
            return Agreement(error=self._agree_error(index, step, skipped, error_ranks, error, why, sizes))
        received = merged_dep = None
        if not self.strict:
            everywhere = self.world_size
            received = {id(p) for i, p in enumerate(params) if len(unreached.get(i, ())) < everywhere}
            if traced_everywhere:
                merged_dep = 0
                for row in agreed:
                    if n <= row < 2 * n:
                        merged_dep |= 1 << (row - n)
        self._agreed = _Agreed(unreached, received, merged_dep, loss_bad)
        return Agreement(notes=[] if self.strict else self._partial_notes(index, unreached, step))

    def forget_step(self) -> None:
        """Forget this rank's facts about the losses of a step that reached no optimizer (its gradients were
        cleared)."""
        self._state = _StepState()
        self._agreed = None

    def _all_reduce(self, flags: torch.Tensor) -> dict[int, tuple[int, ...]]:
        encoded = encode_ranks(flags, self.rank, self.world_size)
        dist.all_reduce(encoded, op=dist.ReduceOp.SUM, group=self.group)
        self.collectives += 1
        return decode_ranks(encoded)

    def _partial_notes(self, index: ParamIndex, unreached: dict[int, tuple[int, ...]], step: int) -> list[str]:
        """With ``find_unused_parameters=True``, a parameter some ranks skip is legitimate (routing): a report note,
        once per parameter."""
        by_ranks: dict[tuple[int, ...], list[str]] = {}
        for bit, ranks in sorted(unreached.items()):
            name = index.names[bit]
            if len(ranks) < self.world_size and name not in self._noted:
                self._noted.add(name)
                by_ranks.setdefault(ranks, []).append(f"`{name}`")
        return [
            (
                f"{', '.join(names)} got no gradient from the loss on {format_ranks(ranks)} of {self.world_size} at "
                f"step {step} (the other ranks used {'it' if len(names) == 1 else 'them'}). DDP "
                "(find_unused_parameters=True) averaged in zeros for those ranks: fine for data-dependent routing, "
                "a bug if every rank should use them."
            )
            for ranks, names in by_ranks.items()
        ]

    def _agree_error(
        self,
        index: ParamIndex,
        step: int,
        unreached: dict[int, tuple[int, ...]],
        error_ranks: tuple[int, ...],
        error: GradGuardError | None,
        why: StepFacts,
        sizes: Mapping[str, int] | None,
    ) -> GradGuardError:
        """Every rank gets here from the same agreed numbers: swap explanations, and make the error every rank raises
        (the same text on every rank)."""
        mine: dict[int, dict[str, Any]] = {}
        for bit, ranks in unreached.items():
            if self.rank in ranks:
                mine[bit] = explain_missing(index.names[bit], bit, why, step).to_dict()
        earlier = reached_params(self._state.fns[:-1]) if len(self._state.fns) > 1 else set()
        payload = {
            "findings": mine,
            "earlier": [bit for bit in mine if id(index.params[bit]) in earlier],
            "error": str(error) if error is not None else None,
            "error_findings": [f.to_dict() for f in error.findings] if error is not None else [],
        }
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, payload, group=self.group)
        self.collectives += 1
        findings = self._merge_unreached(unreached, gathered, step)
        text = self._error_text(findings, unreached, error_ranks, gathered, step, sizes)
        if error_ranks:
            findings += self._merge_error_findings(error_ranks, gathered)
        self._state = _StepState()
        return GradGuardError(text, findings)

    def _error_text(
        self,
        findings: list[Finding],
        unreached: dict[int, tuple[int, ...]],
        error_ranks: tuple[int, ...],
        gathered: list[Any],
        step: int,
        sizes: Mapping[str, int] | None,
    ) -> str:
        """The text every rank raises: the parameters some rank's loss did not reach (``findings``), then the ranks
        whose loss has no graph, each with its own explanation (from ``gathered``)."""
        parts = []
        if findings:
            parts.append(self._unreached_text(findings, unreached, step, sizes))
        if error_ranks:
            parts.append(
                f"GradGuard: at step {step} the loss on {format_ranks(error_ranks)} of {self.world_size} has no "
                "autograd graph, so its `backward()` would fail, and the other ranks would wait in theirs:"
            )
            for r in error_ranks:
                parts.append(f"[rank {r}] {gathered[r]['error']}")
            parts.append(
                f"GradGuard stopped every rank here (not just {format_ranks(error_ranks)}), so that none is left "
                "waiting for the others' gradients."
            )
        return "\n".join(parts)

    def _merge_unreached(self, unreached: dict[int, tuple[int, ...]], gathered: list[Any], step: int) -> list[Finding]:
        findings = []
        for bit, ranks in sorted(unreached.items()):
            # the explanation of the lowest rank that can name the line, else of the lowest rank
            options = [gathered[r]["findings"][bit] for r in ranks]
            best = next((f for f in options if f.get("where")), options[0])
            f = Finding.from_dict(best)
            message = f.message
            if len(ranks) < self.world_size:
                message += f" This happened on {format_ranks(ranks)} of {self.world_size} only."
            early = [r for r in ranks if bit in gathered[r]["earlier"]]
            if early:
                message += (
                    f" On {format_ranks(early)} an earlier micro-batch of this step used it, but not the last one, "
                    "whose backward synchronises gradients."
                )
            seen_on = () if len(ranks) == self.world_size else ranks
            findings.append(replace(f, message=message, step=step, ranks=seen_on))
        return findings

    def _unreached_text(
        self,
        findings: list[Finding],
        unreached: dict[int, tuple[int, ...]],
        step: int,
        sizes: Mapping[str, int] | None = None,
    ) -> str:
        n = len(findings)
        partial = any(len(r) < self.world_size for r in unreached.values())
        head = (
            f"GradGuard: DDP (find_unused_parameters=False) needs a gradient for every trainable parameter from every "
            f"rank's loss in every backward that synchronises gradients, but at step {step} {n} "
            f"parameter{'s' if n != 1 else ''} got none{' on some ranks' if partial else ''}:"
        )
        if partial:
            would = (
                "Left alone, the ranks that used them would hang inside `loss.backward()` until the process-group "
                "timeout (30 minutes by default), waiting for gradients that never come."
            )
        else:
            # Quoting DDP's own error here would cost the names: Lightning's `DDPStrategy.on_exception` replaces the
            # text of any exception that contains it with its generic advice (tests/test_lightning_hooks.py).
            would = (
                "Left alone, DDP would run this step with un-synchronised gradients and fail on the next one, in its "
                "reducer, with an error that does not name the parameters."
            )
        fix = (
            "Fix: use these parameters in the loss on every rank and micro-batch (or freeze them with "
            "`requires_grad_(False)`, or remove them), or, if skipping them is intended (data-dependent routing, "
            'unused heads), train with `strategy="ddp_find_unused_parameters_true"` '
            "(`DDPStrategy(find_unused_parameters=True)`), under which GradGuard reports a parameter that no rank "
            'uses as `unused` (silence it with `GradGuard(ignore=[...])` or `on_unused="ignore"`) and only notes '
            "in its report one that some ranks skip."
        )
        return f"{head}\n{format_findings(findings, sizes)}\n{would}\n{fix}"

    @staticmethod
    def _merge_error_findings(error_ranks: tuple[int, ...], gathered: list[Any]) -> list[Finding]:
        merged: dict[tuple[str, str], Finding] = {}
        seen_on: dict[tuple[str, str], list[int]] = {}
        for r in error_ranks:
            for d in gathered[r]["error_findings"]:
                f = Finding.from_dict(d)
                merged.setdefault(f.key, f)
                seen_on.setdefault(f.key, []).append(r)
        return [replace(f, ranks=tuple(seen_on[k])) for k, f in merged.items()]

    # ------------------------------------------------------------------ optimizer step
    def measure_grads(self, params: Sequence[torch.Tensor], scale: float = 1.0) -> GradStats:
        """:func:`~lightning_gradguard.measure.measure_grads`, for gradients as the strategy left them.

        Under DDP the gradients are averaged, identical on every rank: measured locally, no collective. Under FSDP
        each rank holds shards: :func:`~lightning_gradguard.shards.measure_shards` (one collective).
        """
        if self.sharded is None:
            return measure_grads(params, scale)
        # `DTensor.to_local()` is an autograd function: ~10 µs per tensor with grad mode on (it is, in Lightning's
        # optimizer closure), ~0.1 µs without
        with torch.no_grad(), _compat.torch_function_disabled():
            stats = measure_shards(params, scale, self._weights, self.device, self.group)
        self.collectives += 1
        return stats

    def merge_facts(self, facts: StepFacts) -> StepFacts:
        """``facts`` of this rank's step with what the ranks agreed: which parameters some rank's loss reaches, and
        (on a step every rank traced) which ones some rank's loss depends on. With identical (averaged) gradients,
        identical facts give identical findings on every rank."""
        if self.sharded:  # FSDP's autograd leaves are flat parameters or unsharded copies: no per-parameter walk
            return StepFacts(compiled=facts.compiled)
        agreed = self._agreed
        if agreed is None or self.strict:
            return facts  # strict: every synchronised parameter was reached by every rank, or we raised already
        return replace(facts, received=agreed.received, dep=agreed.dep)

    def _sharded_finding(self, f: Finding) -> Finding:
        """Say what FSDP changes: no tracing (unused and detached look alike); FSDP1's zero for "no gradient"."""
        if f.kind == "unused":
            return replace(f, message=(
                f"`{f.param}` received no gradient on any rank (under FSDP GradGuard does not trace the forward "
                "pass, so it cannot tell an unused parameter from a detached one)."
            ))  # fmt: skip
        if f.kind == "zero" and self.sharded == "fsdp":
            return replace(f, message=f.message + _FSDP_ZERO)
        return f

    def combine(self, findings: list[Finding], step: int) -> list[Finding]:
        """The step's findings with the agreed facts added (the ranks whose loss was NaN/Inf); resets the step."""
        agreed = self._agreed
        self._agreed = None
        self._state = _StepState()
        if self.sharded:
            return [self._sharded_finding(f) for f in findings]
        if agreed is None or not agreed.loss_bad:
            return findings
        bad = agreed.loss_bad
        if len(bad) == self.world_size:
            extra, ranks = " The loss was NaN/Inf on every rank.", ()
        else:
            extra = (
                f" The loss was NaN/Inf on {format_ranks(bad)} of {self.world_size} only; DDP's averaging of "
                "gradients carried it to every rank."
            )
            ranks = bad
        return [replace(f, message=f.message + extra, ranks=ranks) if f.kind == "nonfinite" else f for f in findings]
