# shelfsight: `make demo` runs the service on an embedded stack; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-unit test-integration lint typecheck bench-throughput bench-learning-curve gpu-wheels clean

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

# What bench/gpu_check.sh carries to the offline GPU machine (Python 3.12): bench/gpu_wheels.txt
# and the shelfsight wheel built from this checkout.
gpu-wheels: install
	rm -rf bench/wheels
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	    -d bench/wheels -r bench/gpu_wheels.txt
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation --no-index -w bench/wheels .

clean:
	rm -rf $(VENV) .shelfsight bench/out
