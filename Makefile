# One obvious entry point: `make run` opens the app, `make test` runs the whole CPU suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on machines without a GPU; a GPU user can pass TORCH_SPEC="torch" for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# GPU targets run on whatever Python already has CUDA PyTorch (the venv if it exists, else python3).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
# Only the modules that hold gpu tests, so a CUDA Python without the app's dependencies can run them
# (expanded when test-gpu runs, not on every make call).
GPU_TESTS = $(shell grep -l "mark.gpu" tests/test_*.py)

.PHONY: install run test test-gpu bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: install
	$(VENV)/bin/nsa-explorer

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not gpu" -q

test-gpu:
	$(GPU_PY) -m pytest -m gpu -q $(GPU_TESTS)

bench:
	$(GPU_PY) benchmarks/bench_attention.py

lint: install
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q -e ".[lint]"
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
