"""Hostile but fair input: huge prompts and bodies, broken text, absurd numbers. Each gets a
quick, clear 4xx in the envelope; the gateway stays responsive and gives its memory back."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from stack.gateway_process import Gateway
from tests.reliability.conftest import SMOL, TINY, StartGateway

FOUR_MIB = 4 * 1024 * 1024


def rss_mb(gw: Gateway) -> float:
    status = Path(f"/proc/{gw.process.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def chat(content: str, **kw: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


async def health_while(client: httpx.AsyncClient, gw: Gateway, work: asyncio.Task[httpx.Response]) -> list[float]:
    """/health latencies, polled every 20 ms until ``work`` is done."""
    latencies = []
    while not work.done():
        started = time.perf_counter()
        resp = await client.get(gw.url + "/health")
        latencies.append(time.perf_counter() - started)
        assert resp.status_code == 200, resp.text
        await asyncio.sleep(0.02)
    return latencies


async def test_a_4_mib_prompt_never_stalls_health_and_memory_comes_back(start_gw: StartGateway) -> None:
    # A context this long makes the gateway tokenize the whole prompt (no bound settles it):
    # the worst case for the event loop.
    gw = start_gw(model_settings={"context_length": 2_000_000}, limits={"max_requested_tokens": 2_000_000})
    prompt = ("All work and no play makes Jack a dull boy. " * (FOUR_MIB // 44 + 1))[:FOUR_MIB]
    async with httpx.AsyncClient(timeout=120) as client, httpx.AsyncClient(timeout=120) as prober:
        for _ in range(20):  # warm up: the idle level is that of a gateway that has served
            assert (await client.post(gw.v1 + "/chat/completions", json=chat("hi"))).status_code == 200
        idle = rss_mb(gw)
        worst = []
        for endpoint, body in (
            ("/chat/completions", chat(prompt, model=SMOL, max_tokens=1_990_000)),
            ("/completions", {"model": SMOL, "prompt": prompt, "max_tokens": 1_990_000}),
        ):
            work = asyncio.create_task(client.post(gw.v1 + endpoint, json=body))
            latencies = await health_while(prober, gw, work)
            resp = work.result()
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["code"] == "context_length_exceeded"
            worst.append(max(latencies))
            worst_ms = max(latencies) * 1000
            print(f"{endpoint} with a 4 MiB prompt: 400; /health polled {len(latencies)}×, worst {worst_ms:.0f} ms")
        await asyncio.sleep(1)
        after = rss_mb(gw)
    print(
        f"gateway RSS: idle {idle:.0f} MB, after the 4 MiB prompts {after:.0f} MB ({(after / idle - 1) * 100:+.1f} %)"
    )
    assert max(worst) < 0.1
    assert after <= idle * 1.10


def test_a_4_mib_prompt_over_the_context_is_refused_without_tokenizing(start_gw: StartGateway) -> None:
    gw = start_gw()
    started = time.perf_counter()
    resp = httpx.post(gw.v1 + "/chat/completions", json=chat("x " * (FOUR_MIB // 2)), timeout=60)
    seconds = time.perf_counter() - started
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded", resp.text
    assert "at least" in resp.json()["error"]["message"]
    print(f"4 MiB prompt over a 4,096-token context: 400 in {seconds * 1000:.0f} ms")
    assert seconds < 2


def test_size_limits(start_gw: StartGateway) -> None:
    gw = start_gw(max_body_bytes=8 * 1024 * 1024)
    url = gw.v1 + "/chat/completions"
    with httpx.Client(timeout=60) as client:
        twenty = json.dumps({**chat("hi"), "junk": "x" * (20 * 1024 * 1024)})
        started = time.perf_counter()
        resp = client.post(url, content=twenty, headers={"content-type": "application/json"})
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "request_too_large"
        print(f"20 MB body (bulk in an unknown field): 413 in {(time.perf_counter() - started) * 1000:.0f} ms")

        def chunks() -> Any:  # chunked: no Content-Length to go by
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"y" * 100_000
            yield b'"}]}'

        resp = client.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413, resp.text
    with httpx.Client(timeout=60) as client:
        resp = client.post(url, json=chat("hi"), headers={"x-junk": "z" * (1024 * 1024)})
        assert resp.status_code == 431, resp.text
        assert client.post(url, json=chat("hi")).status_code == 200


def test_bad_text_and_numbers_are_400s_naming_the_field(start_gw: StartGateway) -> None:
    gw = start_gw(limits={"max_prompts": 8, "max_n": 4})
    cases = [
        (
            "/chat/completions",
            '{"model":"tiny","messages":[{"role":"user","content":"a\\ud800b"}]}',
            "messages[0].content",
        ),
        ("/completions", '{"model":"tiny","prompt":"\\udfff"}', "prompt"),
        ("/completions", '{"model":"tiny","prompt":["ok","\\ud800"]}', "prompt[1]"),
        (
            "/chat/completions",
            '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"stop":["\\ud800"]}',
            "stop[0]",
        ),
        (
            "/chat/completions",
            '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"seed":1180591620717411303424}',
            "seed",
        ),
        ("/chat/completions", '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"n":5}', "n"),
        ("/completions", json.dumps({"model": "tiny", "prompt": ["p"] * 2000, "max_tokens": 1}), "prompt"),
        (
            "/chat/completions",
            '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"n":4,"max_tokens":9000}',
            "max_tokens",
        ),
    ]
    # One keep-alive connection for all: a refusal must leave it usable.
    with httpx.Client(timeout=30) as client:
        for endpoint, raw, param in cases:
            resp = client.post(gw.v1 + endpoint, content=raw, headers={"content-type": "application/json"})
            assert resp.status_code == 400, (raw[:80], resp.text)
            assert resp.json()["error"]["param"] == param, (raw[:80], resp.text)
        assert client.post(gw.v1 + "/chat/completions", json=chat("still fine")).status_code == 200
        resp = client.get(gw.v1 + "/chat/completions")
        assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    print(f"{len(cases)} hostile requests: 400 naming the field; the connection served the next one")
