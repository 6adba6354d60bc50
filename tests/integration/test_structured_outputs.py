"""Structured outputs, tool calls and logprobs end to end: the official ``openai`` client and
LangChain against the real gateway, in front of the real Triton serving SmolLM2 on both
engines (``llm``: xgrammar in the project's own model; ``vllm``: vLLM's structured outputs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from jsonschema import validate
from pydantic import BaseModel, Field

from stack.gateway_process import Gateway
from tests.integration.conftest import SMOL

pytestmark = [pytest.mark.triton, pytest.mark.smollm2]

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested object": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "array of strings": {
        "type": "object",
        # maxLength: greedy SmolLM2 can otherwise repeat one word inside a string until max_tokens
        "properties": {
            "colors": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3}
        },
        "required": ["colors"],
    },
    "enum": {
        "type": "object",
        "properties": {"mood": {"type": "string", "enum": ["happy", "sad", "angry"]}},
        "required": ["mood"],
    },
    "bounded numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["age", "score"],
    },
    "optional field": {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}, "note": {"type": "string"}},
        "required": ["title", "year"],
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module", params=["llm", "vllm"])
def gw(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """The gateway in front of each engine (the vllm one is started once per session)."""
    yield request.getfixturevalue("gateway" if request.param == "llm" else "vllm_gateway")


def ask(gw: Gateway, content: str, **kw: Any) -> Any:
    return gw.client().chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": content}],
        temperature=0,  # type: ignore[arg-type]
        **kw,
    )


def test_json_object_parses(gw: Gateway) -> None:
    reply = ask(
        gw,
        "Give a JSON object with the name and the age of a cat.",
        max_tokens=160,
        response_format={"type": "json_object"},
    )
    text = reply.choices[0].message.content
    print(f"json_object: {text!r}")
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("shape", list(SCHEMAS))
def test_json_schema_answers_validate(gw: Gateway, shape: str) -> None:
    schema = SCHEMAS[shape]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    reply = ask(gw, f"Answer with an example ({shape}).", max_tokens=150, response_format=fmt)
    text = reply.choices[0].message.content
    print(f"{shape}: {text!r}")
    assert reply.choices[0].finish_reason == "stop", text
    validate(json.loads(text), schema)


def test_json_schema_streamed(gw: Gateway) -> None:
    schema = SCHEMAS["nested object"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    chunks = list(ask(gw, "A person and their address.", max_tokens=150, response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    validate(json.loads(text), schema)


def test_too_few_tokens_is_length_not_valid_json(gw: Gateway) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMAS["nested object"]}}
    reply = ask(gw, "A person and their address.", max_tokens=5, response_format=fmt)
    assert reply.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.content)


def test_a_schema_the_grammar_engine_refuses_is_a_400(gw: Gateway) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": 5}}}
    with pytest.raises(openai.BadRequestError) as info:
        ask(gw, "x", max_tokens=5, response_format=fmt)
    assert info.value.body["param"].startswith("response_format"), info.value.body  # type: ignore[index]


@pytest.mark.parametrize("choice", ["required", "named"])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_validate(gw: Gateway, choice: str, stream: bool) -> None:
    tool_choice: Any = "required" if choice == "required" else {"type": "function", "function": {"name": "get_time"}}
    reply = gw.client().chat.completions.create(
        model=SMOL,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice=tool_choice,
        max_tokens=120,
        temperature=0,
        stream=stream,
    )
    if stream:
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in reply:
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for d in ch.delta.tool_calls or []:
                    call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                    if d.id:
                        assert not call["id"], "the id comes once, in the call's first delta"
                        call.update(id=d.id, name=d.function.name or "")  # type: ignore[union-attr]
                    call["arguments"] += (d.function.arguments or "") if d.function else ""
        made = list(calls.values())
    else:
        message = reply.choices[0].message
        finish = reply.choices[0].finish_reason
        made = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
    print(f"{choice} stream={stream}: {made}")
    assert finish == "tool_calls" and made
    for call in made:
        assert call["id"].startswith("call_")
        tool = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]
        validate(json.loads(call["arguments"]), tool["function"]["parameters"])  # type: ignore[index]
    if choice == "named":
        assert [c["name"] for c in made] == ["get_time"]


def test_a_conversation_with_a_tool_result_is_answered(gw: Gateway) -> None:
    messages = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = gw.client().chat.completions.create(
        model=SMOL,
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    print(f"after the tool: {reply.choices[0].message.content!r}")
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_logprobs(gw: Gateway, stream: bool) -> None:
    kw: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
    reply = ask(gw, "Name three fruits.", max_tokens=20, logprobs=True, top_logprobs=3, stream=stream, **kw)
    if stream:
        chunks = list(reply)
        content = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content or []]
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        usage = chunks[-1].usage
    else:
        content = reply.choices[0].logprobs.content
        text, usage = reply.choices[0].message.content, reply.usage
    print(f"logprobs stream={stream}: {[(t.token, round(t.logprob, 3)) for t in content[:5]]}…")
    assert usage is not None and len(content) == usage.completion_tokens
    assert "".join(t.token for t in content) == text
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(max(a.logprob for a in t.top_logprobs), abs=1e-4)
        assert t.token == t.top_logprobs[0].token
        assert bytes(t.bytes or []) == t.token.encode()


def test_ignore_eos_and_min_tokens(gw: Gateway) -> None:
    reply = ask(gw, "Say hi.", max_tokens=24, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 24 and reply.choices[0].finish_reason == "length"
    reply = ask(gw, "Say hi.", max_tokens=30, extra_body={"min_tokens": 20})
    assert reply.usage.completion_tokens >= 20


# ------------------------------------------------------------------ clients, unchanged


class Pet(BaseModel):
    name: str
    species: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)


def test_openai_sdk_parse(gw: Gateway) -> None:
    reply = gw.client().chat.completions.parse(
        model=SMOL,
        messages=[{"role": "user", "content": "Invent a pet."}],
        response_format=Pet,
        max_tokens=80,
        temperature=0,
    )
    pet = reply.choices[0].message.parsed
    print(f"parse(): {pet!r}")
    assert isinstance(pet, Pet)


def test_langchain_structured_output_and_tools(gw: Gateway) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=SMOL, base_url=gw.v1, api_key="unused", temperature=0, max_tokens=100, max_retries=0)
    pet = llm.with_structured_output(Pet).invoke("Invent a pet.")
    print(f"with_structured_output: {pet!r}")
    assert isinstance(pet, Pet)

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The current weather in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    print(f"bind_tools: {message.tool_calls}")  # type: ignore[attr-defined]
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    assert message.tool_calls[0]["args"]["unit"] in ("celsius", "fahrenheit")  # type: ignore[attr-defined]
