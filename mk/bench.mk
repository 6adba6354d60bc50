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
# Extra arguments, e.g. BENCH_ARGS="--piece-delay-ms 5 --concurrency 1,32" (python -m bench --help).
BENCH_ARGS ?=

.PHONY: bench bench-quick bench-profile bench-setup test-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e ".[bench]" $(PIP_ARGS)
	@touch $@

bench-setup: setup $(BENCH_STAMP)

bench: bench-setup ## full benchmark: triton vs gateway vs litellm, c=1,8,32,64, + SmolLM2 line (~10 min)
	$(PY) -m bench --out $(BENCH_OUT) $(BENCH_ARGS)

bench-quick: bench-setup ## one level (c=8) of each mode and target, no SmolLM2 line (< 1 min)
	$(PY) -m bench --quick --out $(BENCH_QUICK_OUT) $(BENCH_ARGS)

bench-profile: bench-setup ## py-spy on the gateway while it streams at c=32; summary in bench/results/
	$(PY) -m bench profile --out-dir $(dir $(BENCH_OUT))

test-bench: bench-setup ## smoke test: the quick bench's code path writes well-formed JSON (no timing checks)
	$(PY) -m pytest -q tests/bench

TEST_SUITES += test-bench
