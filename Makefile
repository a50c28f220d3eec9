# Two commands on a fresh machine: `make demo` and `make test`. Each creates or updates .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint check clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/drgw demo $(ARGS)

# Most tests wait on real peers (brokers, servers, timers) rather than compute: four workers on two
# cores keep the cores busy. Each worker takes whole test files. WORKERS=0 runs in one process.
WORKERS ?= 4

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway protocols drgw_tools mappings tests migrations
	$(BIN)/ruff format --check gateway protocols drgw_tools mappings tests migrations
	$(BIN)/mypy

check: test lint

clean:
	rm -rf $(VENV) build *.egg-info drgw-demo.db*
