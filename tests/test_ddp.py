"""GradGuard under distributed training: real 2-process CPU/gloo runs, plus unit tests of the pure parts.

Each launch runs a script from ``tests/ddp_scripts/`` in a fresh session with a hard timeout; the script runs one
``Trainer.fit`` per scenario in the same two processes (``ddp`` re-launches the script for rank 1; ``ddp_spawn``
spawns both ranks per fit), and every rank writes what its GradGuard did to ``<scenario>.rank<r>.json``. A launch
is shared by the tests of its scenarios (module-scoped fixtures), so the whole file costs five launches.

Every launch proves that all processes ended: ``communicate()`` returns only once every process holding the output
pipe (rank 1 included) has exited, and no recorded pid is still alive. A rank left waiting in a collective would
instead hit the hard timeout (the process-group timeout of the scripts is 45 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule

from conftest import loader, make_trainer, where
from lightning_gradguard import Finding, GradGuard
from lightning_gradguard.audit import StepFacts
from lightning_gradguard.callback import rank_zero_warnings
from lightning_gradguard.distributed import BITS, RankSync, _Agreed, decode_ranks, encode_ranks, format_ranks
from lightning_gradguard.params import clean_name
from lightning_gradguard.policy import GradGuardWarning
from lightning_gradguard.shards import stats_from_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "ddp_scripts"
LAUNCH_TIMEOUT = 150  # seconds for a whole launch (several fits); a hang would take the 45 s process-group timeout
SPREAD = 5.0  # seconds: every rank raises within this of the first one
#: Set by a launcher around us (e.g. a DDP test runner): they would make the script join that job instead.
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

DDP_SCENARIOS = (
    "unused_all",
    "unused_rank1",
    "detached",
    "nan_rank1",
    "graphless_rank1",
    "accumulate",
    "accumulate_last_skips",
)
FIND_UNUSED_SCENARIOS = (
    "unused_all",
    "unused_rank1",
    "accumulate_last_skips",
    "unused_rank0_detached_rank1",
    "nan_rank1",
    "graphless_rank1",
)
SHARDED_SCENARIOS = ("clean", "unused")


@dataclass
class Launch:
    """One script launch: its output, and each scenario's per-rank records."""

    out: Path
    output: str
    returncode: int
    wall: float

    def ranks(self, scenario: str) -> list[dict]:
        """The records of ranks 0 and 1 for ``scenario`` (both must exist)."""
        records = []
        for rank in (0, 1):
            path = self.out / f"{scenario}.rank{rank}.json"
            assert path.exists(), f"rank {rank} wrote nothing for {scenario!r}:\n{self.output[-4000:]}"
            records.append(json.loads(path.read_text()))
        return records


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")  # a zombie has ended; only its exit status waits to be collected


def launch(script: str, out: Path, *args: str) -> Launch:
    """Run ``script out *args`` in its own session; kill the whole session if it outlives the hard timeout."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), str(out), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{script} {' '.join(args)} did not end within {LAUNCH_TIMEOUT} s:\n{output[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leave nothing behind, whatever happened
    wall = time.monotonic() - start
    result = Launch(out, output, proc.returncode, wall)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{output[-4000:]}"
    return result


def assert_all_ended(records: list[dict]) -> None:
    deadline = time.monotonic() + 5
    pids = {r["pid"] for r in records}
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "a rank's process is still running"


def assert_raised_together(records: list[dict], hook: str) -> None:
    """Every rank raised GradGuardError in ``hook``, on the same step, within seconds, with the same message."""
    assert [r["status"] for r in records] == ["raised", "raised"]
    assert {r["hook"] for r in records} == {hook}
    assert len({r["step"] for r in records}) == 1
    assert len({r["error"] for r in records}) == 1, "the ranks raised different errors"
    times = [r["time"] for r in records]
    assert max(times) - min(times) < SPREAD
    assert_all_ended(records)


def assert_agree(records: list[dict]) -> list[dict]:
    """Every rank's ``guard.findings`` (and report notes) are the same; return rank 0's findings."""
    assert records[0]["findings"] == records[1]["findings"]
    assert records[0]["notes"] == records[1]["notes"]
    return records[0]["findings"]


# ---------------------------------------------------------------------------------------------------- launches
@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Launch:
    return launch("run_ddp.py", tmp_path_factory.mktemp("ddp"), "ddp", *DDP_SCENARIOS)


@pytest.fixture(scope="module")
def find_unused(tmp_path_factory) -> Launch:
    return launch(
        "run_ddp.py", tmp_path_factory.mktemp("find_unused"), "ddp_find_unused_parameters_true", *FIND_UNUSED_SCENARIOS
    )


@pytest.fixture(scope="module")
def spawn(tmp_path_factory) -> Launch:
    return launch("run_ddp.py", tmp_path_factory.mktemp("spawn"), "ddp_spawn", "unused_rank1")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Launch:
    return launch("run_fsdp.py", tmp_path_factory.mktemp("fsdp"), "fsdp", *SHARDED_SCENARIOS)


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory) -> Launch:
    return launch("run_fsdp.py", tmp_path_factory.mktemp("model_parallel"), "model_parallel", *SHARDED_SCENARIOS)


# ---------------------------------------------------------------------------------------------------- ddp
@pytest.mark.ddp
def test_ddp_unused_on_every_rank_raises_on_first_step_on_all_ranks(ddp):
    records = ddp.ranks("unused_all")
    assert_raised_together(records, "on_before_backward")
    assert records[0]["step"] == 0
    findings = assert_agree(records)
    assert [(f["kind"], f["param"], f["ranks"]) for f in findings] == [
        ("unused", "aux.weight", []),
        ("unused", "aux.bias", []),
    ]
    error = records[0]["error"]
    assert "find_unused_parameters=False" in error
    assert "aux.weight" in error
    assert "use these parameters in the loss" in error  # fix 1
    assert 'strategy="ddp_find_unused_parameters_true"' in error  # fix 2
    assert "on_unused=" in error
    assert "Expected to have finished reduction" not in ddp.output.replace(error, "")


@pytest.mark.ddp
def test_ddp_unused_on_rank1_only_raises_on_all_ranks_within_seconds(ddp):
    records = ddp.ranks("unused_rank1")
    assert_raised_together(records, "on_before_backward")
    findings = assert_agree(records)
    assert [(f["kind"], f["param"], f["ranks"]) for f in findings] == [
        ("unused", "aux.weight", [1]),
        ("unused", "aux.bias", [1]),
    ]
    assert "on rank 1 of 2 only" in findings[0]["message"]
    assert "hang inside `loss.backward()`" in records[0]["error"]


@pytest.mark.ddp
def test_ddp_detached_on_every_rank_names_the_line(ddp):
    records = ddp.ranks("detached")
    assert_raised_together(records, "on_before_backward")
    findings = assert_agree(records)
    line = where("cut: aux", str(SCRIPTS / "run_ddp.py")).rsplit(":", 1)[1]
    assert [(f["kind"], f["param"]) for f in findings] == [("detached", "aux.weight"), ("detached", "aux.bias")]
    assert all(f["where"].endswith(f"run_ddp.py:{line}") for f in findings)


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "find_unused"])  # the README's DDP table: "same" in both columns
def test_ddp_nan_on_rank1_only_raises_on_all_ranks(request, strategy):
    records = request.getfixturevalue(strategy).ranks("nan_rank1")
    assert_raised_together(records, "on_before_optimizer_step")
    findings = assert_agree(records)
    assert {f["kind"] for f in findings} == {"nonfinite"}
    assert {f["param"] for f in findings} == {"body.weight", "body.bias", "head.weight", "head.bias", "aux.weight",
                                             "aux.bias"}  # fmt: skip
    assert all(f["ranks"] == [1] for f in findings)
    assert "NaN/Inf on rank 1 of 2 only" in findings[0]["message"]


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "find_unused"])
def test_ddp_graphless_loss_on_rank1_only_raises_on_all_ranks(request, strategy):
    records = request.getfixturevalue(strategy).ranks("graphless_rank1")
    assert_raised_together(records, "on_before_backward")
    findings = assert_agree(records)
    assert findings, "rank 1's traced step explains which parameters its loss was cut from"
    assert {f["kind"] for f in findings} == {"detached"}
    assert all(f["ranks"] == [1] for f in findings)
    assert "[rank 1] The loss does not require grad" in records[0]["error"]


@pytest.mark.ddp
def test_ddp_accumulation_runs_one_collective_per_optimizer_step(ddp):
    records = ddp.ranks("accumulate")
    assert [r["status"] for r in records] == ["finished", "finished"]
    assert assert_agree(records) == []
    assert [(r["optimizer_steps"], r["collectives"]) for r in records] == [(3, 3), (3, 3)]  # 6 micro-batches each
    assert_all_ended(records)


@pytest.mark.ddp
def test_ddp_accumulation_parameter_skipped_by_the_synchronising_micro_batch_raises(ddp):
    records = ddp.ranks("accumulate_last_skips")
    assert_raised_together(records, "on_before_backward")
    findings = assert_agree(records)
    assert [(f["kind"], f["param"]) for f in findings] == [("unused", "aux.weight"), ("unused", "aux.bias")]
    assert "an earlier micro-batch of this step used it, but not the last one" in findings[0]["message"]


@pytest.mark.ddp
@pytest.mark.parametrize(("scenario", "extra"), [("unused_rank1", 1), ("graphless_rank1", 1), ("nan_rank1", 0)])
def test_ddp_a_step_that_raises_before_backward_runs_one_more_collective(ddp, scenario, extra):
    """README, DDP cost: one `all_reduce` per optimizer step, and one more collective (`all_gather_object` of the
    explanations) on a step that raises before `backward()`. A `nonfinite` raise at the optimizer step needs none:
    the averaged gradients are the same on every rank."""
    records = ddp.ranks(scenario)
    assert [r["status"] for r in records] == ["raised", "raised"]
    assert [r["step"] for r in records] == [0, 0]  # the first step: no earlier step's collective is counted
    assert [r["collectives"] for r in records] == [1 + extra] * 2


#: Every DDP scenario that raises, per launch: the error that comes out of `trainer.fit` must still be GradGuard's.
RAISING = [
    *(("ddp", s) for s in ("unused_all", "unused_rank1", "detached", "nan_rank1", "graphless_rank1",
                           "accumulate_last_skips")),
    *(("find_unused", s) for s in ("unused_all", "unused_rank0_detached_rank1", "nan_rank1", "graphless_rank1")),
    ("spawn", "unused_rank1"),
]  # fmt: skip


@pytest.mark.ddp
@pytest.mark.parametrize(("launch", "scenario"), RAISING)
def test_ddp_the_error_out_of_fit_is_gradguards_naming_the_parameters(request, launch, scenario):
    """What the user finally sees (the exception out of `trainer.fit`, after Lightning's `on_exception` hooks) is
    GradGuard's text, whole: `DDPStrategy.on_exception` replaces the text of any exception that matches
    `.*Expected to have finished reduction in the prior iteration.*` with its own, which names no parameter. Under
    `ddp_spawn` the launching process gets the rank's error inside `ProcessRaisedException` (rank 0's record)."""
    records = request.getfixturevalue(launch).ranks(scenario)
    for r in records[:1] if launch == "spawn" else records:
        assert r["error"] in r["seen"], r["seen"][-2000:]
        if launch != "spawn":
            assert r["seen"].startswith("lightning_gradguard.findings.GradGuardError: ")
        assert all(f["param"] in r["error"] for f in r["findings"][:5])  # the first five names are listed
        assert "It looks like your LightningModule has parameters that were not used" not in r["seen"]


# ---------------------------------------------------------------------------------------------------- find_unused
@pytest.mark.ddp
def test_ddp_find_unused_true_unused_on_every_rank_raises_on_all_ranks(find_unused):
    records = find_unused.ranks("unused_all")
    assert_raised_together(records, "on_before_optimizer_step")
    findings = assert_agree(records)
    assert [(f["kind"], f["param"], f["ranks"]) for f in findings] == [
        ("unused", "aux.weight", []),
        ("unused", "aux.bias", []),
    ]


@pytest.mark.ddp
def test_ddp_find_unused_true_unused_on_rank1_only_is_a_report_note(find_unused):
    records = find_unused.ranks("unused_rank1")
    assert [r["status"] for r in records] == ["finished", "finished"]
    assert assert_agree(records) == []
    (note,) = records[0]["notes"]
    assert note.startswith("`aux.weight`, `aux.bias` got no gradient from the loss on rank 1 of 2 at step 0")
    assert_all_ended(records)


@pytest.mark.ddp
def test_ddp_find_unused_true_accumulation_is_judged_per_optimizer_step(find_unused):
    records = find_unused.ranks("accumulate_last_skips")  # aux: first micro-batch only; DDP still syncs its sum
    assert [r["status"] for r in records] == ["finished", "finished"]
    assert assert_agree(records) == []
    assert records[0]["notes"] == []
    assert_all_ended(records)


@pytest.mark.ddp
def test_ddp_find_unused_true_ranks_agree_on_detached_when_one_rank_cut_and_the_other_skipped(find_unused):
    """The dependence rows: rank 0 never calls `aux`, rank 1 calls it and `.detach()`es it. No rank gives `aux` a
    gradient; rank 1's traced loss depends on it, so every rank calls it `detached`, not `unused` (rank 0 alone
    would), and raises at the same step."""
    records = find_unused.ranks("unused_rank0_detached_rank1")
    assert [r["status"] for r in records] == ["raised", "raised"]
    assert {r["hook"] for r in records} == {"on_before_optimizer_step"}
    assert [r["step"] for r in records] == [0, 0]
    for r in records:
        assert [(f["kind"], f["param"], f["ranks"]) for f in r["findings"]] == [
            ("detached", "aux.weight", []),
            ("detached", "aux.bias", []),
        ]
    line = where("cut on rank 1: aux", str(SCRIPTS / "run_ddp.py")).rsplit(":", 1)[1]
    assert all(f["where"].endswith(f"run_ddp.py:{line}") for f in records[1]["findings"])  # the rank that cut it
    assert all(f["where"] in (None, records[1]["findings"][0]["where"]) for f in records[0]["findings"])  # Limits
    times = [r["time"] for r in records]
    assert max(times) - min(times) < SPREAD
    assert_all_ended(records)


@pytest.mark.ddp
def test_ddp_spawn_unused_on_rank1_only_raises_on_all_ranks(spawn):
    records = spawn.ranks("unused_rank1")
    assert_raised_together(records, "on_before_backward")
    assert [f["ranks"] for f in assert_agree(records)] == [[1], [1]]


# ---------------------------------------------------------------------------------------------------- fsdp
NAMES = ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "heads.out.weight", "heads.out.bias",
         "heads.aux.weight", "heads.aux.bias"]  # fmt: skip


def assert_global_norms(records: list[dict]) -> None:
    for r in records:
        assert r["names"] == NAMES
        assert [n for n, _, _ in r["norms"]] == NAMES, "nothing was measured (no sync object at the first step?)"
        assert all(measured is not None for _, measured, _ in r["norms"]), "every parameter of the clean run has a norm"
        for name, measured, reference in r["norms"]:
            assert measured == pytest.approx(reference, rel=1e-5, abs=1e-7), name
    assert records[0]["norms"] == records[1]["norms"]


@pytest.mark.ddp
def test_fsdp_findings_use_original_names_and_global_norms(fsdp):
    records = fsdp.ranks("fsdp-clean")
    # the README's cost: one `all_reduce` per optimizer step (the fused norms, has-a-gradient and NaN/Inf rows)
    assert all(r["optimizer_steps"] > 0 and r["collectives"] == r["optimizer_steps"] for r in records), [
        (r["optimizer_steps"], r["collectives"]) for r in records
    ]
    assert [r["status"] for r in records] == ["finished", "finished"]
    assert assert_agree(records) == []
    assert_global_norms(records)
    assert_all_ended(records)


@pytest.mark.ddp
def test_fsdp_unused_parameter_in_a_used_unit_is_an_all_zero_gradient(fsdp):
    records = fsdp.ranks("fsdp-unused")
    assert [r["status"] for r in records] == ["finished", "finished"]  # `zero` warns by default
    findings = assert_agree(records)
    assert [(f["kind"], f["param"]) for f in findings] == [("zero", "heads.aux.weight"), ("zero", "heads.aux.bias")]
    assert "it may be unused" in findings[0]["message"]
    assert fsdp.output.count("GradGuard: zero: module `heads.aux`") == 1  # warned by rank zero only, one group
    assert_all_ended(records)


@pytest.mark.ddp
def test_model_parallel_findings_use_original_names_and_global_norms(model_parallel):
    records = model_parallel.ranks("model_parallel-clean")
    assert [r["status"] for r in records] == ["finished", "finished"]
    assert assert_agree(records) == []
    assert_global_norms(records)
    assert_all_ended(records)


@pytest.mark.ddp
def test_model_parallel_unused_raises_on_all_ranks(model_parallel):
    records = model_parallel.ranks("model_parallel-unused")
    assert_raised_together(records, "on_before_optimizer_step")
    findings = assert_agree(records)
    assert [(f["kind"], f["param"]) for f in findings] == [("unused", "heads.aux.weight"), ("unused", "heads.aux.bias")]
    assert "received no gradient on any rank" in findings[0]["message"]


# ---------------------------------------------------------------------------------------------------- unit
def test_encode_ranks_sum_names_the_ranks_for_any_world_size():
    world = 2 * BITS + 5  # three int64 words per row
    flags = {r: torch.tensor([r % 3 == 0, r == world - 1, False]) for r in range(world)}
    total = sum(encode_ranks(f, r, world) for r, f in flags.items())
    assert total.shape == (3, 3)
    assert decode_ranks(total) == {0: tuple(r for r in range(world) if r % 3 == 0), 1: (world - 1,)}


def test_format_ranks():
    assert format_ranks((1,)) == "rank 1"
    assert format_ranks((0, 2)) == "ranks 0, 2"


def test_stats_from_shards_global_norms_missing_zero_nonfinite():
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    stats = stats_from_shards(ps, [[9.0 + 16.0, 2, 0], [0.0, 0, 0], [0.0, 1, 0], [float("nan"), 2, 1]], scale=5.0)
    assert stats.norms[:3] == [1.0, None, 0.0]
    assert (stats.missing, stats.zero, stats.nonfinite) == ([1], [2], [3])


def test_clean_name_strips_fsdp_and_checkpoint_wrappers():
    assert clean_name("_fsdp_wrapped_module.body._fsdp_wrapped_module.0.weight") == "body.0.weight"
    assert clean_name("layers.1._checkpoint_wrapped_module.attn._orig_mod.q.weight") == "layers.1.attn.q.weight"


def test_rank_zero_warnings_silences_other_ranks_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for rank in (0, 1):
            with rank_zero_warnings(rank):
                warnings.warn(f"from rank {rank}", GradGuardWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["from rank 0"]


def test_single_process_run_has_no_sync_and_runs_no_collective(tmp_path):
    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return loader()

    guard = GradGuard()
    make_trainer(tmp_path, [guard], max_steps=2).fit(Tiny())
    assert guard._core.checks == 2
    assert guard._core.dist is None
    assert RankSync.of(torch.nn.Linear(2, 2), "cpu") is None


# ---------------------------------------------------------------- unit: what the ranks agreed, applied to findings
# (tests/mutation/run.py: the multi-process launches above cover these too, but take minutes)
def _sync(**kwargs) -> RankSync:
    return RankSync(group=None, rank=0, world_size=2, device="cpu", **kwargs)


def _agreed(loss_bad=(), received=None, dep=None) -> _Agreed:
    return _Agreed(unreached={}, received=received, dep=dep, loss_bad=tuple(loss_bad))


def test_combine_names_the_ranks_whose_loss_was_nan_on_nonfinite_findings_only():
    nan = Finding("nonfinite", "w", "`w` has a NaN or Inf in its gradient.")
    unused = Finding("unused", "b", "`b` received no gradient.")
    sync = _sync(strict=True)
    sync._agreed = _agreed(loss_bad=(1,))
    out = sync.combine([nan, unused], 3)
    assert out[0].ranks == (1,)
    assert "The loss was NaN/Inf on rank 1 of 2 only" in out[0].message
    assert out[1] == unused
    sync._agreed = _agreed(loss_bad=(0, 1))
    (out,) = sync.combine([nan], 4)
    assert (out.ranks, out.message.endswith("The loss was NaN/Inf on every rank.")) == ((), True)
    sync._agreed = _agreed()  # nearest silent: no rank's loss was bad
    assert sync.combine([nan], 5) == [nan]


def test_merge_facts_takes_the_agreed_reach_unless_ddp_is_strict():
    facts = StepFacts(received={1}, dep=1)
    loose = _sync(strict=False)
    loose._agreed = _agreed(received={1, 2}, dep=3)
    merged = loose.merge_facts(facts)
    assert (merged.received, merged.dep) == ({1, 2}, 3)
    strict = _sync(strict=True)  # every synchronised parameter was reached on every rank, or the step raised
    strict._agreed = _agreed(received={1, 2}, dep=3)
    assert strict.merge_facts(facts) is facts


def test_sharded_findings_say_what_fsdp_changes():
    zero = Finding("zero", "w", "`w` received a gradient that is exactly zero everywhere.")
    unused = Finding("unused", "b", "`b` received no gradient.")
    fsdp, dtensor = _sync(sharded="fsdp"), _sync(sharded="dtensor")
    assert "Under FSDP (FullyShardedDataParallel)" in fsdp.combine([zero], 0)[0].message
    assert dtensor.combine([zero], 0) == [zero]  # FSDP2 gives no gradient, not a zero one, to an unused parameter
    for sync in (fsdp, dtensor):
        assert "received no gradient on any rank" in sync.combine([unused], 0)[0].message
