"""The fused gradient pass (`measure_grads`): norms against independent references, the confirmation of zero and
non-finite candidates, sparse and half-precision gradients, the cached plan, and the number of host transfers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from test_kinds import BigLoss, Net
from torch import nn

import lightning_gradguard.measure as measure
from conftest import loader, make_trainer
from lightning_gradguard import GradGuard, GradGuardError, check_step
from lightning_gradguard.measure import GradStats, amp_scale, measure_grads
from lightning_gradguard.params import ParamList

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def with_grads(*grads: torch.Tensor | None, requires_grad: bool = True) -> list[torch.Tensor]:
    """Parameters whose ``.grad`` are ``grads`` (a parameter of the same shape and dtype each)."""
    params = []
    for g in grads:
        if g is None:
            p = nn.Parameter(torch.zeros(3), requires_grad=requires_grad)
        else:
            p = nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=g.device), requires_grad=requires_grad)
            p.grad = g
        params.append(p)
    return params


def reference(g: torch.Tensor) -> float:
    """The L2 norm in float64, computed independently of the code under test."""
    if g.layout != torch.strided:
        g = g.to_dense()
    return math.sqrt(math.fsum(v * v for v in g.detach().double().reshape(-1).tolist()))


@pytest.fixture
def transfers(monkeypatch):
    """Count the host transfers of `measure_grads` (every read goes through `measure.to_host`)."""
    calls = []
    real = measure.to_host

    def counting(t):
        calls.append(t.numel())
        return real(t)

    monkeypatch.setattr(measure, "to_host", counting)
    return calls


# ---------------------------------------------------------------------------------------------- norms
def test_norms_of_mixed_shapes_match_a_reference_parameter_by_parameter():
    # Same-shape tensors are stacked, the odd ones flattened together, large ones measured alone: the norms must
    # still come back in the parameters' order. Each has its own scale, so a permutation cannot go unnoticed.
    torch.manual_seed(0)
    shapes = [(8, 8), (8,), (8, 8), (3, 5), (8,), (8, 8), (), (8, 8), (8,), (8,), (300, 100), (7,), (8, 8)]
    grads = [torch.randn(s) * (i + 1) for i, s in enumerate(shapes)]
    stats = measure_grads(with_grads(*grads))
    assert stats.norms == pytest.approx([reference(g) for g in grads], rel=1e-6)
    assert stats.total_norm == pytest.approx(math.sqrt(math.fsum(n * n for n in stats.norms)), rel=1e-12)
    assert stats.total_norm == pytest.approx(math.sqrt(math.fsum(reference(g) ** 2 for g in grads)), rel=1e-6)
    assert stats.clean


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16384,), (512, 1024), (4096, 256), (64, 3, 7, 7)])
def test_blas_dot_path_at_real_sizes_matches_vector_norm(shape, dtype):
    torch.manual_seed(1)
    g = torch.randn(shape, dtype=dtype) * 3.0
    small = torch.randn(10, dtype=dtype)
    stats = measure_grads(with_grads(small, g))
    if g.numel() >= measure._DOT_MIN:  # the path under test: measured alone, by a dot product
        plan = measure._make_plan([small, g])
        assert (len(plan.dots), plan.single, plan.order.tolist()) == (1, [], [0, 1])
    expected = float(torch.linalg.vector_norm(g.double()))
    torch_error = abs(float(torch.linalg.vector_norm(g)) - expected)  # torch's own, in the gradient's dtype
    assert abs(stats.norms[1] - expected) <= max(2 * torch_error, 1e-6 * expected)  # no less accurate than torch
    assert stats.norms[1] == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-12)
    assert stats.norms[0] == pytest.approx(float(torch.linalg.vector_norm(small.double())), rel=1e-6)


def test_a_large_gradient_that_stops_being_contiguous_gets_a_new_plan():
    """Planned as a dot product while contiguous; a later step's transposed gradient (``view(-1)`` fails) is measured
    by a new plan, right, in the same call."""
    p = _param_with_grad(torch.randn(256, 128))
    params = [p, _param_with_grad(torch.randn(4))]
    assert measure_grads(params).norms[0] == pytest.approx(reference(p.grad), rel=1e-6)
    p.grad = torch.randn(128, 256).t()
    assert measure_grads(params).norms[0] == pytest.approx(reference(p.grad), rel=1e-6)


def test_non_contiguous_large_gradient_is_measured():
    g = torch.randn(256, 128).t()  # 32768 elements, not contiguous: no dot product
    assert not g.is_contiguous()
    stats = measure_grads(with_grads(g.contiguous().t().t()))  # same values, contiguous
    other = measure_grads([_param_with_grad(g)])
    assert other.norms[0] == pytest.approx(reference(g), rel=1e-6)
    assert stats.norms[0] == pytest.approx(reference(g), rel=1e-6)


def test_l2_norms_of_every_kind_of_tensor_match_a_float64_reference():
    """The one L2-norm helper (`measure.l2_norms`): every path (BLAS dot, fused per device and dtype, half precision
    in float32, sparse values, complex moduli) against an independent float64 reference, in the input order."""
    torch.manual_seed(3)
    sparse = torch.sparse_coo_tensor([[1, 3, 1]], torch.tensor([2.0, -1.0, 0.5]), (6,), check_invariants=True)
    tensors = [
        torch.randn(300, 100),  # large contiguous float32: a dot product
        torch.randn(8, 3),
        torch.randn(256, 128).t(),  # large, not contiguous: the fused path
        torch.randn(20000, dtype=torch.float64) * 1e3,
        (torch.rand(40000) * 300 + 200).half(),  # squares overflow float16: summed in float32
        torch.randn(7).bfloat16(),
        sparse,
        torch.randn(5, dtype=torch.cfloat),
        torch.empty(0),
        torch.tensor(-2.5),
    ]
    norms = measure.l2_norms(tensors)
    assert [n.dim() for n in norms] == [0] * len(tensors)
    expected = [reference(sparse.coalesce()) if t is sparse else reference(t) for t in tensors[:7]]
    expected += [math.sqrt(float(tensors[7].abs().double().square().sum())), 0.0, 2.5]
    assert [float(n) for n in norms] == pytest.approx(expected, rel=2e-6)
    assert norms[4].dtype == norms[5].dtype == torch.float32  # half precision measured in float32
    in_float64 = measure.l2_norms(tensors[:7], torch.float64)
    assert {n.dtype for n in in_float64} == {torch.float64}
    assert [float(n) for n in in_float64] == pytest.approx(expected[:7], rel=1e-12)
    assert measure.l2_norms([]) == []


def test_l2_norms_in_float64_keep_a_norm_that_float32_squares_overflow():
    g = torch.full((4,), 2e19)  # its square, 4e38, is above float32's max
    assert math.isinf(float(measure.l2_norms([g])[0]))  # as torch.linalg.vector_norm does
    assert float(measure.l2_norms([g], torch.float64)[0]) == pytest.approx(4e19, rel=1e-7)


def _param_with_grad(g: torch.Tensor) -> torch.Tensor:
    p = nn.Parameter(torch.zeros(g.shape))
    p.grad = g
    return p


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 40000])
def test_half_precision_gradients_match_a_float64_reference(dtype, n):
    # 300**2 = 90000 overflows float16 (max 65504): the squares must be summed in float32.
    torch.manual_seed(2)
    big = (torch.rand(n) * 300 + 200).to(dtype)
    tiny = (torch.randn(n) * 1e-3).to(dtype)
    same = [torch.randn(8).to(dtype) for _ in range(5)]  # a stacked group
    grads = [big, tiny, *same]
    stats = measure_grads(with_grads(*grads))
    assert stats.clean
    assert stats.norms == pytest.approx([reference(g) for g in grads], rel=2e-3)


def test_scale_divides_every_norm():
    grads = [torch.full((4,), 3.0), torch.full((40000,), 1.0)]
    stats = measure_grads(with_grads(*grads), scale=4.0)
    assert stats.norms == pytest.approx([6.0 / 4.0, 200.0 / 4.0])
    assert stats.total_norm == pytest.approx(math.hypot(1.5, 50.0))


def test_missing_and_frozen_are_listed():
    params = with_grads(torch.ones(2), None, torch.ones(3))
    params[2].requires_grad_(False)
    stats = measure_grads(params)
    assert stats.norms == [pytest.approx(math.sqrt(2)), None, pytest.approx(math.sqrt(3))]
    assert stats.missing == [1]
    assert stats.frozen == [2]
    assert not stats.clean


def test_all_missing():
    stats = measure_grads(with_grads(None, None))
    assert stats.norms == [None, None]
    assert stats.missing == [0, 1]
    assert stats.total_norm == 0.0


def test_empty_gradient_is_not_zero():
    stats = measure_grads(with_grads(torch.zeros(0), torch.ones(2)))
    assert stats.zero == []
    assert stats.norms == [0.0, pytest.approx(math.sqrt(2))]


# ---------------------------------------------------------------------------------------------- confirmations
def test_overflowing_norm_of_finite_values_is_remeasured_not_nonfinite():
    g = torch.full((10,), 1e20)  # squares overflow float32
    stats = measure_grads(with_grads(g))
    assert stats.nonfinite == []
    assert stats.norms[0] == pytest.approx(1e20 * math.sqrt(10))


def test_underflowing_norm_of_tiny_values_is_not_zero():
    g = torch.full((10,), 1e-30)  # squares underflow float32
    stats = measure_grads(with_grads(g))
    assert stats.zero == []
    assert stats.norms[0] == pytest.approx(1e-30 * math.sqrt(10))


@pytest.mark.parametrize("first_read", [0.0, -0.0, math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_is_reported_whatever_the_first_read_returned(monkeypatch, first_read):
    # On a GPU, a read that raced the copy could see anything in the slot of a NaN gradient's norm. Whatever it
    # saw that makes it a candidate (zero or not finite), the element-wise confirmation must call it non-finite.
    grads = [torch.ones(4), torch.tensor([1.0, math.nan, 2.0]), torch.zeros(5), torch.full((4,), 2.0)]
    real = measure.to_host
    reads = []

    def racy(t):
        host = real(t).copy()
        if not reads:  # the first read: the NaN gradient's norm (parameter 1) comes back as `first_read`
            host[np.isnan(host)] = first_read
        reads.append(host)
        return host

    monkeypatch.setattr(measure, "to_host", racy)
    stats = measure_grads(with_grads(*grads))
    assert stats.nonfinite == [1]
    assert stats.zero == [2]
    assert math.isnan(stats.norms[1])
    assert stats.norms[0] == pytest.approx(2.0)


@pytest.mark.parametrize("first_read", [0.0, math.nan, math.inf])
def test_healthy_gradient_read_as_a_candidate_is_remeasured(monkeypatch, first_read):
    real = measure.to_host
    reads = []

    def racy(t):
        host = real(t).copy()
        if not reads:
            host[0] = first_read
        reads.append(host)
        return host

    monkeypatch.setattr(measure, "to_host", racy)
    stats = measure_grads(with_grads(torch.full((4,), 3.0), torch.ones(1)))
    assert stats.clean
    assert stats.norms[0] == pytest.approx(6.0)


def test_inf_gradient_is_nonfinite():
    stats = measure_grads(with_grads(torch.tensor([1.0, math.inf]), torch.ones(2)))
    assert stats.nonfinite == [0]
    assert math.isinf(stats.total_norm)


# ---------------------------------------------------------------------------------------------- sparse
def sparse_grad(values: list[float], size: int = 20) -> torch.Tensor:
    idx = torch.tensor([[1, 7, 1][: len(values)]])
    return torch.sparse_coo_tensor(
        idx, torch.tensor(values).reshape(-1, 1).expand(-1, 4), (size, 4), check_invariants=True
    )


def test_sparse_gradient_norm_matches_the_dense_reference():
    g = sparse_grad([3.0, -2.0, 1.0])  # index 1 twice: uncoalesced, duplicates add up
    stats = measure_grads(with_grads(g, torch.ones(3)))
    assert stats.norms[0] == pytest.approx(float(g.to_dense().norm()))
    assert stats.norms[0] == pytest.approx(reference(g))
    assert stats.clean


@pytest.mark.parametrize(("values", "kind"), [([math.nan, 1.0], "nonfinite"), ([0.0, 0.0], "zero"),
                                             ([2.0, 0.0, -2.0], "zero")])  # fmt: skip
def test_sparse_gradient_candidates_are_classified(values, kind):
    stats = measure_grads(with_grads(sparse_grad(values), torch.ones(3)))
    assert (stats.nonfinite, stats.zero) == (([0], []) if kind == "nonfinite" else ([], [0]))


class SparseModel(nn.Module):
    def __init__(self, poison: str | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4, sparse=True)
        self.out = nn.Linear(4, 1)
        self.poison = poison

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        if self.poison == "nan":
            h = h * torch.tensor(math.nan)
        elif self.poison == "zero":
            h = h * 0.0
        return self.out(h).mean()


@pytest.mark.parametrize(("poison", "kind"), [("nan", "nonfinite"), ("zero", "zero")])
def test_check_step_reports_nan_and_zero_sparse_gradients(poison, kind):
    model = SparseModel(poison)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with check_step(model, opt) as chk:
            model(torch.tensor([1, 2, 3])).backward()
            opt.step()
    assert ("emb.weight", kind) in {(f.param, f.kind) for f in chk.findings}


def test_gradguard_raises_on_a_nan_sparse_gradient_in_a_trainer(tmp_path):
    import lightning.pytorch as pl

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = SparseModel("nan")

        def training_step(self, batch, batch_idx):
            return self.net(batch[0][:, 0].long().abs() % 20)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(GradGuardError, match="NaN or Inf"):
        make_trainer(tmp_path, [GradGuard()], max_steps=1).fit(LM(), loader())


# ---------------------------------------------------------------------------------------------- plan cache
@pytest.mark.parametrize("container", [list, ParamList])
def test_cached_plan_follows_a_gradient_that_goes_missing_changes_layout_or_dtype(container):
    torch.manual_seed(3)
    params = container(with_grads(*[torch.randn(8, 8) for _ in range(6)], torch.randn(5)))
    first = measure_grads(params)
    assert first.norms == pytest.approx([reference(p.grad) for p in params])
    params[2].grad = None
    second = measure_grads(params)
    assert second.missing == [2]
    assert second.norms[3] == pytest.approx(reference(params[3].grad))
    params[2].grad = torch.full((8, 8), 2.0)
    params[4].grad = torch.zeros(8, 8)
    third = measure_grads(params)
    assert third.norms[2] == pytest.approx(16.0)
    assert third.zero == [4]
    for p in params:  # what `model.double()` does: same tensors, new data
        p.data = p.data.double()
        p.grad = torch.ones_like(p.data)
    fourth = measure_grads(params)
    assert fourth.norms == pytest.approx([8.0] * 6 + [math.sqrt(5)])


@pytest.mark.parametrize("container", [list, ParamList])
def test_cached_plan_follows_a_gradient_turning_sparse(container):
    params = container(with_grads(*[torch.ones(20, 4) for _ in range(5)]))
    measure_grads(params)
    params[1].grad = sparse_grad([3.0])
    stats = measure_grads(params)
    assert stats.norms == pytest.approx([math.sqrt(80), 6.0, math.sqrt(80), math.sqrt(80), math.sqrt(80)])


def test_plan_cache_is_bounded_and_holds_no_tensor():
    for _ in range(measure._MAX_PLANS + 5):
        measure_grads(with_grads(torch.ones(3), torch.ones(3)))
    assert len(measure._PLANS) <= measure._MAX_PLANS
    for plan in measure._PLANS.values():
        held = [v for v in vars(plan).values() if isinstance(v, torch.Tensor)]
        assert all(t.dtype == torch.int64 for t in held)  # only the segment lengths, never a parameter or gradient


def test_param_list_keeps_its_plan_so_a_clean_step_makes_none(monkeypatch):
    made = []
    real = measure._make_plan
    monkeypatch.setattr(measure, "_make_plan", lambda *args: made.append(1) or real(*args))
    torch.manual_seed(4)
    params = ParamList(with_grads(*[torch.randn(8, 8) * (i + 1) for i in range(12)], torch.randn(3)))
    before = dict(measure._PLANS)
    for _ in range(4):
        for p in params:  # a new backward: new gradient tensors, same layout
            p.grad = torch.randn_like(p) * p.grad.abs().max()
        stats = measure_grads(params)
        assert stats.norms == pytest.approx([reference(p.grad) for p in params], rel=1e-6)
    assert len(made) == 1
    assert list(params.plans) == [()]  # keyed by the missing pattern alone
    assert before == measure._PLANS  # the module-level cache (keyed by every tensor's id) is not used
    params[3].grad = None
    assert measure_grads(params).missing == [3]
    assert len(made) == 2
    assert list(params.plans) == [(), (3,)]


def test_new_missing_patterns_are_planned_from_the_remembered_layout(monkeypatch):
    """LayerDrop / MoE routing: a new set of missing gradients on most steps. The plan for each comes from what the
    list remembers of every gradient's group: only gradients never seen before are looked at."""
    learned = []
    real = measure._Layout.learn
    monkeypatch.setattr(measure._Layout, "learn", lambda self, i, g: learned.append(i) or real(self, i, g))
    torch.manual_seed(6)
    shapes = [(8, 8), (8,)] * 30 + [(3, 5), (), (40000,)]
    params = ParamList(nn.Parameter(torch.zeros(s)) for s in shapes)
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        drop = set(torch.randperm(len(params), generator=gen)[: 1 + step % 5].tolist())
        if step == 0:
            drop = {0, 5}  # these two are seen later
        for i, p in enumerate(params):
            p.grad = None if i in drop else torch.randn_like(p) * (i + 1)
        stats = measure_grads(params)
        assert stats.missing == sorted(drop)
        assert [i for i, v in enumerate(stats.norms) if v is None] == sorted(drop)
        got = [v for v in stats.norms if v is not None]
        assert got == pytest.approx([reference(p.grad) for p in params if p.grad is not None], rel=1e-6)
    assert sorted(learned) == list(range(len(params)))  # each gradient's group was looked up once


def test_the_pass_does_not_go_through_a_pushed_torch_function_mode():
    """On a traced step the tracer's mode stays pushed while the optimizer steps: the guard's own reads and ops must
    not go through its Python handler (several microseconds per tensor), nor be recorded by it."""
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    grads = [torch.randn(8, 8) for _ in range(6)] + [torch.zeros(3), torch.tensor([math.nan]), torch.randn(40000)]
    params = ParamList(with_grads(*grads))
    scale = torch.tensor(2.0)
    with Counting():
        params[0].requires_grad  # noqa: B018 - the mode does see an attribute read outside the pass
        assert Counting.calls == 1
        stats = measure_grads(params, scale)
    assert Counting.calls == 1
    assert (stats.zero, stats.nonfinite, stats.scale) == ([6], [7], 2.0)


def test_param_list_plans_are_bounded_and_hold_no_tensor():
    params = ParamList(with_grads(*[torch.ones(3) for _ in range(measure._MAX_LIST_PLANS + 4)]))
    grads = [p.grad for p in params]
    for i in range(len(params)):  # a new pattern of missing gradients each time
        for j, p in enumerate(params):
            p.grad = None if j == i else grads[j]
        measure_grads(params)
    assert len(params.plans) == measure._MAX_LIST_PLANS
    for plan in params.plans.values():
        held = [v for v in vars(plan).values() if isinstance(v, torch.Tensor)]
        assert all(t.dtype == torch.int64 for t in held)


def test_blocks_stay_under_the_grain_size_and_keep_the_parameter_order():
    # 700 same-shape gradients (a block of all of them would be 44800 elements) and eight 0-dim ones, interleaved.
    torch.manual_seed(5)
    grads = []
    for i in range(700):
        grads.append(torch.randn(8, 8) * (1 + i % 97))
        if i % 90 == 0:
            grads.append(torch.randn(()) * (i + 1))
    plan = measure._make_plan(grads)
    assert len(plan.blocks) >= 3
    for _, rows, numel, _ in plan.blocks:
        assert rows * numel < measure._GRAIN or rows == measure._STACK_MIN
    assert sum(rows for _, rows, _, _ in plan.blocks) == len(grads)
    stats = measure_grads(with_grads(*grads))
    assert stats.norms == pytest.approx([reference(g) for g in grads], rel=1e-6)


def test_scale_tensor_is_read_in_the_same_transfer(transfers):
    grads = [torch.randn(8, 8) for _ in range(6)] + [torch.randn(40000)]
    params = with_grads(*grads)
    stats = measure_grads(params, torch.tensor(1024.0))
    assert len(transfers) == 1
    assert stats.syncs == 1
    assert stats.scale == 1024.0
    assert stats.norms == pytest.approx([reference(g) / 1024.0 for g in grads], rel=1e-6)
    assert stats.total_norm == pytest.approx(math.sqrt(sum(reference(g) ** 2 for g in grads)) / 1024.0, rel=1e-6)
    transfers.clear()
    none = measure_grads(with_grads(None, None), torch.tensor(8.0))  # nothing to measure: the scale alone
    assert (len(transfers), none.scale, none.total_norm) == (1, 8.0, 0.0)


def test_amp_scale_is_the_scalers_tensor_without_a_read():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert amp_scale(scaler, None) == (scaler, 2.0**10)  # no tensor before the first `scale()`: the initial value
    scaler.scale(torch.ones(()))
    got, scale = amp_scale(scaler, None)
    assert got is scaler
    assert isinstance(scale, torch.Tensor)
    assert scale is scaler._get_scale_async()
    assert float(scale) == 2.0**10
    plain, fused = (
        torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]),
        torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], fused=True),
    )
    assert amp_scale(scaler, plain) == (scaler, 1.0)  # `scaler.step` unscaled its gradients
    assert amp_scale(scaler, fused)[1] is scale  # a fused optimizer unscales inside its own `step()`
    assert amp_scale(torch.amp.GradScaler("cpu", enabled=False), fused) == (None, 1.0)
    assert amp_scale(None, fused) == (None, 1.0)


class _ScaleReads:
    """Counts ``scaler.get_scale()`` calls (each one a device sync on CUDA) on a real scaler."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.calls = 0
        real = scaler.get_scale

        def counting() -> float:
            self.calls += 1
            return real()

        scaler.get_scale = counting  # type: ignore[method-assign]


class _FusedAdam(Net):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


class _BigLossFused(BigLoss, _FusedAdam):
    pass


def _record_measures(monkeypatch) -> list[tuple[object, float, GradStats]]:
    """``(scale argument, its value then, stats)`` of every ``measure_grads`` call the guard makes."""
    import lightning_gradguard.core as core

    seen = []
    real = core.measure_grads

    def recording(params, scale=1.0):
        stats = real(params, scale)
        seen.append((scale, float(scale), stats))  # the scaler updates its tensor in place after the step
        return stats

    monkeypatch.setattr(core, "measure_grads", recording)
    return seen


@pytest.mark.parametrize("overflow", [False, True])
def test_fused_optimizer_under_amp_reads_the_scale_with_the_norms(tmp_path, monkeypatch, overflow):
    """``Adam(fused=True)`` under a real fp16 scaler: gradients are still scaled at the hook, and the scale comes back
    in the norms' transfer. The guard never calls ``get_scale()`` (a sync of its own on CUDA), also not on the
    overflow steps the scaler skips, which stay silent."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16 if overflow else 2.0**10)
    reads = _ScaleReads(scaler)
    seen = _record_measures(monkeypatch)
    guard = GradGuard(log_every_n_steps=0, diagnose="never")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    make_trainer(tmp_path, [guard], max_steps=6, plugins=[plugin]).fit((_BigLossFused if overflow else _FusedAdam)(),
                                                                       loader())  # fmt: skip
    assert reads.calls == 0
    assert guard.findings == []
    assert len(seen) == 6
    for scale, value, stats in seen:
        assert isinstance(scale, torch.Tensor)
        assert stats.scale == value
        assert stats.syncs == (2 if stats.nonfinite else 1)  # a confirmation only on overflow steps
    skipped = sum(1 for _, _, stats in seen if stats.nonfinite)
    assert (skipped > 0) == overflow


@pytest.mark.parametrize("overflow", [False, True])
def test_unfused_optimizer_under_amp_reads_the_scale_only_on_overflow_steps(tmp_path, monkeypatch, overflow):
    """A plain optimizer's gradients are unscaled before the hook: the scale matters only to tell an overflow the
    scaler skips from a NaN, so it is read on the steps with non-finite gradients alone."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16 if overflow else 2.0**10)
    reads = _ScaleReads(scaler)
    seen = _record_measures(monkeypatch)
    guard = GradGuard(log_every_n_steps=0, diagnose="never")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    make_trainer(tmp_path, [guard], max_steps=6, plugins=[plugin]).fit(BigLoss() if overflow else Net(), loader())
    assert guard.findings == []
    assert all(scale == 1.0 for scale, _, _ in seen)
    skipped = sum(1 for _, _, stats in seen if stats.nonfinite)
    assert (skipped > 0) == overflow
    assert reads.calls == skipped


# ---------------------------------------------------------------------------------------------- host transfers
def test_clean_step_reads_the_device_once(transfers):
    params = with_grads(*[torch.randn(8, 8) for _ in range(10)], torch.randn(40000), sparse_grad([1.0]), None)
    stats = measure_grads(params)
    assert len(transfers) == 1
    assert stats.syncs == 1


def test_candidates_take_exactly_one_more_transfer(transfers):
    params = with_grads(torch.zeros(4), torch.tensor([math.nan]), torch.full((3,), 1e-30), torch.ones(2))
    stats = measure_grads(params)
    assert len(transfers) == 2
    assert stats.syncs == 2
    assert (stats.zero, stats.nonfinite) == ([0], [1])


def test_gradguard_step_reads_the_device_once_per_optimizer_step(tmp_path, transfers):
    make_trainer(tmp_path, [GradGuard(log_every_n_steps=0, diagnose="never")], max_steps=4).fit(Net(), loader())
    assert len(transfers) == 4


@pytest.mark.cuda
@CUDA
def test_cuda_clean_step_synchronises_once():
    params = with_grads(*[torch.randn(8, 8, device="cuda") for _ in range(10)], torch.randn(40000, device="cuda"),
                        torch.randn(64, device="cuda").half())  # fmt: skip
    measure_grads(params)  # the plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = measure_grads(params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert stats.syncs == 1


@pytest.mark.cuda
@CUDA
def test_cuda_nonfinite_and_zero_gradients_are_reported():
    params = with_grads(torch.tensor([1.0, math.nan], device="cuda"), torch.zeros(4, device="cuda"),
                        torch.full((40000,), 1e20, device="cuda"), torch.ones(3, device="cuda"))  # fmt: skip
    for _ in range(3):  # the cached plan too
        stats = measure_grads(params)
        assert stats.nonfinite == [0]
        assert stats.zero == [1]
        assert stats.norms[2] == pytest.approx(1e20 * 200.0)
        assert stats.norms[3] == pytest.approx(math.sqrt(3))


# ---------------------------------------------------------------------------------------------- real precisions
@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_trainer_half_precision_norms_match_a_float64_reference(tmp_path, monkeypatch, precision):
    import lightning_gradguard.core as core

    seen = []
    real = core.measure_grads

    def recording(params, scale=1.0):
        stats = real(params, scale)
        seen.append((stats, [None if p.grad is None else reference(p.grad) for p in params],
                     {p.grad.dtype for p in params if p.grad is not None}))  # fmt: skip
        return stats

    monkeypatch.setattr(core, "measure_grads", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [GradGuard(log_every_n_steps=0)], max_steps=3, precision=precision).fit(Net(), loader())
    assert len(seen) == 3
    want = torch.bfloat16 if precision == "bf16-true" else torch.float16
    for stats, ref, dtypes in seen:
        assert dtypes == {want}
        assert stats.clean
        assert stats.norms == pytest.approx(ref, rel=1e-3)


def test_check_step_with_a_fused_optimizer_under_a_scaler_reads_the_scale_with_the_norms():
    """`check_step(..., scaler=)` with `Adam(fused=True)`: as in the callback, no `get_scale()` of its own."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    reads = _ScaleReads(scaler)
    for step in range(3):
        with check_step(model, opt, scaler=scaler, strict=True, step=step) as chk:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(torch.randn(4, 8)).float().pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert chk.findings == []
    assert reads.calls == 0
