# Two commands for a newcomer: `make run` (the service with demo data) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

.PHONY: install run status test bench bench-quick
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/crm run $(ARGS)

status: $(STAMP)
	$(VENV)/bin/crm status $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/crm bench

bench-quick: $(STAMP)
	$(VENV)/bin/crm bench --quick
