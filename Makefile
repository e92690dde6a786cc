# One command each: `make run` (the post's runs), `make test` (the whole suite), `make test-fast`
# (the suite but its end-to-end, Ray and cluster tests). Each first makes the virtual environment
# .venv/ from requirements.txt, once, and again when that file changes. Without a GPU, install
# PyTorch's CPU-only build into .venv first (README); pip then keeps it.
PYTHON ?= python3
BIN := .venv/bin
# Ray stays on loopback in the tests
TEST_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

.PHONY: run test test-fast

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv .venv
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

run: $(BIN)/.installed
	$(BIN)/python transfer_mnist.py $(ARGS)

test: $(BIN)/.installed
	$(TEST_ENV) $(BIN)/python -m pytest -q $(ARGS)

test-fast: $(BIN)/.installed
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" $(ARGS)
