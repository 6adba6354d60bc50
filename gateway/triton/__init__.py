"""Triton adapters: the HTTP client, one dialect per kind of Triton model, the engine."""

from gateway.triton.engine import TritonEngine

__all__ = ["TritonEngine"]
