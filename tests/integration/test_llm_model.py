"""The ``llm`` Python-backend model, straight through Triton's generate endpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stack.triton_native import TritonServer
from tests.integration.conftest import TINY

pytestmark = pytest.mark.triton
PROMPT = "<|im_start|>user\nTell me about 東京 and café life.<|im_end|>\n<|im_start|>assistant\n"


def generate(triton: TritonServer, body: dict[str, Any], model: str = TINY) -> httpx.Response:
    return httpx.post(f"{triton.url}/v2/models/{model}/generate", json=body, timeout=60)


def stream(triton: TritonServer, body: dict[str, Any], model: str = TINY) -> list[dict[str, Any]]:
    events = []
    with httpx.stream(
        "POST", f"{triton.url}/v2/models/{model}/generate_stream", json={**body, "stream": True}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(orjson.loads(line[6:]))
    return events


def test_greedy_stream_equals_transformers_decode(triton: TritonServer, tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1] :].tolist()
    expected = tok.decode(new, skip_special_tokens=True)

    events = stream(triton, {"text_input": PROMPT, "max_tokens": 48, "temperature": 0})
    pieces = [e["text_output"] for e in events]
    assert "".join(pieces) == expected
    assert len([p for p in pieces if p]) > 5
    assert all("finish_reason" not in e for e in events[:-1])
    last = events[-1]
    assert last["num_input_tokens"] == ids.shape[1]
    assert last["num_output_tokens"] == len(new)
    assert last["finish_reason"] == ("stop" if new[-1] == tok.eos_token_id else "length")

    plain = generate(triton, {"text_input": PROMPT, "max_tokens": 48, "temperature": 0}).json()
    assert plain["text_output"] == expected


def test_length_is_exact(triton: TritonServer) -> None:
    for n in (1, 7):
        body = generate(triton, {"text_input": PROMPT, "max_tokens": n, "temperature": 0}).json()
        assert (body["finish_reason"], body["num_output_tokens"]) == ("length", n)


def test_stop_words(triton: TritonServer) -> None:
    base = {"text_input": PROMPT, "max_tokens": 60, "temperature": 1.0, "seed": 5}
    full = generate(triton, base).json()["text_output"]
    stop = full[20:23]
    body = generate(triton, {**base, "stop_words": [stop, "never-appears"]}).json()
    assert body["text_output"] == full[: full.find(stop)]
    assert body["finish_reason"] == "stop"
    pieces = "".join(e["text_output"] for e in stream(triton, {**base, "stop_words": [stop]}))
    assert pieces == body["text_output"]


def test_sampling_controls_change_the_output(triton: TritonServer) -> None:
    base = {"text_input": PROMPT, "max_tokens": 24}
    greedy = generate(triton, {**base, "temperature": 0}).json()["text_output"]
    # top_k=1 and a tiny top_p both reduce sampling to the most likely token.
    assert generate(triton, {**base, "temperature": 1.0, "top_k": 1, "seed": 1}).json()["text_output"] == greedy
    assert generate(triton, {**base, "temperature": 1.0, "top_p": 1e-6, "seed": 1}).json()["text_output"] == greedy
    for knob in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        assert generate(triton, {**base, "temperature": 0, **knob}).json()["text_output"] != greedy, knob


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "context"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": "hot"}, ""),
    ],
)
def test_bad_request_fails_alone(triton: TritonServer, body: dict[str, Any], fragment: str) -> None:
    resp = generate(triton, {"text_input": PROMPT, **body})
    assert resp.status_code >= 400
    assert fragment in resp.json()["error"]
    # The instance keeps serving.
    ok = generate(triton, {"text_input": PROMPT, "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["num_output_tokens"] == 3
