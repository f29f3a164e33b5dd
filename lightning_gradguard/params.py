"""The model's parameters as GradGuard sees them: names, bit indices, owning modules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["ParamIndex", "ParamList", "alike_items", "clean_name", "optimizer_layout", "optimizer_params"]


#: Name segments that wrappers insert: ``torch.compile``, FSDP (``FullyShardedDataParallel``), activation checkpointing.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """``name`` without the segments that wrappers add: ``_orig_mod.`` (``torch.compile``), ``_fsdp_wrapped_module.``
    (FSDP) and ``_checkpoint_wrapped_module.`` (activation checkpointing): the name the user's module gives it.

    Example::

        >>> clean_name("encoder._orig_mod.0.weight")
        'encoder.0.weight'
        >>> clean_name("layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.weight")
        'layers.0.attn.weight'
    """
    if "_orig_mod" not in name and "_wrapped_module" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of ``optimizer.param_groups``, in order, each once."""
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class ParamList(tuple):  # noqa: SLOT001 - a tuple subclass keeps an instance dict for `plans`
    """An optimizer's parameters in order, each once: immutable, so that what is computed once about the list stays
    valid as long as the list does.

    :func:`~lightning_gradguard.measure.measure_grads` keeps its measurement plans in :attr:`plans` (per pattern of
    missing gradients), so that a clean step looks nothing up per tensor, and in :attr:`layout` what each gradient
    looked like (so that a new pattern is planned without looking at every tensor again). The guard makes one per
    optimizer layout (:meth:`~lightning_gradguard.core.GuardCore.params_of`).

    Example::

        >>> import torch
        >>> params = ParamList(torch.nn.Linear(2, 1).parameters())
        >>> len(params), params.plans
        (2, {})
    """

    plans: dict[object, object]
    layout: object

    def __new__(cls, params: Iterable[torch.Tensor] = ()) -> ParamList:
        self = super().__new__(cls, params)
        self.plans = {}
        self.layout = None
        return self


def optimizer_layout(optimizer: torch.optim.Optimizer) -> tuple[object, ...]:
    """A cheap key that changes when ``optimizer``'s param groups do (groups added, lists replaced or resized)."""
    return (id(optimizer), *((id(g["params"]), len(g["params"])) for g in optimizer.param_groups))


class ParamIndex:
    """An ordered table of a model's parameters: ``names[i]`` is ``params[i]``; bit ``1 << i`` stands for it.

    Tied parameters appear once, under the name ``named_parameters()`` yields first. The index holds references
    to the parameters themselves (never to gradients or activations).
    """

    def __init__(self, named: Iterable[tuple[str, nn.Parameter | torch.Tensor]]) -> None:
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.index: dict[int, int] = {}
        self.bit_of: dict[str, int] = {}
        for name, p in named:
            if id(p) in self.index:
                continue
            self.index[id(p)] = len(self.params)
            self.bit_of[clean_name(name)] = len(self.params)
            self.names.append(clean_name(name))
            self.params.append(p)

    @classmethod
    def of(cls, model: nn.Module) -> ParamIndex:
        """The index of ``model.named_parameters()``."""
        return cls(model.named_parameters())

    def __len__(self) -> int:
        return len(self.params)

    def name_of(self, p: torch.Tensor) -> str | None:
        """The parameter's name, or ``None`` when it is not a parameter of the model."""
        i = self.index.get(id(p))
        return None if i is None else self.names[i]

    def bits(self, mask: int) -> list[int]:
        """The indices set in ``mask``, in order."""
        out = []
        while mask:
            low = mask & -mask
            out.append(low.bit_length() - 1)
            mask ^= low
        return out


def module_of(name: str) -> str:
    """The owning module's name of parameter ``name`` (``""`` for the root module)."""
    return name.rpartition(".")[0]


def alike_items(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Per item of an ``nn.ModuleList`` or ``nn.ModuleDict``, the names of the items of that container of the same
    class, itself included: the parts that routing, LayerDrop or a task chosen per batch runs some of on a step
    (experts, layers, heads). Names as :func:`clean_name` gives them.

    Example::

        >>> from torch import nn
        >>> net = nn.Module()
        >>> net.experts = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2), nn.ReLU()])
        >>> net.head = nn.Linear(2, 1)
        >>> alike_items(net)
        {'experts.0': ('experts.0', 'experts.1'), 'experts.1': ('experts.0', 'experts.1'), 'experts.2': ('experts.2',)}
    """
    out: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            items = [(clean_name(f"{name}.{key}" if name else key), child) for key, child in module.named_children()]
            for item, child in items:
                out[item] = tuple(n for n, other in items if type(other) is type(child))
    return out
