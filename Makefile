# shelfsight: `make demo` runs the service on an embedded stack; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-unit test-integration lint typecheck bench-throughput bench-learning-curve clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/shelfsight demo

# The README's test command: lint, type-check, then both test tiers.
test: lint typecheck
	$(BIN)/pytest -q tests/unit tests/integration

# The fast tier: no server, well under a minute.
test-unit: install
	$(BIN)/pytest -q tests/unit

# Real redis-server and moto S3 on loopback, started by the fixtures.
test-integration: install
	$(BIN)/pytest -q tests/integration

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy shared worker trainer

bench-throughput: install
	$(BIN)/python bench/throughput.py --quick

bench-learning-curve: install
	$(BIN)/python bench/learning_curve.py --quick

clean:
	rm -rf $(VENV) .shelfsight bench/out
