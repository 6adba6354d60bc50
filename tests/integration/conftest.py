"""A real native Triton serving the tiny model and SmolLM2, and the real gateway in front."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from stack import repository
from stack.paths import REPO_ROOT
from stack.triton_native import TritonServer
from tests.conftest import free_port

TINY = "tiny"
SMOL = "smollm2-135m-instruct"
STANDINS = REPO_ROOT / "tests" / "standins" / "model_repository"


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self, **kw: object) -> OpenAI:
        return OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=120, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_triton(repo: Path, models: list[str], log: Path, env: dict[str, str] | None = None) -> TritonServer:
    server = TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log_file=log, env=env or {}
    )
    server.start()
    try:
        server.wait_ready(models, timeout=300)
    except Exception:
        server.stop()
        raise
    return server


def start_gateway(config: dict[str, object], workdir: Path, env: dict[str, str] | None = None) -> Gateway:
    port = free_port()
    path = workdir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / f"gateway-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(path), "--port", str(port), "--log-level", "warning"],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    gateway = Gateway(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(gateway.url + "/v1/models", timeout=1).status_code == 200:
                return gateway
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    gateway.stop()
    raise RuntimeError(f"gateway did not start: {log.read_text()[-2000:]}")


def gateway_config(triton_url: str, models: dict[str, tuple[str, Path]]) -> dict[str, object]:
    return {
        "triton": {"urls": [triton_url], "read_timeout_s": 60},
        "models": {
            name: {"triton_model": triton_model, "tokenizer": str(tok)} for name, (triton_model, tok) in models.items()
        },
    }


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def standin_log(workdir: Path) -> Path:
    return workdir / "standin-requests.jsonl"


@pytest.fixture(scope="session")
def triton(workdir: Path, tiny_model_dir: Path, smollm2_dir: Path, standin_log: Path) -> Iterator[TritonServer]:
    repo = repository.render(workdir / "model_repository", {TINY: tiny_model_dir, SMOL: smollm2_dir})
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
    gw = start_gateway(gateway_config(triton.url, models), workdir)
    yield gw
    gw.stop()


def triton_metric(triton: TritonServer, name: str, model: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{triton.metrics_port}/metrics", timeout=5).text
    prefix = f'{name}{{model="{model}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{name} for {model} not in Triton's metrics")
