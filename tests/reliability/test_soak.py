"""A bounded soak: thousands of short requests through one gateway, no error and no memory growth."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import httpx
import pytest

from stack.gateway_process import Gateway
from tests.reliability.conftest import TINY, StartGateway

pytestmark = pytest.mark.triton

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "5000"))
WARMUP = 200
CONCURRENCY = 8
MAX_RSS_GROWTH = 0.05


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def _one(client: httpx.AsyncClient, i: int) -> str | None:
    """Request ``i`` (streaming every other one); None when it went right, else what went wrong."""
    stream = i % 2 == 1
    body = {
        "model": TINY,
        "messages": [{"role": "user", "content": f"say something {i}"}],
        "max_tokens": 4,
        "stream": stream,
    }
    try:
        if not stream:
            r = await client.post("/chat/completions", json=body)
            if r.status_code != 200:
                return f"{r.status_code}: {r.text[:200]}"
            return None if r.json()["choices"][0]["finish_reason"] in ("stop", "length") else r.text[:200]
        async with client.stream("POST", "/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"{r.status_code}: {(await r.aread())[:200]!r}"
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        if not events or events[-1] != "data: [DONE]" or any('"error"' in e for e in events):
            return f"bad stream: {events[-3:]}"
        return None
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


async def _run(gw: Gateway, first: int, count: int, errors: Counter[str]) -> None:
    next_index = iter(range(first, first + count))
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in next_index:
                error = await _one(client, i)
                if error is not None:
                    errors[error] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def test_soak_short_requests(start_gw: StartGateway) -> None:
    gw = start_gw()
    pid = gw.process.pid
    errors: Counter[str] = Counter()
    asyncio.run(_run(gw, 0, WARMUP, errors))
    rss_before = rss_kib(pid)
    start = time.monotonic()
    asyncio.run(_run(gw, WARMUP, REQUESTS, errors))
    duration = time.monotonic() - start
    rss_after = rss_kib(pid)
    growth = (rss_after - rss_before) / rss_before
    print(
        f"\nsoak: {REQUESTS} requests (+{WARMUP} warm-up) at concurrency {CONCURRENCY}, half streaming, "
        f"max_tokens 4: {duration:.1f} s, {REQUESTS / duration:.1f} req/s; errors {sum(errors.values())}; "
        f"gateway RSS {rss_before / 1024:.1f} MiB -> {rss_after / 1024:.1f} MiB ({growth:+.2%})"
    )
    assert not errors, errors.most_common(5)
    assert growth <= MAX_RSS_GROWTH
