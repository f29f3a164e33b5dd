"""GradGuard's messages reach the user whole, through every hook in which Lightning rewrites an exception's text.

An exception raised in a callback leaves ``trainer.fit`` through ``_call_and_handle_interrupt``, which first calls
the ``on_exception`` hooks of the callbacks, the datamodule and the strategy. Lightning 2.6's
``DDPStrategy.on_exception`` replaces the text of any exception matching
``.*Expected to have finished reduction in the prior iteration.*`` (``re.DOTALL``) with generic advice that names
no parameter (``lightning.pytorch.utilities.exceptions._augment_message``). GradGuard's DDP error once quoted that
phrase, and users saw Lightning's text instead of the names.

The hooks are found by introspection of the installed Lightning, so a hook a new release adds is tested too (or,
with a signature this file cannot call, fails the test naming it): every ``on_exception(self, exception)`` of a class
in Lightning (strategies, precision plugins, loops, the datamodule, accelerators...), and every function of Lightning
that assigns an exception's ``args`` or calls a helper function that does. Each GradGuard text (every kind, raised and
warned, the loss without a graph, the windowed and end-of-run texts, ``sync="late"``, ``check_step``'s texts, the DDP
and FSDP texts) goes through each hook as an exception; it must come out unchanged. The same holds end to end in
real ``strategy="ddp"`` launches (``test_ddp.py::test_ddp_the_error_out_of_fit_is_gradguards_naming_the_parameters``).
"""

from __future__ import annotations

import copy
import dis
import importlib
import inspect
import pkgutil
import sys
import types
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from lightning_gradguard import GradGuardError, GradGuardWarning, check_step
from lightning_gradguard.core import GuardCore
from lightning_gradguard.distributed import RankSync
from lightning_gradguard.findings import Finding
from lightning_gradguard.policy import Policy

#: Lightning's own text for the error that `DDPStrategy.on_exception` rewrites (the control: the hook does rewrite).
DDP_REDUCTION = "Expected to have finished reduction in the prior iteration before starting a new one."


# ---------------------------------------------------------------------------------------------------- the hooks
def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _assigns_args(fn: types.FunctionType) -> bool:
    """``fn`` (or a function nested in it) sets some object's ``args``: ``exception.args = ...``."""
    return any(
        ins.opname == "STORE_ATTR" and ins.argval == "args"
        for code in _codes(fn.__code__)
        if "args" in code.co_names
        for ins in dis.get_instructions(code)
    )


def _lightning_functions() -> Iterator[tuple[type | None, str, types.FunctionType]]:
    """``(class or None, name, function)`` of every function and method defined in an imported Lightning module."""
    for modname, module in list(sys.modules.items()):
        if not modname.startswith("lightning.") or module is None:
            continue
        for obj in list(vars(module).values()):
            if inspect.isclass(obj) and obj.__module__ == modname:
                for name, member in vars(obj).items():
                    fn = getattr(member, "__func__", member)
                    if isinstance(fn, types.FunctionType):
                        yield obj, name, fn
            elif isinstance(obj, types.FunctionType) and obj.__module__ == modname:
                yield None, obj.__name__, obj


def _bare(cls: type) -> object:
    """An instance of ``cls`` without ``__init__`` (the hooks found so far use nothing of it), abstract or not."""
    concrete = type(cls.__name__, (cls,), {})
    concrete.__abstractmethods__ = frozenset()
    return object.__new__(concrete)


@pytest.fixture(scope="module")
def hooks() -> dict[str, Callable[[BaseException], None]]:
    """Every hook of the installed Lightning that may rewrite an exception's text, callable with the exception."""
    import lightning.pytorch as pl

    for info in pkgutil.walk_packages(pl.__path__, pl.__name__ + "."):
        try:
            importlib.import_module(info.name)
        except Exception:  # an optional dependency of that module is not installed (`lightning.pytorch.serve`, ...)
            continue
    functions = list(_lightning_functions())
    # the helpers that rewrite (`_augment_message`), and the functions that call one of them
    helpers = {fn.__name__ for cls, _, fn in functions if cls is None and _assigns_args(fn)}
    rewriters = {
        fn for _, _, fn in functions if _assigns_args(fn) or any(helpers & set(c.co_names) for c in _codes(fn.__code__))
    }
    found: dict[str, Callable[[BaseException], None]] = {}
    uncallable = []
    for cls, name, fn in functions:
        is_hook = name == "on_exception" and list(inspect.signature(fn).parameters) == ["self", "exception"]
        if not is_hook and fn not in rewriters:
            continue
        label = f"{fn.__module__}.{fn.__qualname__}"
        params = list(inspect.signature(fn).parameters)
        if cls is not None and params == ["self", "exception"]:
            found[label] = lambda exc, cls=cls, fn=fn: fn(_bare(cls), exc)
        elif cls is None and fn.__name__ in helpers:
            continue  # a helper: reached through its callers, with their patterns
        else:
            uncallable.append(f"{label}{inspect.signature(fn)}")
    assert not uncallable, f"Lightning has exception-rewriting code this test does not call yet: {uncallable}"
    return found


def test_the_hooks_found_include_ddps_and_it_rewrites_its_own_pattern(hooks):
    """The control: introspection finds `DDPStrategy.on_exception`, and calling it as this file does rewrites the
    text it targets (so that an unchanged GradGuard text below means the hook let it through)."""
    assert "lightning.pytorch.strategies.ddp.DDPStrategy.on_exception" in hooks
    assert "lightning.pytorch.strategies.strategy.Strategy.on_exception" in hooks
    err = RuntimeError(f"aux.weight: {DDP_REDUCTION}")
    hooks["lightning.pytorch.strategies.ddp.DDPStrategy.on_exception"](err)
    assert "aux.weight" not in str(err)
    assert "parameters that were not used in producing the loss" in str(err)


# ---------------------------------------------------------------------------------------------------- the texts
class Net(nn.Module):
    """``body -> head``; ``aux`` joins as ``how`` says."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.aux = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, how: str = "used") -> torch.Tensor:
        h = torch.relu(self.body(x))
        out = self.head(h)
        if how == "used":
            out = out + self.aux(h)
        elif how == "detached":
            out = out + self.aux(h).detach()
        elif how == "zero":
            out = out + self.aux(h) * 0
        return out.pow(2).mean()


#: Every parameter name of `Net`.
NAMES = ("body.weight", "body.bias", "head.weight", "head.bias", "aux.weight", "aux.bias")


class Texts:
    """Every text collected, with the parameter names it contains (each must name one, unless said otherwise)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, tuple[str, ...]]] = []

    def add(self, label: str, text: str, named: bool = True) -> None:
        names = tuple(n for n in NAMES if n in text)
        assert names or not named, f"{label}: the rendered text names no parameter:\n{text}"
        self.items.append((label, text, names))

    def run(self, label: str, block: Callable[[], object], named: bool = True) -> None:
        """Run ``block``; collect the GradGuardError it raises and every GradGuardWarning it warns."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                block()
            except GradGuardError as err:
                self.add(f"{label}: error", str(err), named)
        for i, w in enumerate(x for x in caught if issubclass(x.category, GradGuardWarning)):
            self.add(f"{label}: warning {i}", str(w.message), named)


def _step(model: Net, opt: torch.optim.Optimizer, how: str, *, strict: bool, step_inside: bool = True) -> None:
    with check_step(model, opt, strict=strict):
        opt.zero_grad()
        model(torch.randn(8, 4), how).backward()
        if step_inside:
            opt.step()


def _core_run(texts: Texts, label: str, hows: list[str], window: int, diagnose: str = "on_finding") -> None:
    """GuardCore as the Lightning adapter drives it, for the texts that need several steps (``hows[s]``: how step
    ``s`` uses `aux`): the idle window, the end-of-run report of a short run, a step explained by the next trace."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    core = GuardCore(Policy({"unused": "warn", "zero": "warn"}), diagnose, window)
    core.bind(model)

    def run() -> None:
        for step, how in enumerate(hows):
            core.begin_batch()
            opt.zero_grad()
            loss = model(torch.randn(8, 4), how)
            core.record_loss(loss, step)
            core.pause()
            loss.backward()
            core.check(core.params_of(opt), step, optimizers=[opt])
            core.end_batch()
        core.finish(len(hows))

    texts.run(label, run)


def _late_nan(texts: Texts) -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    core = GuardCore(Policy(), "never", 1)
    core.bind(model)

    def run() -> None:
        opt.zero_grad()
        (model(torch.randn(8, 4)) * float("nan")).backward()
        core.check(core.params_of(opt), 0, late=True)
        core.resolve_late()

    texts.run("sync='late' NaN", run)


def _ddp_texts(texts: Texts, graphless: str) -> None:
    """The texts every rank raises under DDP, built by the code that builds them (the collectives left out);
    ``graphless``: a rank's own error about its loss without a graph."""
    sync = RankSync(group=None, rank=0, world_size=2, device="cpu", strict=True)
    unused = {"findings": {}, "earlier": [], "error": None, "error_findings": []}
    for bit, name in enumerate(("aux.weight", "aux.bias")):
        unused["findings"][bit] = Finding("unused", name, f"`{name}` never took part in the forward pass.").to_dict()
    early = {**unused, "earlier": [0, 1]}
    for label, unreached, gathered in (
        ("every rank", {0: (0, 1), 1: (0, 1)}, [unused, unused]),
        ("rank 1 only", {0: (1,), 1: (1,)}, [None, unused]),
        ("an earlier micro-batch", {0: (0, 1), 1: (0, 1)}, [early, early]),
    ):
        findings = sync._merge_unreached(unreached, gathered, 3)
        texts.add(f"DDP: {label}", sync._error_text(findings, unreached, (), gathered, 3, None))
    payload = {"findings": {}, "earlier": [], "error": graphless, "error_findings": []}
    text = sync._error_text([], {}, (1,), [None, payload], 3, None)
    texts.add("DDP: the loss on rank 1 has no graph", text)
    for kind in ("unused", "zero"):
        for sharded in ("fsdp", "dtensor"):
            f = RankSync(group=None, rank=0, world_size=2, device="cpu", sharded=sharded)._sharded_finding(
                Finding(kind, "aux.weight", f"`aux.weight` received {kind}.")
            )
            texts.add(f"{sharded}: {kind}", str(GradGuardError.from_findings([f], 3)))


@pytest.fixture(scope="module")
def texts() -> list[tuple[str, str, tuple[str, ...]]]:
    torch.manual_seed(0)
    texts = Texts()
    for how, strict in (("unused", True), ("detached", True), ("zero", False), ("nan", True)):
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if how == "nan":
            model.aux.weight.register_hook(lambda g: g * float("nan"))
        texts.run(how, lambda m=model, o=opt, h=how, s=strict: _step(m, o, "used" if h == "nan" else h, strict=s))
    frozen = Net()
    frozen.aux.requires_grad_(False)
    opt = torch.optim.SGD(frozen.parameters(), lr=0.0)
    texts.run("frozen", lambda: _step(frozen, opt, "used", strict=False))
    orphan = Net()
    opt = torch.optim.SGD([*orphan.body.parameters(), *orphan.head.parameters()], lr=0.0)
    texts.run("orphan", lambda: _step(orphan, opt, "used", strict=False))
    stale = Net()
    opt = torch.optim.SGD(copy.deepcopy(stale).parameters(), lr=0.0)
    texts.run("stale", lambda: _step(stale, opt, "used", strict=True))
    nothing = Net()
    nothing.aux.requires_grad_(False)
    opt = torch.optim.SGD(nothing.aux.parameters(), lr=0.0)
    texts.run("an optimizer that trains nothing", lambda: _step(nothing, opt, "used", strict=False))
    constant = Net().requires_grad_(False)
    texts.run(
        "the loss depends on no trainable parameter", lambda: _step(constant, opt, "used", strict=True), named=False
    )
    unstepped = Net()
    opt = torch.optim.SGD(unstepped.parameters(), lr=0.0)
    texts.run("no step in the block", lambda: _step(unstepped, opt, "unused", strict=True, step_inside=False))
    graphless = Net()

    def loss_without_graph() -> None:
        with check_step(graphless, strict=True):
            graphless(torch.randn(8, 4)).detach().backward()

    texts.run("the loss has no graph", loss_without_graph)
    texts.run("no backward in the block", lambda: check_step(Net()).__enter__().__exit__(None, None, None), named=False)
    _core_run(texts, "idle window reached", ["unused"] * 3, 2)
    _core_run(texts, "short run", ["unused"] * 2, 16)
    _core_run(texts, "zero, idle window", ["zero"] * 3, 2, diagnose="never")
    _core_run(texts, "explained by the next trace", ["used", "unused", "used"], 1)
    _late_nan(texts)
    _ddp_texts(texts, next(text for label, text, _ in texts.items if label == "the loss has no graph: error"))
    kinds = {label.split(":")[0] for label, _, _ in texts.items}
    assert {"unused", "detached", "zero", "nan", "frozen", "orphan", "stale", "the loss has no graph"} <= kinds
    return texts.items


def test_no_gradguard_text_is_taken_for_out_of_memory(texts):
    """Lightning's batch-size finder swallows the errors `is_oom_error` accepts and retries a smaller batch."""
    from lightning.pytorch.utilities.memory import is_oom_error

    assert not [label for label, text, _ in texts if is_oom_error(GradGuardError(text))]


@pytest.mark.parametrize("as_type", [GradGuardError, GradGuardWarning])
def test_every_gradguard_text_survives_every_lightning_hook(hooks, texts, as_type):
    """Each text, raised as a `GradGuardError` (and as a `GradGuardWarning`, which `-W error` turns into an
    exception on its way out of `fit`), comes out of each hook unchanged, names and all."""
    changed = []
    for label, text, names in texts:
        for hook_name, hook in hooks.items():
            err = as_type(text)
            hook(err)
            if str(err) != text or not all(n in str(err) for n in names):
                changed.append(f"{hook_name} rewrote {label!r}: {str(err)[:200]!r}")
    assert not changed, "\n".join(changed)
