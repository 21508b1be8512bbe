# The user's verbs. `make test` builds .venv when it is missing, then runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast bench clean promote filter-laion

# CONFIG and ARGS pass a config file and extra flags to the targets below.

setup: $(STAMP)

# torch + torchvision first (a pair; the constraints file keeps pip from replacing it),
# then everything else pinned in requirements/ (img2dataset without its outdated pins), then
# this project in editable mode.
$(STAMP): requirements/constraints.txt requirements/lock.txt requirements/base.txt requirements/data.txt requirements/nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/constraints.txt
	$(PIP) install -q -c requirements/constraints.txt -c requirements/lock.txt -r requirements/base.txt -r requirements/data.txt
	$(PIP) install -q --no-deps -r requirements/nodeps.txt
	$(PIP) install -q -c requirements/constraints.txt --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The data pipeline: the embedded sample by default; METADATA=<parquet/glob/URL> OUTPUT=<dir/URL>
# for the real laion2B-en metadata (RAY_ADDRESS joins a cluster).
filter-laion: $(STAMP)
	$(PY) -m pipelines.filter_laion $(if $(METADATA),--metadata $(METADATA)) $(if $(OUTPUT),--output $(OUTPUT)) $(ARGS)

promote: $(STAMP)
	$(PY) training/promote.py --config $(or $(CONFIG),training/configs/promote.yaml) $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/load_memory.py
	$(PY) benchmarks/sampling_speed.py
	$(PY) benchmarks/tiled_memory.py --weights full --sizes 1024 2048
	$(PY) benchmarks/tiled_memory.py --weights tiny --sizes 4096x3072 --steps 2
	$(PY) benchmarks/degradations.py
	$(PY) benchmarks/quality_filter.py

clean:
	rm -rf $(VENV) .pytest_cache
