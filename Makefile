# Set-up is two commands on a fresh machine with Python 3.11 and make:
#   make run    broker in the foreground on the default socket
#   make test   lint, type-check and the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck unit integration soak bench bench-quick clean fuzz example browser screenshot

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files so an unchanged pyproject.toml does not reinstall every time.
# editable_mode=compat: a path entry in a .pth file, which type checkers follow (mypy run
# outside the checkout finds aiobus); the default import hook is invisible to them.
# The distribution was called "aiobus" before "aiobus-ipc": an old install of it goes
# first (both would own bin/aiobus).
EDITABLE := --config-settings editable_mode=compat
OLD_DIST := $(BIN)/python -m pip uninstall --quiet --yes aiobus 2>/dev/null || true
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(OLD_DIST)
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml Makefile | $(BIN)/python
	$(OLD_DIST)
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/aiobus-broker $(ARGS)

# An example with the venv's Python (the system's lacks anyio): make example NAME=weather ARGS=demo
example: $(VENV)/.installed
	@test -n "$(NAME)" || { echo "usage: make example NAME=weather ARGS=demo"; exit 2; }
	$(BIN)/python examples/$(NAME).py $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(wildcard aiobus tests examples benchmarks)
	$(BIN)/mypy

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/unit -q

integration: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/integration -q

# The integration tests mostly wait on processes and sockets, and each uses its own temp
# paths: run them on $(TEST_WORKERS) pytest-xdist workers (2 cores: 4 workers take ~60% of
# the serial time). TEST_WORKERS=0 runs them in this process, one at a time.
TEST_WORKERS ?= 4
test: lint browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The dashboard's test drives Debian's chromium headless: installed here when missing,
# where that is possible (root, with apt-get); elsewhere that test skips, naming what is
# missing.
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } \
	    || echo "make: could not install chromium; the browser test will skip"; fi

# Redraw docs/dashboard.png (the README's picture) from the browser test.
screenshot: $(VENV)/.installed-test browser
	AIOBUS_SCREENSHOT=1 $(BIN)/python -m pytest -q tests/integration/test_dashboard_browser.py

# Soak tests (marked `soak`, deselected by `make test`): real time is the point, as a
# reader that opens a FIFO 60 s after `aiobus fifo-out` started. A few minutes.
soak: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m soak -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Benchmarks against Redis, NATS and ZeroMQ: not part of `make test` (they take minutes
# and measure speed, which the test suite never asserts).
# `make compiled` first: the "compiled broker" rows (where it cannot compile, the build is
# pure Python and those rows fail, saying so; the rest of the run goes on).
bench: $(VENV)/.installed
	bash benchmarks/setup.sh $(VENV)
	$(MAKE) compiled || echo "make: no compiled build; its benchmark rows will fail"
	COMPILED_VENV=$(COMPILED_DIR)/venv $(BIN)/python benchmarks/run.py
bench-quick: $(VENV)/.installed
	bash benchmarks/setup.sh $(VENV)
	$(BIN)/python benchmarks/run.py --quick

# Model-based fuzzing: not part of `make test`. Runs the hypothesis state machines
# (tests/unit/test_model_*.py, tests/integration/test_model_broker.py) with the "fuzz"
# profile, round after round for FUZZ_SECONDS (default 600; the last round may run a
# minute or two over). On a failure it prints the falsifying steps and stops; hypothesis
# keeps the example in .hypothesis/ and replays it first on the next run.
#   make fuzz                     ten minutes
#   make fuzz FUZZ_SECONDS=3600   an hour
FUZZ_SECONDS ?= 600
fuzz: $(VENV)/.installed-test
	FUZZ_SECONDS=$(FUZZ_SECONDS) PYTHON=$(BIN)/python sh tests/fuzz.sh

# Optional compiled build (docs/performance.md, "A compiled build"): mypyc compiles the
# broker's hot modules (setup.py's list) into a wheel, from a copy of the sources in
# $(COMPILED_DIR), never in this tree (a .so beside a .py is what Python imports: a stale
# one would run old code), and installs it in its own venv:
#   make compiled && $(COMPILED_DIR)/venv/bin/aiobus-broker
# Needs a C compiler and Python headers; where compiling fails the wheel is pure Python.
# `make run`, `make test` and the editable install never compile.
.PHONY: compiled compiled-test
COMPILED_DIR ?= /tmp/aiobus-compiled
compiled: $(VENV)/.installed-test
	rm -rf $(COMPILED_DIR)/src $(COMPILED_DIR)/dist $(COMPILED_DIR)/venv
	mkdir -p $(COMPILED_DIR)/src
	tar -c --exclude=__pycache__ --exclude='*.so' pyproject.toml setup.py README.md LICENSE aiobus \
		| tar -x -C $(COMPILED_DIR)/src
	cd $(COMPILED_DIR)/src && AIOBUS_COMPILE=1 $(abspath $(BIN))/python -m pip wheel --quiet \
		--no-build-isolation --no-deps --wheel-dir $(COMPILED_DIR)/dist .
	$(BIN)/python -m venv $(COMPILED_DIR)/venv
	$(COMPILED_DIR)/venv/bin/python -m pip install --quiet $(COMPILED_DIR)/dist/*.whl
	cd / && $(COMPILED_DIR)/venv/bin/python -c "import aiobus.broker.core as m; print(m.__file__)"

# The unit suite and the broker process tests of queues and topics against a compiled
# build made in a temp dir (tests/integration/test_compiled.py; a few minutes).
compiled-test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m compiled -q tests/integration/test_compiled.py
