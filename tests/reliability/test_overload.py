"""Overload: beyond the in-flight limit and its queue the gateway answers at once (429) or after
the longest wait (503), with Retry-After, while the admitted requests complete."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.reliability.conftest import MAX_BATCH_SEQS, TINY, StartGateway

# The tiny model: quick, and ignore_eos makes every answer exactly max_tokens long.
LONG = {"model": TINY, "messages": [{"role": "user", "content": "Count to a hundred."}], "ignore_eos": True}


async def timed_post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    resp = await client.post(url, json=body)
    return resp, time.perf_counter() - started


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in the gateway's metrics")


async def test_full_queue_is_an_immediate_429_and_admitted_requests_complete(start_gw: StartGateway) -> None:
    gw = start_gw(limits={"max_queue": 4, "max_queue_wait_s": 120})
    url = gw.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=64)) as client:
        admitted = [asyncio.create_task(timed_post(client, url, {**LONG, "max_tokens": 1000})) for _ in range(8)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until 4 run and 4 wait
            text = (await client.get(gw.url + "/metrics")).text
            if metric(text, "gateway_queued", model=TINY) == 4:
                break
            await asyncio.sleep(0.05)
        assert metric(text, "gateway_in_flight", model=TINY) == MAX_BATCH_SEQS
        # One after another on a warm connection: each answer's own latency.
        extra = [await timed_post(client, url, {**LONG, "max_tokens": 24}) for _ in range(12)]
        done = await asyncio.gather(*admitted)
        text = (await client.get(gw.url + "/metrics")).text
    times = sorted(seconds for _, seconds in extra)
    median, slowest = times[len(times) // 2], times[-1]
    statuses = sorted({r.status_code for r, _ in extra})
    print(f"12 over the queue: statuses {statuses}, median {median * 1000:.0f} ms, slowest {slowest * 1000:.0f} ms")
    for resp, _ in extra:
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"]["code"] == "queue_full"
        assert int(resp.headers["retry-after"]) >= 1
    # The engine keeps both cores of a small CI machine busy meanwhile: the median is the
    # gateway's answer time, the slowest also the OS scheduler's.
    assert median < 0.1
    assert slowest < 0.25
    for resp, _ in done:
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 1000
    print(f"8 admitted (4 running, 4 queued) completed in {max(s for _, s in done):.1f} s")
    assert metric(text, "gateway_rejected_requests_total", model=TINY, reason="queue_full") == 12
    assert metric(text, "gateway_in_flight", model=TINY) == 0
    assert metric(text, "gateway_queued", model=TINY) == 0


async def test_a_wait_past_the_limit_is_a_503_with_retry_after(start_gw: StartGateway) -> None:
    gw = start_gw(limits={"max_queue": 8, "max_queue_wait_s": 1})
    url = gw.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=180) as client:
        # Long enough to outlast the wait on any machine; closed once the waiters have their answer.
        running = [asyncio.create_task(timed_post(client, url, {**LONG, "max_tokens": 3000})) for _ in range(4)]
        await asyncio.sleep(0.5)
        waited = await asyncio.gather(*(timed_post(client, url, {**LONG, "max_tokens": 8}) for _ in range(3)))
        still_running = not any(task.done() for task in running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    for resp, seconds in waited:
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "queue_timeout"
        assert int(resp.headers["retry-after"]) >= 1
        assert 0.9 < seconds < 1.5
    print(f"queued past 1 s: 503 after {', '.join(f'{s:.2f}' for _, s in waited)} s")
    assert still_running
