"""Tool calling, structured outputs and logprobs in the gateway, with a fake engine: what is
sent to the engine (the guide), and what the client gets back, whole and streamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import ValidationError, validate

from gateway.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionResponse
from gateway.tokenizer import ChatTokenizer
from gateway.tools import CallStream, plan, render_messages
from tests.unit.fakes import FakeEngine
from tests.unit.test_gateway_api import MODEL, assert_envelope, chat, client, events

__all__ = ["client"]  # the gateway's fixture, shared (tokenizer and engine: conftest.py)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = '[{"name": "get_weather", "arguments": {"city": "Paris \\"Ville\\" {x}", "unit": "c"}}]'


def pieces_of(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# ------------------------------------------------------------------ structured outputs


async def test_json_schema_is_sent_as_a_guide(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]}
    engine.pieces = ['{"n": 3}']
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}}
    resp = await client.post("/v1/chat/completions", json=chat(response_format=fmt))
    assert resp.status_code == 200, resp.text
    guide = engine.requests[-1][1].guide
    assert guide is not None and guide.type == "json_schema" and json.loads(guide.text) == schema
    assert json.loads(resp.json()["choices"][0]["message"]["content"]) == {"n": 3}
    await client.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}))
    guide = engine.requests[-1][1].guide
    assert guide is not None and json.loads(guide.text) == {"type": "object"}


async def test_bad_schema_is_a_400_naming_it(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    err = assert_envelope(await client.post("/v1/chat/completions", json=chat(response_format=fmt)), 400)
    assert err["param"] == "response_format.json_schema.schema" and "objekt" in err["message"], err
    assert not engine.requests


# ------------------------------------------------------------------ tools


def test_plan_guides_force_the_tools_schemas() -> None:
    body = ChatCompletionRequest.model_validate(chat(tools=[WEATHER, TIME], tool_choice="required"))
    tools = plan(body)
    assert tools is not None and tools.mode == "required"
    guide = tools.guide()
    assert guide is not None and guide.param == "tool_choice"
    schema = json.loads(guide.text)
    validate(json.loads(CALL), schema)
    validate([{"name": "get_time", "arguments": {}}], schema)
    with pytest.raises(ValidationError):
        validate([{"name": "get_weather", "arguments": {"unit": "c"}}], schema)  # city is required
    named = plan(ChatCompletionRequest.model_validate(chat(tools=[WEATHER, TIME], tool_choice=_named("get_time"))))
    assert named is not None and named.guide() is not None
    assert json.loads(named.guide().text)["maxItems"] == 1  # type: ignore[union-attr]
    auto = plan(ChatCompletionRequest.model_validate(chat(tools=[WEATHER])))
    assert auto is not None and auto.mode == "auto" and auto.guide() is None
    assert plan(ChatCompletionRequest.model_validate(chat(tools=[WEATHER], tool_choice="none"))) is None


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def test_fallback_rendering_describes_tools_and_replays_calls() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
            ],
            "tools": [WEATHER],
        }
    )
    out = render_messages(body.messages, plan(body), native=False)["messages"]
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"] and "JSON array" in out[0]["content"]
    assert json.loads(out[2]["content"]) == [{"name": "get_weather", "arguments": {}}]
    assert out[3] == {"role": "user", "content": "Result of tool call call_1:\n18 C"}


@pytest.mark.parametrize("size", [1, 2, 5, 200])
def test_call_stream_splits_any_way(size: int) -> None:
    body = ChatCompletionRequest.model_validate(chat(tools=[WEATHER, TIME], tool_choice="required"))
    tools = plan(body)
    assert tools is not None
    two = CALL[:-1] + ', {"name": "get_time", "arguments": {}}]'
    stream = CallStream(tools)
    got = [e for p in pieces_of(two, size) for e in stream.feed(p)] + list(stream.finish())
    heads = [e for e in got if e[0] == "call"]
    assert [h[1] for h in heads] == [0, 1] and [h[3] for h in heads] == ["get_weather", "get_time"]
    args = ["".join(e[2] for e in got if e[0] == "args" and e[1] == i) for i in (0, 1)]  # type: ignore[misc]
    assert [json.loads(a) for a in args] == [json.loads(CALL)[0]["arguments"], {}]
    # the head of each call comes before any of its arguments
    assert got.index(heads[1]) > max(i for i, e in enumerate(got) if e[0] == "args" and e[1] == 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_required_tool_call_whole_and_streamed(
    client: httpx.AsyncClient, engine: FakeEngine, stream: bool
) -> None:
    engine.pieces = pieces_of(CALL, 4)
    body = chat(tools=[WEATHER, TIME], tool_choice="required", stream=stream, max_tokens=100)
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert engine.requests[-1][1].guide is not None
    if not stream:
        answer = ChatCompletionResponse.model_validate(resp.json())
        calls = answer.choices[0].message.tool_calls
        assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.content is None
    else:
        chunks = [ChatCompletionChunk.model_validate_json(e) for e in events(resp.text)[:-1]]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        deltas = [tc for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or []]
        assert deltas[0].id and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
        assert all(d.id is None for d in deltas[1:]) and len(deltas) > 2  # arguments came in pieces
        arguments = "".join(d.function.arguments or "" for d in deltas)
        calls = None
        assert json.loads(arguments) == json.loads(CALL)[0]["arguments"]
    if calls is not None:
        assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == json.loads(CALL)[0]["arguments"]


@pytest.mark.parametrize("stream", [False, True])
async def test_auto_text_stays_text(client: httpx.AsyncClient, engine: FakeEngine, stream: bool) -> None:
    resp = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER], stream=stream))
    assert resp.status_code == 200
    assert engine.requests[-1][1].guide is None
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in (ChatCompletionChunk.model_validate_json(e) for e in events(resp.text)[:-1])
            if c.choices
        )
        assert text == "Hello, world!"
    else:
        assert resp.json()["choices"][0]["message"]["content"] == "Hello, world!"
        assert resp.json()["choices"][0]["finish_reason"] == "stop"


async def test_auto_reads_a_hermes_call(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.pieces = pieces_of('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    resp = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER], stream=True, max_tokens=100))
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events(resp.text)[:-1]]
    deltas = [tc for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_errors(client: httpx.AsyncClient) -> None:
    body = chat(tools=[WEATHER], tool_choice=_named("nope"))
    assert_envelope(await client.post("/v1/chat/completions", json=body), 400, "tool_choice")
    body = chat(tools=[WEATHER, WEATHER])
    assert_envelope(await client.post("/v1/chat/completions", json=body), 400, "tools")
    body = chat(messages=[{"role": "tool", "content": "x"}])
    assert_envelope(await client.post("/v1/chat/completions", json=body), 400)
    body = chat(tools=[WEATHER], response_format={"type": "json_object"})
    assert_envelope(await client.post("/v1/chat/completions", json=body), 400, "response_format")


# ------------------------------------------------------------------ logprobs


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_logprobs(
    client: httpx.AsyncClient, engine: FakeEngine, tokenizer: ChatTokenizer, stream: bool
) -> None:
    engine.pieces = list("Hi there")
    engine.token_id = lambda p: tokenizer.tokenizer.encode(p, add_special_tokens=False)[0]
    body = chat(logprobs=True, top_logprobs=2, stream=stream, max_tokens=50)
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert engine.requests[-1][1].logprobs == 2
    if stream:
        chunks = [ChatCompletionChunk.model_validate_json(e) for e in events(resp.text)[:-1]]
        content = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content or []]
    else:
        answer = ChatCompletionResponse.model_validate(resp.json())
        assert answer.choices[0].logprobs is not None
        content = answer.choices[0].logprobs.content or []
    assert "".join(t.token for t in content) == "Hi there"
    assert all(len(t.top_logprobs) == 2 and t.logprob == max(a.logprob for a in t.top_logprobs) for t in content)
    assert all(bytes(t.bytes or []).decode() == t.token for t in content)


async def test_completion_logprobs(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: ChatTokenizer) -> None:
    engine.pieces = list("ab c")
    engine.token_id = lambda p: tokenizer.tokenizer.encode(p, add_special_tokens=False)[0]
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 1, "echo": True})
    answer = CompletionResponse.model_validate(resp.json())
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == ["a", "b", " ", "c"]
    assert logprobs.text_offset == [1, 2, 3, 4]  # after the echoed prompt
    assert logprobs.top_logprobs is not None and all(len(t) == 1 for t in logprobs.top_logprobs)


async def test_extensions_reach_the_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post("/v1/chat/completions", json=chat(ignore_eos=True, min_tokens=2, max_tokens=9))
    sent = engine.requests[-1][1]
    assert sent.ignore_eos is True and sent.min_tokens == 2
    assert orjson.loads(orjson.dumps(sent.stop)) == []


def test_a_template_that_takes_tools_renders_them_itself(tiny_model_dir: Path, tmp_path: Path) -> None:

    folder = tmp_path / "with-tools"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{{ '\\n' }}"
        "{% endfor %}assistant:"
    )
    tokenizer = ChatTokenizer(folder)
    assert tokenizer.takes_tools
    body = ChatCompletionRequest.model_validate(
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [WEATHER],
        }
    )
    variables = render_messages(body.messages, plan(body), native=True)
    text = tokenizer.chat_prompt(variables["messages"], variables.get("tools"))
    # The template's own format: tools listed by it, arguments handed over as a dict, the
    # tool role kept; no fallback system prompt.
    assert text == "TOOL get_weather\nuser: Weather?\nassistant: CALL get_weather Oslo\ntool: sunny\nassistant:"
