"""Messages for people at scale: findings grouped by module in warnings, errors and the report; every tensor kept in
``err.findings`` and the JSON report; warnings about the optimizer point at ``configure_optimizers``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from conftest import make_trainer, where
from lightning_gradguard import Finding, GradGuard, GradGuardError, GradGuardWarning, check_step
from lightning_gradguard.findings import group_findings
from lightning_gradguard.report import RunReport

N_BLOCKS = 25


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def batches(features: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, features)), batch_size=8)


class FrozenBackbone(LightningModule):
    """A frozen 25-block backbone (100 tensors) handed to the optimizer with the trainable head."""

    def __init__(self, keep_trainable: str | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*[Block() for _ in range(N_BLOCKS)])
        self.head = nn.Linear(8, 1)
        self.backbone.requires_grad_(False)
        if keep_trainable:
            self.get_parameter(keep_trainable).requires_grad_(True)

    def training_step(self, batch, batch_idx):
        return self.head(self.backbone(batch[0])).pow(2).mean()

    def configure_optimizers(self):
        params = list(self.parameters())
        return torch.optim.SGD(params, lr=0.1)  # OPTIMIZER

    def train_dataloader(self):
        return batches(8)


class NanEverywhere(LightningModule):
    """A NaN loss: 1000 tensors get a NaN gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(500))

    def training_step(self, batch, batch_idx):
        x = batch[0]
        for layer in self.layers:
            x = layer(x)
        return x.sum() * float("nan")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return batches(2)


def fit_recording(tmp_path, model, guard, **kwargs):
    trainer = make_trainer(tmp_path, [guard], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return [w for w in caught if issubclass(w.category, GradGuardWarning)]


def test_frozen_backbone_gives_one_warning_at_configure_optimizers(tmp_path):
    guard = GradGuard(report_path=str(tmp_path / "report.json"))
    caught = fit_recording(tmp_path, FrozenBackbone(), guard)

    assert len(caught) == 1  # was one per tensor: 100 (and 438 console lines)
    (w,) = caught
    text = str(w.message)
    assert "module `backbone` (100 tensors, 3.6 k parameters)" in text
    assert len(text.splitlines()) <= 8
    assert f"{w.filename}:{w.lineno}".endswith(where("OPTIMIZER"))  # not at `trainer.fit`

    assert len(guard.findings) == 4 * N_BLOCKS  # every tensor is kept
    table = guard.report.table()
    assert "100 findings in 1 group" in table
    assert len(table.splitlines()) == 4  # title, header, rule, one row
    data = json.loads((tmp_path / "report.json").read_text())
    assert len(data["findings"]) == 4 * N_BLOCKS  # the JSON keeps one entry per tensor
    assert [(g["kind"], g["module"], len(g["params"])) for g in data["groups"]] == [("frozen", "backbone", 100)]


def test_a_backbone_frozen_but_for_one_tensor_is_one_warning_saying_how_many(tmp_path):
    """`backbone` is not all frozen, so it is not "module `backbone` (100 tensors)"; but its 99 frozen tensors share
    one cause and one fix: one warning, "99 of its 100 tensors", not one per block (it was 26)."""
    guard = GradGuard()
    caught = fit_recording(tmp_path, FrozenBackbone(keep_trainable="backbone.24.fc2.bias"), guard)

    groups = group_findings(guard.findings, guard.report.sizes)
    assert [(g.module, len(g.findings), g.of) for g in groups] == [("backbone", 4 * N_BLOCKS - 1, 4 * N_BLOCKS)]
    assert len(caught) == 1
    text = str(caught[0].message)
    assert f"module `backbone` ({4 * N_BLOCKS - 1} of its {4 * N_BLOCKS} tensors" in text
    assert "backbone.24.fc2.bias" not in text


def test_nan_in_1000_tensors_is_a_short_error_keeping_every_tensor(tmp_path):
    guard = GradGuard(report_path=str(tmp_path / "report.json"))
    with pytest.raises(GradGuardError) as err:
        make_trainer(tmp_path, [guard]).fit(NanEverywhere())

    text = str(err.value)
    assert len(text.splitlines()) <= 10  # was 2000
    assert "every parameter of the model (1000 tensors, 3.0 k parameters)" in text
    assert "layers.0.weight: nonfinite" in text
    assert "... and 995 more" in text
    assert len(err.value.findings) == 1000
    assert {f.kind for f in err.value.findings} == {"nonfinite"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert len(data["findings"]) == 1000


def test_group_findings_by_largest_module():
    sizes = {"enc.0.weight": 6, "enc.0.bias": 2, "enc.1.weight": 6, "enc.1.bias": 2, "head.weight": 3}
    frozen = [Finding("frozen", n, f"`{n}` is frozen.") for n in ("enc.0.weight", "enc.0.bias", "enc.1.weight")]
    groups = group_findings([*frozen, Finding("zero", "head.weight", "")], sizes)
    assert [(g.kind, g.module, g.params, g.numel, g.of) for g in groups] == [
        ("frozen", "enc", ["enc.0.weight", "enc.0.bias", "enc.1.weight"], 14, 4),
        ("zero", None, ["head.weight"], 3, 0),
    ]
    assert groups[0].message == "module `enc` (3 of its 4 tensors, 14 parameters) is frozen."
    whole = group_findings(frozen[:2], sizes)
    assert [(g.module, g.of) for g in whole] == [("enc.0", 0)]
    assert whole[0].message == "module `enc.0` (2 tensors, 8 parameters) is frozen."
    # Without the model's layout nothing is grouped.
    assert [g.module for g in group_findings(frozen)] == [None, None, None]


def test_findings_of_one_kind_with_different_causes_stay_apart():
    """Two cut lines are two problems: the tensors cut at each stay in their own group (nearest correct case of the
    merge by cause)."""
    sizes = {"a.0.weight": 4, "a.0.bias": 2, "a.1.weight": 4, "a.1.bias": 2}
    first = [Finding("detached", n, f"`{n}` is cut.", "train.py:10") for n in ("a.0.weight", "a.0.bias")]
    second = [Finding("detached", n, f"`{n}` is cut.", "train.py:20") for n in ("a.1.weight",)]
    groups = group_findings([*first, *second], sizes)
    assert [(g.module, g.params, g.where) for g in groups] == [
        ("a.0", ["a.0.weight", "a.0.bias"], "train.py:10"),
        (None, ["a.1.weight"], "train.py:20"),
    ]


def test_different_kinds_never_share_a_group():
    sizes = {"m.weight": 4, "m.bias": 2}
    groups = group_findings([Finding("unused", "m.weight", ""), Finding("detached", "m.bias", "")], sizes)
    assert [(g.kind, g.module) for g in groups] == [("detached", None), ("unused", None)]


@pytest.mark.filterwarnings("ignore::lightning_gradguard.GradGuardWarning")
def test_ignore_takes_one_string_and_the_report_lists_what_it_left_out(tmp_path):
    guard = GradGuard(ignore="backbone.*", on_frozen="raise")
    assert guard.ignore == ["backbone.*"]
    make_trainer(tmp_path, [guard]).fit(FrozenBackbone())  # frozen backbone ignored: no raise

    assert guard.findings == []
    table = guard.report.table()
    assert "every parameter received" not in table
    assert "every checked parameter received a usable gradient" in table
    assert "100 parameter tensors not checked (ignore=['backbone.*'])" in table
    data = guard.report.to_dict()
    assert data["ignore"] == ["backbone.*"]
    assert len(data["ignored"]) == 100


def test_clean_report_without_ignore_claims_every_parameter(tmp_path):
    guard = GradGuard()
    model = FrozenBackbone()
    model.backbone.requires_grad_(True)
    make_trainer(tmp_path, [guard]).fit(model)
    assert guard.report.table() == "GradGuard: every parameter received a usable gradient."


def test_check_step_accepts_one_ignore_string():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with check_step(model, opt, ignore="0.*") as chk:
        loss = model[1](torch.ones(1, 2)).sum()  # model[0] unused, but ignored
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert chk.findings == []


def test_report_reads_back_its_groups(tmp_path):
    report = RunReport()
    report.set_model(["a.w", "a.b", "c"], [3, 1, 2])
    report.add([Finding("unused", "a.w", "`a.w` unused."), Finding("unused", "a.b", "`a.b` unused.")])
    path = report.write_json(tmp_path / "r.json")
    again = RunReport.read_json(path)
    assert again.table() == report.table()
    assert "module `a` (2 tensors, 4 parameters)" in again.table()


# ---------------------------------------------------------------------- torch's own warnings under GradGuard's modes
class BroadcastingLoss(LightningModule):
    """A classic silent bug that torch warns about: an ``[B, 1]`` output against a ``[B]`` target."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)  # broadcasting loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def torch_warnings(caught: list, text: str) -> list[str]:
    """``path:line`` of the caught warnings whose message contains ``text``."""
    return sorted({f"{w.filename}:{w.lineno}" for w in caught if text in str(w.message)})


def test_torch_warning_in_a_traced_step_names_the_users_line(tmp_path):
    """While the tracer forwards the ops of a traced step, torch's own warnings (here ``mse_loss``'s Python warning
    about broadcasting) name the user's line, not GradGuard's, and ``warnings.showwarning`` is left as it was."""
    from conftest import loader

    before = warnings.showwarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [GradGuard(diagnose="always")], max_steps=2).fit(BroadcastingLoss(), loader())
    line = where("broadcasting loss").rsplit(":", 1)[1]
    assert torch_warnings(caught, "different to the input size") == [f"{__file__}:{line}"]
    assert warnings.showwarning is before


# ---------------------------------------------------------------- mutation campaign (tests/mutation/run.py)
def _unused(n: int, wheres: int = 0) -> tuple[list[Finding], dict[str, int]]:
    """``n`` unused findings on every tensor of module ``m`` (``wheres`` of them at distinct lines); the model also
    has a ``head``."""
    names = [f"m.{i}" for i in range(n)]
    findings = [
        Finding("unused", name, f"`{name}` received no gradient.", f"model.py:{10 + i}" if i < wheres else None)
        for i, name in enumerate(names)
    ]
    return findings, {**dict.fromkeys(names, 4), "head.weight": 4}


@pytest.mark.parametrize(("n", "more"), [(5, None), (6, "    ... and 1 more")])
def test_a_group_lists_five_names_and_counts_only_the_rest(n, more):
    findings, sizes = _unused(n)
    (group,) = group_findings(findings, sizes)
    lines = group.lines()
    assert [line.strip() for line in lines[1:6]] == [f"m.{i}: unused" for i in range(5)]
    assert [line for line in lines if line.startswith("    ...")] == ([more] if more else [])


@pytest.mark.parametrize(("n", "points_on"), [(5, False), (6, True)])
def test_an_error_points_at_err_findings_only_when_it_left_names_out(n, points_on):
    findings, sizes = _unused(n)
    text = str(GradGuardError.from_findings(findings, 3, sizes=sizes))
    assert ("`err.findings` and the run report list every tensor" in text) is points_on


@pytest.mark.parametrize(("wheres", "expected"), [
    (3, "model.py:10, model.py:11, model.py:12"),
    (4, "model.py:10, model.py:11, model.py:12 and 1 more"),
])  # fmt: skip
def test_a_group_names_three_lines_and_counts_the_rest(wheres, expected):
    findings, sizes = _unused(6, wheres)
    (group,) = group_findings(findings, sizes)
    assert group.where == expected


def test_a_group_whose_messages_differ_says_what_they_share_and_gives_one_example():
    findings, sizes = _unused(3)
    same = group_findings(findings, sizes)[0].message
    assert same == "module `m` (3 tensors, 12 parameters) received no gradient."
    odd = Finding("unused", "m.2", "`m.2` never took part in the forward pass.")
    (group,) = group_findings([*findings[:2], odd], sizes)
    assert group.message == (
        "module `m` (3 tensors, 12 parameters): no gradient: the loss does not depend on them "
        "(e.g. `m.0` received no gradient.)"
    )


def test_torch_warning_is_shown_once_per_line_as_without_gradguard(tmp_path):
    """Under Python's "default" action a warning shows once per line. Step 0 is traced (the warning is raised under
    the mode), the later ones are not: still one warning at the user's line, as in the same run without the guard."""
    from conftest import loader

    shown = {}
    for name, callbacks in (("guarded", [GradGuard(diagnose="first")]), ("plain", [])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            make_trainer(tmp_path / name, callbacks, max_steps=3).fit(BroadcastingLoss(), loader())
        shown[name] = [f"{w.filename}:{w.lineno}" for w in caught if "different to the input size" in str(w.message)]
    line = where("broadcasting loss").rsplit(":", 1)[1]
    assert shown["plain"] == [f"{__file__}:{line}"]
    assert shown["guarded"] == shown["plain"]
