# Two commands matter: `make run` (the pipeline on the local stack) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install packages system stack stack-down run test unit lint bench schema clean prometheus prometheus-down rules chaos docs quality topics

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the Debian packages the stack, promtool and the image test need (as root)
packages:
	bash scripts/install-system.sh

stack: packages
	bash scripts/stack.sh up

stack-down:
	bash scripts/stack.sh down

# The explicit admin step (python -m segmentation.admin): the topics; on a SASL broker
# (KAFKA_SASL=1 make stack) also the SCRAM users and least-privilege ACLs, as its admin user.
topics: install
ifeq ($(KAFKA_SASL),1)
	$(PY) -m segmentation.admin --secrets-dir $(or $(STACK_DIR),.stack)/kafka/secrets all
else
	$(PY) -m segmentation.admin topics
endif

# On a SASL stack (KAFKA_SASL=1) the admin step first: every part then logs in as its own principal.
run: install stack $(if $(filter 1,$(KAFKA_SASL)),topics)
	$(PY) -m demo.run

# Three tiers, each timed (`time` and --durations in every CI log): unit (no stack), unit +
# integration (make test, on TEST_WORKERS pytest-xdist workers: each test has its own topics,
# consumer group and Redis prefix), system (kills, real Prometheus, image, quality sweeps).
# On the 2 cores here (load 1-4): 2 workers 6m49s, 3 workers 4m28s-4m38s, 4 workers 4m43s.
TEST_WORKERS ?= 3
test: install stack
	time $(PY) -m pytest -q -m "not quality and not system" -n $(TEST_WORKERS) --dist loadgroup --durations=15

UNIT_WORKERS ?= 2
unit: install
	time $(PY) -m pytest -q -m "not integration and not quality and not system" -n $(UNIT_WORKERS) --durations=10

SYSTEM_WORKERS ?= 2
system: install stack
	time $(PY) -m pytest -q -m "system or quality" -n $(SYSTEM_WORKERS) --dist loadgroup --durations=15

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy segmentation consumer trainer demo bench chaos quality
	$(VENV)/bin/mypy -p tests

# River (the per-event baseline) comes with the bench extra
$(VENV)/.bench-installed: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed stack
	$(PY) -m bench

# K selection against the truth, the gate and drift scenarios (about an hour on two cores); writes docs/model-quality.md
quality: install
	$(PY) -m quality

# 10,000 property-based cases of the per-message path, then the chaos table on a private stack
chaos: install packages
	SEG_FUZZ_EXAMPLES=10000 $(PY) -m pytest -q tests/consumer/test_hostile_input.py -k "fuzz or mutated"
	$(PY) -m chaos

# the input's schema and the outputs' (segmentation/schemas/: assignments, changes, dead letters, models topic)
schema: install
	$(PY) -m segmentation.events > segmentation/event.schema.json
	$(PY) -m segmentation.contracts

docs: install schema
	$(PY) -m segmentation.settings_table > docs/settings.md

prometheus: stack
	bash scripts/stack.sh prometheus-up

prometheus-down:
	bash scripts/stack.sh prometheus-down

rules:
	promtool check config monitoring/prometheus.yml
	promtool check config monitoring/prometheus-compose.yml
	promtool test rules monitoring/alerts_test.yml

clean:
	rm -rf $(VENV) .pytest_cache
