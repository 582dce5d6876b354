# ingestd — make demo | make test | make bench | make lint
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint install binaries clean

# The virtualenv is rebuilt whenever pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# mosquitto, the PostgreSQL server binaries and docker-compose (to validate the compose file):
# apt-get only when missing, and no service is started.
binaries:
	scripts/ensure-binaries.sh

demo: install
	scripts/ensure-binaries.sh --demo
	$(BIN)/ingestd demo

test: install binaries
	$(BIN)/pytest

bench: install binaries
	$(BIN)/python -m bench.run $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache var

# Development CA, certificates and passwords for mosquitto/mosquitto.prod.conf, in var/dev-certs
# (or DEV_CERTS_DIR); keeps what exists. See mosquitto/README.md.
.PHONY: dev-certs
dev-certs:
	scripts/dev-certs.sh $(DEV_CERTS_DIR)
