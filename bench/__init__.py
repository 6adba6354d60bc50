"""Benchmark: what the gateway costs over Triton, next to direct Triton and LiteLLM's proxy.

``python -m bench`` (``make bench``); see bench/README.md.
"""
