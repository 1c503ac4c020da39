# Two entry points for a fresh machine (Python 3.11, nothing installed):
#   make demo   quick CPU efficiency run of every model + a small LongVQ ablation sweep -> results/REPORT.md
#   make test   the test suite
# Both create .venv (seeing system packages, so an installed torch — CPU or CUDA — is reused)
# and install torch==2.13.0 (the CPU build) only when no torch is importable.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/python run_bench.py efficiency --models all --lengths 256,512 --device cpu --quick --out results/quick
	$(BIN)/python run_bench.py sweep sweeps/quick_ablation.toml --quick --device cpu
	$(BIN)/python run_bench.py report

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) results/quick results/bench.db*
