"""The tracer: facts from the forward pass of a diagnosed step.

While it is active, :class:`Tracer` (a ``TorchFunctionMode``) sees every torch call and carries three bit masks
(bit ``i`` = parameter ``i`` of a :class:`~lightning_gradguard.params.ParamIndex`) along the dataflow:

``dep``
    parameters whose *value* flowed into the tensor, through any op, differentiable or not, including
    ``.item()``/``.tolist()``/numpy round-trips: followed by object identity, shared memory and, where identity is
    lost, by a per-step catch-all (see below).
``grad``
    parameters that still have a gradient path to the tensor (cleared where the graph is cut).
``cuts``
    the cut sites (:class:`CutSite`) the value passed through.

A *cut site* is an op whose input had a gradient path to some parameters and whose output has none
(``.detach()``, ``.data``, ``no_grad``/``inference_mode``, a reentrant checkpoint none of whose inputs requires grad,
non-differentiable ops such as ``argmax``, ``.item()``/numpy escapes, a parameter copied into a new leaf), an op
whose derivative is zero everywhere (``round``, ``sign``, ...), or a custom autograd Function (see below). Each
site remembers the user's ``path:line`` (the innermost frame outside torch, lightning, torchmetrics, numpy, the
standard library and this package) and the parameters it severed.

Values that leave torch are followed as far as they can be:

* the exact object ``.item()``/``.tolist()``/``float()``/``.numpy()`` returned, by identity (and the elements of a
  ``.tolist()`` list, within a budget);
* an array that shares memory with one that went to numpy (``torch.from_numpy(arr)`` after ``np.tanh(arr,
  out=arr)``), by data pointer;
* a numpy value of unknown identity (numpy arithmetic), and a tensor built by the invisible ``torch.from_numpy``
  (a CPU tensor whose storage numpy owns), carry everything that went to numpy this step;
* a Python float (or numpy scalar: ``np.float32(t.item()) * 2``) that may be arithmetic on an escaped number
  carries everything that left torch as a Python number this step, when it re-enters torch (``torch.tensor(v *
  0.5)``, ``loss * v``). Constants are not tainted: a literal of the calling code (``torch.tensor(0.5)``, ``*
  0.123456789``: in its code object's constants) never, another float with a short ``repr`` (``lr=3e-4`` from a
  config) unless an escaped number had a short repr itself (float16/bfloat16 values have few digits, and so does
  arithmetic on them; see ``Tracer._derived``);
* a tensor built by the legacy ``torch.Tensor(list)`` constructor (invisible to function modes) is matched by value
  against the Python floats that escaped;
* a new leaf that shares storage with a traced tensor (``nn.Parameter(h.detach().clone())``, built through the
  invisible ``Tensor._make_subclass``) carries that tensor's facts and a ``copy`` cut site.

Every escape is also listed in :meth:`Tracer.escapes_of`, so that a parameter whose value left torch but could
not be followed back into the loss is not reported as certainly unused.

A reentrant checkpoint (``checkpoint(fn, x, use_reentrant=True)``) runs ``fn`` under ``no_grad`` and recomputes it
with a graph during backward: when some tensor input requires grad, the ops inside carry their gradient paths as if
grad mode were on (a non-differentiable op inside still cuts); when none does, it is one ``checkpoint`` cut site,
located at the line that called ``checkpoint(...)``. A cut under ``inference_mode`` (whose entry a function mode
cannot see) inside a checkpointed function is also named at the line that called ``checkpoint(...)``.

A custom autograd Function (``torch.autograd.Function``) runs its ``forward`` with grad mode off, and autograd gives
each input of ``apply`` what ``backward`` returns for it. An op inside ``forward`` cuts nothing by itself: what it
makes is settled when ``apply`` returned it (linked to ``backward``: a gradient path to the parameters behind the
inputs that its value depends on; not differentiable: none). The Function is a site of its own, located at the
``.apply`` line: a parameter that reached the loss through it and got no gradient was given none by ``backward``
(or was used in ``forward`` without being an input), which only the gradients show, after ``backward`` ran.

Memory: across ops the tracer holds tensors and numpy arrays (whose ``.base`` may be a tensor) only through weak
references, and no stack frame (a ``no_grad`` region is remembered by its frame's ``id`` and code object). Python
numbers and lists that escaped are held until :meth:`Tracer.reset` (they hold no tensor). Everything is forgotten
at :meth:`Tracer.reset`.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _compat
from ._frames import (
    code_line,
    format_where,
    frame_where,
    is_library_file,
    user_frame,
    warnings_at_user_begin,
    warnings_at_user_end,
)
from .params import ParamIndex

__all__ = ["CutSite", "EagerStance", "LossFacts", "Tracer", "format_where", "is_library_file"]

_TENSOR = torch.Tensor
_DATA_DESCRIPTOR = _compat.TENSOR_DATA
_ESCAPES = frozenset({"item", "tolist", "__float__", "__int__", "__index__", "__complex__", "numpy", "__array__"})
_ESCAPE_SPELLING = {"numpy": ".numpy()", "__array__": "np.asarray(tensor)", "item": ".item()", "tolist": ".tolist()",
                    "__float__": "float(tensor)", "__int__": "int(tensor)", "__index__": "int(tensor)",
                    "__complex__": "complex(tensor)"}  # fmt: skip
_CREATORS = frozenset({"tensor", "as_tensor", "asarray", "scalar_tensor", "from_numpy", "full"})
#: Ops that take only a shape, dtype or device from their first argument, not its value (a fill value or data in the
#: other arguments may still flow).
_SHAPE_ONLY = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                         "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"})  # fmt: skip
#: Escapes whose result is a Python number or a list of them.
_TO_PYTHON = frozenset({"item", "tolist", "__float__", "__int__", "__index__", "__complex__"})
#: A Python float whose ``repr`` is at most this long looks like a constant typed in the code (``0.5``, ``3e-4``).
_CONSTANT_REPR = 8
#: Python floats of one list (``torch.tensor([...])``) checked against the catch-all.
_CATCH_ALL_ITEMS = 16
_ZERO_DERIVATIVE = frozenset({"round", "round_", "floor", "floor_", "ceil", "ceil_", "trunc", "trunc_", "sign",
                              "sign_", "sgn", "sgn_", "fix", "fix_"})  # fmt: skip
_SKIP_OUTPUT = frozenset({"backward", "register_hook", "register_post_accumulate_grad_hook", "__bool__", "size",
                          "dim", "numel", "__len__", "__repr__", "__format__", "__str__"})  # fmt: skip

#: Ops that need more than "one tensor out, masks of the inputs": everything else takes the fast path.
_SPECIAL = (
    _SKIP_OUTPUT | _ESCAPES | _ZERO_DERIVATIVE | _CREATORS | {"__get__", "__setitem__", "requires_grad_", "detach",
                                                               "detach_"}
)  # fmt: skip
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled

# What `Tracer.__torch_function__` does with a torch function, looked up once per function (by `_kind_of`).
_PLAIN = 0  # one or more tensors out, masks of the inputs (the fast path)
_SPECIAL_OP = 1  # see `_SPECIAL`
_PASS = 2  # no value flows (`.shape`, `.size()`, `.backward()` without a callback, ...)
_GRAD_MODE = 3  # `torch._C._set_grad_enabled` (entering or leaving `no_grad`)
_BACKWARD = 4  # `Tensor.backward`, `torch.autograd.backward`
_SHAPE = 5  # see `_SHAPE_ONLY`
#: torch function -> its kind. Torch's functions and methods live as long as torch: at most `_MAX_KINDS` entries,
#: so that functions made on the fly (rare) cannot grow it without bound.
_KINDS: dict[Any, int] = {}
_MAX_KINDS = 8192
_MODE_STACK = _compat.function_mode_stack()
_current_mode, _push_mode, _pop_mode = _MODE_STACK or (None, None, None)
_getframe = _compat.getframe

#: Frames between a torch call in the user's code and ``__torch_function__``: this file, torch's dispatch
#: (``handle_torch_function``, the ``Tensor`` operator wrappers) and the public functional API (``F.layer_norm``).
_DISPATCH_FILES = (os.path.join("lightning_gradguard", "trace.py"), *_compat.DISPATCH_FILES)
#: Frames of this file run a reentrant checkpoint's forward under no_grad.
_CHECKPOINT_FILE = _compat.CHECKPOINT_FILE

#: ``.tolist()`` results are followed element by element up to this many items (a traced step stays cheap).
_MAX_ESCAPED_ITEMS = 4096

#: Kinds of cut sites that take a value out of the graph (see ``Tracer.dropped_at``).
_DROPS = frozenset({"detach", "data", "no_grad", "inference_mode", "escape", "nondiff", "copy"})

#: The code of ``torch.autograd.Function.apply`` (a classmethod every custom Function inherits): its frame on the
#: stack means a Function's ``forward`` runs (see ``Tracer._function``); ``None`` if torch changes that.
_APPLY_CODE = _compat.FUNCTION_APPLY_CODE

#: Where a ``no_grad`` region was entered (see ``Tracer._grad_off``).
_GradOff = tuple[int, CodeType | None, int]


def _kind_of(func: Any) -> int:
    """The kind of ``func`` for :meth:`Tracer.__torch_function__` (remembered in ``_KINDS``)."""
    name = getattr(func, "__name__", "")
    if name == _compat.GRAD_MODE_FUNCTION:
        kind = _GRAD_MODE
    elif name == "backward":
        kind = _BACKWARD
    elif name in _SKIP_OUTPUT or (name == "__get__" and getattr(func, "__self__", None) is not _DATA_DESCRIPTOR):
        kind = _PASS
    elif name in _SHAPE_ONLY:
        kind = _SHAPE
    elif name in _SPECIAL:
        kind = _SPECIAL_OP
    else:
        kind = _PLAIN
    try:
        if len(_KINDS) < _MAX_KINDS:
            _KINDS[func] = kind
    except TypeError:  # an unhashable callable: classified on every call
        pass
    return kind


def _input_names(cls: Any, n: int) -> list[str | None]:
    """The names of the ``n`` inputs of custom Function ``cls`` (``forward``'s parameters after ``ctx``), or
    ``None`` for each one its signature does not name."""
    try:
        code = inspect.unwrap(cls.forward).__code__
    except (AttributeError, TypeError, ValueError):
        return [None] * n
    names: list[str | None] = list(code.co_varnames[: code.co_argcount])
    if getattr(cls, "setup_context", None) is getattr(torch.autograd.Function, "setup_context", None):
        names = names[1:]  # `forward(ctx, ...)`: no `setup_context` of its own
    return (names + [None] * n)[:n]


def _checkpoint_caller(frame: FrameType) -> FrameType | None:
    """The user frame that called ``torch.utils.checkpoint`` to run ``frame``'s function, or ``None`` if a
    checkpoint did not run it."""
    g = frame.f_back
    crossed = False
    while g is not None and is_library_file(g.f_code.co_filename):
        crossed = crossed or g.f_code.co_filename.endswith(_CHECKPOINT_FILE)
        g = g.f_back
    return g if crossed else None


@dataclass
class CutSite:
    """A place where a gradient path to some parameters was cut.

    Attributes:
        kind: ``"detach"``, ``"data"``, ``"no_grad"``, ``"inference_mode"``, ``"checkpoint"``, ``"escape"``
            (``.item()``, ``.tolist()``, ``float()``, numpy), ``"nondiff"`` (``argmax``, comparisons, integer
            casts, ...), ``"copy"`` (a parameter's value copied into a new leaf), ``"zero_derivative"``,
            ``"function"`` (a custom ``torch.autograd.Function``, whose ``backward`` gave no gradient for an input,
            or whose ``forward`` used a tensor that is not an input) or ``"function_output"`` (an output of one that
            is not differentiable).
        op: the torch function's name (``"detach"``, ``"argmax"``, ``"item"``, ...); for ``function`` sites the
            Function's class name.
        where: the user's ``path:line``, or ``None`` if no user frame was on the stack.
        mask: the parameters whose gradient path this site severed (for ``function``: that pass through it).
        entered: for ``no_grad``: where the no-grad region was entered.
        note: for ``checkpoint``: what is true of the checkpoint's inputs.
        calls: how many times the op cut a gradient path here this step.
        losses: how many losses of this step (seen by :meth:`Tracer.facts`) carry this site.
        inputs: for ``function``: per input of ``apply``, its name (``None``: unknown) and the parameters with a
            gradient path to it.
    """

    kind: str
    op: str
    where: str | None
    mask: int = 0
    entered: str | None = None
    note: str | None = None
    calls: int = 0
    losses: int = 0
    inputs: list[tuple[str | None, int]] = field(default_factory=list)

    @property
    def reused(self) -> bool:
        """One result of this ``.detach()``/``.data`` fed several losses (a GAN's ``fake.detach()`` made for the
        discriminator's loss and reused in the generator's): the cut is wanted in one of them."""
        return self.kind in ("detach", "data") and self.losses > max(self.calls, 1)

    def describe(self, bit: int | None = None) -> str:
        """What happened here, in a few words, e.g. ``"`.detach()` at model.py:42"``; ``bit``: the parameter
        asked about (a ``function`` site names the input that carried it)."""
        at = f" at {self.where}" if self.where else ""
        if self.kind == "function":
            inputs = self._inputs_of(bit)
            if not inputs:
                return (f"`{self.op}.apply`{at}, whose `forward` uses it without taking it as an input (autograd "
                        "gives gradients to the inputs of `apply` only),")  # fmt: skip
            return f"`{self.op}.apply`{at}, whose `backward` returned no gradient for its {_spell_inputs(inputs)},"
        if self.kind == "function_output":
            return (f"`{self.op}.apply`{at}, whose output used by the loss is not differentiable (marked with "
                    "`ctx.mark_non_differentiable`, or not a floating-point tensor),")  # fmt: skip
        if self.reused:
            spelled = "`.data`" if self.kind == "data" else f"`.{self.op}()`"
            return f"{spelled}{at}, whose result another loss of this step also uses (and may need detached),"
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
            note = self.note or "none of its inputs requires grad"
            return f"`checkpoint(..., use_reentrant=True)`{at}, whose forward records no graph because {note},"
        if self.kind == "escape":
            trip = " (a round-trip through numpy)" if self.op in ("numpy", "__array__") else ""
            return f"`{_ESCAPE_SPELLING.get(self.op, self.op)}`{at}{trip}"
        if self.kind == "copy":
            how = "`nn.Parameter(...)`" if self.op == "Parameter" else "`.requires_grad_()`"
            return f"a copy into a new leaf ({how}){at}"
        if self.kind == "zero_derivative":
            return f"`{self.op}`{at}, whose derivative is zero everywhere"
        return f"non-differentiable `{self.op}`{at}"

    def fix(self, bit: int | None = None) -> str:
        """What to change at this site, e.g. ``"remove the `.detach()`"`` (``bit``: see :meth:`describe`)."""
        if self.kind == "function":
            inputs = self._inputs_of(bit)
            if not inputs:
                return f"pass it to `{self.op}.apply` as an input and return its gradient from `{self.op}.backward`"
            which = " and ".join(_ordinal(i) for i, _ in inputs)
            several = len(inputs) > 1
            if all(name for _, name in inputs):
                names = " and ".join(f"`{name}`" for _, name in inputs)
                return (f"return {'gradients' if several else 'a gradient'} for {names} from `{self.op}.backward` "
                        f"(its {which} value{'s' if several else ''})")  # fmt: skip
            return f"return a gradient from `{self.op}.backward` as its {which} value{'s' if several else ''}"
        if self.kind == "function_output":
            return f"use a differentiable output of `{self.op}.apply` in the loss"
        if self.reused:
            spelled = "`.data`" if self.kind == "data" else f"`.{self.op}()`"
            return (
                f"in this loss use the tensor from before the {spelled}, not its detached result; keep the "
                f"{spelled} for the loss that needs it (e.g. the discriminator's)"
            )
        return {
            "detach": f"remove the `.{self.op}()`",
            "data": "use the tensor itself, not its `.data`",
            "no_grad": "move the computation out of `torch.no_grad()`",
            "inference_mode": "move the computation out of `torch.inference_mode()`",
            "checkpoint": "make an input of the checkpoint require grad (in `transformers`: "
            "`model.enable_input_require_grads()`), or pass `use_reentrant=False`",
            "escape": "keep the value a tensor instead of leaving torch through "
            f"`{_ESCAPE_SPELLING.get(self.op, self.op)}` and re-wrapping it",
            "copy": "use the tensor itself, not a new leaf copied from it"
            if self.op == "Parameter"
            else "use the parameter itself, not a detached copy",
            "zero_derivative": f"replace `{self.op}` by a differentiable op (e.g. a straight-through estimator)",
        }.get(self.kind, f"replace the non-differentiable `{self.op}`, or keep its result out of the loss")

    def _inputs_of(self, bit: int | None) -> list[tuple[int, str | None]]:
        """``(position, name)`` of the inputs of a ``function`` site that carried parameter ``bit``."""
        if bit is None:
            return []
        return [(i, name) for i, (name, mask) in enumerate(self.inputs) if mask >> bit & 1]


def _spell_inputs(inputs: list[tuple[int, str | None]]) -> str:
    """``[(1, "w")]`` -> ``"2nd input `w`"``; ``[(0, "x"), (1, None)]`` -> ``"1st and 2nd inputs (`x`, ...)"``."""
    if len(inputs) == 1:
        i, name = inputs[0]
        return f"{_ordinal(i)} input" + (f" `{name}`" if name else "")
    names = ", ".join(f"`{name}`" if name else "..." for _, name in inputs)
    return f"{' and '.join(_ordinal(i) for i, _ in inputs)} inputs ({names})"


def _ordinal(i: int) -> str:
    """``0`` -> ``"1st"``, ``1`` -> ``"2nd"``, ``10`` -> ``"11th"``."""
    n = i + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass
class LossFacts:
    """What the tracer knows about one loss: the parameters its value depends on, and the cut sites it carries."""

    dep: int
    grad: int
    cuts: int


_ZERO = (0, 0, 0)


class EagerStance:
    """Makes code compiled by ``torch.compile`` run eagerly between :meth:`enter` and :meth:`leave`, so that a function
    mode sees its ops: torch's ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6). The compiled code and its
    cache stay: after :meth:`leave` the next call runs it again without recompiling. :meth:`leave` restores the stance
    that was set before :meth:`enter`; both are safe to call twice.

    Nothing is done while ``torch._dynamo`` is not loaded: then nothing can have been compiled (and loading it takes
    a second).
    """

    #: torch can run compiled code eagerly on demand (``torch.compiler.set_stance``, torch >= 2.6).
    supported: bool = hasattr(torch.compiler, "set_stance")

    def __init__(self) -> None:
        self._prior: Any = None  # torch's `set_stance` object, which restores the stance from before on `__exit__`

    def enter(self) -> None:
        if self._prior is None and self.supported and _compat.DYNAMO_MODULE in sys.modules:
            self._prior = torch.compiler.set_stance("force_eager")

    def leave(self) -> None:
        prior, self._prior = self._prior, None
        if prior is not None:
            prior.__exit__(None, None, None)


class Tracer(TorchFunctionMode):
    """Records, for a diagnosed step, the dataflow from each parameter to the loss and the sites that cut it.

    Args:
        index: the model's parameters; bit ``i`` of every mask stands for ``index.params[i]``.
        on_backward: called with the tensor whenever ``Tensor.backward`` is called while tracing (``check_step``
            uses it to see the loss; the Lightning callback uses ``on_before_backward`` instead).

    Use it as a context manager, or :meth:`start`/:meth:`stop` across hooks. ``paused = True`` makes every call
    pass straight through: after :meth:`start`, the mode leaves torch's mode stack while paused (when it is on top
    of it), so that the backward pass, the optimizer step and the guard's own work pay nothing for it. While it
    records after :meth:`start`, code compiled by ``torch.compile`` runs eagerly (:class:`EagerStance`), so that the
    tracer sees its ops as in an uncompiled model.
    """

    #: torch lets the tracer stay on its function-mode stack across hooks (see :func:`_compat.function_mode_stack`);
    #: without, no step is traced.
    supported: bool = _MODE_STACK is not None

    def __init__(self, index: ParamIndex, on_backward: Callable[[torch.Tensor], None] | None = None) -> None:
        super().__init__()
        if _DATA_DESCRIPTOR is None:
            _compat.warn_missing("torch._C.TensorBase.__dict__['data']")
        if _APPLY_CODE is None:
            _compat.warn_missing("torch.autograd.Function.apply")
        self.index = index
        self.on_backward = on_backward
        self._paused = False
        self.active = False
        self._pushed = False  # on torch's mode stack because of `start()` (not because of `with tracer:`)
        self._eager = EagerStance()  # compiled code runs eagerly while the tracer records (start/stop, paused)
        self._params = {id(p): i for i, p in enumerate(index.params)}
        self.reset()

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget everything recorded (call between steps)."""
        self._prov: dict[int, tuple[weakref.ref, int, int, int]] = {}
        # id -> (the object, or a weak reference to an array; dep; cuts). Python numbers and lists hold no tensor.
        self._escapes: dict[int, tuple[object, int, int]] = {}
        self._ptrs: dict[int, tuple[int, int]] = {}  # data pointer of an escaped array -> (dep, cuts)
        # data pointer of a traced value without a gradient path -> (dep, cuts, its shape)
        self._cut_ptrs: dict[int, tuple[int, int, torch.Size]] = {}
        self._numpy = (0, 0)  # (dep, cuts) of everything that went to numpy this step
        self._pynum = (0, 0)  # (dep, cuts) of everything that left torch as a Python number this step
        self._pyvals: dict[float, tuple[int, int]] = {}  # non-integer floats that escaped, by value
        self._short_escape = False  # a float that escaped had a short repr (see `_derived`)
        self._site_keys: dict[tuple[str, str, str | None], int] = {}
        self.sites: list[CutSite] = []
        self._exits: dict[tuple[str, str | None], CutSite] = {}
        self.seen = 0
        self._escaping = False  # a value left torch this step: non-tensor arguments are worth a look
        self._losses: list[weakref.ref] = []
        # One entry per no-grad region entered from user code: (id of its frame, its code object, the instruction
        # offset it was entered at); `(0, None, -1)` for one entered with no user frame on the stack.
        self._grad_off: list[_GradOff] = []
        # The reentrant checkpoint whose forward runs now: (id of its frame, code, inputs require grad, site bit).
        self._ckpt: tuple[int, object, bool, int] | None = None
        # (kind, op, code object, instruction offset) of a cut called straight from user code -> its site (`_site`).
        self._site_memo: dict[tuple[str, str, object, int], int] = {}
        # id of a tensor made inside a custom autograd Function's forward -> (a weak reference to it, dep, grad, cuts,
        # index of the Function's site): what it carries is settled once `apply` returned (`_function_output`).
        self._fn_out: dict[int, tuple[weakref.ref, int, int, int, int]] = {}
        # Per op that was the first this step to take some parameters as arguments: (their mask, the code object and
        # instruction offset of its user frame, or `None`: no user frame). Made a `path:line` by `used_at`.
        self._uses: list[tuple[int, tuple[CodeType, int] | None]] = []
        self._used = 0  # the parameters in `_uses`

    @property
    def recorded(self) -> bool:
        """Something was recorded since the last :meth:`reset`."""
        return bool(self._prov or self.sites or self._escapes or self.seen or self._ptrs or self._exits or self._fn_out)

    @property
    def paused(self) -> bool:
        """Every call passes straight through (set it to pause and resume recording)."""
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        value = bool(value)
        if value == self._paused:
            return
        self._paused = value
        if not self.active:
            return
        if value:
            self._eager.leave()
            if self._pushed and _current_mode() is self:  # not when a mode pushed later is still above it
                _pop_mode()
                self._pushed = False
        else:
            self._eager.enter()
            if not self._pushed:
                _push_mode(self)
                self._pushed = True

    def start(self) -> Tracer:
        """Push the mode (it stays active until :meth:`stop`; while :attr:`paused`, it is off torch's mode stack)."""
        if not self.active and self.supported:
            self.active = True
            warnings_at_user_begin()  # torch's warnings from the ops it forwards name the user's line, not this file
            if not self._paused:
                self._eager.enter()
                _push_mode(self)
                self._pushed = True
        return self

    def stop(self) -> None:
        """Pop the mode if it is active; safe to call twice."""
        if self.active:
            self.active = False
            warnings_at_user_end()
            self._eager.leave()
            self._grad_off.clear()
            self._ckpt = None
            if self._pushed:
                self._pushed = False
                _pop_mode()

    # ---------------------------------------------------------------- queries
    def facts(self, t: torch.Tensor) -> LossFacts:
        """The masks the tracer carries for the loss ``t`` (all zero for a tensor it never saw).

        Each loss asked about is counted once on the cut sites it carries (:attr:`CutSite.losses`).
        """
        dep, grad, cuts = self._lookup(t)
        if cuts and not any(r() is t for r in self._losses):
            self._losses.append(weakref.ref(t))
            for site in self.site_bits(cuts):
                site.losses += 1
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

    def escapes_of(self, param_bit: int) -> list[CutSite]:
        """Where the value of parameter ``param_bit`` left torch this step (``.item()``, ``.tolist()``, numpy, ...).

        Each is an ``"escape"`` :class:`CutSite` whose ``mask`` is the parameters whose *value* left there (whether
        or not a gradient path was cut). A parameter listed here that got no gradient and that the loss is not known
        to depend on may still feed the loss through a value the tracer could not follow.
        """
        return [site for site in self._exits.values() if site.mask >> param_bit & 1]

    def used_at(self, param_bit: int) -> str | None:
        """The user's ``path:line`` of the first op that took parameter ``param_bit`` as an argument this step (for
        a module's parameter, the line that called the module), or ``None``."""
        for mask, at in self._uses:
            if mask >> param_bit & 1:
                return format_where(at[0].co_filename, code_line(*at)) if at is not None else None
        return None

    def dropped_at(self, param_bit: int) -> list[CutSite]:
        """Where the value of parameter ``param_bit`` was taken out of the graph this step: the cut sites that
        severed it (``.detach()`` or ``no_grad`` to log or measure it, ``argmax`` for a metric; not a custom
        Function or a checkpoint, which pass a value on), then the places where it left torch
        (:meth:`escapes_of`). For a parameter the loss does not depend on, evidence that its output was put to a
        use other than the loss, rather than not computed or dropped by control flow."""
        cuts = [s for s in self.sites if s.kind in _DROPS and s.mask >> param_bit & 1]
        spots = {(s.kind, s.op, s.where) for s in cuts}
        return cuts + [s for s in self.escapes_of(param_bit) if (s.kind, s.op, s.where) not in spots]

    # ---------------------------------------------------------------- internals
    def _lookup(self, t: torch.Tensor) -> tuple[int, int, int]:
        i = self._params.get(id(t))
        if i is not None:
            bit = 1 << i
            return (bit, bit if t.requires_grad else 0, 0)
        r = self._prov.get(id(t))
        if r is not None and r[0]() is t:
            return r[1], r[2], r[3]
        if self._fn_out:
            fn = self._function_output(t)
            if fn is not None:
                return fn
        hit = self._unseen(t)
        self._prov[id(t)] = (weakref.ref(t), *hit)  # a tensor first seen here keeps what it was first taken to be
        return hit

    def _unseen(self, t: torch.Tensor) -> tuple[int, int, int]:
        """Facts for a tensor no traced op made: an input, a buffer, or one built by an invisible constructor."""
        if not (self._ptrs or self._numpy[0] or self._pyvals or self._cut_ptrs):
            return _ZERO
        if t.layout != torch.strided or not (type(t) is _TENSOR or type(t) is nn.Parameter):
            return _ZERO
        try:
            ptr = t.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage (functional wrappers, meta)
            return _ZERO
        if t.requires_grad and t.is_leaf:  # a new leaf, e.g. `nn.Parameter(h.detach().clone())`
            hit = self._cut_ptrs.get(ptr)  # same memory and shape: not a later tensor that reuses freed memory
            return self._new_leaf(hit[0], hit[1]) if hit is not None and hit[2] == t.shape else _ZERO
        if t.device.type != "cpu":
            return _ZERO
        hit = self._ptrs.get(ptr)
        if hit is not None:  # memory an escaped numpy array owns or shares (`torch.from_numpy(arr)`)
            found = hit[0], 0, hit[1]
        elif self._numpy[0] and not t.untyped_storage().resizable() and not t.is_shared():
            found = self._numpy[0], 0, self._numpy[1]  # storage owned by numpy: `torch.from_numpy(np_result)`
        elif self._pyvals and t.is_floating_point() and t.numel() > 0:
            found = self._by_value(t)
        else:
            return _ZERO
        if found[0] and t.grad_fn is not None:  # built so in a custom Function's forward, returned by its `apply`
            idx = self._function_of(t.grad_fn)
            if idx is not None:
                found = self._linked(found[0], found[2], idx)
        return found

    def _new_leaf(self, dep: int, cuts: int) -> tuple[int, int, int]:
        """A leaf sharing memory with a traced value that has no gradient path: a copy of it into a new leaf."""
        where = None
        for site in self.site_bits(cuts):  # the leaf is made where its source was cut, when that is a user line
            if site.kind in ("detach", "data") and site.mask & dep:
                where = site.where
        if where is None:
            where, _ = self._locate(_getframe(4), "copy")
        key = ("copy", "Parameter", where)
        idx = self._site_keys.get(key)
        if idx is None:
            idx = len(self.sites)
            self._site_keys[key] = idx
            self.sites.append(CutSite("copy", "Parameter", where, dep))
        else:
            self.sites[idx].mask |= dep
        return dep, 0, cuts | 1 << idx

    def _by_value(self, t: torch.Tensor) -> tuple[int, int, int]:
        """A tensor of Python floats that escaped, rebuilt by a constructor the mode does not see."""
        sample = t.detach().reshape(-1)[:8].tolist()
        dep = cuts = 0
        for v in sample:
            if v == int(v) if math.isfinite(v) else True:
                continue  # 0.0, 1.0, ...: say nothing about where a value came from
            hit = self._pyvals.get(v)
            if hit is None:
                return _ZERO
            dep |= hit[0]
            cuts |= hit[1]
        return (dep, 0, cuts) if dep else _ZERO

    def _record(self, t: torch.Tensor, dep: int, grad: int, cuts: int) -> None:
        if id(t) in self._params:
            return
        self._prov[id(t)] = (weakref.ref(t), dep, grad, cuts)
        if dep and not grad:  # a value without a gradient path: a new leaf sharing its memory is a copy of it
            try:  # noqa: SIM105 - cheaper than contextlib.suppress on a hot path
                self._cut_ptrs[t.data_ptr()] = (dep, cuts, t.shape)
            except (RuntimeError, NotImplementedError):
                pass

    def _escaped(self, obj: object, depth: int = 0) -> tuple[int, int] | None:
        hit = self._escapes.get(id(obj))
        if hit is not None:
            held = hit[0]
            if (held() if isinstance(held, weakref.ref) else held) is obj:
                return hit[1], hit[2]
        if isinstance(obj, float):
            return self._pynum if self._pynum[0] and self._derived(obj) else None
        if isinstance(obj, (list, tuple)) and depth < 4:
            dep = cuts = 0
            budget = _CATCH_ALL_ITEMS
            for x in obj[:_MAX_ESCAPED_ITEMS]:
                if isinstance(x, float) and id(x) not in self._escapes:
                    if budget <= 0:
                        continue
                    budget -= 1
                sub = self._escaped(x, depth + 1)
                if sub is not None:
                    dep |= sub[0]
                    cuts |= sub[1]
            return (dep, cuts) if dep else None
        if type(obj).__module__ == "numpy":
            if self._numpy[0]:
                # A numpy value of unknown identity while model values went to numpy this step: after numpy
                # arithmetic the identity is lost, so it is taken to carry everything that went to numpy.
                return self._numpy
            # `np.float32(t.item()) * 2`: a Python number that escaped, made a numpy scalar
            kind = getattr(getattr(obj, "dtype", None), "kind", None)
            scalar = kind in ("f", "c") and getattr(obj, "shape", None) == ()
            if self._pynum[0] and scalar and self._derived(float(obj.real)):  # type: ignore[attr-defined]
                return self._pynum
        return None

    def _derived(self, v: float) -> bool:
        """Whether the Python float ``v`` (seen while Python numbers left torch this step) may be arithmetic on one
        of them, rather than a constant.

        A float that a library passes (``nn.LayerNorm``'s ``eps``, ``nn.Dropout``'s ``p``) is a constant, and so
        is a literal of the user's code calling torch (in its code object's constants: ``0.5``, ``1e-3``). So is
        any other float with a short ``repr`` (``lr=3e-4`` from a config), unless a number that escaped this step
        had a short repr itself (values from float16/bfloat16 tensors have few digits, and so does arithmetic on
        them); a longer repr is what arithmetic on an escaped float32/float64 value gives.
        """
        if not math.isfinite(v) or v == int(v):
            return False  # 0.0, 1.0, inf: say nothing about where a value came from
        if len(repr(v)) <= _CONSTANT_REPR and not self._short_escape:
            return False
        frame = _getframe(1)
        while frame is not None and frame.f_code.co_filename.endswith(_DISPATCH_FILES):
            frame = frame.f_back  # this module, torch's dispatch, and the public functional API the call went in by
        if frame is None:
            return True
        if is_library_file(frame.f_code.co_filename):
            return False  # a library's own argument (a module's `eps`), not arithmetic in the user's code
        return v not in frame.f_code.co_consts

    def _site(self, kind: str, op: str, mask: int, frame: FrameType | None) -> int:
        # A cut called straight from user code is located at that frame's line (`_locate` stops there, unless it
        # looks for a `no_grad` entry or a checkpoint's caller): a cut that repeats there (a loop, a layer called
        # per block) skips the stack walk and the path formatting. Keep in step with `_locate`.
        memo = None
        if frame is not None and kind != "inference_mode" and not (kind == "no_grad" and self._grad_off):
            code = frame.f_code
            if not is_library_file(code.co_filename):
                memo = (kind, op, code, frame.f_lasti)
                idx = self._site_memo.get(memo)
                if idx is not None:
                    site = self.sites[idx]
                    if site.kind == kind and site.op == op:  # not since made into another kind of site
                        site.mask |= mask
                        site.calls += 1
                        return 1 << idx
        where, entry = self._locate(frame, kind)
        key = (kind, op, where)
        idx = self._site_keys.get(key)
        if idx is None:
            entered = format_where(entry[1].co_filename, code_line(entry[1], entry[2])) if entry and entry[1] else None
            idx = len(self.sites)
            self._site_keys[key] = idx
            self.sites.append(CutSite(kind, op, where, mask, entered, calls=1))
        else:
            site = self.sites[idx]
            site.mask |= mask
            site.calls += 1
        if memo is not None:
            self._site_memo[memo] = idx
        return 1 << idx

    def _locate(self, frame: FrameType | None, kind: str) -> tuple[str | None, _GradOff | None]:
        """The user's ``path:line`` for a site whose op was called from ``frame``, and for a ``no_grad`` site the
        entry of its region (see ``_grad_off``), if known."""
        entry_id, entry_code, entry = None, None, None
        if kind == "no_grad" and self._grad_off:
            entry = self._grad_off[-1]
            entry_id, entry_code, _ = entry
        first_user = None
        f = frame
        while f is not None:
            if entry_id is not None and id(f) == entry_id and f.f_code is entry_code:
                return frame_where(f), entry
            if first_user is None and not is_library_file(f.f_code.co_filename):
                first_user = f
                if entry_id is None:
                    break
            f = f.f_back
        if kind == "inference_mode" and first_user is not None:
            # The mode's entry is invisible to a function mode. A function run by `checkpoint(fn, ...)` was most
            # likely called inside the mode, not the other way round: name the line that called `checkpoint`.
            first_user = _checkpoint_caller(first_user) or first_user
        return (frame_where(first_user) if first_user is not None else None), entry

    def _scan(self, a: object) -> tuple[int, int, int]:
        """(dep, grad, cuts) of one argument of a torch call."""
        if isinstance(a, _TENSOR):
            return self._lookup(a)
        dep = grad = cuts = 0
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, _TENSOR):
                    d, g, c = self._lookup(b)
                    dep |= d
                    grad |= g
                    cuts |= c
        if self._escaping:
            hit = self._escaped(a)
            if hit is not None:
                dep |= hit[0]
                cuts |= hit[1]
        return dep, grad, cuts

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901 - one hot loop, kept flat
        if self._paused or _is_compiling():
            return func(*args, **kwargs) if kwargs else func(*args)
        kind = _KINDS.get(func)
        if kind is None:
            kind = _kind_of(func)
        if kind:  # not a plain op
            if kind == _PASS:
                return func(*args, **kwargs) if kwargs else func(*args)  # no value flows: `.shape`, `.size()`, ...
            if kind == _GRAD_MODE:
                return self._grad_mode(func, args, kwargs or {})
            if kind == _BACKWARD:
                if self.on_backward is not None and args and isinstance(args[0], _TENSOR):
                    self.on_backward(args[0])
                return func(*args, **kwargs) if kwargs else func(*args)
            if kind == _SHAPE:
                return self._shape_only(func, args, kwargs)
            name = getattr(func, "__name__", "")
        else:
            name = ""

        # The masks of the inputs: parameters and traced tensors inline (the common case), the rest in `_lookup`.
        params = self._params
        prov = self._prov
        escaping = self._escaping
        dep = grad = cuts = direct = 0  # direct: the parameters among the arguments (see `_note_use`)
        for a in args:
            if isinstance(a, _TENSOR):
                i = params.get(id(a))
                if i is not None:
                    bit = 1 << i
                    dep |= bit
                    if a.requires_grad:
                        grad |= bit
                    direct |= bit
                    continue
                r = prov.get(id(a))
                if r is not None and r[0]() is a:
                    dep |= r[1]
                    grad |= r[2]
                    cuts |= r[3]
                    continue
                d, g, c = self._lookup(a)
            elif escaping or isinstance(a, (list, tuple)):
                d, g, c = self._scan(a)
                if d & ~self._used and isinstance(a, (list, tuple)):  # maybe a new parameter in it (an RNN's
                    for b in a:  # `_flat_weights`), or only values computed from one
                        i = params.get(id(b))
                        if i is not None:
                            direct |= 1 << i
            else:
                continue
            dep |= d
            grad |= g
            cuts |= c
        if kwargs:
            for a in kwargs.values():
                if isinstance(a, _TENSOR):
                    i = params.get(id(a))
                    if i is not None:
                        direct |= 1 << i
                    d, g, c = self._lookup(a)
                elif escaping and isinstance(a, (float, list, tuple)):
                    d, g, c = self._scan(a)
                else:
                    continue
                dep |= d
                grad |= g
                cuts |= c
            out = func(*args, **kwargs)
        else:
            out = func(*args)
        if direct and direct & ~self._used:
            self._note_use(direct & ~self._used, out, _getframe(1))
        if not (dep or cuts):
            return out
        if not kind:
            if isinstance(out, _TENSOR):  # the common case: one tensor out of a plain op
                self.seen |= dep
                if _grad_enabled():  # (off: maybe in a custom Function's forward, see `_record_outputs`)
                    if out.requires_grad:
                        if id(out) not in params:
                            prov[id(out)] = (weakref.ref(out), dep, grad, cuts)
                        return out
                    if not grad:
                        self._record(out, dep, 0, cuts)  # also remembers its memory (for a copy into a new leaf)
                        return out
                elif not grad and self._in_no_grad():  # a value already cut, under the user's `no_grad`
                    self._record(out, dep, 0, cuts)
                    return out
            name = getattr(func, "__name__", "")
            if isinstance(out, _TENSOR):
                self._record_outputs(out, dep, grad, cuts, (func, name), _getframe(1))
                return out
        if name in _ESCAPES:
            self.seen |= dep
            self._escape(name, out, dep, grad, cuts)
            return out
        if name == "__setitem__" and args and isinstance(args[0], _TENSOR):
            self.seen |= dep  # `t[idx] = value` writes `value` into `t`: `t` now carries both
            self._record_outputs(args[0], dep, grad, cuts, (func, name), _getframe(1))
            return out
        if not isinstance(out, (_TENSOR, list, tuple)):
            return out  # metadata (`is_floating_point()`, ...) carries no value
        self.seen |= dep

        frame = _getframe(1)
        if name in _ZERO_DERIVATIVE and grad and (_grad_enabled() or self._function(frame) is None):
            cuts |= self._site("zero_derivative", name, grad, frame)
        elif name == "requires_grad_" and not grad and (args[1:2] or [(kwargs or {}).get("requires_grad", True)])[0]:
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

    def _shape_only(self, func: Any, args: tuple, kwargs: dict | None) -> Any:
        """``zeros_like(t)``, ``t.new_ones(...)``, ``t.new_full(size, v)``: ``t`` gives a shape, dtype or device,
        not its value (a module whose output is only used this way is unused, not detached); a fill value or data
        in the other arguments may still carry facts (an escaped number, a tensor copied by ``new_tensor``)."""
        out = func(*args, **kwargs) if kwargs else func(*args)
        dep = cuts = 0
        others = [v for k, v in kwargs.items() if k != "input"] if kwargs else []
        for a in (*args[1:], *others):
            d, _, c = self._scan(a)
            dep |= d
            cuts |= c
        if dep or cuts:
            self.seen |= dep
            self._record_outputs(out, dep, 0, cuts, None, _getframe(1))
        return out

    def _record_outputs(self, out, dep, grad, cuts, op, frame, depth=0) -> None:
        if isinstance(out, _TENSOR):
            if not _grad_enabled() and id(out) not in self._params:
                fn = self._function(frame)
                if fn is not None:  # made in a custom Function's forward: its backward decides, not this op
                    self.sites[fn].mask |= grad
                    self._fn_out[id(out)] = (weakref.ref(out), dep, grad, cuts, fn)
                    return
            if grad and not out.requires_grad:
                if op is not None and self._through_checkpoint(out, op[1], frame):
                    self._record(out, dep, grad, cuts)
                    return
                cuts |= self._cut(op, grad, frame)
                self._record(out, dep, 0, cuts)
            else:
                self._record(out, dep, grad if out.requires_grad else 0, cuts)
        elif isinstance(out, (list, tuple)) and depth < 2:
            for o in out:
                self._record_outputs(o, dep, grad, cuts, op, frame, depth + 1)

    def _function(self, frame: FrameType | None) -> int | None:
        """The index of the site of the custom autograd Function (``torch.autograd.Function``) whose ``forward``
        runs the op called from ``frame`` (made on first sight), or ``None``.

        Autograd runs a Function's ``forward`` with grad mode off and links its outputs to its ``backward``: an op
        in there cuts nothing by itself. The ``apply`` that autograd differentiates is the outermost one on the stack
        (another ``apply`` inside a ``forward`` runs with grad mode off), unless grad mode was switched off around it
        (a ``no_grad`` region: its ops are cut as usual). A reentrant checkpoint is a Function too, handled by
        :meth:`_checkpoint`: when some input of it requires grad, the backward recompute differentiates the next
        ``apply`` inside it; when none does, the checkpoint cuts.
        """
        if _APPLY_CODE is None or torch.is_inference_mode_enabled():
            return None
        if self._in_no_grad():  # grad mode was switched off around it: no walk per op under `no_grad`
            return None
        applies: list[tuple[FrameType, FrameType | None]] = []  # (`apply`'s frame, the `forward` it called)
        f, below = frame, None
        while f is not None:
            if f.f_code is _APPLY_CODE:
                applies.append((f, below))
            below, f = f, f.f_back
        for apply, forward in reversed(applies):
            if forward is not None and forward.f_code.co_filename.endswith(_CHECKPOINT_FILE):
                ckpt = self._checkpoint(forward)
                if ckpt is None or not ckpt[2]:
                    return None
                continue
            return self._function_site(apply)
        return None

    def _in_no_grad(self) -> bool:
        """Grad mode is off because the user's code switched it off (``no_grad``), in a frame still running: a region
        is left, and its entry popped by :meth:`_grad_mode`, before the frame that entered it returns."""
        return bool(self._grad_off) and self._grad_off[-1][1] is not None

    def _function_site(self, apply: FrameType) -> int:
        """The site of the Function whose ``apply`` runs in frame ``apply``; adds what reaches each of its inputs."""
        cls, args = _compat.apply_arguments(apply)
        name = getattr(cls, "__name__", "Function")
        where, _ = self._locate(apply.f_back, "function")
        key = ("function", name, where)
        idx = self._site_keys.get(key)
        if idx is None:
            idx = len(self.sites)
            self._site_keys[key] = idx
            self.sites.append(CutSite("function", name, where, calls=1))
        site = self.sites[idx]
        if len(site.inputs) < len(args):
            names = _input_names(cls, len(args))
            site.inputs += [(names[i], 0) for i in range(len(site.inputs), len(args))]
        for i, a in enumerate(args):
            if isinstance(a, _TENSOR):
                g = self._lookup(a)[1]
                if g:
                    site.inputs[i] = (site.inputs[i][0], site.inputs[i][1] | g)
                    site.mask |= g
        return idx

    def _function_output(self, t: torch.Tensor) -> tuple[int, int, int] | None:
        """The facts of ``t``, made in a custom Function's ``forward`` (``None``: it was not). Once ``apply``
        returned, ``t`` has a gradient path to the parameters behind the inputs of ``apply`` that its value depends
        on when autograd linked it to the Function's ``backward`` (whether ``backward`` gives each input a gradient
        is known only after it ran: the Function's site is then the culprit), and none when it is not
        differentiable; inside ``forward`` it keeps what it was made with."""
        entry = self._fn_out.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        ref, dep, grad, cuts, idx = entry
        site = self.sites[idx]
        if t.requires_grad:
            hit = self._linked(dep, cuts, idx)
        elif _grad_enabled():  # after `apply`: an output it did not make differentiable
            inputs = 0
            for _, mask in site.inputs:
                inputs |= mask
            key = ("function_output", site.op, site.where)
            out = self._site_keys.get(key)
            if out is None:
                out = len(self.sites)
                self._site_keys[key] = out
                self.sites.append(CutSite("function_output", site.op, site.where))
            self.sites[out].mask |= grad | dep & inputs
            hit = (dep, 0, cuts | 1 << out)
        else:
            return dep, grad, cuts  # still inside `forward`
        del self._fn_out[id(t)]
        self._prov[id(t)] = (ref, *hit)
        return hit

    def _linked(self, dep: int, cuts: int, idx: int) -> tuple[int, int, int]:
        """The facts of an output of the Function of site ``idx`` that autograd linked to its ``backward``: a
        gradient path to the parameters behind the Function's inputs that its value depends on."""
        inputs = 0
        for _, mask in self.sites[idx].inputs:
            inputs |= mask
        return dep, dep & inputs, cuts | 1 << idx

    def _function_of(self, node: object) -> int | None:
        """The latest site of the custom Function whose backward node ``node`` is (autograd names its class
        ``<Function>Backward``), or ``None``."""
        name = type(node).__name__
        for idx in range(len(self.sites) - 1, -1, -1):
            site = self.sites[idx]
            if site.kind == "function" and name == _compat.function_node_name(site.op):
                return idx
        return None

    def _note_use(self, fresh: int, out: object, frame: FrameType | None) -> None:
        """Remember the user's line of the op called from ``frame`` that took the parameters in mask ``fresh`` among
        its arguments, the first this step to take them (for a module, the line that called it); an in-place op on
        the parameter itself (``w.zero_()``) does not count.

        Kept as the code and instruction offset of the user's frame (the one ``_locate`` names), once per op;
        :meth:`used_at` (a finding's) makes them a ``path:line``: a frame's ``f_lineno`` scans its code's line table
        (microseconds in a long ``forward``), and most steps have no finding to name."""
        i = self._params.get(id(out))
        if i is not None:
            fresh &= ~(1 << i)
            if not fresh:
                return
        f = user_frame(frame)
        self._uses.append((fresh, (f.f_code, f.f_lasti) if f is not None else None))
        self._used |= fresh

    def _through_checkpoint(self, out: torch.Tensor, name: str, frame: FrameType | None) -> bool:
        """``out`` was made inside a reentrant checkpoint some of whose inputs require grad, by an op that the
        backward recompute differentiates: its gradient path is kept."""
        if torch.is_grad_enabled() or torch.is_inference_mode_enabled() or name in ("detach", "detach_", "__get__"):
            return False  # (under inference_mode the checkpoint's output has no graph, so nothing is recomputed)
        ckpt = self._checkpoint(frame)
        return ckpt is not None and ckpt[2] and (out.is_floating_point() or out.is_complex())

    def _checkpoint(self, frame: FrameType | None) -> tuple[int, object, bool, int] | None:
        """The reentrant checkpoint whose forward ``frame`` runs in (computed once per checkpoint call), or ``None``.

        ``CheckpointFunction.forward`` runs the checkpointed function under ``no_grad``: found on the stack, its
        ``args`` say whether an input requires grad.
        """
        f = frame
        while f is not None:
            code = f.f_code
            if code.co_filename.endswith(_CHECKPOINT_FILE) and code.co_name == "forward":
                break
            f = f.f_back
        else:
            return None
        ckpt = self._ckpt
        if ckpt is not None and ckpt[0] == id(f) and ckpt[1] is f.f_code:
            return ckpt
        inputs = [a for a in _compat.checkpoint_arguments(f) if isinstance(a, _TENSOR)]
        through = any(a.requires_grad for a in inputs)
        bit = 0
        if not through:
            caller = user_frame(f.f_back)
            where = frame_where(caller) if caller is not None else None
            dep = 0
            for a in inputs:
                dep |= self._lookup(a)[0]
            note = {0: "it has no tensor input", 1: "its only tensor input does not require grad"}.get(
                len(inputs), f"none of its {len(inputs)} tensor inputs requires grad"
            )
            if any(not self.index.params[b].requires_grad for b in self.index.bits(dep)):
                note += " (computed from frozen parameters)"
            elif dep:
                note += " (computed from parameters through a cut gradient path)"
            key = ("checkpoint", "checkpoint", where)
            idx = self._site_keys.get(key)
            if idx is None:
                idx = len(self.sites)
                self._site_keys[key] = idx
                self.sites.append(CutSite("checkpoint", "checkpoint", where, 0, None, note))
            bit = 1 << idx
        self._ckpt = ckpt = (id(f), f.f_code, through, bit)
        return ckpt

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
            ckpt = self._checkpoint(frame)
            if ckpt is not None:
                if ckpt[2]:  # grad inputs: only a non-differentiable op inside cuts
                    kind = "nondiff"
                else:
                    site = self.sites[ckpt[3].bit_length() - 1]
                    site.mask |= grad
                    return ckpt[3]
        else:
            kind = "nondiff"
        return self._site(kind, name, grad, frame)

    def _escape(self, name: str, out: object, dep: int, grad: int, cuts: int) -> None:
        self._escaping = True
        frame = _getframe(2)
        if grad and (_grad_enabled() or self._function(frame) is None):  # (a custom Function's backward decides)
            cuts |= self._site("escape", name, grad, frame)
        elif cuts:  # `.detach().numpy()` on one line is one escape, not a `.detach()` to remove
            where, _ = self._locate(frame, "escape")
            for idx in self.index.bits(cuts):
                site = self.sites[idx]
                if site.kind == "detach" and site.where == where:
                    # the `.detach()` key stays on this site: the next `.detach()` at this line (a loop) counts here
                    site.kind, site.op = "escape", name
                    self._site_keys.setdefault((site.kind, site.op, site.where), idx)
        where, _ = self._locate(frame, "escape")
        exit_ = self._exits.get((name, where))
        if exit_ is None:
            self._exits[(name, where)] = CutSite("escape", name, where, dep)
        else:
            exit_.mask |= dep
        if name in _TO_PYTHON:
            self._pynum = (self._pynum[0] | dep, self._pynum[1] | cuts)
        if isinstance(out, bool) or (isinstance(out, int) and -5 <= out <= 256):
            return  # interned by CPython: its identity says nothing
        if name in ("numpy", "__array__"):
            self._numpy = (self._numpy[0] | dep, self._numpy[1] | cuts)
            try:
                self._escapes[id(out)] = (weakref.ref(out), dep, cuts)  # an array's `.base` may be the tensor
                ptr = out.__array_interface__["data"][0]  # type: ignore[attr-defined]
            except (AttributeError, KeyError, TypeError):
                return
            self._ptrs[ptr] = (dep, cuts)
            return
        self._escapes[id(out)] = (out, dep, cuts)
        if isinstance(out, float):
            self._remember_value(out, dep, cuts)
        elif isinstance(out, list):
            stack, budget = [out], _MAX_ESCAPED_ITEMS
            while stack and budget > 0:
                for x in stack.pop()[:budget]:
                    budget -= 1
                    if isinstance(x, list):
                        stack.append(x)
                    elif isinstance(x, float):
                        self._escapes[id(x)] = (x, dep, cuts)
                        self._remember_value(x, dep, cuts)

    def _remember_value(self, v: float, dep: int, cuts: int) -> None:
        if len(repr(v)) <= _CONSTANT_REPR:
            self._short_escape = True  # a half-precision value, or a round one: short reprs prove nothing now
        if math.isfinite(v) and v != int(v):
            old = self._pyvals.get(v)
            self._pyvals[v] = (dep, cuts) if old is None else (old[0] | dep, old[1] | cuts)

    def _grad_mode(self, func, args, kwargs):
        self._ckpt = None  # a checkpoint's forward leaves its `no_grad` here: look again at the next one
        enabled = bool(args[0]) if args else bool(kwargs.get("mode", True))
        if not enabled and torch.is_grad_enabled():
            frame = user_frame(_getframe(1))
            if frame is None:
                self._grad_off.append((0, None, -1))
            else:  # (made a `path:line` only for a cut under it: `_locate`)
                self._grad_off.append((id(frame), frame.f_code, frame.f_lasti))
        elif enabled and self._grad_off:
            self._grad_off.pop()
        return func(*args, **kwargs)
