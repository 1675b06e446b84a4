# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow lint bench clean

# the service and what it needs to run: all the demo installs, so a first `make demo` is quick
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# and the test, benchmark and dask extras, for the tests, the checks and the benchmarks
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/streamer demo

# the style, type and layer checks that CI runs before the tests (configured in pyproject.toml);
# all three run, and it fails if any of them does
lint: $(TEST_STAMP)
	rc=0; \
	$(BIN)/ruff check streamer tests bench || rc=1; \
	$(BIN)/mypy streamer || rc=1; \
	$(BIN)/lint-imports || rc=1; \
	exit $$rc

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -m slow; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests selected"; exit 0; fi; exit $$rc

bench: $(TEST_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
