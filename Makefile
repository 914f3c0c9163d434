# make demo   set up .venv, run a short sweep on the tiny Phi-3 + sample data, promote the best
# make test   set up .venv, run the test suite
#
# torch is pinned to the CPU build this kind of machine has on disk. On a GPU machine:
#   make install TORCH=torch          (PyPI's default Linux build, with CUDA)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install demo train sweep test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python train.py

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf mlruns outputs multirun checkpoints .pytest_cache
