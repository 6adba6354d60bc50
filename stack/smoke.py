"""``make smoke``: is the gateway up, does a chat completion round trip work, and does this
machine's GPU stack answer (stack/gpu_checks.py: each GPU check skips without a GPU)?

Against ``GATEWAY_URL`` (default: the gateway's default address, or ``GATEWAY_PORT`` when
set: http://127.0.0.1:9000/v1) with the official ``openai``
client: one plain and one streaming chat completion. Prints what it got; exits non-zero on
any failure. ``GATEWAY_API_KEY`` is sent when set; ``SMOKE_MODEL`` picks the model (default:
the first one the gateway lists).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

QUESTION = "What is the capital of France? Answer in one sentence."


def _check(ok: bool, what: str) -> bool:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
    return ok


def default_url(env: Mapping[str, str] = os.environ) -> str:
    """Where ``make serve`` and a default install put the gateway (gateway/config.py's defaults)."""
    from gateway.config import DEFAULT_HOST, DEFAULT_PORT

    return f"http://{DEFAULT_HOST}:{env.get('GATEWAY_PORT') or DEFAULT_PORT}/v1"


def main() -> int:
    from openai import OpenAI, OpenAIError

    base_url = (os.environ.get("GATEWAY_URL") or default_url()).rstrip("/")
    api_key = os.environ.get("GATEWAY_API_KEY") or "not-needed"
    print(f"smoke test against {base_url}")
    results: list[bool] = []
    health_url = base_url.removesuffix("/v1") + "/health"
    try:
        with urllib.request.urlopen(health_url, timeout=10) as resp:
            results.append(_check(resp.status == 200, f"GET /health → {resp.status}"))
    except (urllib.error.URLError, OSError) as exc:
        _check(False, f"GET /health: {exc}")
        return 1

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=120, max_retries=0)
    try:
        model = os.environ.get("SMOKE_MODEL") or client.models.list().data[0].id
        print(f"  model: {model}")
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0
        )
        took = time.perf_counter() - started
        text = reply.choices[0].message.content or ""
        usage = reply.usage
        print(f"  plain answer ({took:.2f} s): {text!r}")
        results.append(_check(bool(text.strip()), "plain completion returned text"))
        results.append(_check(usage is not None and usage.completion_tokens > 0, f"usage: {usage}"))

        started = time.perf_counter()
        pieces: list[str] = []
        finishes: list[str] = []
        first_at = None
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    first_at = first_at or time.perf_counter()
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        ttft = (first_at or time.perf_counter()) - started
        streamed = "".join(pieces)
        print(f"  streamed answer ({len(pieces)} chunks, first after {ttft * 1000:.0f} ms): {streamed!r}")
        results.append(_check(len(pieces) > 1, "content arrived in several chunks"))
        results.append(_check(len(finishes) == 1, f"exactly one finish_reason ({finishes})"))
        results.append(_check(streamed == text, "streamed text equals the plain answer (temperature 0)"))
    except OpenAIError as exc:
        _check(False, f"request failed: {exc}")
        return 1
    # The GPU checks of tests/infra/test_gpu.py, on this machine (each skips without a GPU).
    from stack import gpu_checks

    print("GPU checks on this machine")
    results.append(gpu_checks.print_results(gpu_checks.run_all()))
    ok = all(results)
    print("smoke: PASS" if ok else "smoke: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
