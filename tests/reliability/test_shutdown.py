"""SIGTERM to the gateway drains it: queued and new requests get a 503 at once, running streams
get the grace period, then an error event and [DONE]; the process then exits."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx

from tests.reliability.conftest import TINY, StartGateway
from tests.reliability.sse import error_events, stream_events

LONG = {"model": TINY, "messages": [{"role": "user", "content": "Go on."}], "ignore_eos": True}


async def test_sigterm_drains_then_ends_streams_properly(start_gw: StartGateway) -> None:
    gw = start_gw(shutdown_grace_s=2, limits={"max_in_flight": 3})
    url = gw.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=60) as client:
        # Two streams that cannot finish within the grace, one that can; then two requests with
        # n=2 that wait for room (one slot stays free at most, and the queue is FIFO).
        long = [asyncio.create_task(stream_events(client, url, {**LONG, "max_tokens": 2000})) for _ in range(2)]
        short = asyncio.create_task(stream_events(client, url, {**LONG, "max_tokens": 30}))
        await asyncio.sleep(0.3)
        queued = [asyncio.create_task(client.post(url, json={**LONG, "max_tokens": 4, "n": 2})) for _ in range(2)]
        await asyncio.sleep(0.3)
        sent = time.perf_counter()
        gw.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        refused = await client.post(url, json={**LONG, "max_tokens": 4})
        health = await client.get(gw.url + "/health")
        queued_answers = await asyncio.gather(*queued)
        short_status, short_events = await short
        streams = await asyncio.gather(*long)
        ended = time.perf_counter() - sent
    exit_code = await asyncio.to_thread(gw.process.wait, 30)
    exited = time.perf_counter() - sent

    for resp in [*queued_answers, refused, health]:
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "shutting_down"
        assert resp.headers["retry-after"].isdigit()
    assert short_status == 200 and short_events[-1] == "[DONE]" and not error_events(short_events)
    assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
    for long_status, long_events in streams:
        assert long_status == 200 and long_events[-1] == "[DONE]"
        errors = error_events(long_events)
        assert errors and errors[0]["code"] == "shutting_down", long_events[-3:]
    print(
        f"SIGTERM: queued and new requests 503; the long streams ended with an error event and [DONE] "
        f"{ended:.1f} s later (grace 2 s); the gateway exited {exited:.1f} s after the signal (code {exit_code})"
    )
    assert 1.5 < ended < 6
    assert exited < 10
