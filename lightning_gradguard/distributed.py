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
  collective (``all_gather_object`` of each rank's own explanations) makes the error text identical on every rank,
  and then all of them raise :class:`~lightning_gradguard.GradGuardError`: nobody is left waiting.
* :meth:`RankSync.merge_facts` and :meth:`RankSync.combine` (from ``GuardCore.check`` at the optimizer step) use the
  agreed facts, so that gradients that DDP has already averaged (identical on every rank) are classified identically
  on every rank, and a NaN/Inf gradient names the ranks whose loss was not finite.

This module uses ``torch.distributed`` only; the Lightning callback passes in the wrapped model and its device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .audit import StepFacts, explain_missing, reached_params
from .findings import Finding, GradGuardError, format_findings
from .measure import GradStats, measure_grads
from .policy import GradGuardWarning

if TYPE_CHECKING:
    from .core import GuardCore
    from .trace import LossFacts

__all__ = [
    "BITS",
    "RankSync",
    "decode_ranks",
    "encode_ranks",
    "format_ranks",
    "rank_zero_warnings",
    "stats_from_shards",
]

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


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        from torch.distributed._tensor import DTensor
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (a ``DTensor``'s local tensor; other tensors as they are)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def stats_from_shards(params: Sequence[torch.Tensor], rows: Sequence[Sequence[float]], scale: float = 1.0) -> GradStats:
    """:class:`~lightning_gradguard.audit.GradStats` from per-parameter sums over the ranks of ``[squared norm (each
    element counted once), ranks with a gradient, ranks with a NaN/Inf gradient]``.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> b = torch.nn.Parameter(torch.zeros(1))
        >>> stats = stats_from_shards([w, b], [[9.0 + 16.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
        >>> stats.norms, stats.missing
        ([5.0, None], [1])
    """
    norms: list[float | None] = []
    stats = GradStats(list(params), norms)
    for i, (p, (sumsq, with_grad, bad)) in enumerate(zip(params, rows, strict=True)):
        if not p.requires_grad:
            stats.frozen.append(i)
        if with_grad == 0:
            norms.append(None)
            stats.missing.append(i)
            continue
        norm = math.sqrt(sumsq) if math.isfinite(sumsq) else sumsq
        norms.append(norm / scale)
        if bad > 0:
            stats.nonfinite.append(i)
        elif norm == 0.0:
            stats.zero.append(i)
    return stats


@contextmanager
def rank_zero_warnings(rank: int) -> Iterator[None]:
    """Silence :class:`~lightning_gradguard.GradGuardWarning` inside the block on every rank but zero.

    Findings are the same on every rank; one copy of each warning is enough.
    """
    if rank == 0:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        yield


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
        self._weights: dict[int, float] = {}
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
        group = model.process_group
        world_size = dist.get_world_size(group)
        if world_size < 2:
            return None
        ignored = set(getattr(model, "parameters_to_ignore", ()))
        expected = frozenset(id(p) for n, p in model.module.named_parameters() if p.requires_grad and n not in ignored)
        strict = not model.find_unused_parameters and not getattr(model, "static_graph", False)
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
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        roots = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
        if roots:
            root = roots[0]
            shard_size = 1 if root.sharding_strategy == ShardingStrategy.NO_SHARD else root.world_size
            return cls(group=None, rank=dist.get_rank(), world_size=world_size, device=torch.device(device),
                       sharded="fsdp", replicas=world_size / shard_size)  # fmt: skip
        if any(_is_dtensor(p) for p in model.parameters()):
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
        if self.ddp is None:
            return False
        return bool(getattr(self.ddp, "require_forward_param_sync", self.ddp.require_backward_grad_sync))

    def before_backward(
        self, core: GuardCore, loss: torch.Tensor, facts: LossFacts | None, step: int, error: GradGuardError | None
    ) -> None:
        """Note ``loss``'s facts; on a synchronising backward, agree them with every rank and raise together.

        Args:
            core: the guard (its parameter index, tracer, report).
            loss: the loss about to go through ``backward()``.
            facts: the tracer's facts about ``loss`` on a traced step, else ``None``.
            step: the optimizer step.
            error: the error this rank is about to raise because ``loss`` has no graph, or ``None``.

        Raises:
            GradGuardError: on every rank at once, when some rank's loss has no graph, or (with
                ``find_unused_parameters=False``) some rank's loss does not reach a parameter DDP synchronises.
        """
        if self.sharded:
            return  # FSDP has no reducer that waits for every parameter: the optimizer-step check is collective
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
            return  # a no_sync micro-batch: DDP waits for nobody, and neither do we
        index = core.index
        assert index is not None, "GuardCore.bind() first"
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
            self._raise_together(core, step, unreached if self.strict else {}, error_ranks, error, facts)
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
        if not self.strict:
            self._note_partial(core, unreached, step)

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

    def _note_partial(self, core: GuardCore, unreached: dict[int, tuple[int, ...]], step: int) -> None:
        """With ``find_unused_parameters=True``, a parameter some ranks skip is legitimate (routing): a report note."""
        index = core.index
        assert index is not None
        by_ranks: dict[tuple[int, ...], list[str]] = {}
        for bit, ranks in sorted(unreached.items()):
            name = index.names[bit]
            if len(ranks) < self.world_size and name not in self._noted:
                self._noted.add(name)
                by_ranks.setdefault(ranks, []).append(f"`{name}`")
        for ranks, names in by_ranks.items():
            core.report.note(
                f"{', '.join(names)} got no gradient from the loss on {format_ranks(ranks)} of {self.world_size} at "
                f"step {step} (the other ranks used {'it' if len(names) == 1 else 'them'}). DDP "
                "(find_unused_parameters=True) averaged in zeros for those ranks: fine for data-dependent routing, "
                "a bug if every rank should use them."
            )

    def _raise_together(
        self,
        core: GuardCore,
        step: int,
        unreached: dict[int, tuple[int, ...]],
        error_ranks: tuple[int, ...],
        error: GradGuardError | None,
        facts: LossFacts | None,
    ) -> None:
        """Every rank gets here from the same agreed numbers: swap explanations, then all raise the same error."""
        index = core.index
        assert index is not None
        mine: dict[int, dict[str, Any]] = {}
        if unreached:
            sf = StepFacts(compiled=core.compiled)
            if facts is not None and core.tracer is not None:
                sf = StepFacts(dep=facts.dep, cuts=facts.cuts, seen=core.tracer.seen, tracer=core.tracer)
            for bit, ranks in unreached.items():
                if self.rank in ranks:
                    mine[bit] = explain_missing(index.names[bit], bit, sf, step).to_dict()
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
        text = self._error_text(findings, unreached, error_ranks, gathered, step, core.policy.sizes)
        if error_ranks:
            findings += self._merge_error_findings(error_ranks, gathered)
        self._state = _StepState()
        # this rank's own loss error is in its report already (without ranks): make it the agreed version
        own = {f.key for f in error.findings} if error is not None else set()
        entries = {e.finding.key: e for e in core.report.entries if e.finding.key in own}
        agreed = {f.key: f for f in findings}
        for key, entry in entries.items():
            if key in agreed:
                entry.finding = agreed[key]
        core.report.add([f for f in findings if f.key not in entries])
        raise GradGuardError(text, findings)

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
        """:func:`~lightning_gradguard.audit.measure_grads`, for gradients as the strategy left them.

        Under DDP the gradients are averaged, identical on every rank: measured locally, no collective. Under FSDP
        each rank holds shards: this rank's shards are measured in one fused pass (in float64, so that a norm is
        not finite exactly when an element is not), then one ``all_reduce`` sums, per parameter, the squared norms
        (each shard counted once), the ranks holding a gradient, and the ranks with a NaN/Inf: global norms, and
        "no gradient" only where no rank has one.
        """
        if self.sharded is None:
            return measure_grads(params, scale)
        # `DTensor.to_local()` is an autograd function: ~10 µs per tensor with grad mode on (it is, in Lightning's
        # optimizer closure), ~0.1 µs without
        with torch.no_grad(), torch._C.DisableTorchFunction():
            return self._measure_shards(params, scale)

    def _measure_shards(self, params: Sequence[torch.Tensor], scale: float) -> GradStats:
        n = len(params)
        has_grad = [0.0] * n
        weight = [0.0] * n
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[torch.Tensor]]] = {}
        for i, p in enumerate(params):
            g = p.grad
            if g is None:
                continue
            local = _local(g)
            if local.numel() == 0:
                continue  # FSDP1: this rank holds no shard of it
            has_grad[i] = 1.0
            weight[i] = self._weight(p)
            idx, grads = groups.setdefault((local.device, local.dtype), ([], []))
            idx.append(i)
            grads.append(local)
        norms = torch.zeros(n, dtype=torch.float64, device=self.device)
        for idx, grads in groups.values():
            if grads[0].is_sparse:
                reduced = [g.coalesce().values().norm(dtype=torch.float64) for g in grads]
            else:
                reduced = list(torch._foreach_norm(grads, 2, dtype=torch.float64))
            norms[torch.tensor(idx, device=self.device)] = torch.stack(reduced).to(self.device)
        rows = torch.stack([
            norms.square() * torch.tensor(weight, dtype=torch.float64, device=self.device),
            torch.tensor(has_grad, dtype=torch.float64, device=self.device),
            (~torch.isfinite(norms)).to(torch.float64),
        ], dim=1)  # fmt: skip
        dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=self.group)
        self.collectives += 1
        return stats_from_shards(params, rows.cpu().tolist(), scale)

    def _weight(self, p: torch.Tensor) -> float:
        """1 / the number of ranks that hold each element of ``p``'s local shard (so that a sum counts it once)."""
        w = self._weights.get(id(p))
        if w is None:
            if _is_dtensor(p):
                mesh = p.device_mesh  # type: ignore[attr-defined]
                copies = self.world_size / mesh.size()  # the same DTensor lives on other meshes too
                for dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
                    if placement.is_replicate():
                        copies *= mesh.size(dim)
            else:
                copies = self.replicas
            w = self._weights[id(p)] = 1.0 / copies
        return w

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
