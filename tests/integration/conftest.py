"""A real native Triton serving the tiny model and SmolLM2, and the real gateway in front."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stack import repository
from stack.gateway_config import gateway_config
from stack.gateway_process import Gateway, start_gateway
from stack.paths import REPO_ROOT
from stack.triton_native import TritonServer, start_triton

TINY = "tiny"
SMOL = "smollm2-135m-instruct"
STANDINS = REPO_ROOT / "tests" / "standins" / "model_repository"
# Few sequences, so that a queue forms and requests visibly join and leave the running batch.
VLLM_MAX_NUM_SEQS = 4


def gateway_config_for_tests(triton_url: str, models: dict[str, tuple[str, Path]]) -> dict[str, object]:
    """The gateway config of the tests: a shorter read timeout, so a hung answer fails fast."""
    return gateway_config(triton_url, models, triton_read_timeout_s=60)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def standin_log(workdir: Path) -> Path:
    return workdir / "standin-requests.jsonl"


@pytest.fixture(scope="session")
def triton(workdir: Path, tiny_model_dir: Path, smollm2_dir: Path, standin_log: Path) -> Iterator[TritonServer]:
    repo = workdir / "model_repository"
    repository.render(repo, {TINY: tiny_model_dir, SMOL: smollm2_dir})
    models = [TINY, SMOL]
    if STANDINS.exists():
        for standin in sorted(p for p in STANDINS.iterdir() if (p / "config.pbtxt").exists()):
            shutil.copytree(standin, repo / standin.name)
            models.append(standin.name)
    server = start_triton(repo, models, workdir / "triton.log", env={"STANDIN_LOG": str(standin_log)})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(triton: TritonServer, workdir: Path, tiny_model_dir: Path, smollm2_dir: Path) -> Iterator[Gateway]:
    models = {TINY: (TINY, tiny_model_dir), SMOL: (SMOL, smollm2_dir)}
    for standin in ("trtllm_standin", "vllm_standin", "llmapi_standin"):
        if (STANDINS / standin).exists():
            models[standin] = (standin, tiny_model_dir)
    models["missing"] = ("no-such-triton-model", tiny_model_dir)
    gw = start_gateway(gateway_config_for_tests(triton.url, models), workdir)
    yield gw
    gw.stop()


def triton_metric(triton: TritonServer, name: str, model: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{triton.metrics_port}/metrics", timeout=5).text
    prefix = f'{name}{{model="{model}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{name} for {model} not in Triton's metrics")


@pytest.fixture(scope="session")
def vllm_triton(workdir: Path, smollm2_dir: Path) -> Iterator[TritonServer]:
    """The vllm engine on SmolLM2, in vLLM's own venv (installed into the cache on first use by
    ``stack.engines``: a few minutes, once)."""
    from stack.engines import ensure_engine

    python = ensure_engine("vllm")
    repo = workdir / "vllm_repository"
    params = {"max_num_seqs": str(VLLM_MAX_NUM_SEQS)}
    repository.render(repo, {SMOL: smollm2_dir}, template=repository.VLLM_TEMPLATE, params=params)
    server = start_triton(repo, [SMOL], workdir / "triton-vllm.log", python=python, timeout=900)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_gateway(vllm_triton: TritonServer, workdir: Path, smollm2_dir: Path) -> Iterator[Gateway]:
    gw_dir = workdir / "vllm-gateway"
    gw_dir.mkdir(exist_ok=True)
    gw = start_gateway(gateway_config_for_tests(vllm_triton.url, {SMOL: (SMOL, smollm2_dir)}), gw_dir)
    yield gw
    gw.stop()
