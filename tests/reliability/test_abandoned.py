"""Nothing runs for a client that has gone: requests whose clients leave while they wait in the
gateway's queue cost the model no token and no prefill (in the model's own queue, at most their
first token: see below), and a non-streaming request whose client leaves stops at once.

Measured with Triton's own metrics endpoint: its ``nv_inference_*`` counters and the llm model's
``llm_generated_tokens_total`` (tokens delivered), ``llm_admitted_requests_total`` (requests
handed to the running batch, i.e. prefilled) and ``llm_cancelled_requests_total``."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable

import httpx
import pytest

from stack.gateway_process import Gateway
from stack.triton_native import TritonServer
from tests.reliability.conftest import MAX_BATCH_SEQS, SMOL, TINY, StartGateway

pytestmark = pytest.mark.triton

LONG_MAX_TOKENS = 160  # the long requests that hold the batch (SmolLM2 at 4 streams on 2 cores: ~15-30 s)
ABANDONED = 50

_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}\s+(\S+)$")


def metrics(triton: TritonServer, model: str) -> dict[str, float]:
    """Every series of Triton's /metrics for ``model`` (summed over its other labels), by name."""
    text = httpx.get(f"http://127.0.0.1:{triton.metrics_port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SERIES.match(line)
        if m and f'model="{model}"' in m.group(2):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def delta(after: dict[str, float], before: dict[str, float], prefix: str = "") -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if k.startswith(prefix)}


def chat(model: str, max_tokens: int, stream: bool, **extra: object) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


@pytest.mark.parametrize("max_in_flight", [64, MAX_BATCH_SEQS], ids=["queued-in-model", "queued-in-gateway"])
def test_clients_gone_while_queued_cost_nothing(
    rel_triton: TritonServer, start_gw: StartGateway, max_in_flight: int
) -> None:
    gw = start_gw(limits={"max_in_flight": max_in_flight})
    before = metrics(rel_triton, SMOL)
    result = asyncio.run(_abandon_while_queued(gw, rel_triton, before, max_in_flight > MAX_BATCH_SEQS))
    after = metrics(rel_triton, SMOL)
    llm = delta(after, before, "llm_")
    nv = delta(after, before, "nv_inference_")
    long_tokens = result["long_tokens"]
    print(f"\nmax_in_flight={max_in_flight}: {ABANDONED} streaming clients closed while queued behind {MAX_BATCH_SEQS}")
    print(f"  long requests: completion tokens {long_tokens} (sum {sum(long_tokens)})")
    print(f"  closed at {result['closed_at_s']:.1f} s, long requests done at {result['long_done_s']:.1f} s")
    print(f"  llm model metrics (delta): {llm}")
    print(f"  Triton nv_inference_* (delta): {nv}")
    assert result["long_running_at_close"], "the long requests had finished before the others were closed"
    assert long_tokens == [LONG_MAX_TOKENS] * MAX_BATCH_SEQS
    extra = llm["llm_generated_tokens_total"] - sum(long_tokens)
    if max_in_flight > MAX_BATCH_SEQS:
        # They waited in the model, behind a gateway admitting more than the batch. Triton's HTTP
        # frontend learns that a client has gone only when it writes to it: each costs its
        # prefill and first token, and is then cancelled. This is why max_in_flight must be the
        # engine's batch (docs/api.md): then they wait in the gateway, as in the other case.
        print(f"  queued in the model: {extra:.0f} tokens for {ABANDONED} gone clients")
        assert extra <= 2 * ABANDONED  # the token that reveals the hang-up, and one in the same step
        assert llm["llm_cancelled_requests_total"] == ABANDONED
    else:
        # They waited in the gateway: none reached Triton, no token, no prefill.
        assert extra == 0, "tokens were generated for gone clients"
        assert llm["llm_admitted_requests_total"] == MAX_BATCH_SEQS, "gone clients' requests reached the batch"
        assert llm["llm_cancelled_requests_total"] == 0
        assert nv["nv_inference_request_success"] + nv.get("nv_inference_request_failure", 0) == MAX_BATCH_SEQS


async def _abandon_while_queued(
    gw: Gateway, triton: TritonServer, before: dict[str, float], in_model: bool
) -> dict[str, object]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gw.v1, timeout=300, limits=limits) as client:
        start = time.monotonic()

        async def long_one() -> int:
            # Streamed: a busy CPU may take longer than the gateway's read timeout for the whole answer.
            body = chat(SMOL, LONG_MAX_TOKENS, True, ignore_eos=True, stream_options={"include_usage": True})
            usage = None
            async with client.stream("POST", "/chat/completions", json=body) as r:
                assert r.status_code == 200, f"a long request got {r.status_code}: {(await r.aread())!r}"
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                        usage = json.loads(line[len("data: ") :])["usage"]
            assert usage is not None, "no usage chunk"
            return int(usage["completion_tokens"])

        async def abandoned_one() -> None:
            async with client.stream("POST", "/chat/completions", json=chat(SMOL, 64, True)) as r:
                async for _ in r.aiter_bytes():
                    pass
            raise AssertionError("an abandoned request got its whole answer")

        longs = [asyncio.create_task(long_one()) for _ in range(MAX_BATCH_SEQS)]

        def admitted() -> float:
            return metrics(triton, SMOL).get("llm_admitted_requests_total", 0.0) - before.get(
                "llm_admitted_requests_total", 0.0
            )

        def tokens() -> float:
            return metrics(triton, SMOL)["llm_generated_tokens_total"] - before["llm_generated_tokens_total"]

        # The batch is full and decoding.
        await _until(lambda: admitted() >= MAX_BATCH_SEQS and tokens() >= MAX_BATCH_SEQS, 120, "the long requests")
        others = [asyncio.create_task(abandoned_one()) for _ in range(ABANDONED)]
        await asyncio.sleep(3.0)  # they are all sent and queued (in the model or in the gateway)
        long_running = not any(t.done() for t in longs)
        for task in others:
            task.cancel()  # the client closes its connection
        results = await asyncio.gather(*others, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        closed_at = time.monotonic() - start
        long_tokens = await asyncio.gather(*longs)
        long_done = time.monotonic() - start

        def cancelled() -> float:
            return metrics(triton, SMOL)["llm_cancelled_requests_total"] - before["llm_cancelled_requests_total"]

        # Whatever was still to come of them has come: the model dropped them all (queued in the
        # model), or nothing reached it (queued in the gateway). The batch is free for anything late.
        if in_model:
            await _until(lambda: cancelled() >= ABANDONED, 10, "the model's cancellations", must=False)
        await asyncio.sleep(2.0)
    return {
        "long_tokens": long_tokens,
        "long_running_at_close": long_running,
        "closed_at_s": closed_at,
        "long_done_s": long_done,
    }


async def _until(check: Callable[[], bool], timeout: float, what: str, must: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            assert not must, f"timed out after {timeout:.0f} s waiting for {what}"
            return False
        await asyncio.sleep(0.1)
    return True


def test_non_streaming_client_gone_stops_generation(rel_triton: TritonServer, start_gw: StartGateway) -> None:
    gw = start_gw()
    max_tokens = 3000
    before = metrics(rel_triton, TINY)

    def tokens() -> float:
        return metrics(rel_triton, TINY)["llm_generated_tokens_total"] - before["llm_generated_tokens_total"]

    def cancelled() -> float:
        return metrics(rel_triton, TINY)["llm_cancelled_requests_total"] - before["llm_cancelled_requests_total"]

    async def run() -> float:
        async with httpx.AsyncClient(base_url=gw.v1, timeout=300) as client:
            task = asyncio.create_task(
                client.post("/chat/completions", json=chat(TINY, max_tokens, False, ignore_eos=True))
            )
            await asyncio.sleep(2.0)
            assert not task.done(), "the request finished within 2 s: raise max_tokens"
            task.cancel()  # the client closes its connection
            await asyncio.gather(task, return_exceptions=True)
            return time.monotonic()

    closed = asyncio.run(run())
    at_close = tokens()
    deadline = time.monotonic() + 10
    while cancelled() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = time.monotonic() - closed
    time.sleep(max(0.0, 1.0 - (time.monotonic() - closed)))
    settled = tokens()  # 1 s after the client left
    time.sleep(1.0)
    final = tokens()
    print(
        f"\nnon-streaming, client gone after 2 s: {at_close:.0f} tokens at close, {settled:.0f} 1 s later, "
        f"{final:.0f} 2 s later (of max_tokens {max_tokens}); waited {seen:.2f} s for the model's cancellation: "
        f"cancelled +{cancelled():.0f}"
    )
    assert cancelled() == 1, "the model never saw the request cancelled"
    assert final == settled, "still generating 1 s after the client left"
    assert 0 < final < max_tokens
