# ingestd — make demo | make test | make bench | make lint
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench bench-nab lint install binaries clean proto

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

# The anomaly detector's NAB score (needs ../shared/data/nab and ../shared/nab; bench/README.md).
bench-nab: install
	$(BIN)/python -m bench.nab $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Regenerate edge/sparkplug_b_pb2.py and its typed stub (.pyi) from edge/sparkplug_b.proto;
# both are committed, and a unit test checks they match what this produces.
proto: install
	VENV_BIN=$(BIN) scripts/gen-proto.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache var

# Development CA, certificates and passwords for mosquitto/mosquitto.prod.conf, in var/dev-certs
# (or DEV_CERTS_DIR); keeps what exists. See mosquitto/README.md.
.PHONY: dev-certs
dev-certs:
	scripts/dev-certs.sh $(DEV_CERTS_DIR)
