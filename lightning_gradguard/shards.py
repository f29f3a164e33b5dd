"""Gradients held in shards across ranks (FSDP, ``fully_shard``): their global norms, in one fused pass and one
collective.

Under FSDP each rank holds shards of the gradients. :func:`measure_shards` measures this rank's shards in one fused
pass (in float64, so that a norm is not finite exactly when an element is not), then one ``all_reduce`` sums, per
parameter, the squared norms (each shard counted once, see :class:`ShardWeights`), the ranks holding a gradient and
the ranks with a NaN/Inf: :func:`stats_from_shards` turns those sums into the global
:class:`~lightning_gradguard.measure.GradStats` ("no gradient" only where no rank has one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .measure import GradStats, l2_norms

__all__ = ["ShardWeights", "is_dtensor", "measure_shards", "stats_from_shards"]


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2, ``fully_shard``, Lightning's ``ModelParallelStrategy``)."""
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (a ``DTensor``'s local tensor; other tensors as they are)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class ShardWeights:
    """Per parameter, 1 / the number of ranks that hold each element of its local shard, so that a sum over the ranks
    counts every element once.

    Args:
        world_size: the number of ranks.
        replicas: for FSDP1, how many ranks hold each shard (more than 1 under ``HYBRID_SHARD``).
    """

    def __init__(self, world_size: int, replicas: float = 1.0) -> None:
        self.world_size = world_size
        self.replicas = replicas
        self._weights: dict[int, float] = {}

    def of(self, p: torch.Tensor) -> float:
        """The weight of ``p``'s local shard (cached per parameter)."""
        w = self._weights.get(id(p))
        if w is None:
            if is_dtensor(p):
                mesh = p.device_mesh  # type: ignore[attr-defined]
                copies = self.world_size / mesh.size()  # the same DTensor lives on other meshes too
                for dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
                    if placement.is_replicate():
                        copies *= mesh.size(dim)
            else:
                copies = self.replicas
            w = self._weights[id(p)] = 1.0 / copies
        return w


def measure_shards(
    params: Sequence[torch.Tensor], scale: float, weights: ShardWeights, device: torch.device, group: Any
) -> GradStats:
    """The global :class:`~lightning_gradguard.measure.GradStats` of ``params``' sharded gradients: this rank's shards
    in one fused pass, then one ``all_reduce`` over ``group`` (the caller runs it with grad mode and function modes
    off: ``DTensor.to_local()`` is an autograd function, ~10 µs per tensor with grad mode on, ~0.1 µs without)."""
    n = len(params)
    has_grad = [0.0] * n
    weight = [0.0] * n
    idx: list[int] = []
    grads: list[torch.Tensor] = []
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        local = _local(g)
        if local.numel() == 0:
            continue  # FSDP1: this rank holds no shard of it
        has_grad[i] = 1.0
        weight[i] = weights.of(p)
        idx.append(i)
        grads.append(local)
    norms = torch.zeros(n, dtype=torch.float64, device=device)
    if grads:
        norms[torch.tensor(idx, device=device)] = torch.stack([t.to(device) for t in l2_norms(grads, torch.float64)])
    rows = torch.stack([
        norms.square() * torch.tensor(weight, dtype=torch.float64, device=device),
        torch.tensor(has_grad, dtype=torch.float64, device=device),
        (~torch.isfinite(norms)).to(torch.float64),
    ], dim=1)  # fmt: skip
    dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)
    return stats_from_shards(params, rows.cpu().tolist(), scale)


def stats_from_shards(params: Sequence[torch.Tensor], rows: Sequence[Sequence[float]], scale: float = 1.0) -> GradStats:
    """:class:`~lightning_gradguard.measure.GradStats` from per-parameter sums over the ranks of ``[squared norm (each
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
