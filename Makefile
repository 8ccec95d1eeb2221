# medhub: `make run` starts the service on demo models; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install check fix-copies test test-fast bench run clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Lint, format and the copies between modeling files (scripts/check_copies.py); `make fix-copies` rewrites copies.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/check_copies.py

fix-copies: $(STAMP)
	$(BIN)/python scripts/check_copies.py --fix

# Test modules run on TEST_WORKERS processes, each module whole on one, the longest first (tests/conftest.py). Two keep a
# 2-core machine busy while a test waits on a subprocess or a server; more workers mean more copies of torch in memory.
TEST_WORKERS ?= 2
PYTEST := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# The demo models are trained by our own recipes on synthetic phantoms, once, into the local HF cache.
DEMO_DIR ?= $(HOME)/.cache/medhub/demo
HOST     ?= 127.0.0.1
PORT     ?= 3000

run: $(STAMP)
	@test -s $(DEMO_DIR)/models.txt || $(BIN)/medhub demo --out $(DEMO_DIR)
	@exec $(BIN)/medhub serve --host $(HOST) --port $(PORT) \
		$$(sed 's/^/--model /' $(DEMO_DIR)/models.txt) \
		$$(for f in $(DEMO_DIR)/examples/*; do [ -f "$$f" ] && printf -- '--example %s ' "$$f"; done)

clean:
	rm -rf $(VENV) .pytest_cache
