"""Test helpers: assert in a unit test that gradients reach every parameter of a model.

In the spirit of torchtest's ``assert_vars_change``, but saying *why* a parameter would not train: each failure lists
the findings of :func:`~lightning_gradguard.check_step` (kind, parameter, the line that cut the graph, the fix).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import _compat
from .findings import KINDS, Finding, GradGuardError
from .options import check_globs, check_int
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
            mapping with a ``"loss"`` key), which must not need a ``Trainer`` (its ``self.log`` calls are fine).
            A module with manual optimization (``automatic_optimization = False``) steps its own optimizers in
            ``training_step``: with a batch it runs in a one-device ``Trainer`` (on the model's device), where a
            :class:`~lightning_gradguard.GradGuard` judges each optimizer step. A plain module needs a loss function.
        optimizer: the optimizer to step. ``None``: a ``LightningModule``'s own, from ``configure_optimizers()``
            (any form Lightning accepts; its learning-rate schedulers are not stepped), so that a frozen backbone
            still handed to it, a head missing from it or a copy's tensors in it fail too; for a plain module (or a
            ``configure_optimizers()`` that returns ``None``), ``torch.optim.SGD`` over the trainable parameters.
        steps: how many steps to run.
        ignore: fnmatch globs on parameter names never to report.
        allow: finding kinds that do not fail the assertion (e.g. ``("zero",)``).

    Raises:
        GradientFlowError: (an ``AssertionError``) some parameter got no usable gradient; the text lists the
            findings with their fixes, ``err.findings`` holds them as :class:`~lightning_gradguard.Finding` objects.
            pytest shows the line of your test and this text (this helper's frames are hidden).
        TypeError, ValueError: bad arguments, the loss is not a tensor, or ``configure_optimizers()`` fails or
            returns what Lightning would reject.

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
    __tracebackhide__ = True  # pytest shows the caller's line and the message, not this function's source
    if not isinstance(model, nn.Module):
        raise TypeError(f"`assert_gradients_flow(model={model!r})` must be a `torch.nn.Module`.")
    check_int("assert_gradients_flow", "steps", steps, 1)
    bad = [k for k in allow if k not in KINDS]
    if isinstance(allow, str) or bad:
        raise ValueError(
            f"`assert_gradients_flow(allow={allow!r})` must be a list of finding kinds: {', '.join(KINDS)}."
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`assert_gradients_flow(optimizer={optimizer!r})` must be a `torch.optim.Optimizer` or None.")
    ignore = list(check_globs("assert_gradients_flow", ignore))
    manual = getattr(model, "automatic_optimization", True) is False
    if manual and not _is_loss_fn(batch_or_loss_fn):
        if optimizer is not None:
            raise ValueError(
                f"{_name(model)} uses manual optimization: with a batch its `training_step` steps the "
                "optimizers of its `configure_optimizers()` in a Trainer; leave `optimizer=None`, or pass a function "
                "`loss_fn(model) -> loss` to step `optimizer` after."
            )
        found, sizes = _trainer_findings(model, batch_or_loss_fn, steps, ignore)
    else:
        compute = _loss_of(model, batch_or_loss_fn)
        optimizers = [optimizer] if optimizer is not None else _own_optimizers(model, manual)
        found, sizes = _step_findings(model, compute, optimizers, steps, ignore)
    failed = [f for f in found if f.kind not in allow]
    if failed:
        n = len({f.param for f in failed})
        head = (
            f"Gradients do not flow to {n} parameter tensor{'s' if n != 1 else ''} of {_name(model)} "
            f"({steps} step{'s' if steps != 1 else ''} checked)"
        )
        raise GradientFlowError(str(GradGuardError.from_findings(failed, None, head, sizes)), failed)


def _step_findings(
    model: nn.Module,
    compute: Callable[[int], torch.Tensor],
    optimizers: list[torch.optim.Optimizer],
    steps: int,
    ignore: Sequence[str] | None,
) -> tuple[list[Finding], dict[str, int] | None]:
    """Every finding (each parameter and kind once) of ``steps`` steps under ``check_step``, and the module sizes
    that group them."""
    __tracebackhide__ = True
    found: dict[tuple[str, str], Finding] = {}
    sizes = None
    with _restored(model, optimizers), warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)  # the findings go into the assertion, not into warnings
        warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")
        for step in range(steps):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            check = check_step(model, optimizers, ignore=ignore, step=step)
            try:
                with check:
                    loss = compute(step)
                    loss.backward()
                    for opt in optimizers:
                        opt.step()
            except GradGuardError as err:  # the loss has no graph at all: nothing more to run
                if not err.findings:
                    raise GradientFlowError(f"Gradients cannot flow through {_name(model)}: {err}") from None
                for f in err.findings:
                    found.setdefault(f.key, f)
                break
            finally:
                sizes = check.report.sizes  # group findings by module, as the guard's own errors do
            for f in check.findings:
                found.setdefault(f.key, f)
    return list(found.values()), sizes


def _trainer_findings(
    model: nn.Module, batch: Any, steps: int, ignore: Sequence[str] | None
) -> tuple[list[Finding], dict[str, int] | None]:
    """A manual-optimization module's ``training_step`` calls ``self.optimizers()`` and ``self.manual_backward()``,
    which only a Trainer provides: run ``steps`` batches in a quiet one-device Trainer on the model's device, with a
    GradGuard that judges each optimizer step on its own and raises nothing."""
    __tracebackhide__ = True
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from .callback import GradGuard

    guard = GradGuard(**{f"on_{kind}": "warn" for kind in KINDS}, ignore=ignore, diagnose="always", idle_window=1,
                      log_every_n_steps=0, histograms=False, write_report=False, flow_every=0)  # fmt: skip
    device = next(model.parameters(), torch.empty(0)).device
    batches = DataLoader([batch] * steps, batch_size=None, collate_fn=_same)
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    try:
        attached = model.trainer  # type: ignore[union-attr]
    except RuntimeError:  # "... is not attached to a `Trainer`"
        attached = None
    with _restored(model, []), warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        warnings.filterwarnings("ignore", module=r"lightning\.")  # about the Trainer set up here, not the user's code
        lightning_log.setLevel(logging.WARNING)  # no "GPU available" lines, no end-of-fit report
        try:
            trainer = Trainer(
                accelerator="gpu" if device.type == "cuda" else device.type,
                devices=[device.index or 0] if device.type == "cuda" else 1,
                max_epochs=1,
                callbacks=[guard],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
            )
            trainer.fit(model, train_dataloaders=batches)
        except GradGuardError as err:  # the loss has no graph at all
            if not err.findings:
                raise GradientFlowError(f"Gradients cannot flow through {_name(model)}: {err}") from None
            return list(err.findings), guard.report.sizes
        finally:
            lightning_log.setLevel(level)
            model.trainer = attached  # type: ignore[union-attr]
    return guard.findings, guard.report.sizes


def _name(model: nn.Module) -> str:
    """The class name the user gave ``model``: that of the module inside a ``torch.compile`` wrapper."""
    return type(_compat.compiled_inner(model) or model).__name__


def _same(batch: Any) -> Any:
    return batch


def _is_loss_fn(batch_or_loss_fn: Any) -> bool:
    return callable(batch_or_loss_fn) and not isinstance(batch_or_loss_fn, (nn.Module, torch.Tensor))


def _own_optimizers(model: nn.Module, manual: bool) -> list[torch.optim.Optimizer]:
    """A LightningModule's optimizers from its ``configure_optimizers()`` (each form Lightning accepts); else SGD over
    the trainable parameters."""
    __tracebackhide__ = True
    name = _name(model)
    owner = _compat.compiled_inner(model) or model  # a compiled module's `configure_optimizers` is its original's
    configure = getattr(type(owner), "configure_optimizers", None)
    conf = None
    if callable(configure) and not getattr(configure, "__module__", "").startswith(
        ("lightning.", "pytorch_lightning.")
    ):
        try:
            conf = owner.configure_optimizers()  # type: ignore[operator]
        except Exception as err:
            raise ValueError(
                f"`{name}.configure_optimizers()` failed ({type(err).__name__}: {err}); pass the optimizer to check "
                "as `optimizer=` (it may need a Trainer: `self.trainer` is not set here)."
            ) from err
    optimizers = _optimizers_of(conf, name)
    if len(optimizers) > 1 and not manual:
        raise ValueError(
            f"`{name}.configure_optimizers()` returns {len(optimizers)} optimizers, which Lightning trains only with "
            "manual optimization (`self.automatic_optimization = False`); pass the one to check as `optimizer=`."
        )
    if optimizers:
        return optimizers
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise GradientFlowError(f"{name} has no trainable parameter: no gradient can flow.")
    return [torch.optim.SGD(trainable, lr=1e-3)]


def _optimizers_of(conf: Any, name: str) -> list[torch.optim.Optimizer]:
    """The optimizers in what ``configure_optimizers()`` returned, read as Lightning reads it (schedulers left out):
    an optimizer, a list of them, ``([optimizers], [schedulers])``, a dict with ``"optimizer"``, a list of dicts."""
    __tracebackhide__ = True
    optimizers: list[Any]
    if conf is None:
        optimizers = []
    elif isinstance(conf, Mapping):
        optimizers = [conf.get("optimizer")]
    elif isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], list):
        optimizers = list(conf[0])
    elif isinstance(conf, (list, tuple)) and conf and all(isinstance(d, Mapping) for d in conf):
        optimizers = [d.get("optimizer") for d in conf]
    elif isinstance(conf, (list, tuple)):
        optimizers = list(conf)
    else:
        optimizers = [conf]
    if not all(isinstance(opt, torch.optim.Optimizer) for opt in optimizers):
        raise TypeError(
            f"`{name}.configure_optimizers()` returned {conf!r}: Lightning takes an optimizer, a list of them, "
            '`([optimizers], [schedulers])`, `{"optimizer": optimizer, ...}` or a list of such dicts (torch '
            "optimizers, to be checked here); pass the optimizer to check as `optimizer=`."
        )
    return optimizers


def _loss_of(model: nn.Module, batch_or_loss_fn: Any) -> Callable[[int], torch.Tensor]:
    """A function of the step number that returns the loss."""
    __tracebackhide__ = True
    if _is_loss_fn(batch_or_loss_fn):
        fn: LossFn = batch_or_loss_fn

        def from_fn(step: int) -> torch.Tensor:
            __tracebackhide__ = True
            return _as_loss(fn(model), "loss_fn(model)")

        return from_fn
    training_step = getattr(model, "training_step", None)
    if not callable(training_step):
        raise TypeError(
            f"`assert_gradients_flow` got a batch for {_name(model)}, which has no `training_step`: pass a "
            "function `loss_fn(model) -> loss` instead, e.g. `lambda m: loss(m(x), y)`."
        )

    def from_batch(step: int) -> torch.Tensor:
        __tracebackhide__ = True
        return _as_loss(training_step(batch_or_loss_fn, step), "training_step(batch, step)")

    return from_batch


def _as_loss(out: Any, what: str) -> torch.Tensor:
    __tracebackhide__ = True
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else repr(out)
        raise TypeError(f"`{what}` must return a scalar loss tensor (or a mapping with a 'loss' key), got {got}.")
    return out


@contextmanager
def _restored(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> Iterator[None]:
    """Put the model, its gradients, the optimizers' state, the train/eval modes and the CPU RNG back afterwards."""
    tensors = [*model.parameters(), *model.buffers()]
    values = [t.detach().clone() for t in tensors]
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
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
            for opt, state in zip(optimizers, opt_states, strict=True):
                opt.load_state_dict(state)
            for m, training in modes:
                m.training = training
