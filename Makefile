# The two commands of the README: `make demo` (the main job on the embedded dataset) and `make test`.
# Each sets itself up on a fresh machine: a virtual environment in the checkout, the pinned packages, the package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-data dry-run test test-all test-slow lint format clean

$(STAMP): requirements.txt requirements-dev.txt requirements-consumer.txt pyproject.toml tools/prebuild_ops.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first, by exact version: pip takes them from this machine's local wheels.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/clip-benchmark-numpy -r requirements-consumer.txt
	$(PY) tools/prebuild_ops.py
	touch $(STAMP)

setup: $(STAMP)

# The main job: writes the embedded synthetic dataset once, then trains RankCLIP with DeepSpeed on all GPUs, or on
# 2 CPU ranks where there is none, evaluates zero-shot on held-out colour×shape pairs and prints a summary.
DEMO_DATA := data/synthetic/info.json
NPROC ?= $(shell $(PY) -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
DEMO_ARGS ?=

$(DEMO_DATA): | $(STAMP)
	$(PY) tools/make_synthetic_shards.py --output data/synthetic --num-train 20000 --num-zeroshot 800 --seed 0

demo-data: $(DEMO_DATA)

demo: setup $(DEMO_DATA)
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) rankclip_ds/train.py --deepspeed ds_configs/zero2.json \
		--config configs/demo_cpu.yaml $(DEMO_ARGS)

dry-run: setup
	$(PY) rankclip_ds/train.py --deepspeed ds_configs/zero2.json --config $(or $(CONFIG),configs/demo_cpu.yaml) --dry-run

# Extra pytest arguments, e.g. PYTEST_ARGS="--durations=15" (CI) or PYTEST_ARGS="-x -k resume".
PYTEST_ARGS ?=

# Fast default suite (no `slow`, no `gpu` tests).
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything that runs on a CPU, slow tests included.
test-all: setup
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# The slow tier alone (what CI runs after `make test`); the `gpu` tests need a GPU (tools/gpu_check.sh).
test-slow: setup
	$(PY) -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@if command -v shellcheck >/dev/null; then shellcheck -x slurm/*.sbatch slurm/*.sh slurm/lib/*.sh tests/slurm/*.sh tools/*.sh && echo "shellcheck: clean"; \
	else echo "shellcheck not installed (apt-get install shellcheck): shell scripts not checked"; fi

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
