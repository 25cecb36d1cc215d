# Every target works on a fresh machine with only Python 3.11+ and make: .venv is created on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test check lint typecheck demo bench soak clean test-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages some tests run: libfaketime steps the daemon's wall clock (tests/test_clock_steps.py),
# Go builds the README's Go receiver (tests/test_receiver_snippets.py). Installed here when missing,
# only as root with apt-get (a CI machine); elsewhere install them yourself.
test-tools:
	@{ ls /usr/lib/*/faketime/libfaketime.so.1 && command -v go; } >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime golang-go >/dev/null; } \
	  || echo "note: faketime or golang-go is missing (apt-get install faketime golang-go): tests that need them will fail"

# -n 4: four pytest-xdist workers. Most tests wait on real daemons, brokers and PostgreSQL rather
# than compute, so more workers than a CI machine's 2 cores still shortens the run; tests share no
# port, file or database name. tests/support/parallel.py says how tests are shared out.
test: $(STAMP) test-tools
	$(BIN)/python -m pytest -q -n 4

lint: $(STAMP)
	$(BIN)/ruff check watcher tests bench
	$(BIN)/ruff format --check watcher tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

demo: $(STAMP)
	$(BIN)/convertr-watcher demo

# The model-based detection test for ten minutes of fresh random histories (make test runs a bounded profile).
soak: $(STAMP)
	WATCHER_SOAK_SECONDS=$${WATCHER_SOAK_SECONDS:-600} $(BIN)/python -m pytest -q -s -m soak -p no:cacheprovider tests/test_model.py tests/test_model_load.py tests/test_walk_load.py

# The bench extra (apprise) has a stamp of its own, so `make test` and `make check` never install it.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
