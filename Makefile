# The course's commands. Each bootstraps .venv with pip when it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
PROFILE ?= ci
SOLUTION_NBS := .cache/solutions-ipynb
# pytest workers: one per core (each runs one torch thread in the ci profile); a notebook stays on one worker
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
export PATH := $(BIN):$(PATH)

.PHONY: help install data test book check-book check-install lab labs check-labs sync grade grade-dir results bench clean

help:
	@echo "make test     install, then run every unit test, notebook, solution and lab check (CI profile)"
	@echo "make book     install, then execute every notebook and build the site into book/_build/html"
	@echo "make check-book  open the built site (and JupyterLab) in headless Chromium, network cut off"
	@echo "make check-install  pip install . and each extra into clean venvs, and import what each provides"
	@echo "make lab      JupyterLab on the course"
	@echo "make labs     regenerate labs/ from solutions/ (never edit labs by hand)"
	@echo "make sync     pair notebooks/*.py with notebooks/*.ipynb (outputs stripped)"
	@echo "make grade SUB=path/to/submission.ipynb   autograde one student notebook"
	@echo "make grade-dir DIR=submissions            autograde every DIR/<student>/NN_name.ipynb into a CSV"
	@echo "make results CHAPTER=02   write a chapter's full-profile reference table to results/"
	@echo "make bench    time mmalign against pytorch-metric-learning, faiss, torch-optimizer, POT -> results/bench.json"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

# Render the scene world of the profile and cache its frozen features (minutes the first time, then instant).
data: install
	MMALIGN_PROFILE=$(PROFILE) $(BIN)/python -m mmalign.data.features

test: install
	MMALIGN_PROFILE=ci $(BIN)/python -m mmalign.data.features
	rm -rf $(SOLUTION_NBS) && mkdir -p $(SOLUTION_NBS)
	for f in solutions/*.py; do \
	  $(BIN)/jupytext --quiet --to ipynb --set-kernel python3 -o $(SOLUTION_NBS)/$$(basename $${f%.py}).ipynb $$f || exit 1; \
	done
	MMALIGN_PROFILE=ci MPLBACKEND=Agg TQDM_MININTERVAL=2 $(BIN)/python -m pytest tests notebooks/*.ipynb $(SOLUTION_NBS)/*.ipynb \
	  -n $(TEST_WORKERS) --dist loadfile --nbval-lax --nbval-cell-timeout=600 -p no:cacheprovider -q --durations=20

# BOOK_CONFIG: another _config.yml (CI uses one that executes only some chapters; see .ci/run).
BOOK_CONFIG ?= book/_config.yml
book: data
	$(BIN)/python book/fetch_widget_manager.py
	MMALIGN_PROFILE=$(PROFILE) $(BIN)/jupyter-book build book --config $(BOOK_CONFIG) -W --keep-going
	$(BIN)/python book/check_site.py $(BOOK_CONFIG)

# Needs Chromium (apt-get install chromium); skips with a message without it.
check-book: install
	$(BIN)/python -m pytest tests/test_site_browser.py -p no:cacheprovider -q -rs

# jupyter_config/ (added to Jupyter's config path, your ~/.jupyter untouched) makes the course's
# .py sources open as notebooks (jupytext's "Jupytext Notebook" viewer) on a double click.
lab: install
	JUPYTER_CONFIG_PATH=$(CURDIR)/jupyter_config$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH} \
	  $(BIN)/jupyter lab --ServerApp.root_dir=. $(if $(filter 0,$(shell id -u)),--allow-root,)

labs: install
	$(BIN)/python -m mmalign.labs generate solutions labs
	$(BIN)/python -m mmalign.labs check solutions labs

# `pip install .` and each extra into clean venvs (uv, from the registry); make test skips it unless
# MMALIGN_CLEAN_INSTALL=1 (this target; CI runs it after make test): the first run puts torch in uv's cache (several GB).
check-install: install
	MMALIGN_CLEAN_INSTALL=1 $(BIN)/python -m pytest tests/test_clean_install.py -p no:cacheprovider -q -rs

check-labs: install
	$(BIN)/python -m mmalign.labs check solutions labs

sync: install
	$(BIN)/jupytext --sync notebooks/*.py

grade: install
	@test -n "$(SUB)" || { echo "usage: make grade SUB=path/to/submission.ipynb"; exit 2; }
	MMALIGN_PROFILE=$${MMALIGN_PROFILE:-ci} $(BIN)/python -m mmalign.labs grade $(SUB) --json $(basename $(SUB)).grade.json

grade-dir: install
	@test -n "$(DIR)" || { echo "usage: make grade-dir DIR=submissions (DIR/<student>/NN_name.ipynb)"; exit 2; }
	MMALIGN_PROFILE=$${MMALIGN_PROFILE:-ci} $(BIN)/python -m mmalign.labs grade-dir $(DIR)

results: install
	@test -n "$(CHAPTER)" || { echo "usage: make results CHAPTER=02"; exit 2; }
	MMALIGN_PROFILE=full $(BIN)/python -m mmalign.experiments $(CHAPTER)

# Side-by-side benchmarks against the peer libraries (the optional `bench` extra), writing results/bench.json.
bench: install
	$(BIN)/python -c "import faiss, pytorch_metric_learning, torch_optimizer, ot" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet "pytorch-metric-learning>=2.5" "faiss-cpu>=1.8" "torch-optimizer>=0.3" "POT>=0.9"
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf book/_build $(SOLUTION_NBS) .pytest_cache
