# Set-up and entry points. `make demo` and `make test` each create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
OS := $(shell uname -s)
DEMO_DIR ?= runs/demo

.PHONY: venv demo test lint bench clean

$(BIN)/avprune: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ "$(ARCH)" = "x86_64" ] && [ "$(OS)" = "Linux" ]; then \
		$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1; fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(BIN)/avprune

venv: $(BIN)/avprune

demo: venv
	$(BIN)/python -m avprune.demo --out $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check .

# Smoke run of every benchmark (--quick; outputs in runs/bench-quick/, RESULTS.md untouched).
bench: venv
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf runs .pytest_cache
