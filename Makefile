# The user's verbs. `make test` builds .venv when it is missing, then runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast bench clean

setup: $(STAMP)

# torch + torchvision first (a pair; the constraints file keeps pip from replacing it),
# then everything else pinned in requirements/ (img2dataset without its outdated pins), then
# this project in editable mode.
$(STAMP): requirements/constraints.txt requirements/base.txt requirements/data.txt requirements/nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/constraints.txt
	$(PIP) install -q -c requirements/constraints.txt -r requirements/base.txt -r requirements/data.txt
	$(PIP) install -q --no-deps -r requirements/nodeps.txt
	$(PIP) install -q -c requirements/constraints.txt --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/load_memory.py

clean:
	rm -rf $(VENV) .pytest_cache
