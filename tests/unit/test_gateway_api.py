"""The gateway's HTTP surface with a fake engine: protocol, errors, auth, streaming shape."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import generate_latest

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.protocol import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ErrorResponse
from gateway.tokenizer import ChatTokenizer
from tests.unit.fakes import FakeEngine

MODEL = "tiny"


def settings(tokenizer_dir: Path, **extra: Any) -> GatewaySettings:
    return GatewaySettings.model_validate(
        {"models": {MODEL: {"triton_model": "tiny-triton", "tokenizer": tokenizer_dir}}, **extra}
    )


@pytest.fixture()
async def client(
    tiny_model_dir: Path, tokenizer: ChatTokenizer, engine: FakeEngine
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings(tiny_model_dir), engine=engine, tokenizers={MODEL: tokenizer})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}


def events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


def assert_envelope(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    ErrorResponse.model_validate(body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "detail" not in body
    if param is not None:
        assert body["error"]["param"] == param
    return dict(body["error"])


async def test_plain_chat_shape_and_usage(client: httpx.AsyncClient, tokenizer: ChatTokenizer) -> None:
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=10))
    assert resp.status_code == 200
    body = ChatCompletionResponse.model_validate(resp.json())
    assert body.id.startswith("chatcmpl-")
    assert body.choices[0].message.content == "Hello, world!"
    assert body.choices[0].finish_reason == "stop"
    assert body.usage.completion_tokens == 4
    assert body.usage.total_tokens == body.usage.prompt_tokens + 4


async def test_usage_counted_by_tokenizer_when_engine_reports_nothing(
    client: httpx.AsyncClient, engine: FakeEngine, tokenizer: ChatTokenizer
) -> None:
    engine.report_counts = False
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=3))
    body = resp.json()
    prompt = tokenizer.chat_prompt([{"role": "user", "content": "hi"}])
    assert body["usage"]["prompt_tokens"] == tokenizer.count(prompt)
    assert body["usage"]["completion_tokens"] == tokenizer.count("Hello, world")
    # All of max_tokens used and no reason reported: the serving layer infers "length".
    assert body["choices"][0]["finish_reason"] == "length"


async def test_request_fields_reach_the_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post(
        "/v1/chat/completions",
        json=chat(
            max_completion_tokens=9,
            temperature=0.5,
            top_p=0.9,
            top_k=5,
            seed=-1,
            stop="END",
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.1,
        ),
    )
    _, req = engine.requests[-1]
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k) == (9, 0.5, 0.9, 5)
    assert req.seed == 2**64 - 1  # negative seeds wrap into Triton's UINT64
    assert req.stop == ["END"]
    assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty) == (0.5, -0.5, 1.1)
    assert req.prompt.endswith("<|im_start|>assistant\n")


async def test_n_choices_get_distinct_seeds(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    resp = await client.post("/v1/chat/completions", json=chat(n=3, seed=10))
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1, 2]
    assert sorted(r.seed for _, r in engine.requests if r.seed is not None) == [10, 11, 12]


async def test_stream_shape(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    data = events(resp.text)
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(orjson.loads(d)) for d in data[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == "Hello, world!"
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_stream_n2_interleaves_and_finishes_each(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", json=chat(stream=True, n=2))
    chunks = [orjson.loads(d) for d in events(resp.text)[:-1]]
    finished = sorted(ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"])
    assert finished == [0, 1]


async def test_error_before_stream_is_an_http_status(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_before = True
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    err = assert_envelope(resp, 503)
    assert err["code"] == "upstream_unavailable"
    resp = await client.post("/v1/chat/completions", json=chat())
    assert_envelope(resp, 503)


async def test_error_midstream_is_an_event_then_done(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 2
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status_code == 200
    data = events(resp.text)
    assert data[-1] == "[DONE]"
    error = orjson.loads(data[-2])
    ErrorResponse.model_validate(error)
    assert error["error"]["code"] == "upstream_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(max_tokens=0), "max_tokens"),
        (chat(temperature=3), "temperature"),
        (chat(n=0), "n"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (chat(tools=[{"type": "function"}]), "tools[0].function"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(functions=[{"name": "f"}]), "functions"),
        (chat(tool_choice="required"), "tool_choice"),
        (chat(response_format={"type": "xml"}), "response_format"),
        (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}), None),
        (chat(min_tokens=9, max_tokens=4), "min_tokens"),
        (chat(stream_options={"include_usage": True}), None),
    ],
)
async def test_invalid_fields_are_400_with_param(
    client: httpx.AsyncClient, body: dict[str, Any], param: str | None
) -> None:
    err = assert_envelope(await client.post("/v1/chat/completions", json=body), 400)
    if param is not None:
        assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


async def test_bad_json_is_400(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert_envelope(resp, 400)


async def test_unknown_model_404(client: httpx.AsyncClient) -> None:
    err = assert_envelope(await client.post("/v1/chat/completions", json=chat(model="gpt-9")), 404, "model")
    assert err["code"] == "model_not_found"
    assert_envelope(await client.get("/v1/models/gpt-9"), 404, "model")


async def test_context_length_exceeded(client: httpx.AsyncClient) -> None:
    err = assert_envelope(await client.post("/v1/chat/completions", json=chat(max_tokens=100_000)), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded"


async def test_models_and_unknown_route(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert_envelope(await client.get("/v1/nothing-here"), 404)


async def test_completions(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Say", "max_tokens": 10, "echo": True})
    body = CompletionResponse.model_validate(resp.json())
    assert body.choices[0].text == "SayHello, world!"
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Say", "stream": True})
    data = events(resp.text)
    assert data[-1] == "[DONE]"
    texts = [orjson.loads(d)["choices"][0]["text"] for d in data[:-1]]
    assert "".join(texts) == "Hello, world!"


async def test_health_follows_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    assert (await client.get("/health")).status_code == 200
    engine.ready_state = False
    assert_envelope(await client.get("/health"), 503)


async def test_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat())
    await client.post("/v1/chat/completions", json=chat(stream=True))
    text = (await client.get("/metrics")).text
    assert f'gateway_requests_total{{endpoint="chat",model="{MODEL}",status="200"}} 2.0' in text
    assert "gateway_time_to_first_token_seconds_count" in text
    assert f'gateway_completion_tokens_total{{model="{MODEL}"}} 8.0' in text


async def test_api_key(tiny_model_dir: Path, tokenizer: ChatTokenizer) -> None:
    app = create_app(settings(tiny_model_dir, api_key="s3cret"), engine=FakeEngine(), tokenizers={MODEL: tokenizer})
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        err = assert_envelope(await c.post("/v1/chat/completions", json=chat()), 401)
        assert err["type"] == "authentication_error"
        bad = {"Authorization": "Bearer wrong"}
        assert_envelope(await c.post("/v1/chat/completions", json=chat(), headers=bad), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert (await c.post("/v1/chat/completions", json=chat(), headers=good)).status_code == 200
        assert (await c.get("/v1/models", headers=good)).status_code == 200
        assert (await c.get("/health")).status_code == 200  # health stays open for probes


async def test_stream_completions_shape_echo_and_usage(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Say", "stream": True, "echo": True, "stream_options": {"include_usage": True}},
    )
    data = events(resp.text)
    assert data[-1] == "[DONE]"
    chunks = [CompletionResponse.model_validate(orjson.loads(d)) for d in data[:-1]]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert "".join(ch.text for c in chunks for ch in c.choices) == "SayHello, world!"
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_completions_several_prompts_and_n(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    resp = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["A", "B"], "n": 2, "echo": True, "max_tokens": 10}
    )
    body = CompletionResponse.model_validate(resp.json())
    assert [c.text for c in body.choices] == [f"{p}Hello, world!" for p in "AABB"]
    assert [r.prompt for _, r in engine.requests] == ["A", "A", "B", "B"]
    assert body.usage is not None
    assert (body.usage.prompt_tokens, body.usage.completion_tokens) == (14, 16)  # each prompt counted once


async def test_metrics_of_failed_requests(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_before = True
    await client.post("/v1/chat/completions", json=chat(stream=True))
    engine.fail_before, engine.fail_after = False, 2
    await client.post("/v1/chat/completions", json=chat(stream=True))
    text = (await client.get("/metrics")).text
    assert f'gateway_requests_total{{endpoint="chat",model="{MODEL}",status="503"}} 1.0' in text
    assert f'gateway_requests_total{{endpoint="chat",model="{MODEL}",status="502-midstream"}} 1.0' in text
    assert f'gateway_request_duration_seconds_count{{endpoint="chat",model="{MODEL}"}} 2.0' in text
    assert f'gateway_completion_tokens_total{{model="{MODEL}"}}' not in text  # failed: no tokens counted


async def test_client_going_away_cancels_the_engine_request(tiny_model_dir: Path, tokenizer: ChatTokenizer) -> None:
    from gateway.protocol import ChatCompletionRequest
    from gateway.serving import Serving

    engine = FakeEngine(pieces=["x"] * 50, delay_s=0.001)
    serving = Serving(settings(tiny_model_dir), engine, {MODEL: tokenizer})
    stream = await serving.chat(ChatCompletionRequest.model_validate(chat(stream=True, n=2)))
    assert not isinstance(stream, bytes)
    assert isinstance(stream, AsyncGenerator)
    first = await anext(stream)
    assert first.count(b'"role":"assistant"') == 2  # both choices open in the first write
    await stream.aclose()  # what Starlette does when the client disconnects
    assert engine.closed_streams == 2
    text = generate_latest(serving.metrics.registry).decode()
    assert f'gateway_requests_total{{endpoint="chat",model="{MODEL}",status="499"}} 1.0' in text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "a\ud800b"}]), "messages[0].content"),
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
            "messages[0].content[0].text",
        ),
        ("/v1/chat/completions", chat(stop=["ok", "\ud83d"]), "stop[1]"),
        ("/v1/completions", {"model": MODEL, "prompt": ["fine", "bad \ud800"]}, "prompt[1]"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "user": "\ud800"}, "user"),
    ],
)
async def test_lone_surrogates_are_400_naming_the_field(
    client: httpx.AsyncClient, engine: FakeEngine, path: str, body: dict[str, Any], param: str
) -> None:
    # json.dumps writes lone surrogates as \ud800 escapes, as a hostile client may send them.
    raw = json.dumps(body).encode()
    err = assert_envelope(
        await client.post(path, content=raw, headers={"content-type": "application/json"}), 400, param
    )
    assert "surrogate" in err["message"]
    assert not engine.requests
    # Proper non-ASCII text is fine, and the connection still serves.
    ok = await client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "héllo 🐉"}]))
    assert ok.status_code == 200


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**70, -(2**70)])
async def test_seed_outside_int64_is_400(client: httpx.AsyncClient, seed: int) -> None:
    assert_envelope(await client.post("/v1/chat/completions", json=chat(seed=seed)), 400, "seed")


async def test_405_says_what_is_allowed(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/chat/completions")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    ErrorResponse.model_validate(resp.json())
