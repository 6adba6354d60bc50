# Benchmark: `make bench`, `make bench-quick`, `make bench-profile`; bench/README.md.
# Included by the Makefile (-include mk/*.mk). The `bench` extra of pyproject.toml (LiteLLM's
# proxy, matplotlib, psutil, py-spy) goes into $(VENV) on first use.

BENCH_STAMP := $(VENV)/.installed-bench
# Where the rows go (JSON); the chart is the same path with .png, the run's settings .meta.json.
BENCH_OUT ?= bench/results/latest.json
# `make bench-quick` writes beside it unless BENCH_OUT is given on the command line or in
# the environment, so a quick run never overwrites the full run's figures.
ifeq ($(origin BENCH_OUT),file)
BENCH_QUICK_OUT := bench/results/quick.json
else
BENCH_QUICK_OUT := $(BENCH_OUT)
endif
# `make bench-real` (the real-model section alone) likewise writes beside it.
ifeq ($(origin BENCH_OUT),file)
BENCH_REAL_OUT := bench/results/realmodel.json
else
BENCH_REAL_OUT := $(BENCH_OUT)
endif
# Extra arguments, e.g. BENCH_ARGS="--piece-delay-ms 5 --concurrency 1,32" (python -m bench --help).
BENCH_ARGS ?=

.PHONY: bench bench-quick bench-real bench-peers-setup bench-profile bench-setup test-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e ".[bench]" $(PIP_ARGS)
	@touch $@

bench-setup: setup $(BENCH_STAMP)

bench: bench-setup ## full benchmark: triton vs gateway vs litellm + SmolLM2 line + this stack vs vLLM vs llama.cpp (~35 min)
	$(PY) -m bench --out $(BENCH_OUT) $(BENCH_ARGS)

bench-quick: bench-setup ## one level (c=8) of each mode and target, no SmolLM2 line; of the peers only this stack, 4 requests (~1.5 min)
	$(PY) -m bench --quick --out $(BENCH_QUICK_OUT) $(BENCH_ARGS)

bench-real: bench-setup ## only the real-model section: this stack vs vLLM vs llama.cpp on SmolLM2, c=1,4,16
	$(PY) -m bench --peers-only --out $(BENCH_REAL_OUT) $(BENCH_ARGS)

bench-peers-setup: bench-setup ## install the peers once: vLLM's venv, llama-server built from source (~20 min)
	$(PY) -m stack.engines vllm
	$(PY) -m bench.peers llama.cpp

bench-profile: bench-setup ## py-spy on the gateway while it streams at c=32; summary in bench/results/
	$(PY) -m bench profile --out-dir $(dir $(BENCH_OUT))

test-bench: bench-setup ## smoke test: the quick bench's and the real-model section's code paths (no peers, no timing checks)
	$(PY) -m pytest -q tests/bench

TEST_SUITES += test-bench
