"""Admission control and the limits on one request, with a fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admission import Admission
from gateway.app import create_app
from gateway.config import Limits
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.tokenizer import ChatTokenizer
from tests.unit.fakes import FakeEngine
from tests.unit.test_gateway_api import MODEL, assert_envelope, chat, settings


def admission(**limits: Any) -> Admission:
    return Admission(MODEL, Limits(**limits), GatewayMetrics())


def rejected(adm: Admission, reason: str) -> float:
    value = adm._rejected.labels(MODEL, reason)._value.get()
    return float(value)


async def hold(adm: Admission, weight: int, order: list[int], tag: int, release: asyncio.Event) -> None:
    async with adm.slot(weight):
        order.append(tag)
        await release.wait()


async def test_fifo_with_weights() -> None:
    adm = admission(max_in_flight=4, max_queue=10)
    release = asyncio.Event()
    order: list[int] = []
    tasks = [asyncio.create_task(hold(adm, w, order, i, release)) for i, w in enumerate([3, 2, 1])]
    await asyncio.sleep(0.01)
    # 3 runs; 2 does not fit and waits; 1 would fit but must not overtake the head of the queue.
    assert order == [0] and adm.used == 3 and adm.queued == 2
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and adm.used == 0 and adm.queued == 0


async def test_full_queue_is_429_and_long_wait_503_with_retry_after() -> None:
    adm = admission(max_in_flight=1, max_queue=1, max_queue_wait_s=0.2)
    release = asyncio.Event()
    order: list[int] = []
    running = asyncio.create_task(hold(adm, 1, order, 0, release))
    waiting = asyncio.create_task(hold(adm, 1, order, 1, release))
    await asyncio.sleep(0.01)
    with pytest.raises(APIError) as full:
        async with adm.slot(1):
            pass
    assert full.value.status == 429 and full.value.code == "queue_full"
    assert rejected(adm, "queue_full") == 1
    assert full.value.headers and full.value.headers["Retry-After"].isdigit()
    with pytest.raises(APIError) as timeout:
        await waiting
    assert timeout.value.status == 503 and timeout.value.code == "queue_timeout"
    assert adm.queued == 0 and adm.used == 1
    release.set()
    await running
    assert adm.used == 0


async def test_a_waiter_that_leaves_frees_its_place() -> None:
    adm = admission(max_in_flight=1, max_queue=1)
    release = asyncio.Event()
    order: list[int] = []
    running = asyncio.create_task(hold(adm, 1, order, 0, release))
    waiting = asyncio.create_task(hold(adm, 1, order, 1, release))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert adm.queued == 0
    third = asyncio.create_task(hold(adm, 1, order, 2, release))  # takes the freed place
    await asyncio.sleep(0.01)
    assert adm.queued == 1
    release.set()
    await asyncio.gather(running, third)
    assert order == [0, 2] and adm.used == 0


async def test_close_turns_away_waiters_and_newcomers() -> None:
    adm = admission(max_in_flight=1)
    release = asyncio.Event()
    order: list[int] = []
    running = asyncio.create_task(hold(adm, 1, order, 0, release))
    waiting = asyncio.create_task(hold(adm, 1, order, 1, release))
    await asyncio.sleep(0.01)
    adm.close()
    with pytest.raises(APIError) as queued:
        await waiting
    assert queued.value.status == 503 and queued.value.code == "shutting_down"
    with pytest.raises(APIError):
        async with adm.slot(1):
            pass
    release.set()
    await running
    assert adm.used == 0


@pytest.fixture()
async def limited(
    tiny_model_dir: Path, tokenizer: ChatTokenizer, engine: FakeEngine
) -> AsyncIterator[httpx.AsyncClient]:
    s = settings(tiny_model_dir, max_body_bytes=64 * 1024, max_header_bytes=4096)
    s.models[MODEL].limits = Limits(max_prompts=4, max_n=2, max_requested_tokens=100)
    app = create_app(s, engine=engine, tokenizers={MODEL: tokenizer})
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


async def test_work_per_request_is_limited(limited: httpx.AsyncClient, engine: FakeEngine) -> None:
    five = {"model": MODEL, "prompt": ["a"] * 5, "max_tokens": 1}
    assert "4 prompts" in assert_envelope(await limited.post("/v1/completions", json=five), 400, "prompt")["message"]
    assert_envelope(await limited.post("/v1/chat/completions", json=chat(n=3, max_tokens=1)), 400, "n")
    err = assert_envelope(await limited.post("/v1/chat/completions", json=chat(n=2, max_tokens=60)), 400, "max_tokens")
    assert "120" in err["message"]
    err = assert_envelope(
        await limited.post("/v1/chat/completions", json=chat(max_completion_tokens=101)), 400, "max_completion_tokens"
    )
    assert not engine.requests  # none of them reached the engine
    assert (await limited.post("/v1/chat/completions", json=chat(n=2, max_tokens=50))).status_code == 200


async def test_body_and_header_limits(limited: httpx.AsyncClient) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 70_000}])
    resp = await limited.post("/v1/chat/completions", json=big)
    assert_envelope(resp, 413)
    assert resp.headers["connection"] == "close"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 10_000
        yield b'"}]}'

    assert_envelope(await limited.post("/v1/chat/completions", content=chunks()), 413)
    resp = await limited.post("/v1/chat/completions", json=chat(), headers={"x-junk": "z" * 5000})
    assert_envelope(resp, 431)


async def test_an_unexpected_error_closes_the_connection(
    tiny_model_dir: Path, tokenizer: ChatTokenizer, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings(tiny_model_dir), engine=engine, tokenizers={MODEL: tokenizer})

    def broken(*_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(tokenizer, "chat_prompt", broken)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            resp = await c.post("/v1/chat/completions", json=chat())
    assert_envelope(resp, 500)
    assert resp.headers["connection"] == "close"
    assert "boom" not in resp.text
