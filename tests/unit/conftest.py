"""Fixtures of the gateway's unit tests: the tiny model's tokenizer and a fake engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.tokenizer import ChatTokenizer
from tests.unit.fakes import FakeEngine


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer(tiny_model_dir)


@pytest.fixture()
def engine() -> FakeEngine:
    return FakeEngine()
