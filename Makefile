# The two set-up commands of the README. Each creates what it needs (a venv in .venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv bench bench-quick sbom audit reliability soak

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

# Not set-up commands: what CI also runs, and the longer runs the README names.
sbom:
	bash scripts/supply-chain.sh sbom

audit:
	bash scripts/supply-chain.sh audit

reliability: venv
	$(BIN)/python -m tests.chaos.matrix

soak: venv
	$(BIN)/python -m bench soak --minutes 10
