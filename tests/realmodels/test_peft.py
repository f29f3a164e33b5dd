"""LoRA (PEFT) on a real model, for people: what GradGuard says about the two most common adapter mistakes.

The verdicts themselves are the sweep's (``test_sweep.py``: truth by construction, every run compared); these tests
read the text a user gets.
"""

from __future__ import annotations

import linecache
import warnings

import pytest
import torch

from conftest import make_trainer
from lightning_gradguard import GradGuard, GradGuardError, GradGuardWarning

from .harness import Config, SweepModule, configs

pytest.importorskip("transformers")
pytest.importorskip("peft")

#: The adapted attention projections of the tiny Llama: 2 layers x 4 projections x (lora_A, lora_B).
LLAMA_ADAPTERS = 16


def fit_lora(tmp_path, name: str, guard: GradGuard, steps: int = 2) -> list[warnings.WarningMessage]:
    """Train sweep configuration ``name`` for ``steps`` steps under ``guard``; the GradGuard warnings it gave."""
    config: Config = configs([name])[0]
    built = config.build()
    module = SweepModule(built.model, config.optimize)
    loader = torch.utils.data.DataLoader([built.batch(i) for i in range(steps)], batch_size=None)
    trainer = make_trainer(tmp_path, [guard], max_steps=steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    return [w for w in caught if issubclass(w.category, GradGuardWarning)]


def test_lora_reentrant_checkpoint_without_input_grads_is_named_with_its_fix(tmp_path):
    """The star case: frozen embeddings feed reentrant checkpoints, so the adapters inside get nothing and the loss
    has no graph. GradGuard() raises before torch's opaque error, names the checkpoint call and the fix."""
    with pytest.raises(GradGuardError) as err:
        fit_lora(tmp_path, "llama+lora+ckpt-reentrant/no-input-grads", GradGuard(write_report=False))
    text = str(err.value)
    assert "The loss does not require grad" in text
    assert "checkpoint(..., use_reentrant=True)" in text
    assert "model.enable_input_require_grads()" in text
    assert "use_reentrant=False" in text
    findings = err.value.findings
    assert len(findings) == LLAMA_ADAPTERS
    assert {f.kind for f in findings} == {"detached"}
    assert all(".lora_A." in f.param or ".lora_B." in f.param for f in findings)
    (where,) = {f.where for f in findings}  # one cut: the line of `transformers` that calls `checkpoint(...)`
    path, line = where.rsplit(":", 1)
    assert "transformers" in path
    assert "_gradient_checkpointing_func(" in linecache.getline(path, int(line))


def test_lora_with_input_grads_under_reentrant_checkpoints_is_silent(tmp_path):
    """Nearest correct: the same model with transformers' `enable_input_require_grads()` hook (the default)."""
    guard = GradGuard(write_report=False)
    caught = fit_lora(tmp_path, "llama+lora+ckpt-reentrant", guard)
    assert guard.findings == []
    assert caught == []


def test_lora_frozen_base_in_the_optimizer_is_one_warning(tmp_path):
    guard = GradGuard(write_report=False)
    caught = fit_lora(tmp_path, "llama+lora-all-params", guard)
    assert {f.kind for f in guard.findings} == {"frozen"}
    assert len(guard.findings) == 21  # every base tensor: that much is right today
    assert len(caught) == 1
    assert len(str(caught[0].message).splitlines()) <= 10
    quoted = (  # as the README quotes it
        "frozen: module `model.base_model.model` (21 of its 37 tensors, 28.8 k parameters) is in the optimizer but "
        "has `requires_grad=False`"
    )
    assert quoted in str(caught[0].message)


def test_lora_star_case_error_is_one_group(tmp_path):
    with pytest.raises(GradGuardError) as err:
        fit_lora(tmp_path, "llama+lora+ckpt-reentrant/no-input-grads", GradGuard(write_report=False))
    assert str(err.value).count("detached (") == 1


def test_an_optimizer_built_before_get_peft_model_is_said_to_train_nothing(tmp_path):
    """Built before `get_peft_model`, the optimizer holds only the base weights it then froze, and the adapters are in
    no optimizer: one `frozen` warning saying the optimizer updates nothing, one `orphan` warning for the adapters.
    Nearest correct: over `model.parameters()` the adapters are trained, so the `frozen` warning does not say it."""
    caught = fit_lora(tmp_path / "first", "llama+lora-opt-first", GradGuard(write_report=False))
    assert [str(w.message).split(":")[1].strip() for w in caught] == ["frozen", "orphan"]
    assert "Nothing this optimizer holds is trainable: it updates nothing" in str(caught[0].message)
    caught = fit_lora(tmp_path / "all", "llama+lora-all-params", GradGuard(write_report=False))
    assert len(caught) == 1
    assert "updates nothing" not in str(caught[0].message)
