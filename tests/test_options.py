"""Bad input and odd models.

Every invalid option value is rejected when ``GradGuard`` is built, in Python and in a YAML config through
LightningCLI, with a message that names the option and the value. Models at the edges (no parameters, no optimizer,
complex or empty parameters, a parameter in two optimizers) get a clear message or silence, never a traceback from
inside the guard.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from conftest import loader, make_trainer
from lightning_gradguard import GradGuard, GradGuardError
from lightning_gradguard.policy import GradGuardWarning

# (option, value): each must be rejected, naming both.
INVALID: list[tuple[str, Any]] = [
    ("on_frozen", "explode"),
    ("on_unused", "RAISE"),
    ("on_detached", None),
    ("on_orphan", True),
    ("on_stale", ""),
    ("on_nonfinite", "error"),
    ("on_zero", 1),
    ("ignore", [3]),
    ("ignore", [""]),
    ("ignore", [None]),
    ("ignore", 5),
    ("diagnose", "sometimes"),
    ("diagnose", None),
    ("log_every_n_steps", -1),
    ("log_every_n_steps", 1.5),
    ("log_every_n_steps", True),
    ("log_every_n_steps", "10"),
    ("norms", "layer"),
    ("norms", None),
    ("max_norm_tags", 0),
    ("max_norm_tags", 2.5),
    ("max_norm_tags", True),
    ("histograms", "yes"),
    ("value_histograms", 1),
    ("update_ratio", None),
    ("write_report", "false"),
    ("report_path", 3),
    ("idle_window", 0),
    ("idle_window", 2.5),
    ("idle_window", True),
    ("idle_window", "16"),
    ("flow_every", -1),
    ("flow_every", 2.5),
    ("sync", "later"),
    ("sync", None),
]
#: YAML strings that jsonargparse legitimately converts to the option's type ("10" -> 10, "yes" -> True, ...).
CONVERTED_BY_THE_CLI = [
    ("log_every_n_steps", "10"),
    ("histograms", "yes"),
    ("write_report", "false"),
    ("idle_window", "16"),
]


def _id(case: tuple[str, Any]) -> str:
    return f"{case[0]}={case[1]!r}"


@pytest.mark.parametrize("case", INVALID, ids=_id)
def test_invalid_value_is_rejected_at_construction_naming_option_and_value(case):
    option, value = case
    with pytest.raises(ValueError, match=r"GradGuard\(" + option) as exc_info:
        GradGuard(**{option: value})
    assert repr(value) in str(exc_info.value)


def test_the_table_covers_every_option():
    import inspect

    options = {k for k in inspect.signature(GradGuard.__init__).parameters if k != "self"}
    assert options == {option for option, _ in INVALID}
    assert len(INVALID) >= 20


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)


def cli_error(tmp_path: Path, option: str, value: Any) -> str:
    """Build a Trainer from a YAML config with ``GradGuard(option=value)``; the text of the error it stops with."""
    config = {
        "trainer": {
            "logger": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning_gradguard.GradGuard", "init_args": {option: value}}],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            LightningCLI(Tiny, run=False, args=["--config", str(path)], save_config_callback=None)
    except SystemExit as exit_:  # jsonargparse's type check, before GradGuard is built
        return f"exit code {exit_.code}: {stderr.getvalue()}"
    except ValueError as err:  # GradGuard's own check, when the CLI builds it
        return str(err)
    pytest.fail(f"LightningCLI accepted {option}={value!r}")


@pytest.fixture
def cli_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI(args=...) warns when sys.argv holds pytest's
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.mark.parametrize("case", [c for c in INVALID if c not in CONVERTED_BY_THE_CLI], ids=_id)
def test_invalid_value_in_yaml_is_rejected_by_lightning_cli_naming_option_and_value(tmp_path, cli_argv, case):
    option, value = case
    text = cli_error(tmp_path, option, value)
    assert not text.startswith("exit code 0")
    assert option in text
    assert str(value) in text


def test_ignore_accepts_one_string(tmp_path):
    guard = GradGuard(ignore="aux.*")
    assert guard.ignore == ["aux.*"]


def test_ignore_accepts_one_string_in_yaml(tmp_path, cli_argv):
    path = tmp_path / "config.yaml"
    callback = {"class_path": "lightning_gradguard.GradGuard", "init_args": {"ignore": "aux.*"}}
    path.write_text(yaml.safe_dump({"trainer": {"logger": False, "callbacks": [callback]}}))
    cli = LightningCLI(Tiny, run=False, args=["--config", str(path)], save_config_callback=None)
    (guard,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradGuard)]
    assert guard.ignore == ["aux.*"]


# ---------------------------------------------------------------------------------------------------- odd models
class _Base(LightningModule):
    def train_dataloader(self):
        return loader()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoParameters(_Base):
    """No parameter at all, no optimizer, nothing to optimise."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None


class AllFrozen(_Base):
    """The optimizer holds only frozen parameters: the loss has no graph."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()


class NoOptimizer(_Base):
    """``configure_optimizers`` returns None: Lightning trains with a no-op optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return None


class ComplexWeights(_Base):
    """A complex parameter next to a real one."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 1, dtype=torch.cfloat))
        self.layer = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return (x.to(torch.cfloat) @ self.w).abs().mean() + self.layer(x).pow(2).mean()


class EmptyParameter(_Base):
    """A parameter with no elements (say, zero prefix tokens) that takes part in the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = nn.Parameter(torch.zeros(0, 8))
        self.layer = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x = torch.cat([self.prefix, batch[0]])
        return self.layer(x).pow(2).mean()


class SharedByTwoOptimizers(_Base):
    """Manual optimization with two optimizers that both hold ``a.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        opt_all, opt_a = self.optimizers()
        loss = self.b(self.a(batch[0])).pow(2).mean()
        self.manual_backward(loss)
        opt_all.step()
        opt_a.step()
        opt_all.zero_grad()
        opt_a.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD([self.a.weight], lr=0.1)


def fit_everything_on(tmp_path, model: LightningModule) -> GradGuard:
    """Fit two steps with every dashboard option on (so that each code path meets the odd model)."""
    guard = GradGuard(log_every_n_steps=1, norms="param", value_histograms=True, update_ratio=True, diagnose="always")
    trainer = make_trainer(tmp_path, [guard], max_steps=2, max_epochs=1, logger=TensorBoardLogger(tmp_path))
    trainer.fit(model)
    return guard


@pytest.mark.parametrize("model_class", [NoParameters, ComplexWeights, SharedByTwoOptimizers])
def test_odd_model_trains_silently(tmp_path, model_class):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        guard = fit_everything_on(tmp_path, model_class())
    assert guard.findings == []


def test_only_frozen_parameters_is_a_clear_error_before_backward(tmp_path):
    with pytest.raises(GradGuardError, match="does not depend on any trainable parameter") as exc_info:
        fit_everything_on(tmp_path, AllFrozen())
    assert exc_info.value.__cause__ is None  # not a crash turned into an error
    assert exc_info.value.__context__ is None


def test_no_optimizer_says_each_parameter_is_never_updated(tmp_path):
    with pytest.warns(GradGuardWarning, match="no optimizer holds it"):
        guard = fit_everything_on(tmp_path, NoOptimizer())
    assert {(f.kind, f.param) for f in guard.findings} == {("orphan", "layer.weight"), ("orphan", "layer.bias")}


def test_empty_parameter_is_not_reported(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        guard = fit_everything_on(tmp_path, EmptyParameter())
    assert guard.findings == []


def test_complex_gradient_value_histogram_keeps_the_imaginary_part():
    from lightning_gradguard.histograms import histogram_counts

    g = torch.tensor([3 + 4j, 0 + 1j], dtype=torch.cfloat)
    stats, _ = histogram_counts([g])
    assert float(stats[4]) == pytest.approx(float(torch.linalg.vector_norm(g)) ** 2)  # sum of squares = norm^2


# ---------------------------------------------------------------------------------------------------- two guards
class AuxOrphan(_Base):
    """``aux`` takes part in the loss, but the optimizer holds ``layer`` only: an orphan on every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss((self.layer(x) + self.aux(x)).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


class Recorder(Callback):
    def __init__(self) -> None:
        self.hooks: list[str] = []

    def setup(self, trainer, pl_module, stage):
        self.hooks.append("setup")

    def on_train_start(self, trainer, pl_module):
        self.hooks.append("on_train_start")


TWO_GUARDS = "This Trainer has 2 GradGuard callbacks: only "


def test_two_guards_keep_the_configured_one_and_say_so_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    bare, configured, between, after = GradGuard(), GradGuard(ignore=["aux.*"]), Recorder(), Recorder()
    trainer = make_trainer(tmp_path, [bare, between, configured, after], max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(AuxOrphan())
    said = [str(w.message) for w in caught if TWO_GUARDS in str(w.message)]
    assert said == [
        "This Trainer has 2 GradGuard callbacks: only GradGuard(ignore=['aux.*']) runs (the first with options of its "
        "own), so that each step is checked once, with one report and one JSON. Left out: GradGuard(), which differs "
        "in ignore ([] vs ['aux.*']). Configure GradGuard once: drop the extra `--trainer.callbacks+=GradGuard`, the "
        "YAML's entry under `trainer.callbacks`, or the second GradGuard in `Trainer(callbacks=...)`."
    ]
    assert not any(issubclass(w.category, GradGuardWarning) for w in caught)  # the bare guard's orphan warning
    assert [cb for cb in trainer.callbacks if isinstance(cb, (GradGuard, Recorder))] == [configured, between, after]
    assert between.hooks == after.hooks == ["setup", "on_train_start"]  # the others' hooks all ran, once
    assert caplog.text.count("GradGuard: every checked parameter received a usable gradient") == 1
    assert caplog.text.count("GradGuard: report written to") == 1
    assert json.loads((tmp_path / "gradguard_report.json").read_text())["ignored"] == ["aux.weight", "aux.bias"]


def test_of_two_configured_guards_the_first_runs(tmp_path):
    first, second = GradGuard(on_orphan="raise"), GradGuard(on_orphan="ignore", on_zero="ignore")
    kept = r"only GradGuard\(on_orphan='raise'\) runs \(the first with options"
    with pytest.warns(UserWarning, match=kept) as rec, pytest.raises(GradGuardError, match="aux.weight: orphan"):
        make_trainer(tmp_path, [first, second], max_steps=2).fit(AuxOrphan())
    (text,) = [str(w.message) for w in rec if TWO_GUARDS in str(w.message)]
    assert "Left out: GradGuard(on_orphan='ignore', on_zero='ignore'), which differs in on_orphan ('ignore' vs " in text


def test_one_guard_says_nothing_about_duplicates(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [GradGuard(ignore=["aux.*"]), Recorder()], max_steps=1).fit(AuxOrphan())
    assert not [w for w in caught if "GradGuard callbacks" in str(w.message)]


def test_two_identical_guards_are_refused_by_lightning(tmp_path):
    """Their `state_key`s clash: Lightning stops at `Trainer(...)`, before GradGuard could keep one."""
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        make_trainer(tmp_path, [GradGuard(), GradGuard()])


def test_two_guards_resume_with_the_kept_ones_state(tmp_path):
    """The checkpoint holds the kept guard's state only; resuming with both again, or with the kept one alone,
    restores it (the orphan's count goes on from 2), and the left-out guard's absence breaks nothing."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    kept = GradGuard(on_orphan="warn", on_zero="ignore")
    with pytest.warns(UserWarning, match=TWO_GUARDS):
        trainer = make_trainer(tmp_path, [GradGuard(), kept, ckpt], max_steps=2, enable_checkpointing=True)
        trainer.fit(AuxOrphan())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert [k for k in saved if "GradGuard" in str(k)] == [kept.state_key]
    for guards in (
        [GradGuard(), GradGuard(on_orphan="warn", on_zero="ignore")],
        [GradGuard(on_orphan="warn", on_zero="ignore")],
    ):
        resumed = guards[-1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", GradGuardWarning)  # warned before the checkpoint: not again
            make_trainer(tmp_path, guards, max_steps=4).fit(AuxOrphan(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
        counts = {row["param"]: row["count"] for row in resumed.report.to_dict()["findings"]}
        assert counts == {"aux.weight": 4, "aux.bias": 4}
