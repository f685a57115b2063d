# The two commands of the README:  `make run` (the main job) and `make test` (the whole suite).
# Both bootstrap a fresh machine: a .venv with the pinned torch, the project, and Fashion-MNIST.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aso-se-installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
RUN_DIR ?= runs/fashion-mnist
PRESET ?= fashion-mnist

.PHONY: run test install data bench clean gpu-check report-check

# Idempotent: an interrupted run in RUN_DIR is resumed (one killed before its first checkpoint starts again);
# a finished one (final.json, written last) is kept and a new run starts beside it.
run: install data
	@if [ -f $(RUN_DIR)/config.json ] && [ ! -f $(RUN_DIR)/final.json ]; then \
	  echo "resuming the unfinished run in $(RUN_DIR)"; \
	  out=$(RUN_DIR); $(PY) -m engine.cli search --resume $$out; \
	else \
	  out=$(RUN_DIR); [ -f $(RUN_DIR)/final.json ] && out=$(RUN_DIR)-$$(date +%Y%m%d-%H%M%S); \
	  echo "run directory: $$out"; \
	  $(PY) -m engine.cli search --preset $(PRESET) --out $$out; \
	fi && echo "report: $$($(PY) -m engine.cli report $$out)"

# One pytest worker per core (pytest-xdist), each with its share of the threads; the 15 slowest tests listed
# at the end, so every CI log shows where the suite's time goes.
TEST_WORKERS ?= auto
test: install data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

install: $(STAMP)

# Re-installs only when setup.py changes; the venv itself is kept.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Fashion-MNIST missing: installing dataset-fashion-mnist with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR). Install it with:  sudo apt-get install dataset-fashion-mnist"; \
	  echo "or put the four idx files (train-images-idx3-ubyte.gz, ...) in a folder and pass --data-dir / FMNIST_DIR."; \
	  echo "Tests that need the real data are skipped until then."; \
	fi

bench: install data
	$(PY) bench/data.py --dataset fashion-mnist --json bench/results/data.json
	$(PY) bench/mixed_sum.py --json bench/results/mixed_sum.json
	$(PY) bench/step.py --preset fashion-mnist --json bench/results/step.json

clean:
	rm -rf runs .pytest_cache

# The report's one real-browser check: Debian's Chromium renders index.html (installed here when missing).
report-check: install
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	$(PY) -m pytest -q tests/test_report.py -k chromium

# Everything only a GPU can measure (cuda tests, kernel and step benches, a short search, an Nsight capture):
# under 10 minutes on one H100; without a GPU the CPU-possible parts run and the rest say "no GPU".
gpu-check: install
	$(PY) bench/gpu_check.py --out bench/results
