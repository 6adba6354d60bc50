"""The reliability suite: a real native Triton (llm model, tiny and SmolLM2) and gateways with
small limits, so that overload, abandoned requests and faults show in seconds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stack import repository
from stack.gateway_config import gateway_config
from stack.gateway_process import Gateway, start_gateway
from stack.triton_native import TritonServer, start_triton

TINY = "tiny"
SMOL = "smollm2-135m-instruct"
# The llm model's batch here; gateways are admitted to match (max_in_flight).
MAX_BATCH_SEQS = 4

StartGateway = Callable[..., Gateway]


@pytest.fixture(scope="session")
def rel_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def rel_triton(rel_workdir: Path, tiny_model_dir: Path, smollm2_dir: Path) -> Iterator[TritonServer]:
    repo = rel_workdir / "model_repository"
    repository.render(repo, {TINY: tiny_model_dir, SMOL: smollm2_dir}, params={"max_batch_seqs": str(MAX_BATCH_SEQS)})
    server = start_triton(repo, [TINY, SMOL], rel_workdir / "triton.log")
    yield server
    server.stop()


@pytest.fixture
def start_gw(
    rel_triton: TritonServer, rel_workdir: Path, tiny_model_dir: Path, smollm2_dir: Path
) -> Iterator[StartGateway]:
    """``start_gw(limits={...}, model_settings={...}, **top_level_settings)``: a gateway of its own
    on the suite's Triton (stopped at the end of the test), serving ``tiny`` and
    ``smollm2-135m-instruct``; ``limits`` and ``model_settings`` apply to both models."""
    started: list[Gateway] = []

    def start(
        limits: dict[str, Any] | None = None,
        triton_url: str | None = None,
        model_settings: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Gateway:
        models = {TINY: (TINY, tiny_model_dir), SMOL: (SMOL, smollm2_dir)}
        every_model = {"limits": {"max_in_flight": MAX_BATCH_SEQS, **(limits or {})}, **(model_settings or {})}
        config = gateway_config(triton_url or rel_triton.url, models, every_model, triton_read_timeout_s=60, **settings)
        gw = start_gateway(config, rel_workdir)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
