# ember: every figure/table is a parameterized notebook run headlessly by papermill.
#   make all                      every figure at the default profile
#   make fig2 PROFILE=paper P='repeats=5'
#   make fig2 PROFILE=paper REUSE=1   render from results of `ember run fig2 --profile paper` (e.g. a GPU box);
#                                     STALE=1 also renders a run of unknown git SHA, marked stale
#   make stamp                    write the git SHA into .ember-sha before shipping the tree to a GPU machine
#   make test                     pytest + nbval (smoke profile)
#   make fig8 PROFILE=paper RAY=auto  the grid's cells as Ray tasks (RAY=auto | local:N | an address; `.[ray]`)
#   make test-ray                 the Ray fan-out on a local two-worker cluster (installs the ray extra)
#   make paper [STRICT=1]         paper/main.pdf from figures/ and paper/generated/ (STRICT=1: fail on missing)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= default
P ?=
REUSE ?=
STALE ?=
STRICT ?=
RAY ?=
FIGURES := fig2 fig3 fig4 fig5 fig6 fig7 fig8 tab1 tab2 tab3
TEST_OUT := $(CURDIR)/.test-out

.PHONY: setup all test test-ray bench lab clean help targets models stamp paper llama-cpp $(FIGURES)

help:
	@sed -n '1,10p' Makefile | sed 's/^# \{0,1\}//'
	@echo "targets: setup all $(FIGURES) paper models stamp test test-ray bench llama-cpp lab clean"

$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.setup-done

all: $(FIGURES)

# One rule for every figure/table: add the target's name to FIGURES.
$(FIGURES): setup
	$(if $(RAY),EMBER_RAY=$(RAY)) $(PY) -m ember.cli figure $@ --profile $(PROFILE) --set "$(P)" $(if $(REUSE),--reuse) \
		$(if $(STALE),--allow-stale)

# paper/main.pdf from figures/ and paper/generated/ (LaTeX installed from Debian packages when missing);
# STRICT=1 fails while a figure, table or macro is missing, naming them
paper: setup
	$(PY) -m ember.paper build $(if $(STRICT),--strict)

targets: setup
	$(PY) -m ember.cli targets

models: setup
	$(PY) -m ember.cli models

stamp: setup
	$(PY) -m ember.cli stamp

test-ray: setup
	$(PY) -m pip install --quiet -e '.[ray]'
	$(PY) -m pytest tests/test_ray.py -p no:cacheprovider

test: setup
	rm -rf $(TEST_OUT)
	EMBER_OUT_ROOT=$(TEST_OUT) $(PY) -m pytest tests notebooks --nbval-lax \
		--sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

bench: setup
	$(PY) -m ember.cli bench generate --out reports/bench/generate_cpu.json
	$(PY) -m ember.cli bench kvwire --out reports/bench/kvwire_cpu.json
	$(PY) -m ember.cli bench prompt_kv --model qwen2.5-0.5b --time-prompt 256 --out reports/bench/prompt_kv_cpu.json
	$(PY) -m ember.cli bench long_tail --out reports/bench/long_tail_cpu.json

# llama-cpp-python for tab2's llama.cpp rows, built from the PyPI source for this CPU (several minutes on 2
# cores; never part of `make test`). 0.3.16: the 0.3.36 build crashed on every multi-token prompt here.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.16
llama-cpp: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
		-DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet $(LLAMA_CPP_PYTHON)

lab: setup
	$(PY) -m ember.cli lab

clean:
	rm -rf reports figures paper/generated $(TEST_OUT) .pytest_cache
