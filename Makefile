# shelfsight: `make demo` runs the service on an embedded stack; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint bench-throughput bench-learning-curve clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/shelfsight demo

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

bench-throughput: install
	$(BIN)/python bench/throughput.py --quick

bench-learning-curve: install
	$(BIN)/python bench/learning_curve.py --quick

clean:
	rm -rf $(VENV) .shelfsight bench/out
