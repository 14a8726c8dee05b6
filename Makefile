# The two set-up commands of the README. Each creates what it needs (a venv in .venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv bench bench-quick

$(BIN)/resilience-proxy: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/resilience-proxy

demo: venv
	$(BIN)/resilience-proxy demo

test: venv
	bash scripts/test.sh

bench: venv
	$(BIN)/python -m bench

bench-quick: venv
	$(BIN)/python -m bench --quick
