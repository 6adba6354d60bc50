"""The gateway's TensorRT-LLM (ensemble and LLM API) and vLLM adapters, against stand-ins on the real Triton.

The stand-ins (tests/standins) declare the exact tensors of TensorRT-LLM's ensemble and of
the vLLM backend and fake the generation with words " w0", " w1", …; they log the inputs
they received, so these tests see what the gateway really sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from stack.gateway_process import Gateway
from tests.integration.conftest import STANDINS

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not STANDINS.exists(), reason="tests/standins/model_repository is missing"),
]
DIALECTS = ["trtllm_standin", "vllm_standin", "llmapi_standin"]


def received(log: Path, model: str) -> dict[str, Any]:
    """The inputs of the last request the stand-in got."""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    requests = [r for r in lines if r.get("model") == model and "inputs" in r]
    assert requests, f"{model} logged no request"
    return dict(requests[-1]["inputs"])


def words(n: int, start: int = 0) -> str:
    return "".join(f" w{i}" for i in range(start, start + n))


def completion_tokens(model: str, text: str, tokenizer_dir: Path) -> int:
    """What usage must say: the backend's own count, or (LLM API model: it returns none) the
    gateway's count with the served model's tokenizer."""
    if model != "llmapi_standin":
        return len(text.split())
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir).encode(text, add_special_tokens=False))


@pytest.mark.parametrize("model", DIALECTS)
def test_plain_and_stream(gateway: Gateway, model: str, tiny_model_dir: Path) -> None:
    expected_tokens = completion_tokens(model, words(5), tiny_model_dir)
    client = gateway.client()
    messages = [{"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert plain.choices[0].message.content == words(5)
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == expected_tokens
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=5,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == words(5)
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == expected_tokens


@pytest.mark.parametrize("model", DIALECTS)
def test_natural_end_is_stop(gateway: Gateway, model: str) -> None:
    messages = [{"role": "user", "content": "[[stop_after=3]]"}]
    for stream in (False, True):
        if stream:
            chunks = list(
                gateway.client().chat.completions.create(model=model, messages=messages, max_tokens=10, stream=True)
            )  # type: ignore[arg-type]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        else:
            reply = gateway.client().chat.completions.create(model=model, messages=messages, max_tokens=10)  # type: ignore[arg-type]
            text, finish = reply.choices[0].message.content or "", [reply.choices[0].finish_reason]
        assert text == words(3)
        assert finish == ["stop"]


@pytest.mark.parametrize("model", DIALECTS)
def test_stop_word(gateway: Gateway, model: str) -> None:
    reply = gateway.client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=10,
        stop=[" w2"],  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content == words(2)
    assert reply.choices[0].finish_reason == "stop"


def test_trtllm_receives_its_own_tensor_names(gateway: Gateway, standin_log: Path) -> None:
    gateway.client().chat.completions.create(
        model="trtllm_standin",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,  # type: ignore[arg-type]
        temperature=0,
        seed=42,
        stop=["END"],
        presence_penalty=0.5,
    )
    inputs = received(standin_log, "trtllm_standin")
    assert inputs["max_tokens"] == 4
    assert inputs["top_k"] == 1 and "temperature" not in inputs  # greedy as top-1
    assert inputs["seed"] == 42 and "random_seed" not in inputs
    assert inputs["stop_words"] in (["END"], "END")  # the log unwraps one-element tensors
    assert inputs["presence_penalty"] == 0.5
    assert inputs["exclude_input_in_output"] is True
    assert inputs["return_num_output_tokens"] is True
    assert inputs["text_input"].endswith("<|im_start|>assistant\n")


def test_vllm_receives_sampling_parameters(gateway: Gateway, standin_log: Path) -> None:
    gateway.client().chat.completions.create(
        model="vllm_standin",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,  # type: ignore[arg-type]
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop="END",
        frequency_penalty=0.1,
        extra_body={"top_k": 20, "repetition_penalty": 1.2},
    )
    inputs = received(standin_log, "vllm_standin")
    params = json.loads(inputs["sampling_parameters"])
    assert params == {
        "max_tokens": 4,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.2,
        "frequency_penalty": 0.1,
        "seed": 7,
        "stop": ["END"],
    }
    assert inputs["exclude_input_in_output"] is True
    assert inputs["return_finish_reason"] is True


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_trtllm_receives_the_guide_for_a_schema_and_a_tool_call(gateway: Gateway, standin_log: Path) -> None:
    client = gateway.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    client.chat.completions.create(
        model="trtllm_standin",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        response_format=fmt,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    inputs = received(standin_log, "trtllm_standin")
    assert inputs["guided_decoding_guide_type"] == "json_schema"
    assert json.loads(inputs["guided_decoding_guide"]) == SCHEMA
    assert inputs["min_tokens"] == 4  # ignore_eos: no end before max_tokens
    # The stand-in's words are not a call: the answer stays text, never a made-up call.
    reply = client.chat.completions.create(
        model="trtllm_standin",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        max_tokens=4,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    inputs = received(standin_log, "trtllm_standin")
    assert inputs["guided_decoding_guide_type"] == "json_schema"
    guide = json.loads(inputs["guided_decoding_guide"])
    assert guide["items"]["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert guide["items"]["properties"]["arguments"] == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert "get_weather" in inputs["text_input"]  # the fallback prompt lists the tool
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="trtllm_standin", messages=[{"role": "user", "content": "x"}], max_tokens=2, logprobs=True
        )
    assert info.value.body["param"] == "logprobs"  # type: ignore[index]


def test_vllm_receives_structured_outputs_and_returns_logprobs(gateway: Gateway, standin_log: Path) -> None:
    client = gateway.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    client.chat.completions.create(
        model="vllm_standin",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        response_format=fmt,  # type: ignore[arg-type]
        extra_body={"min_tokens": 2},
    )
    params = json.loads(received(standin_log, "vllm_standin")["sampling_parameters"])
    assert params["min_tokens"] == 2
    assert json.loads(params["structured_outputs"]) == {"json": SCHEMA}
    for stream in (False, True):
        reply = client.chat.completions.create(
            model="vllm_standin",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=3,
            logprobs=True,
            top_logprobs=1,
            stream=stream,
        )
        inputs = received(standin_log, "vllm_standin")
        assert inputs["return_logprobs"] is True and json.loads(inputs["sampling_parameters"])["logprobs"] == 1
        if stream:
            content = [t for c in reply for ch in c.choices if ch.logprobs for t in ch.logprobs.content or []]  # type: ignore[union-attr]
        else:
            content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
        # The stand-in's token ids (1000 + i) are rendered with the tiny tokenizer; one entry per token.
        assert len(content) == 3 and all(t.logprob == -0.5 and len(t.top_logprobs) == 1 for t in content)
