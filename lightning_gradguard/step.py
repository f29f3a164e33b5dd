"""``check_step``: the guard for plain PyTorch training loops."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode

from ._frames import user_stacklevel, warnings_at_user_begin, warnings_at_user_end
from .core import GuardCore
from .findings import Finding
from .measure import amp_scale
from .options import DEFAULT_ACTIONS, check_globs
from .policy import GradGuardWarning, Policy

__all__ = ["check_step"]

OptimizerArg = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


class check_step:  # noqa: N801 - used like a function: `with check_step(model, opt):`
    """Check one training step of a plain PyTorch loop: every parameter the optimizer steps must get a usable
    gradient.

    Run the forward pass, the loss and ``backward()`` inside the block, and ``optimizer.step()`` too where you can.
    The step is traced, so a parameter without a gradient is classified (``frozen``, ``unused``, ``detached``,
    ``zero``, ``nonfinite``, ``orphan``, ``stale``) and a detached one names the line that cut its gradient path.

    When the check runs:

    * just before each ``step()`` in the block of a given optimizer (with ``optimizer=None``: of any optimizer),
      over that optimizer's parameters. With several optimizers (a GAN), each judges its own parameters;
    * when the block ends, for each given optimizer that did not step although ``backward()`` ran in the block
      (``optimizer.step()`` comes after the block, say). With ``optimizer=None`` and no optimizer stepping, the
      model's trainable parameters are judged. With gradient accumulation, put the whole accumulation window in
      one block: a block per micro-batch judges each micro-batch's gradients on their own;
    * ``orphan`` and ``stale`` when the block ends, against every optimizer given or seen stepping in it: a
      parameter that any of them holds is never an orphan (an orphan's gradient is still there then, since no
      ``optimizer.zero_grad()`` clears it; a ``model.zero_grad()`` inside the block would);
    * with a ``scaler``, a step the :class:`torch.amp.GradScaler` skips (``scaler.step(opt)`` found inf/NaN) is
      judged at ``scaler.step``: its non-finite gradients are an overflow and stay silent while the loss scale is
      above 1; once the scale has fallen to 1 or below they are ``nonfinite`` (as in :class:`GradGuard`).
      Without ``scaler``, a step the scaler skipped counts as not taken and is judged when the block ends.

    Code compiled by ``torch.compile`` runs eagerly inside a traced block (torch >= 2.6), so that the trace sees it and
    a cut in it is named as in an uncompiled model. A block in which no ``backward()`` ran warns
    (:class:`~lightning_gradguard.GradGuardWarning`) instead of passing silently. A loss without a graph raises
    :class:`~lightning_gradguard.GradGuardError` at ``backward()`` (torch would fail there anyway), naming the
    parameters that were cut and where.

    Args:
        model: the model whose parameters are checked.
        optimizer: the optimizer that steps them, or a list of them; ``None``: any optimizer that steps inside the
            block.
        scaler: the :class:`torch.amp.GradScaler` of a mixed-precision loop, if any. While the block runs,
            ``scaler.step`` is wrapped (and restored afterwards) to see the steps it skips.
        strict: raise :class:`~lightning_gradguard.GradGuardError` for findings whose default action is
            ``"raise"`` (unused, detached, stale, nonfinite). Otherwise every finding is a warning.
        ignore: fnmatch globs on parameter names never to report.
        step: the step number the findings carry.
        trace: trace the forward pass (needed to tell ``detached`` from ``unused`` and to name the line).

    Raises:
        TypeError: ``model``, ``optimizer`` or ``scaler`` is of the wrong type.
        ValueError: ``ignore`` is not a list of glob strings, or ``optimizer`` is an empty list.

    Example::

        >>> import torch
        >>> from lightning_gradguard import check_step
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with check_step(model, opt) as chk:
        ...     loss = model(torch.randn(2, 4)).sum()
        ...     loss.backward()
        ...     opt.step()
        >>> chk.findings
        []
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerArg = None,
        *,
        scaler: Any = None,
        strict: bool = False,
        ignore: Sequence[str] | None = None,
        step: int = 0,
        trace: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`check_step(model={model!r})` must be a `torch.nn.Module`.")
        if scaler is not None and not (callable(getattr(scaler, "step", None)) and hasattr(scaler, "get_scale")):
            raise TypeError(f"`check_step(scaler={scaler!r})` must be a `torch.amp.GradScaler` or None.")
        actions = DEFAULT_ACTIONS if strict else dict.fromkeys(DEFAULT_ACTIONS, "warn")
        policy = Policy(actions, check_globs("check_step", ignore))
        self.model = model
        self.optimizer = optimizer
        self.optimizers: list[torch.optim.Optimizer] = _as_optimizers(optimizer)
        self.scaler = scaler
        self.strict = strict
        self.step = step
        self.trace = trace
        self._core = GuardCore(policy, "always" if trace else "never")
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._post: torch.utils.hooks.RemovableHandle | None = None
        self._spy: _BackwardSpy | None = None
        self._scaler_had_step: tuple[bool, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._backwards = 0
        self._step_calls = 0
        self._seen: list[torch.optim.Optimizer] = []  # every optimizer that stepped (or was skipped) in the block
        self._judged: set[int] = set()  # ids of the given optimizers (or, without any, seen ones) already judged
        self._measured = False  # a check in the block judged gradients
        self._skipped = False  # a check in the block found no gradient to judge (the optimizer stepped without any)

    @property
    def findings(self) -> list[Finding]:
        """Every finding of the block (each once)."""
        return self._core.findings

    @property
    def report(self):  # noqa: ANN201 - RunReport, imported lazily in docs
        """The :class:`~lightning_gradguard.report.RunReport` of the block."""
        return self._core.report

    # ------------------------------------------------------------------ the block
    def __enter__(self) -> check_step:
        self._reset()
        core = self._core
        core.bind(self.model, on_backward=self._record_backward)
        self._handle = register_optimizer_step_pre_hook(self._before_step)  # every optimizer: the ones seen matter too
        self._post = register_optimizer_step_post_hook(self._after_step)
        if self.scaler is not None:
            self._wrap_scaler()
        core.begin_batch()
        if not core.tracing:  # trace=False (or torch < 2.6 and a compiled model): no tracer, but backward must be seen
            self._spy = _BackwardSpy(self._record_backward)
            self._spy.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        core = self._core
        self._unhook()
        if exc_type is not None:
            core.abort()
            self._seen = []
            return
        core.end_batch(forget=False)  # the optimizers that did not step are judged below, on the same losses
        try:
            if self._backwards:
                self._judge_unstepped()
            else:
                self._warn_no_backward()
            known = _unique([*self.optimizers, *self._seen])
            if known:  # orphans and stale tensors, once every optimizer of the block is known
                core.check([], self.step, optimizers=known)
            core.finish(self.step)
        finally:
            core.abort()
            self._seen = []  # hold no optimizer (nor its tensors) the user did not give past the block

    def _unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._post is not None:
            self._post.remove()
            self._post = None
        if self._spy is not None:
            self._spy.__exit__(None, None, None)
            self._spy = None
        if self._scaler_had_step is not None:
            had, previous = self._scaler_had_step
            if had:
                self.scaler.step = previous
            else:
                del self.scaler.step
            self._scaler_had_step = None

    # ------------------------------------------------------------------ events
    def _record_backward(self, loss: torch.Tensor) -> None:
        self._backwards += 1
        self._core.record_loss(loss, self.step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self._step_calls += 1
        self._core.pause()  # the optimizer's step is not part of the forward pass: the tracer leaves torch's modes
        self._judge(optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self._core.resume()  # more forward passes may follow in the same block

    def _wrap_scaler(self) -> None:
        scaler = self.scaler
        self._scaler_had_step = ("step" in vars(scaler), vars(scaler).get("step"))
        original: Callable[..., Any] = scaler.step

        def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            before = self._step_calls
            out = original(optimizer, *args, **kwargs)
            if self._step_calls == before:  # the scaler found inf/NaN and skipped `optimizer.step()`
                self._judge(optimizer, skipped=True)
            return out

        scaler.step = step

    # ------------------------------------------------------------------ judging
    def _judge(self, optimizer: torch.optim.Optimizer, *, skipped: bool = False) -> None:
        """Judge ``optimizer``'s parameters now (it is about to step, or the scaler skipped it)."""
        if not any(_same(optimizer, o) for o in self._seen):
            self._seen.append(optimizer)
        target = self._target(optimizer)
        if target is None:  # an optimizer the user did not ask about: only seen, for the orphan check
            return
        self._judged.add(id(target))
        # (a skipped step's gradients were unscaled: only a fused optimizer unscales in `step()`, which then runs)
        scaler, scale = amp_scale(self.scaler, optimizer)
        core = self._core
        core.pause()
        try:
            stats = core.check(core.params_of(optimizer), self.step, scaler=scaler, scale=scale)
            self._skipped = self._skipped or stats.skipped
            self._measured = self._measured or not stats.skipped
        finally:
            if skipped:  # no `optimizer.step()` ran, so no post-step hook will resume the tracer
                core.resume()

    def _judge_unstepped(self) -> None:
        """At the block's end, after a backward: judge the given optimizers that did not step."""
        core = self._core
        if self.optimizers:
            todo = [opt for opt in self.optimizers if id(opt) not in self._judged]
        else:
            todo = [] if self._seen else [None]  # None: the model's trainable parameters
        if not todo:
            return
        scaler, scale = amp_scale(self.scaler, None)  # `scaler.step` has not unscaled them
        context = (
            f"Parameters got no usable gradient at step {self.step}, judged when the `check_step` block ended "
            "because no optimizer.step() ran inside it"
        )
        if scaler is None:
            context += " (if a GradScaler skipped that step, pass `check_step(..., scaler=scaler)`)"
        for opt in todo:
            params = [p for p in self.model.parameters() if p.requires_grad] if opt is None else core.params_of(opt)
            core.check(params, self.step, scaler=scaler, scale=scale, context=context)

    def _target(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
        if not self.optimizers:
            return optimizer
        return next((o for o in self.optimizers if _same(optimizer, o)), None)

    def _warn_no_backward(self) -> None:
        if self._measured:
            what = (
                "an optimizer stepped on gradients computed before the block, so they were judged without knowing "
                "what cut them"
            )
        elif self._skipped:
            what = "an optimizer stepped, but none of its parameters had a gradient, so nothing was checked"
        else:
            what = "nothing was checked"
        warnings.warn(
            f"GradGuard: no `backward()` ran inside `check_step(...)`: {what}. Put the forward pass, the loss and "
            "`loss.backward()` inside the `with check_step(...)` block.",
            GradGuardWarning,
            stacklevel=user_stacklevel(2),
        )


class _BackwardSpy(TorchFunctionMode):
    """Sees ``Tensor.backward`` / ``torch.autograd.backward`` when the forward pass is not traced."""

    def __init__(self, on_backward: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.on_backward = on_backward

    def __enter__(self) -> _BackwardSpy:
        warnings_at_user_begin()  # torch's warnings from the ops it forwards name the user's line, not this file
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            warnings_at_user_end()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if getattr(func, "__name__", "") == "backward" and args:
            first = args[0]
            for t in first if isinstance(first, (list, tuple)) else (first,):
                if isinstance(t, torch.Tensor):
                    self.on_backward(t)
        return func(*args, **(kwargs or {}))


def _same(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    """The same optimizer, also through a wrapper that shares its param groups (Lightning Fabric's)."""
    return a is b or a.param_groups is b.param_groups


def _unique(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    out: list[torch.optim.Optimizer] = []
    for o in optimizers:
        if not any(_same(o, k) for k in out):
            out.append(o)
    return out


def _as_optimizers(optimizer: object) -> list[torch.optim.Optimizer]:
    """``optimizer`` as a list, or a ``TypeError`` / ``ValueError`` naming the bad value."""
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if isinstance(optimizer, (list, tuple)):
        if not optimizer:
            raise ValueError("`check_step(optimizer=[])` must hold at least one optimizer; pass None for any.")
        for o in optimizer:
            if not isinstance(o, torch.optim.Optimizer):
                raise TypeError(
                    f"`check_step(optimizer=[...])` must hold `torch.optim.Optimizer`s, got {o!r} in {optimizer!r}."
                )
        return list(optimizer)
    raise TypeError(
        f"`check_step(optimizer={optimizer!r})` must be a `torch.optim.Optimizer`, a list of them, or None."
    )
