"""Triton going away and coming back, under a gateway that keeps running."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from stack import repository
from stack.gateway_process import Gateway, start_gateway
from stack.triton_native import TritonServer, start_triton
from tests.integration.conftest import TINY, gateway_config_for_tests

pytestmark = pytest.mark.triton
# Greedy: the tiny model then never emits EOS early (sampled, it sometimes ends an answer
# before Triton is killed, or with fewer than max_tokens tokens).
CHAT = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def own_stack(workdir: Path, tiny_model_dir: Path) -> Iterator[tuple[TritonServer, Gateway]]:
    repo = workdir / "restart_repository"
    repository.render(repo, {TINY: tiny_model_dir})
    server = start_triton(repo, [TINY], workdir / "triton-restart.log")
    gw = start_gateway(gateway_config_for_tests(server.url, {TINY: (TINY, tiny_model_dir)}), workdir)
    yield server, gw
    gw.stop()
    server.stop()


def kill_hard(server: TritonServer) -> None:
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()


def test_triton_down_then_back(own_stack: tuple[TritonServer, Gateway]) -> None:
    server, gw = own_stack
    assert httpx.get(gw.url + "/health").status_code == 200

    # Killed in the middle of a stream: an error event, then [DONE].
    body = {**CHAT, "max_tokens": 3500, "stream": True}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = []
        for line in resp.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 5:
                kill_hard(server)
    assert lines[-1] == "data: [DONE]"
    error = orjson.loads(lines[-2][6:])
    assert error["error"]["code"] == "upstream_error"

    # Down: health and requests say 503 in OpenAI's envelope.
    health = httpx.get(gw.url + "/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "upstream_unavailable"
    for stream in (False, True):
        resp = httpx.post(gw.v1 + "/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["type"] == "server_error"

    # Back on the same ports: served again, no gateway restart.
    server.start()
    server.wait_ready([TINY], timeout=120)
    deadline = time.monotonic() + 30
    while httpx.get(gw.url + "/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    resp = httpx.post(gw.v1 + "/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
