# Developer entry points. `make test` on a fresh clone creates .venv and installs everything first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint bench gpu sweep corpus mutate compat clean distclean

venv: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changed (or .venv is new).
# constraints.txt pins torch to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -c constraints.txt -e '.[dev]'
	touch $@

test: venv
	$(VPY) -m pytest -q

# Trains a small model with a planted `.detach()`; GradGuard stopping it with a GradGuardError is the point.
# Logs and gradguard_report.json: lightning_logs/demo/version_N. Then the same check as a CI preflight (exit 1).
demo: venv
	$(VPY) examples/train.py fit --config configs/demo.yaml
	-$(VPY) -m lightning_gradguard check --config configs/demo.yaml --cli examples/train.py --steps 1 \
		--report lightning_logs/demo/preflight_report.json

# The lowest versions pyproject.toml claims (constraints-min.txt: Lightning 2.4, torchmetrics 1.4, TensorBoard 2.18,
# jsonargparse 4.31, NumPy 1.26, ...) in their own .venv-min, and the suite on them. Without `transformers` (a
# test-only package): the real-model tests skip. Not part of CI (~6 minutes more).
VENV_MIN := .venv-min
compat:
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -c constraints-min.txt -e . pytest
	$(VENV_MIN)/bin/python -m pytest -q -p no:cacheprovider

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

# On a CUDA machine, not in CI (~5 minutes): every test marked `cuda`, then `benchmarks/run.py --device cuda`; writes
# benchmarks/gpu-results.md. Runs the machine's own python3 and its CUDA torch (GPU_PYTHON=... picks another) on this
# checkout, installing nothing; fails if any of those tests fails or skips.
GPU_PYTHON ?= python3
gpu:
	$(GPU_PYTHON) benchmarks/gpu.py

# The real-model sweep (tests/realmodels): every architecture, ground truth vs check_step and GradGuard. Prints the
# table and writes it to docs/sweep.md; fails if any configuration has a crash, false positive, miss or change.
sweep: venv
	OMP_NUM_THREADS=1 PYTHONPATH=tests$${PYTHONPATH:+:$$PYTHONPATH} $(VPY) -m realmodels --out docs/sweep.md

# ~10 minutes on 2 cores: prints the paired and scaling tables and writes benchmarks/results.md, then the traced-step
# table over the sweep's architectures and over three of them compiled (benchmarks/traced.md; inductor builds C++
# for each graph: a few minutes more).
# `$(VPY) benchmarks/run.py --quick` is the smoke run that `make test` does (tests/test_benchmark.py).
bench: venv
	$(VPY) benchmarks/run.py
	$(VPY) benchmarks/traced.py

# The generated bug corpus (tests/corpus/): 3151 models with one planted bug or none, scored against the ground
# truth; prints the confusion matrix and writes docs/corpus.md. `make test` runs a fixed 177 of them.
# The mutation campaign (tests/mutation/run.py): one line of the verdict path broken at a time, in a temporary copy of
# the checkout; each must turn a fast test subset red (~30 min on 1 core; results: tests/mutation/RESULTS.md).
mutate: venv
	OMP_NUM_THREADS=1 $(VPY) tests/mutation/run.py

corpus: venv
	OMP_NUM_THREADS=1 $(VPY) tests/corpus/corpus_run.py

# Build outputs, caches and training logs; keeps .venv (see distclean).
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache lightning_logs
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(VENV_MIN)
