"""The tracer: facts from the forward pass of a diagnosed step.

While it is active, :class:`Tracer` (a ``TorchFunctionMode``) sees every torch call and carries three bit masks
(bit ``i`` = parameter ``i`` of a :class:`~lightning_gradguard.params.ParamIndex`) along the dataflow:

``dep``
    parameters whose *value* flowed into the tensor, through any op, differentiable or not, including
    ``.item()``/``.tolist()``/numpy round-trips (followed by object identity and shared memory).
``grad``
    parameters that still have a gradient path to the tensor (cleared where the graph is cut).
``cuts``
    the cut sites (:class:`CutSite`) the value passed through.

A *cut site* is an op whose input had a gradient path to some parameters and whose output has none
(``.detach()``, ``.data``, ``no_grad``/``inference_mode``, a reentrant checkpoint without grad inputs,
non-differentiable ops such as ``argmax``, ``.item()``/numpy escapes, a parameter copied into a new leaf), or
an op whose derivative is zero everywhere (``round``, ``sign``, ...). Each site remembers the user's ``path:line``
(the innermost frame outside torch, lightning, torchmetrics, numpy, the standard library and this package) and
the parameters it severed. The tracer holds tensors only through weak references and forgets everything at
:meth:`Tracer.reset`.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ._frames import format_where, frame_where, is_library_file
from .params import ParamIndex

__all__ = ["CutSite", "LossFacts", "Tracer", "format_where", "is_library_file"]

_TENSOR = torch.Tensor
_DATA_DESCRIPTOR = torch._C.TensorBase.__dict__.get("data", None)
_ESCAPES = frozenset({"item", "tolist", "__float__", "__int__", "__index__", "__complex__", "numpy", "__array__"})
_ESCAPE_SPELLING = {"numpy": ".numpy()", "__array__": "np.asarray(tensor)", "item": ".item()", "tolist": ".tolist()",
                    "__float__": "float(tensor)", "__int__": "int(tensor)", "__index__": "int(tensor)",
                    "__complex__": "complex(tensor)"}  # fmt: skip
_CREATORS = frozenset({"tensor", "as_tensor", "asarray", "scalar_tensor", "from_numpy"})
_ZERO_DERIVATIVE = frozenset({"round", "round_", "floor", "floor_", "ceil", "ceil_", "trunc", "trunc_", "sign",
                              "sign_", "sgn", "sgn_", "fix", "fix_"})  # fmt: skip
_SKIP_OUTPUT = frozenset({"backward", "register_hook", "register_post_accumulate_grad_hook", "__bool__", "size",
                          "dim", "numel", "__len__", "__repr__", "__format__", "__str__"})  # fmt: skip

#: Frames of this file run a reentrant checkpoint's forward under no_grad.
_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")

#: ``.tolist()`` results are followed element by element up to this many items (a traced step stays cheap).
_MAX_ESCAPED_ITEMS = 4096


@dataclass
class CutSite:
    """A place where a gradient path to some parameters was cut.

    Attributes:
        kind: ``"detach"``, ``"data"``, ``"no_grad"``, ``"inference_mode"``, ``"checkpoint"``, ``"escape"``
            (``.item()``, ``.tolist()``, ``float()``, numpy), ``"nondiff"`` (``argmax``, comparisons, integer
            casts, ...), ``"copy"`` (a parameter's value copied into a new leaf) or ``"zero_derivative"``.
        op: the torch function's name (``"detach"``, ``"argmax"``, ``"item"``, ...).
        where: the user's ``path:line``, or ``None`` if no user frame was on the stack.
        mask: the parameters whose gradient path this site severed.
        entered: for ``no_grad``: where the no-grad region was entered.
    """

    kind: str
    op: str
    where: str | None
    mask: int = 0
    entered: str | None = None

    def describe(self) -> str:
        """What happened here, in a few words, e.g. ``"`.detach()` at model.py:42"``."""
        at = f" at {self.where}" if self.where else ""
        if self.kind == "detach":
            return f"`.{self.op}()`{at}"
        if self.kind == "data":
            return f"`.data`{at}"
        if self.kind == "no_grad":
            entered = f" (entered at {self.entered})" if self.entered and self.entered != self.where else ""
            return f"`{self.op}` under `torch.no_grad()`{at}{entered}"
        if self.kind == "inference_mode":
            return f"`{self.op}` under `torch.inference_mode()`{at}"
        if self.kind == "checkpoint":
            return f"`checkpoint(..., use_reentrant=True)`{at}, none of whose inputs requires grad"
        if self.kind == "escape":
            trip = " (a round-trip through numpy)" if self.op in ("numpy", "__array__") else ""
            return f"`{_ESCAPE_SPELLING.get(self.op, self.op)}`{at}{trip}"
        if self.kind == "copy":
            return f"a copy into a new leaf (`.requires_grad_()`){at}"
        if self.kind == "zero_derivative":
            return f"`{self.op}`{at}, whose derivative is zero everywhere"
        return f"non-differentiable `{self.op}`{at}"

    def fix(self) -> str:
        """What to change at this site, e.g. ``"remove the `.detach()`"``."""
        return {
            "detach": f"remove the `.{self.op}()`",
            "data": "use the tensor itself, not its `.data`",
            "no_grad": "move the computation out of `torch.no_grad()`",
            "inference_mode": "move the computation out of `torch.inference_mode()`",
            "checkpoint": "make an input of the checkpoint require grad, or pass `use_reentrant=False`",
            "escape": "keep the value a tensor instead of leaving torch through "
            f"`{_ESCAPE_SPELLING.get(self.op, self.op)}` and re-wrapping it",
            "copy": "use the parameter itself, not a detached copy",
            "zero_derivative": f"replace `{self.op}` by a differentiable op (e.g. a straight-through estimator)",
        }.get(self.kind, f"replace the non-differentiable `{self.op}`, or keep its result out of the loss")


@dataclass
class LossFacts:
    """What the tracer knows about one loss: the parameters its value depends on, and the cut sites it carries."""

    dep: int
    grad: int
    cuts: int


_ZERO = (0, 0, 0)


class Tracer(TorchFunctionMode):
    """Records, for a diagnosed step, the dataflow from each parameter to the loss and the sites that cut it.

    Args:
        index: the model's parameters; bit ``i`` of every mask stands for ``index.params[i]``.
        on_backward: called with the tensor whenever ``Tensor.backward`` is called while tracing (``check_step``
            uses it to see the loss; the Lightning callback uses ``on_before_backward`` instead).

    Use it as a context manager, or :meth:`start`/:meth:`stop` across hooks. ``paused = True`` makes every call
    pass straight through.
    """

    def __init__(self, index: ParamIndex, on_backward: Callable[[torch.Tensor], None] | None = None) -> None:
        super().__init__()
        self.index = index
        self.on_backward = on_backward
        self.paused = False
        self.active = False
        self._params = {id(p): i for i, p in enumerate(index.params)}
        self.reset()

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget everything recorded (call between steps)."""
        self._prov: dict[int, tuple[weakref.ref, int, int, int]] = {}
        self._escapes: dict[int, tuple[object, int, int]] = {}
        self._ptrs: dict[int, tuple[int, int]] = {}
        self._numpy = (0, 0)
        self._site_keys: dict[tuple[str, str, str | None], int] = {}
        self.sites: list[CutSite] = []
        self.seen = 0
        self._grad_off: list[tuple[FrameType | None, str | None]] = []

    @property
    def recorded(self) -> bool:
        """Something was recorded since the last :meth:`reset`."""
        return bool(self._prov or self.sites or self._escapes or self.seen or self._ptrs)

    def start(self) -> Tracer:
        """Push the mode (it stays active until :meth:`stop`)."""
        if not self.active:
            self.__enter__()
            self.active = True
        return self

    def stop(self) -> None:
        """Pop the mode if it is active; safe to call twice."""
        if self.active:
            self.active = False
            self._grad_off.clear()
            self.__exit__(None, None, None)

    # ---------------------------------------------------------------- queries
    def facts(self, t: torch.Tensor) -> LossFacts:
        """The masks the tracer carries for ``t`` (all zero for a tensor it never saw)."""
        dep, grad, cuts = self._lookup(t)
        return LossFacts(dep, grad, cuts)

    def site_bits(self, cuts: int) -> list[CutSite]:
        """The cut sites in mask ``cuts``, in the order they happened."""
        return [self.sites[i] for i in self.index.bits(cuts)]

    def culprit(self, param_bit: int, cuts: int) -> CutSite | None:
        """The site among ``cuts`` that severed parameter ``param_bit`` (the latest such one), or ``None``."""
        found = None
        for site in self.site_bits(cuts):
            if site.mask >> param_bit & 1:
                found = site
        return found

    # ---------------------------------------------------------------- internals
    def _lookup(self, t: torch.Tensor) -> tuple[int, int, int]:
        i = self._params.get(id(t))
        if i is not None:
            bit = 1 << i
            return (bit, bit if t.requires_grad else 0, 0)
        r = self._prov.get(id(t))
        if r is not None and r[0]() is t:
            return r[1], r[2], r[3]
        if self._ptrs and t.device.type == "cpu" and t.layout == torch.strided:
            try:
                hit = self._ptrs.get(t.data_ptr())
            except RuntimeError:  # tensors without storage (subclasses, functional wrappers)
                return _ZERO
            if hit is not None:
                return hit[0], 0, hit[1]
        return _ZERO

    def _record(self, t: torch.Tensor, dep: int, grad: int, cuts: int) -> None:
        if id(t) in self._params:
            return
        self._prov[id(t)] = (weakref.ref(t), dep, grad, cuts)

    def _escaped(self, obj: object) -> tuple[int, int] | None:
        hit = self._escapes.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1], hit[2]
        if isinstance(obj, (list, tuple)):
            dep = cuts = 0
            for x in obj[:_MAX_ESCAPED_ITEMS]:
                sub = self._escaped(x)
                if sub is not None:
                    dep |= sub[0]
                    cuts |= sub[1]
            return (dep, cuts) if dep else None
        if self._numpy[0] and type(obj).__module__ == "numpy":
            # A numpy value of unknown identity while model values went to numpy this step: after numpy
            # arithmetic the identity is lost, so it is taken to carry everything that went to numpy.
            return self._numpy
        return None

    def _site(self, kind: str, op: str, mask: int, frame: FrameType | None) -> int:
        where, entered = self._locate(frame, kind)
        key = (kind, op, where)
        idx = self._site_keys.get(key)
        if idx is None:
            idx = len(self.sites)
            self._site_keys[key] = idx
            self.sites.append(CutSite(kind, op, where, mask, entered))
        else:
            self.sites[idx].mask |= mask
        return 1 << idx

    def _locate(self, frame: FrameType | None, kind: str) -> tuple[str | None, str | None]:
        """The user's ``path:line`` for a site whose op was called from ``frame``."""
        entry, entered = (None, None)
        if kind == "no_grad" and self._grad_off:
            entry, entered = self._grad_off[-1]
        first_user = None
        in_checkpoint = False
        f = frame
        while f is not None:
            if entry is not None and f is entry:
                return frame_where(f), entered
            filename = f.f_code.co_filename
            if filename.endswith(_CHECKPOINT_FILE):
                in_checkpoint = True
                first_user = None
            elif first_user is None and not is_library_file(filename):
                first_user = f
                if not in_checkpoint and entry is None:
                    break
            f = f.f_back
        return (frame_where(first_user) if first_user is not None else None), entered

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901 - one hot loop, kept flat
        if kwargs is None:
            kwargs = {}
        if self.paused or torch.compiler.is_compiling():
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "_set_grad_enabled":
            return self._grad_mode(func, args, kwargs)
        if name == "backward" and self.on_backward is not None and args and isinstance(args[0], _TENSOR):
            self.on_backward(args[0])

        dep = grad = cuts = 0
        for a in args:
            if isinstance(a, _TENSOR):
                d, g, c = self._lookup(a)
                dep |= d
                grad |= g
                cuts |= c
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, _TENSOR):
                        d, g, c = self._lookup(b)
                        dep |= d
                        grad |= g
                        cuts |= c
                if self._escapes or self._numpy[0]:
                    hit = self._escaped(a)
                    if hit is not None:
                        dep |= hit[0]
                        cuts |= hit[1]
            elif self._escapes or self._numpy[0]:
                hit = self._escaped(a)
                if hit is not None:
                    dep |= hit[0]
                    cuts |= hit[1]
        for a in kwargs.values():
            if isinstance(a, _TENSOR):
                d, g, c = self._lookup(a)
                dep |= d
                grad |= g
                cuts |= c

        out = func(*args, **kwargs)
        if not (dep or cuts) or name in _SKIP_OUTPUT:
            return out
        if name == "__get__" and getattr(func, "__self__", None) is not _DATA_DESCRIPTOR:
            return out  # other attribute reads (`.grad`, `.is_cuda`, ...) carry no value
        if name in _ESCAPES:
            self.seen |= dep
            self._escape(name, out, dep, grad, cuts)
            return out
        if name == "__setitem__" and args and isinstance(args[0], _TENSOR):
            self.seen |= dep  # `t[idx] = value` writes `value` into `t`: `t` now carries both
            self._record_outputs(args[0], dep, grad, cuts, (func, name), sys._getframe(1))
            return out
        if not isinstance(out, (_TENSOR, list, tuple)):
            return out  # metadata (`is_floating_point()`, ...) carries no value
        self.seen |= dep

        frame = sys._getframe(1)
        if name in _ZERO_DERIVATIVE and grad:
            cuts |= self._site("zero_derivative", name, grad, frame)
        elif name == "requires_grad_" and not grad and (args[1:2] or [kwargs.get("requires_grad", True)])[0]:
            # A parameter's own value made into a new leaf (`p.detach().clone().requires_grad_()`): exactly one
            # parameter flows into it, with that parameter's shape. Anything else keeps its earlier cut as culprit.
            src = self.index.params[dep.bit_length() - 1] if dep and dep & (dep - 1) == 0 else None
            if src is not None and src.requires_grad and isinstance(out, _TENSOR) and out.shape == src.shape:
                cuts |= self._site("copy", name, dep, frame)
        if name in _CREATORS:
            self._record_outputs(out, dep, 0, cuts, None, frame)
            return out
        self._record_outputs(out, dep, grad, cuts, (func, name), frame)
        return out

    def _record_outputs(self, out, dep, grad, cuts, op, frame, depth=0) -> None:
        if isinstance(out, _TENSOR):
            if grad and not out.requires_grad:
                cuts |= self._cut(op, grad, frame)
                self._record(out, dep, 0, cuts)
            else:
                self._record(out, dep, grad if out.requires_grad else 0, cuts)
        elif isinstance(out, (list, tuple)) and depth < 2:
            for o in out:
                self._record_outputs(o, dep, grad, cuts, op, frame, depth + 1)

    def _cut(self, op: tuple[Any, str] | None, grad: int, frame: FrameType | None) -> int:
        func, name = op if op is not None else (None, "tensor")
        if name in ("detach", "detach_"):
            kind = "detach"
        elif name == "__get__":
            kind, name = "data", "data"
        elif torch.is_inference_mode_enabled():
            kind = "inference_mode"
        elif not torch.is_grad_enabled():
            kind = "no_grad"
            if self._in_checkpoint(frame):
                kind = "checkpoint"
        else:
            kind = "nondiff"
        return self._site(kind, name, grad, frame)

    @staticmethod
    def _in_checkpoint(frame: FrameType | None) -> bool:
        f = frame
        while f is not None:
            if f.f_code.co_filename.endswith(_CHECKPOINT_FILE):
                return True
            f = f.f_back
        return False

    def _escape(self, name: str, out: object, dep: int, grad: int, cuts: int) -> None:
        if grad:
            cuts |= self._site("escape", name, grad, sys._getframe(2))
        elif cuts:  # `.detach().numpy()` on one line is one escape, not a `.detach()` to remove
            where, _ = self._locate(sys._getframe(2), "escape")
            for idx in self.index.bits(cuts):
                site = self.sites[idx]
                if site.kind == "detach" and site.where == where:
                    del self._site_keys[(site.kind, site.op, site.where)]
                    site.kind, site.op = "escape", name
                    self._site_keys.setdefault((site.kind, site.op, site.where), idx)
        if isinstance(out, bool) or (isinstance(out, int) and -5 <= out <= 256):
            return  # interned by CPython: its identity says nothing
        self._escapes[id(out)] = (out, dep, cuts)
        if isinstance(out, list):
            stack, budget = [out], _MAX_ESCAPED_ITEMS
            while stack and budget > 0:
                for x in stack.pop()[:budget]:
                    budget -= 1
                    if isinstance(x, list):
                        stack.append(x)
                    elif isinstance(x, float):
                        self._escapes[id(x)] = (x, dep, cuts)
        elif name in ("numpy", "__array__"):
            self._numpy = (self._numpy[0] | dep, self._numpy[1] | cuts)
            try:
                ptr = out.__array_interface__["data"][0]  # type: ignore[attr-defined]
            except (AttributeError, KeyError, TypeError):
                return
            self._ptrs[ptr] = (dep, cuts)

    def _grad_mode(self, func, args, kwargs):
        enabled = bool(args[0]) if args else bool(kwargs.get("mode", True))
        if not enabled and torch.is_grad_enabled():
            frame = sys._getframe(1)
            while frame is not None and is_library_file(frame.f_code.co_filename):
                frame = frame.f_back
            self._grad_off.append((frame, frame_where(frame) if frame is not None else None))
        elif enabled and self._grad_off:
            self._grad_off.pop()
        return func(*args, **kwargs)
