"""A client that hangs up mid-stream makes the model stop generating."""

from __future__ import annotations

import time

import pytest

from stack.gateway_process import Gateway
from stack.triton_native import TritonServer
from tests.integration.conftest import TINY, triton_metric

pytestmark = pytest.mark.triton


def test_disconnect_cancels_generation(gateway: Gateway, triton: TritonServer) -> None:
    tokens_before = triton_metric(triton, "llm_generated_tokens_total", TINY)
    cancelled_before = triton_metric(triton, "llm_cancelled_requests_total", TINY)
    max_tokens = 3500
    stream = gateway.client().chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "go on forever"}],
        max_tokens=max_tokens,
        temperature=1.0,
        seed=1,
        stream=True,
    )
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received >= 5:
            break
    stream.close()  # the client hangs up

    deadline = time.monotonic() + 20
    while triton_metric(triton, "llm_cancelled_requests_total", TINY) == cancelled_before:
        assert time.monotonic() < deadline, "the model never saw the cancellation"
        time.sleep(0.05)
    settled = triton_metric(triton, "llm_generated_tokens_total", TINY)
    time.sleep(1.0)
    assert triton_metric(triton, "llm_generated_tokens_total", TINY) == settled, "still generating"
    generated = settled - tokens_before
    print(f"generated {generated:.0f} of {max_tokens} tokens before the cancellation took effect")
    assert 5 <= generated < max_tokens
