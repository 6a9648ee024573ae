# Every command a user or CI needs. `make test` and `make demo` bootstrap .venv themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test test-slow test-reliability test-all demo protos lint format clean

venv: $(STAMP)

# Re-run the install only when the dependency declaration or its resolved versions change. Every
# install takes constraints.txt, as the Dockerfile does, so the venv and the image hold the same versions.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# A fresh resolution of every extra into build/lock-venv, written to constraints.txt (run it after
# changing pyproject.toml's dependencies, then `make test`: tests/test_constraints.py checks the result).
LOCK_VENV := build/lock-venv
.PHONY: lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[dev,bench]"
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

protos: $(STAMP)
	$(PY) -m protos.generate

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not reliability" $(PYTEST_ARGS)

# The fast suite plus the long reliability runs (10,000+ fuzz cases, 16x200 load, killed servers and
# trainers); their numbers (docs/reliability.md) are appended to build/reliability.jsonl.
test-reliability: $(STAMP)
	@mkdir -p build
	E2PO_RELIABILITY_REPORT=build/reliability.jsonl $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job end to end on this machine: E2PO on the shapes world (GenEval service started locally),
# then the held-out evaluation of its EMA weights.
demo: $(STAMP)
	$(PY) -m trainer.run
	$(PY) -m trainer.evaluate --run runs/shapes

# Quick versions of the CPU benchmarks (bench/results/*_quick.json) and the GPU benchmark's CPU smoke
# test; the full runs quoted in docs/benchmarks.md are `python -m bench.<name>` without --quick.
.PHONY: bench
bench: $(STAMP)
	@$(PY) -c "import flask, gunicorn" 2>/dev/null || $(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) -m bench.serving --quick
	$(PY) -m bench.fairness --quick
	$(PY) -m bench.trainer --quick
	$(PY) -m bench.gpu_sd3 --smoke
	$(PY) -m bench.gpu_e2e --tiny

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# TorchServe archives (.mar) of every registered scorer, tiny models by default, plus config.properties.
# Real weights: python -m services.torchserve build SCORER --checkpoint PATH --device cuda (docs/deploy.md).
TORCHSERVE_OUT ?= build/torchserve
TORCHSERVE_FLAGS ?= --tiny
.PHONY: torchserve-archives
torchserve-archives: $(STAMP)
	@for scorer in $$($(PY) -c "from services.registry import SCORERS; print(*SCORERS)"); do \
		$(PY) -m services.torchserve build $$scorer $(TORCHSERVE_FLAGS) --out $(TORCHSERVE_OUT) || exit 1; \
	done
