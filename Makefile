# Citadel's two set-up commands: `make run` and `make test`. Both create the virtual
# environment on first use; they need only Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
CITADEL_DATA_DIR ?= $(CURDIR)/var
export CITADEL_DATA_DIR PORT
# torch is pinned to the CPU build 2.13.0; where a local wheel folder exists (these machines), use it.
export PIP_FIND_LINKS ?= $(wildcard /opt/wheels)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint bench install clean ansible-check chaos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/citadel migrate --noinput
	$(BIN)/citadel bootstrap
	$(BIN)/citadel serve --port $(PORT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault tests (tests/chaos, platform/citadel/jobs/RELIABILITY.md) on private PostgreSQL, Redis and
# RabbitMQ instances: CITADEL_CHAOS_ROUNDS worker kills mid-inference and mid-fine-tune in all.
# `make test` runs them with 3.
# Then the long API fuzzing run (tests/fuzz: schemathesis against /api and /v1, in process through the
# WSGI application, CITADEL_FUZZ_EXAMPLES valid and as many invalid examples per operation; `make test`
# runs 5). One torch thread per process (OMP_NUM_THREADS=1): on a loaded machine torch's default
# threads made the tiny model's replies 20-30 times slower.
CITADEL_CHAOS_ROUNDS ?= 100
CITADEL_FUZZ_EXAMPLES ?= 1000
chaos: install
	CITADEL_CHAOS_ROUNDS=$(CITADEL_CHAOS_ROUNDS) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m chaos tests/chaos -s -p no:cacheprovider $(PYTEST_ARGS)
	CITADEL_FUZZ_EXAMPLES=$(CITADEL_FUZZ_EXAMPLES) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m fuzz tests/fuzz -s -p no:cacheprovider --timeout=0 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

# The Ansible roles (ansible/): ansible-lint's production profile (ansible/.ansible-lint) and the
# playbooks' syntax. Needs Debian's packages: apt-get install -y ansible ansible-lint.
ansible-check:
	cd ansible && ansible-lint
	cd ansible && ansible-playbook --syntax-check site.yml validate.yml

bench: install
	$(BIN)/python -m bench.engine --quick

clean:
	rm -rf $(VENV) var
