"""Test helpers: assert in a unit test that gradients reach every parameter of a model.

In the spirit of torchtest's ``assert_vars_change``, but saying *why* a parameter would not train: each failure lists
the findings of :func:`~lightning_gradguard.check_step` (kind, parameter, the line that cut the graph, the fix).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .findings import KINDS, Finding, GradGuardError
from .policy import GradGuardWarning
from .step import check_step

__all__ = ["GradientFlowError", "assert_gradients_flow"]

LossFn = Callable[[nn.Module], torch.Tensor]


class GradientFlowError(AssertionError):
    """Raised by :func:`assert_gradients_flow`; ``.findings`` lists every finding (each parameter and kind once)."""

    def __init__(self, message: str, findings: Sequence[Finding] = ()) -> None:
        self.findings: list[Finding] = list(findings)
        super().__init__(message)


def assert_gradients_flow(
    model: nn.Module,
    batch_or_loss_fn: Any,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = 1,
    *,
    ignore: Sequence[str] | None = None,
    allow: Sequence[str] = (),
) -> None:
    """Run ``steps`` traced training steps and fail if any parameter does not get a usable gradient.

    Each step is ``zero_grad()``, the loss, ``backward()`` and ``optimizer.step()`` inside
    :class:`~lightning_gradguard.check_step`, so every finding kind is checked (``frozen``, ``unused``,
    ``detached``, ``orphan``, ``stale``, ``nonfinite``, ``zero``) and a cut names the line that made it.

    The model is left as it was: its parameters, buffers and gradients, the optimizer's state, its train/eval mode
    and the CPU random number generator are restored afterwards (the steps do update the parameters in between, so
    that ``steps > 1`` sees what later steps see).

    Args:
        model: the model to check: a plain ``nn.Module`` or a ``LightningModule``.
        batch_or_loss_fn: either a callable ``loss_fn(model) -> loss`` (a scalar tensor), or, for a
            ``LightningModule``, a batch: the loss is then ``model.training_step(batch, step)`` (a tensor, or a
            mapping with a ``"loss"`` key). The module must not need a ``Trainer`` in ``training_step`` (its
            ``self.log`` calls are fine) and must use automatic optimization. A plain module needs a loss function.
        optimizer: the optimizer to step. ``None``: ``torch.optim.SGD`` over the trainable parameters (so
            ``frozen``, ``orphan`` and ``stale`` cannot occur); pass the real one to check those as well.
        steps: how many steps to run.
        ignore: fnmatch globs on parameter names never to report.
        allow: finding kinds that do not fail the assertion (e.g. ``("zero",)``).

    Raises:
        GradientFlowError: (an ``AssertionError``) some parameter got no usable gradient; the text lists the
            findings with their fixes, ``err.findings`` holds them as :class:`~lightning_gradguard.Finding` objects.
        TypeError, ValueError: bad arguments, or the loss is not a tensor.

    Example::

        >>> import torch
        >>> from lightning_gradguard.testing import assert_gradients_flow
        >>> model, x = torch.nn.Linear(4, 1), torch.randn(8, 4)
        >>> assert_gradients_flow(model, lambda m: m(x).pow(2).mean())  # passes: returns None
        >>> assert_gradients_flow(model, lambda m: m(x).detach().pow(2).mean())
        Traceback (most recent call last):
        ...
        lightning_gradguard.testing.GradientFlowError: Gradients do not flow to 2 parameter tensors of Linear (...):
          - detached (...): The loss depends on every parameter of the model (2 tensors, 5 parameters), but ...
              weight: detached
              bias: detached

    In a pytest test::

        from lightning_gradguard.testing import assert_gradients_flow

        def test_every_parameter_learns():
            model = MyModel()
            x, y = torch.randn(8, 16), torch.randn(8, 1)
            assert_gradients_flow(model, lambda m: torch.nn.functional.mse_loss(m(x), y))

        def test_lightning_module_learns():
            assert_gradients_flow(MyLightningModule(), next(iter(my_datamodule.train_dataloader())), steps=2)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`assert_gradients_flow(model={model!r})` must be a `torch.nn.Module`.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`assert_gradients_flow(steps={steps!r})` must be a positive integer.")
    bad = [k for k in allow if k not in KINDS]
    if isinstance(allow, str) or bad:
        raise ValueError(
            f"`assert_gradients_flow(allow={allow!r})` must be a list of finding kinds: {', '.join(KINDS)}."
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`assert_gradients_flow(optimizer={optimizer!r})` must be a `torch.optim.Optimizer` or None.")
    compute = _loss_of(model, batch_or_loss_fn)
    if optimizer is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise GradientFlowError(f"{type(model).__name__} has no trainable parameter: no gradient can flow.")
        optimizer = torch.optim.SGD(trainable, lr=1e-3)
    check = check_step(model, optimizer, ignore=ignore)  # validates `ignore`
    found: dict[tuple[str, str], Finding] = {}
    with _restored(model, optimizer), warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)  # the findings go into the assertion, not into warnings
        warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            check = check_step(model, optimizer, ignore=ignore, step=step)
            try:
                with check:
                    loss = compute(step)
                    loss.backward()
                    optimizer.step()
            except GradGuardError as err:  # the loss has no graph at all: nothing more to run
                for f in err.findings or check.findings:
                    found.setdefault(f.key, f)
                if not err.findings:
                    raise GradientFlowError(f"Gradients cannot flow through {type(model).__name__}: {err}") from None
                break
            for f in check.findings:
                found.setdefault(f.key, f)
    failed = [f for f in found.values() if f.kind not in allow]
    if failed:
        n = len({f.param for f in failed})
        head = (
            f"Gradients do not flow to {n} parameter tensor{'s' if n != 1 else ''} of {type(model).__name__} "
            f"({steps} step{'s' if steps != 1 else ''} checked)"
        )
        sizes = getattr(check.report, "sizes", None)  # group findings by module, as the guard's own errors do
        raise GradientFlowError(str(GradGuardError.from_findings(failed, None, head, sizes)), failed)


def _loss_of(model: nn.Module, batch_or_loss_fn: Any) -> Callable[[int], torch.Tensor]:
    """A function of the step number that returns the loss."""
    if callable(batch_or_loss_fn) and not isinstance(batch_or_loss_fn, (nn.Module, torch.Tensor)):
        fn: LossFn = batch_or_loss_fn

        def from_fn(step: int) -> torch.Tensor:
            return _as_loss(fn(model), "loss_fn(model)")

        return from_fn
    training_step = getattr(model, "training_step", None)
    if not callable(training_step):
        raise TypeError(
            f"`assert_gradients_flow` got a batch for {type(model).__name__}, which has no `training_step`: pass a "
            "function `loss_fn(model) -> loss` instead, e.g. `lambda m: loss(m(x), y)`."
        )
    if getattr(model, "automatic_optimization", True) is False:
        raise ValueError(
            f"{type(model).__name__} uses manual optimization: its `training_step` steps its own optimizers; pass a "
            "function `loss_fn(model) -> loss` instead."
        )

    def from_batch(step: int) -> torch.Tensor:
        return _as_loss(training_step(batch_or_loss_fn, step), "training_step(batch, step)")

    return from_batch


def _as_loss(out: Any, what: str) -> torch.Tensor:
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise TypeError(f"`{what}` must return a scalar loss tensor (or a mapping with a 'loss' key), got {out!r}.")
    return out


@contextmanager
def _restored(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Put the model, its gradients, the optimizer's state, the train/eval modes and the CPU RNG back afterwards."""
    tensors = [*model.parameters(), *model.buffers()]
    values = [t.detach().clone() for t in tensors]
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]
    opt_state = copy.deepcopy(optimizer.state_dict())
    modes = [(m, m.training) for m in model.modules()]
    with torch.random.fork_rng(devices=[]):
        try:
            model.train()
            yield
        finally:
            with torch.no_grad():
                for t, v in zip(tensors, values, strict=True):
                    t.copy_(v)
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g
            optimizer.load_state_dict(opt_state)
            for m, training in modes:
                m.training = training
