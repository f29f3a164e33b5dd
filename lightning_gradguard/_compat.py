"""Every private name of torch, Lightning and the standard library that the package touches, in one place.

Each one is an entry of :data:`PRIVATES`: the feature it serves, what happens without it, and a check of its shape
on the installed versions, which ``tests/test_compat.py`` runs for every entry (naming it when it changed). The rest
of the package reaches these names only through the functions and constants below. A private that is missing does
not break ``import lightning_gradguard``: its feature steps aside and :func:`warn_missing` says so once (a log
warning naming the private and the feature).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FILE",
    "DISPATCH_FILES",
    "DYNAMO_MODULE",
    "FUNCTION_APPLY_CODE",
    "GRAD_MODE_FUNCTION",
    "PRIVATES",
    "Private",
    "REENTRANT_CHECKPOINT_NODES",
    "TENSOR_DATA",
    "apply_arguments",
    "batches_that_stepped",
    "checkpoint_arguments",
    "compiled_inner",
    "ddp_facts",
    "ddp_syncs_backward",
    "default_showwarning",
    "event_file_writer",
    "fabric_wrappers",
    "flatten_dense",
    "foreach_norm",
    "fsdp_replicas",
    "function_mode_stack",
    "function_node_name",
    "getframe",
    "is_compiled",
    "mark_warning_shown",
    "metric_prefix",
    "optimizer_unscales",
    "record_file",
    "record_writer",
    "scale_tensor",
    "subtract_all",
    "torch_function_disabled",
    "warn_missing",
]

log = logging.getLogger("lightning_gradguard")


@dataclass(frozen=True)
class Private:
    """A private name the package relies on.

    Attributes:
        name: the name as the package uses it (``"torch.overrides._push_mode"``).
        feature: what the package uses it for.
        without: what happens when it is missing or changed.
        check: ``None`` when the name is there with the shape the package expects, else what is wrong.
    """

    name: str
    feature: str
    without: str
    check: Callable[[], str | None]


#: Every private name the package touches, by name.
PRIVATES: dict[str, Private] = {}
_said: set[str] = set()


def _private(name: str, feature: str, without: str) -> Callable[[Callable[[], str | None]], Callable[[], str | None]]:
    """Register the decorated function as the check of private ``name``."""

    def register(check: Callable[[], str | None]) -> Callable[[], str | None]:
        PRIVATES[name] = Private(name, feature, without, check)
        return check

    return register


def warn_missing(name: str) -> None:
    """Log once per process that private ``name`` is missing or changed, and which feature steps aside."""
    if name in _said:
        return
    _said.add(name)
    entry = PRIVATES[name]
    log.warning(
        "GradGuard: `%s` is not what GradGuard expects in this version of its library (used for %s), so %s.",
        name,
        entry.feature,
        entry.without,
    )


def _resolve(path: str) -> Any:
    """The object at the dotted ``path`` (a module, then attributes), or ``None``."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _missing_attrs(obj: Any, *attrs: str) -> str | None:
    missing = [a for a in attrs if not hasattr(obj, a)]
    return f"{obj!r} has no {', '.join(missing)}" if missing else None


def _missing_from_source(obj: Any, *names: str) -> str | None:
    """Which of ``names`` the source of ``obj`` no longer mentions (``None``: all of them)."""
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return f"the source of {obj!r} is not available"
    missing = [n for n in names if n not in source]
    return f"{getattr(obj, '__qualname__', obj.__name__)} no longer mentions {', '.join(missing)}" if missing else None


# ---------------------------------------------------------------------------------------------- the tracer (torch)
_MODE_STACK = "torch.overrides._push_mode"
_MODE_NAMES = ("_get_current_function_mode", "_push_mode", "_pop_mode")


def function_mode_stack() -> tuple[Callable[[], Any], Callable[[Any], None], Callable[[], Any]] | None:
    """``(current mode, push, pop)`` of torch's function-mode stack, or ``None``: the tracer stays on the stack
    between Lightning's hooks (``with mode:`` would not), pushing and popping itself when paused."""
    found = [getattr(torch.overrides, n, None) for n in _MODE_NAMES]
    return tuple(found) if all(callable(f) for f in found) else None  # type: ignore[return-value]


@_private(_MODE_STACK, "tracing steps (`diagnose`, `check_step(trace=True)`): pushing the tracer on torch's "
          "function-mode stack, as `torch.overrides._push_mode`, `_pop_mode`, `_get_current_function_mode`",
          "no step is traced: findings come from gradients alone (unused and detached are not told apart, and no "
          "line is named)")  # fmt: skip
def _check_mode_stack() -> str | None:
    stack = function_mode_stack()
    if stack is None:
        return f"torch.overrides lacks one of {', '.join(_MODE_NAMES)}"
    current, push, pop = stack
    mode = torch.overrides.TorchFunctionMode()
    push(mode)
    try:
        if current() is not mode:
            return "`_get_current_function_mode()` is not the mode `_push_mode` pushed"
    finally:
        pop()
    return None


_TENSOR_DATA = "torch._C.TensorBase.__dict__['data']"
#: The descriptor of ``Tensor.data``: a function mode sees a ``.data`` read as its ``__get__`` (``None`` if missing).
TENSOR_DATA: Any = getattr(torch._C, "TensorBase", object).__dict__.get("data")


@_private(_TENSOR_DATA, "naming a `.data` read as the cut of a `detached` parameter",
          "a value read through `.data` is not followed: its parameter may be reported `unused` instead of `detached`, "
          "without the line")  # fmt: skip
def _check_tensor_data() -> str | None:
    if TENSOR_DATA is None:
        return "`torch._C.TensorBase` has no `data` descriptor"
    seen: list[Any] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        _ = torch.zeros(1).data
    if not any(getattr(f, "__self__", None) is TENSOR_DATA for f in seen):
        return "a function mode no longer sees `.data` as that descriptor's `__get__`"
    return None


GRAD_MODE_FUNCTION = "_set_grad_enabled"


@_private("torch._C._set_grad_enabled", "naming a `no_grad` region as the cut (a function mode sees `no_grad` "
          "switch grad mode through `torch._C._set_grad_enabled`)",
          "a value computed under `no_grad` is not followed as a cut, so the `with torch.no_grad():` line is not "
          "named")  # fmt: skip
def _check_grad_mode_function() -> str | None:
    names: list[str] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            names.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    with Spy(), torch.no_grad():
        pass
    return None if GRAD_MODE_FUNCTION in names else f"`no_grad` shows a function mode {names}, not {GRAD_MODE_FUNCTION}"


_APPLY = "torch.autograd.Function.apply"
#: The code of ``torch.autograd.Function.apply``: its frame on the stack means a custom Function's ``forward`` runs.
FUNCTION_APPLY_CODE: Any = getattr(getattr(getattr(torch.autograd.Function, "apply", None), "__func__", None),
                                   "__code__", None)  # fmt: skip


def apply_arguments(frame: FrameType) -> tuple[Any, tuple[Any, ...]]:
    """``(the Function class, its positional arguments)`` of a ``Function.apply`` frame (its locals)."""
    local = frame.f_locals
    return local.get("cls"), tuple(local.get("args", ()))


@_private(_APPLY, "custom autograd Functions: its frame (`cls`, `*args`) says a Function's `forward` runs, whose ops "
          "cut nothing", "an op inside a custom Function's `forward` may be taken for a cut")  # fmt: skip
def _check_apply() -> str | None:
    if FUNCTION_APPLY_CODE is None:
        return "`Function.apply` is not a classmethod with Python code"
    params = list(inspect.signature(torch.autograd.Function.apply.__func__).parameters.values())  # type: ignore[attr-defined]
    if (
        not params
        or params[0].name != "cls"
        or not any(p.kind is p.VAR_POSITIONAL and p.name == "args" for p in params)
    ):
        return f"`Function.apply` takes {[p.name for p in params]}, not `(cls, *args, ...)`"
    return None


def function_node_name(function_name: str) -> str:
    """The class name autograd gives the backward node of custom Function ``function_name``."""
    return f"{function_name}Backward"


@_private("<Function>Backward", "custom autograd Functions: telling a Function's backward node by its class name",
          "a parameter cut inside a custom Function is not blamed on that Function")  # fmt: skip
def _check_function_node_name() -> str | None:
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return 2 * x

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            return 2 * g

    node = Twice.apply(torch.ones(1, requires_grad=True)).grad_fn
    name = type(node).__name__
    return None if name == function_node_name("Twice") else f"the node is a {name}, not {function_node_name('Twice')}"


#: ``torch.utils.checkpoint``'s file, whose frames run a reentrant checkpoint.
CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")
#: Backward nodes of a reentrant checkpoint: the parameters inside are linked to the graph only during backward.
REENTRANT_CHECKPOINT_NODES = frozenset({"CheckpointFunctionBackward"})


def checkpoint_arguments(frame: FrameType) -> tuple[Any, ...]:
    """The checkpointed function's arguments, from a reentrant checkpoint's ``CheckpointFunction.forward`` frame."""
    return tuple(frame.f_locals.get("args", ()))


@_private("torch.utils.checkpoint.CheckpointFunction", "reentrant activation checkpoints: the frame of its "
          "`forward(ctx, run_function, preserve_rng_state, *args)` in `torch/utils/checkpoint.py`, and its backward "
          "node `CheckpointFunctionBackward`",
          "a reentrant checkpoint is not recognised: parameters inside it may be reported as cut")  # fmt: skip
def _check_checkpoint() -> str | None:
    import torch.utils.checkpoint as ckpt

    fn = getattr(ckpt, "CheckpointFunction", None)
    if fn is None:
        return "torch.utils.checkpoint has no CheckpointFunction"
    if not ckpt.__file__.endswith(CHECKPOINT_FILE):
        return f"torch.utils.checkpoint is {ckpt.__file__}, not *{CHECKPOINT_FILE}"
    params = inspect.signature(fn.forward).parameters.values()
    if not any(p.kind is p.VAR_POSITIONAL and p.name == "args" for p in params):
        return "CheckpointFunction.forward has no `*args`"
    x = torch.ones(1, requires_grad=True)
    node = ckpt.checkpoint(torch.sin, x, use_reentrant=True).grad_fn
    if type(node).__name__ not in REENTRANT_CHECKPOINT_NODES:
        return f"a reentrant checkpoint's node is a {type(node).__name__}"
    return None


@_private("AccumulateGrad.variable", "the graph walk from the loss to the parameters it reaches (the leaf of each "
          "`AccumulateGrad` node)",
          "the graph walk finds no parameter: every missing gradient looks left over")  # fmt: skip
def _check_accumulate_grad() -> str | None:
    p = torch.nn.Parameter(torch.ones(1))
    node = p.sum().grad_fn.next_functions[0][0]  # type: ignore[union-attr]
    return None if getattr(node, "variable", None) is p else f"{type(node).__name__} has no `variable`"


#: Frames between a torch call in the user's code and a function mode's ``__torch_function__``: torch's dispatch
#: (``handle_torch_function``, the ``Tensor`` operator wrappers) and the public functional API (``F.layer_norm``).
DISPATCH_FILES = (
    os.path.join("torch", "overrides.py"),
    os.path.join("torch", "_tensor.py"),
    os.path.join("torch", "nn", "functional.py"),
    os.path.join("torch", "functional.py"),
)


@_private("torch/_tensor.py", "telling a float typed in the user's code from one computed from an escaped value "
          "(the frames of torch's dispatch, `torch/overrides.py` and `torch/_tensor.py`, are skipped)",
          "a computed float re-entering torch may be taken for a constant")  # fmt: skip
def _check_dispatch_files() -> str | None:
    root = os.path.dirname(os.path.dirname(torch.__file__))
    missing = [f for f in DISPATCH_FILES if not os.path.exists(os.path.join(root, f))]
    return f"torch has no {', '.join(missing)}" if missing else None


#: The module whose presence says ``torch.compile`` may have compiled something (loading it costs a second).
DYNAMO_MODULE = "torch._dynamo"


@_private(DYNAMO_MODULE, "running compiled code eagerly on traced steps only once `torch.compile` was used "
          "(`torch.compiler.set_stance`)", "compiled code is not run eagerly on traced steps: cuts inside it are "
          "not named")  # fmt: skip
def _check_dynamo() -> str | None:
    return None if _resolve(f"{DYNAMO_MODULE}.eval_frame.OptimizedModule") is not None else "no OptimizedModule"


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` or one of its submodules is wrapped by ``torch.compile`` (also through Lightning's
    ``trainer.fit(torch.compile(model))``, which keeps the compile arguments in ``_compiler_ctx``)."""
    if getattr(model, "_compiler_ctx", None):
        return True
    if DYNAMO_MODULE not in sys.modules:
        return False
    optimized = _resolve(f"{DYNAMO_MODULE}.eval_frame.OptimizedModule")
    if optimized is None:
        warn_missing(DYNAMO_MODULE)
        return False
    return any(isinstance(m, optimized) for m in model.modules())


@_private("LightningModule._compiler_ctx", "telling that `trainer.fit(torch.compile(model))` compiled the model, on "
          "torch < 2.6 (which cannot run compiled code eagerly for a trace)",
          "such a model is traced as if uncompiled (torch < 2.6 only)")  # fmt: skip
def _check_compiler_ctx() -> str | None:
    from lightning.pytorch import LightningModule

    return None if "_compiler_ctx" in vars(LightningModule()) else "LightningModule() has no `_compiler_ctx`"


def torch_function_disabled() -> contextlib.AbstractContextManager[Any]:
    """A block in which no torch function mode sees the ops (the dashboards' and sharded measurement's work, while
    the tracer may still be on the stack); without ``torch._C.DisableTorchFunction``, a plain block."""
    disable = getattr(torch._C, "DisableTorchFunction", None)
    if disable is None:
        warn_missing("torch._C.DisableTorchFunction")
        return contextlib.nullcontext()
    return disable()


@_private("torch._C.DisableTorchFunction", "keeping GradGuard's own tensor work (dashboards, sharded measurement) "
          "out of any torch function mode", "a function mode still on the stack sees GradGuard's own ops")  # fmt: skip
def _check_disable_torch_function() -> str | None:
    seen: list[Any] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy(), torch._C.DisableTorchFunction():
        torch.zeros(1).add(1)
    return "a function mode still sees the ops inside it" if seen else None


# ------------------------------------------------------------------------------------------------ AMP (torch)
_UNSCALES = "_step_supports_amp_scaling"


def optimizer_unscales(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales AMP gradients inside its own ``step()`` (fused optimizers): then ``GradScaler``
    skips ``unscale_``, and the gradients are still scaled when the guard reads them."""
    if _UNSCALES not in torch.amp.GradScaler.step.__code__.co_consts:
        warn_missing(f"optimizer.{_UNSCALES}")
        return False
    return bool(getattr(optimizer, _UNSCALES, False))


@_private(f"optimizer.{_UNSCALES}", "reading the AMP loss scale of fused optimizers (which unscale inside `step()`)",
          "the gradient norms of fused optimizers under AMP are logged still scaled")  # fmt: skip
def _check_unscales() -> str | None:
    if _UNSCALES not in torch.amp.GradScaler.step.__code__.co_consts:
        return f"GradScaler.step no longer reads `{_UNSCALES}`"
    fused = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
    return None if getattr(fused, _UNSCALES, None) is True else f"Adam(fused=True) has no `{_UNSCALES}` = True"


# -------------------------------------------------------------------------------------- distributed (torch)
def ddp_facts(ddp: Any) -> tuple[Any, frozenset[str], bool, bool]:
    """``(process group, names of the parameters it ignores, find_unused_parameters, static_graph)`` of a
    ``DistributedDataParallel`` wrapper. Without ``find_unused_parameters``, DDP is taken to tolerate unused
    parameters (GradGuard then never raises for a rank that skipped one)."""
    group = getattr(ddp, "process_group", None)
    find_unused = getattr(ddp, "find_unused_parameters", None)
    if group is None or find_unused is None:
        warn_missing("DistributedDataParallel internals")
    ignored = frozenset(getattr(ddp, "parameters_to_ignore", ()))
    return group, ignored, True if find_unused is None else bool(find_unused), bool(getattr(ddp, "static_graph", False))


def ddp_syncs_backward(ddp: Any) -> bool:
    """Whether DDP prepared its reducer in the forward pass, so that the coming ``backward()`` synchronises
    gradients (``require_forward_param_sync``; else ``require_backward_grad_sync``, which ``no_sync`` sets)."""
    return bool(getattr(ddp, "require_forward_param_sync", getattr(ddp, "require_backward_grad_sync", False)))


_DDP_NAMES = ("process_group", "parameters_to_ignore", "find_unused_parameters", "static_graph",
              "require_forward_param_sync", "require_backward_grad_sync")  # fmt: skip


@_private("DistributedDataParallel internals", "agreeing findings across DDP ranks: `DistributedDataParallel`'s "
          f"{', '.join(f'`{n}`' for n in _DDP_NAMES)}", "GradGuard treats the wrapper as tolerating unused parameters "
          "(no agreed raise before a rank hangs)")  # fmt: skip
def _check_ddp() -> str | None:
    from torch.nn.parallel import DistributedDataParallel

    return _missing_from_source(DistributedDataParallel, *(f"self.{n}" for n in _DDP_NAMES))


def fsdp_replicas(root: Any, world_size: int) -> float:
    """How many ranks hold each shard of an FSDP1 root (``world_size`` over its sharding group's size)."""
    strategy, size = getattr(root, "sharding_strategy", None), getattr(root, "world_size", None)
    if strategy is None or size is None:
        warn_missing("FullyShardedDataParallel internals")
        return 1.0
    from torch.distributed.fsdp import ShardingStrategy

    return world_size / (1 if strategy == ShardingStrategy.NO_SHARD else size)


@_private("FullyShardedDataParallel internals", "summing shard norms under FSDP1 `HYBRID_SHARD` "
          "(`FullyShardedDataParallel.sharding_strategy`, `.world_size`)",
          "each shard is counted once per rank: norms under HYBRID_SHARD are too large")  # fmt: skip
def _check_fsdp() -> str | None:
    import torch.distributed.fsdp._init_utils as init  # where FSDP sets the two on the module it wraps

    return _missing_from_source(init, "state.sharding_strategy =", "state.world_size =")


# --------------------------------------------------------------------------------------------- Lightning Fabric
def fabric_wrappers() -> tuple[type, type] | None:
    """Fabric's wrapper classes ``(_FabricModule, _FabricOptimizer)``, or ``None``."""
    module, optimizer = (
        _resolve("lightning.fabric.wrappers._FabricModule"),
        _resolve("lightning.fabric.wrappers._FabricOptimizer"),
    )
    if module is None or optimizer is None:
        warn_missing("lightning.fabric.wrappers")
        return None
    return module, optimizer


def compiled_inner(model: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (its ``_orig_mod``), or ``None``."""
    return getattr(model, "_orig_mod", None)


@_private("lightning.fabric.wrappers", "unwrapping Fabric's `_FabricModule` (`.module`, and `_orig_mod` of a "
          "compiled one) and `_FabricOptimizer` (`.optimizer`) in `check_fabric_step`",
          "the wrappers are checked as they are: parameter names carry `_forward_module.`")  # fmt: skip
def _check_fabric() -> str | None:
    wrappers = fabric_wrappers()
    if wrappers is None:
        return "lightning.fabric.wrappers has no _FabricModule or _FabricOptimizer"
    module, optimizer = wrappers
    return (
        _missing_attrs(module, "module")
        or _missing_attrs(optimizer, "optimizer")
        or _missing_from_source(_resolve("torch._dynamo.eval_frame.OptimizedModule"), "_orig_mod")
    )


# --------------------------------------------------------------------------------------------- Python itself
def _walk_frames(depth: int = 0) -> FrameType:
    frame = inspect.currentframe()
    for _ in range(depth + 1):
        frame = frame.f_back  # type: ignore[union-attr]
    return frame  # type: ignore[return-value]


#: ``sys._getframe``: the caller's frame without building a traceback (CPython); else walked from ``inspect``'s.
getframe: Callable[[int], FrameType] = getattr(sys, "_getframe", None) or _walk_frames


@_private("sys._getframe", "naming the user's line of a cut or a warning", "frames are found through `inspect`, "
          "much slower")  # fmt: skip
def _check_getframe() -> str | None:
    return None if getattr(sys, "_getframe", None) is not None else "sys has no _getframe"


_ORIGINAL_SHOWWARNING = warnings.showwarning


def default_showwarning() -> Callable[..., None]:
    """``warnings``' own ``showwarning`` (what prints a warning when nobody replaced it)."""
    return getattr(warnings, "_showwarning_orig", None) or _ORIGINAL_SHOWWARNING


def mark_warning_shown(frame: FrameType, message: Warning | str, category: type[Warning], module: str,
                       lineno: int) -> None:  # fmt: skip
    """Record a warning shown at ``frame``'s line in the registry of ``frame``'s module, as Python records one raised
    there, so that under the ``"default"`` action the same warning from the same line is not shown twice. Only when
    Python just recorded it in the registry of ``module`` at ``lineno`` (not under ``"always"``, which records
    nothing), with the filters' version it recorded there."""
    mode_registry = getattr(sys.modules.get(module), "__warningregistry__", None) or {}
    text = str(message) if isinstance(message, Warning) else message
    version = mode_registry.get("version")
    if version is None or not mode_registry.get((text, category, lineno)):
        return
    registry = frame.f_globals.setdefault("__warningregistry__", {})
    if registry.get("version") != version:
        registry.clear()
        registry["version"] = version
    registry[(text, category, frame.f_lineno)] = True


@_private("warnings._showwarning_orig", "showing a torch warning raised under GradGuard's tracer at the user's line, "
          "once (`warnings`' `__warningregistry__`: its `version` and `(text, category, lineno)` keys)",
          "a warning shown at the user's line under the tracer may show again on an untraced step")  # fmt: skip
def _check_warnings() -> str | None:
    if getattr(warnings, "_showwarning_orig", None) is None:
        return "warnings has no _showwarning_orig"
    registry: dict[Any, Any] = {}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("default")
        warnings.warn_explicit("probe", UserWarning, "probe.py", 7, registry=registry)
    if "version" not in registry or not registry.get(("probe", UserWarning, 7)):
        return f"a warning's registry is {registry!r}, not `version` and `(text, category, lineno)` keys"
    return None


# ------------------------------------------------------------------------------------------------ measurement (torch)
def scale_tensor(scaler: Any) -> Any:
    """``scaler._get_scale_async()``: a :class:`torch.amp.GradScaler`'s scale tensor, read without a sync (what
    torch's fused optimizers read it with), ``None`` before its first ``scale()`` or for another kind of scaler (the
    caller then reads ``get_scale()``, one sync more on CUDA)."""
    get = getattr(scaler, "_get_scale_async", None)
    return get() if callable(get) else None


@_private("GradScaler._get_scale_async", "reading the AMP loss scale in the same transfer as the norms",
          "the scale is read with `get_scale()`: one more sync per step under fp16 AMP on CUDA")  # fmt: skip
def _check_scale_async() -> str | None:
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(1))
    got = scale_tensor(scaler)
    return None if isinstance(got, torch.Tensor) and float(got) == 8.0 else f"it gave {got!r}, not the scale tensor"


def foreach_norm(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """``torch._foreach_norm(tensors, 2, dtype=dtype)`` (``clip_grad_norm_`` uses it): the L2 norm of each of
    ``tensors`` (strided, one device), computed in ``dtype`` if given, in one fused kernel per device and dtype off
    the CPU; on the CPU a loop of ``torch.linalg.vector_norm``, with the same values."""
    return torch._foreach_norm(tensors, 2, dtype=dtype)  # type: ignore[arg-type]


@_private("torch._foreach_norm", "every gradient norm off the CPU (one fused kernel per device and dtype)",
          "no gradient can be measured: the guard cannot run")  # fmt: skip
def _check_foreach_norm() -> str | None:
    norms = foreach_norm([torch.tensor([3.0, 4.0]), torch.ones(4, dtype=torch.bfloat16)], torch.float64)
    return None if [float(n) for n in norms] == [5.0, 2.0] else f"it gave {norms!r} for norms 5 and 2"


def flatten_dense(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch._C._nn.flatten_dense_tensors(tensors)`` (DDP's bucketing uses it): the values of dense ``tensors`` of
    one device and dtype as one 1-D tensor, in one allocation and one copy (``torch.cat`` of their ``reshape(-1)``
    would make a view per tensor first)."""
    return torch._C._nn.flatten_dense_tensors(tensors)


@_private("torch._C._nn.flatten_dense_tensors", "measuring the small CPU gradients together, through one copy",
          "no small CPU gradient can be measured: the guard cannot run")  # fmt: skip
def _check_flatten() -> str | None:
    flat = flatten_dense([torch.ones(2, 2), torch.zeros(3)])
    return None if flat.tolist() == [1.0] * 4 + [0.0] * 3 else f"it gave {flat.tolist()}"


def subtract_all(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    """``before[i] -= after[i]`` for every ``i``, in place, in one fused op per device and dtype
    (``torch._foreach_sub_``; the optimizers' ``foreach`` implementations use it)."""
    torch._foreach_sub_(before, after)


@_private("torch._foreach_sub_", "the update-to-weight ratios (`update_ratio=True`)",
          "`update_ratio=True` cannot run")  # fmt: skip
def _check_foreach_sub() -> str | None:
    a = [torch.ones(2)]
    subtract_all(a, [torch.ones(2) * 3])
    return None if a[0].tolist() == [-2.0, -2.0] else f"it left {a[0].tolist()}"


# ----------------------------------------------------------------------------------------------- Lightning, TensorBoard
def batches_that_stepped(trainer: Any) -> int | None:
    """The number of batches so far in which an optimizer stepped, the step Lightning logs ``self.log`` values at:
    ``trainer.fit_loop.epoch_loop._batches_that_stepped``; ``None`` without a fit loop (a stand-in Trainer)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    n = getattr(loop, "_batches_that_stepped", None)
    return n if isinstance(n, int) else None


@_private("fit_loop.epoch_loop._batches_that_stepped", "putting the dashboards at the step of the user's `self.log`",
          "the dashboards use the global step (the same with one optimizer)")  # fmt: skip
def _check_batches_that_stepped() -> str | None:
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return None if batches_that_stepped(trainer) == 0 else "a new Trainer's fit loop has no `_batches_that_stepped`"


def event_file_writer(writer: Any) -> Any:
    """A torch ``SummaryWriter``'s ``FileWriter`` (``writer.file_writer``, not documented), whose ``add_summary``
    takes a whole ``Summary``; ``None`` once the writer is closed."""
    return getattr(writer, "file_writer", None)


def record_writer(writer: Any) -> Any:
    """The ``RecordWriter`` that frames and checksums the records of a torch ``SummaryWriter``'s event file, or
    ``None``: ``writer.file_writer.event_writer._async_writer._writer`` (TensorBoard's ``EventFileWriter`` and
    ``_AsyncWriter`` keep it private; the writer thread calls its ``write``)."""
    event_writer = getattr(event_file_writer(writer), "event_writer", None)
    return getattr(getattr(event_writer, "_async_writer", None), "_writer", None)


def record_file(writer: Any) -> Any:
    """The file a TensorBoard ``RecordWriter`` writes to (``writer._writer``), or ``None`` when ``writer`` is not
    one."""
    try:
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:  # pragma: no cover - tensorboard not installed
        return None
    return writer._writer if isinstance(writer, RecordWriter) else None


@_private("SummaryWriter.file_writer.event_writer._async_writer._writer._writer",
          "one `Summary` per step for all of GradGuard's values, and the C CRC32C scoped to GradGuard's own writer",
          "each value is its own event, checksummed by TensorBoard's pure-Python CRC")  # fmt: skip
def _check_record_writer() -> str | None:
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as d:
        writer = SummaryWriter(d)
        try:
            if not callable(getattr(event_file_writer(writer), "add_summary", None)):
                return "SummaryWriter.file_writer has no add_summary"
            rw = record_writer(writer)
            if rw is None or not callable(getattr(rw, "write", None)):
                return "no RecordWriter with a `write` behind the SummaryWriter"
            return None if record_file(rw) is not None else "the RecordWriter keeps no `_writer` file"
        finally:
            writer.close()


def metric_prefix(logger: Any) -> str:
    """The prefix Lightning's ``TensorBoardLogger`` puts before the keys of ``log_metrics`` (``<prefix>-``): its
    ``prefix`` argument, kept as ``logger._prefix``; ``""`` for other loggers."""
    return getattr(logger, "_prefix", "") or ""


@_private("TensorBoardLogger._prefix", "GradGuard's tags under a `TensorBoardLogger(prefix=...)`",
          "GradGuard's tags leave out the logger's prefix")  # fmt: skip
def _check_prefix() -> str | None:
    import tempfile

    from lightning.pytorch.loggers import TensorBoardLogger

    with tempfile.TemporaryDirectory() as d:
        return None if metric_prefix(TensorBoardLogger(d, prefix="p")) == "p" else "TensorBoardLogger has no `_prefix`"
