# make demo   set up .venv, run a short sweep on the tiny Phi-3 + sample data, promote the best
# make test   set up .venv, run the test suite
#
# torch is pinned to the CPU build this kind of machine has on disk. On a GPU machine:
#   make install TORCH=torch          (PyPI's default Linux build, with CUDA)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install sysdeps demo train sweep test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

DEMO_MODEL ?= support-assistant

# A 6-trial Optuna sweep (sweeps/quick.yaml) on the tiny Phi-3 and data/, the
# leaderboard, then the best trial promoted to models:/$(DEMO_MODEL)@champion.
# Re-running continues the same study (already complete: it only promotes again).
demo: install
	$(BIN)/python train.py -m sweep=quick
	$(BIN)/phitune compare --sweep latest --top 6
	$(BIN)/phitune promote --sweep latest --name $(DEMO_MODEL)
	@echo
	@echo "Next:"
	@echo "  source $(VENV)/bin/activate"
	@echo "  mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db      # runs, sweep plots, the registry"
	@echo "  phitune serve models:/$(DEMO_MODEL)@champion                  # OpenAI-compatible API on 127.0.0.1:8000"
	@echo "  phitune chat --url http://127.0.0.1:8000 --prompt 'How do I reset my password?'"

# The tests start their own PostgreSQL server (tests/pg.py) and drive Debian's chromium
# (tests/test_mlflow_ui.py): installed here when missing, on Debian as root.
sysdeps:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql)
	@[ -x /usr/bin/chromium ] || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: install sysdeps
	$(BIN)/python -m pytest -q

clean:
	rm -rf mlruns outputs multirun checkpoints .pytest_cache
