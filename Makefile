# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install asa3d into it first.
#
# TORCH_SPEC picks the PyTorch build. The default, torch==2.13.0, resolves to the CPU wheel on
# machines that carry it locally (this project's CI) and to the CUDA build from PyPI on a Linux
# GPU machine. For another CUDA version:
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint bench mutation clean

$(BIN)/asa3d: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(BIN)/asa3d

demo: install
	$(BIN)/asa3d demo --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -n 2 --durations=15

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/asa_step.py
	$(BIN)/python benchmarks/augment.py
	$(BIN)/python benchmarks/ema_update.py
	$(BIN)/python benchmarks/finetune_step.py
	$(BIN)/python benchmarks/method_step.py

# Mutation testing (not part of CI): make mutation MODULE=eval/stats.py, or every critical module.
# Minutes per module, about an hour for all on 2 cores; see docs/testing.md.
MODULE ?=
mutation: install
	nice -n 19 $(BIN)/python scripts/mutation.py $(MODULE)

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
