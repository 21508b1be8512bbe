# The user's verbs. `make test` builds .venv when it is missing, then runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup lint test test-fast bench clean demo promote filter-laion example-data tiny-models train-rm train-gm evaluate restore-archive serve refresh-golden

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# The whole loop on this machine: filter the sample, train, register, promote, serve, restore
# (infra/demo.py; CONFIG=infra/configs/demo.yaml, ARGS='--hold' keeps the services up).
demo: $(STAMP)
	$(PY) infra/demo.py $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The data pipeline: the embedded sample by default; METADATA=<parquet/glob/URL> OUTPUT=<dir/URL>
# for the real laion2B-en metadata (RAY_ADDRESS joins a cluster).
filter-laion: $(STAMP)
	$(PY) -m pipelines.filter_laion $(if $(METADATA),--metadata $(METADATA)) $(if $(OUTPUT),--output $(OUTPUT)) $(ARGS)

# Training. Without RAY_ADDRESS the script starts (or joins) a local Ray; with it, the run is a
# Ray job on that cluster. A job runs in an uploaded copy of this directory without its
# git-ignored runs/, so the tiny configs' paths are passed absolute. JOB_PYTHON: the job's
# interpreter (on a cluster whose image has the project installed: JOB_PYTHON=python). The job
# gets this shell's MLFLOW_TRACKING_URI (jobs otherwise see the cluster's environment).
EXAMPLE    := runs/data/example
TINY       := runs/tiny
JOB_PYTHON ?= $(abspath $(PY))
JOB_ENV     = $(if $(MLFLOW_TRACKING_URI),--runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "$(MLFLOW_TRACKING_URI)"}}')
RUN_JOB     = $(if $(RAY_ADDRESS),RAY_AUTH_MODE=token $(VENV)/bin/ray job submit --address $(RAY_ADDRESS) --working-dir . $(JOB_ENV) -- $(JOB_PYTHON),$(PY))
TINY_PATHS  = --data $(CURDIR)/$(EXAMPLE)/train --val-data $(CURDIR)/$(EXAMPLE)/val --storage $(CURDIR)/runs/train --tracking-dir $(CURDIR)/runs/mlflow

example-data: $(EXAMPLE)/.done

# The tiny SD 2.1, IRControlNet and SwinIR files (official layouts, key-based initialisation)
# that the tiny configs, the demo and the README's examples use.
tiny-models: $(TINY)/.done

$(TINY)/.done: | $(STAMP)
	$(VENV)/bin/diffbir init-tiny --output $(TINY)
	touch $@

$(EXAMPLE)/.done: | $(STAMP)
	$(PY) -m pipelines.feed $(EXAMPLE)
	touch $@

# CONFIG=<yaml> runs another config as it is (its own data and storage); the default is the
# tiny one on the example shards, and the GM's frozen RM is RM_MODEL, the one train-rm trained
# (trained first when missing).
train-rm: $(STAMP) $(if $(CONFIG),,$(EXAMPLE)/.done)
	$(RUN_JOB) training/train_rm.py --config $(or $(CONFIG),training/configs/rm_tiny.yaml) $(if $(CONFIG),,$(TINY_PATHS)) $(ARGS)

RM_MODEL   ?= $(CURDIR)/runs/train/rm-tiny/model

train-gm: $(STAMP) $(if $(CONFIG),,$(EXAMPLE)/.done $(TINY)/.done)
	$(if $(CONFIG),,test -f $(RM_MODEL)/model.json || $(MAKE) train-rm)
	$(RUN_JOB) training/train_gm.py --config $(or $(CONFIG),training/configs/gm_tiny.yaml) \
	  $(if $(CONFIG),,$(TINY_PATHS) --base-weights $(CURDIR)/$(TINY)/sd21_tiny.safetensors --stage1-weights $(RM_MODEL)) $(ARGS)

promote: $(STAMP)
	$(PY) training/promote.py --config $(or $(CONFIG),training/configs/promote.yaml) $(ARGS)

# Score models on the benchmarks of a config (default: the tiny model of the README on three
# photos); ARGS='--models models:/diffbir@champion --compare NAME=FOLDER' (RAY_ADDRESS joins a cluster).
evaluate: $(STAMP)
	$(PY) -m training.evaluate --config $(or $(CONFIG),training/configs/eval_tiny.yaml) $(ARGS)

# The restoration API on Ray Serve, in the foreground until Ctrl-C (serving/configs/serve.yaml;
# every field is also a flag: ARGS='--model-uri /tmp/diffbir-tiny --port 8080').
serve: $(STAMP)
	$(PY) -m serving.app --config $(or $(CONFIG),serving/configs/serve.yaml) $(ARGS)

# Restore every image of an archive: IN=<tar, tar.gz, zip or folder; path or fsspec URL>
# OUT=<the same kind>; the model is the config's (models:/diffbir@champion) unless ARGS='--model ...'.
restore-archive: $(STAMP)
	$(PY) -m serving.archive --config $(or $(CONFIG),serving/configs/archive.yaml) $(if $(IN),--input $(IN)) $(if $(OUT),--output $(OUT)) $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/load_memory.py
	$(PY) benchmarks/sampling_speed.py
	$(PY) benchmarks/tiled_memory.py --weights full --sizes 1024 2048
	$(PY) benchmarks/tiled_memory.py --weights tiny --sizes 4096x3072 --steps 2
	$(PY) benchmarks/degradations.py
	$(PY) benchmarks/quality_filter.py

# Copy new reference fixtures from the team's shared reference folder into tests/golden/
# (tests/golden/refresh.py says what and how; the tests only read the copy).
refresh-golden: $(STAMP)
	$(PY) tests/golden/refresh.py

clean:
	rm -rf $(VENV) .pytest_cache
