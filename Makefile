# The two commands of the README: `make demo` (the main job on the embedded dataset) and `make test`.
# Each sets itself up on a fresh machine: a virtual environment in the checkout, the pinned packages, the package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo dry-run test test-all test-slow lint format clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first, by exact version: pip takes them from this machine's local wheels.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job. Until the trainer lands it validates every recipe and prints the demo's plan (dry run).
demo: setup
	$(PY) rankclip_ds/train.py --deepspeed ds_configs/zero2.json --config configs/demo_cpu.yaml --dry-run --dry-run-world-size 2

dry-run: setup
	$(PY) rankclip_ds/train.py --deepspeed ds_configs/zero2.json --config $(or $(CONFIG),configs/demo_cpu.yaml) --dry-run

# Fast default suite (no `slow`, no `gpu` tests).
test: setup
	$(PY) -m pytest -q

# Everything that runs on a CPU, slow tests included.
test-all: setup
	$(PY) -m pytest -q -m "not gpu"

test-slow: setup
	$(PY) -m pytest -q -m "slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
