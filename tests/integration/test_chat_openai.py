"""The official ``openai`` client against the gateway, in front of the real Triton."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import orjson
import pytest
from transformers import AutoTokenizer

from stack.gateway_process import Gateway
from tests.integration.conftest import SMOL, TINY

pytestmark = pytest.mark.triton
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def templated_length(folder: Path, messages: list[dict[str, str]]) -> int:
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.smollm2
def test_smollm2_answers_paris(gateway: Gateway, smollm2_dir: Path) -> None:
    reply = gateway.client().chat.completions.create(
        model=SMOL,
        messages=QUESTION,
        max_tokens=30,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == templated_length(smollm2_dir, QUESTION)
    assert 0 < reply.usage.completion_tokens <= 30


@pytest.mark.smollm2
def test_smollm2_stream_matches_plain(gateway: Gateway) -> None:
    client = gateway.client()
    plain = client.chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=30, temperature=0, seed=7)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model=SMOL,
            messages=QUESTION,
            max_tokens=30,
            temperature=0,
            seed=7,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 1, "content should arrive in several chunks"
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert plain.usage is not None
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert "".join(contents) == plain.choices[0].message.content


def test_sampled_stream_equals_plain_for_same_seed(gateway: Gateway) -> None:
    client = gateway.client()
    kw = {"model": TINY, "messages": QUESTION, "max_tokens": 60, "temperature": 1.0, "seed": 1234}
    plain = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    again = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    other = client.chat.completions.create(**{**kw, "seed": 4321})  # type: ignore[call-overload]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kw, stream=True)
        if c.choices  # type: ignore[call-overload]
    )
    assert plain.choices[0].message.content == again.choices[0].message.content
    assert streamed == plain.choices[0].message.content
    assert other.choices[0].message.content != plain.choices[0].message.content


def test_max_tokens_gives_length(gateway: Gateway) -> None:
    reply = gateway.client().chat.completions.create(model=TINY, messages=QUESTION, max_tokens=5, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_prompt_tokens_match_tokenizer(gateway: Gateway, tiny_model_dir: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé 東京 🚀"}]
    reply = gateway.client().chat.completions.create(model=TINY, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == templated_length(tiny_model_dir, messages)


def test_n_choices(gateway: Gateway) -> None:
    reply = gateway.client().chat.completions.create(model=TINY, messages=QUESTION, max_tokens=8, n=3, seed=3)  # type: ignore[arg-type]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1, "n choices with one seed must differ"
    assert reply.usage is not None and 3 <= reply.usage.completion_tokens <= 24


def test_stop_string_ends_text_before_it(gateway: Gateway) -> None:
    client = gateway.client()
    kw = {"model": TINY, "messages": QUESTION, "max_tokens": 60, "temperature": 1.0, "seed": 99}
    full = client.chat.completions.create(**kw).choices[0].message.content or ""  # type: ignore[call-overload]
    assert len(full) > 20
    stop = full[12:15]
    expected = full[: full.find(stop)]
    reply = client.chat.completions.create(**kw, stop=[stop])  # type: ignore[call-overload]
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(**kw, stop=stop, stream=True))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_raw_stream_ends_with_done(gateway: Gateway) -> None:
    body = {"model": TINY, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", gateway.v1 + "/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert orjson.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_completions_endpoint(gateway: Gateway) -> None:
    reply = gateway.client().completions.create(model=TINY, prompt="Once upon", max_tokens=6, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    streamed = "".join(
        c.choices[0].text
        for c in gateway.client().completions.create(
            model=TINY, prompt="Once upon", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == reply.choices[0].text


def test_errors_are_openai_errors(gateway: Gateway) -> None:
    client = gateway.client()
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-nope", messages=QUESTION)  # type: ignore[arg-type]
    assert not_found.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=TINY, messages=QUESTION, max_tokens=0)  # type: ignore[arg-type]
    assert bad.value.status_code == 400 and bad.value.body["param"] == "max_tokens"  # type: ignore[index]
    # Served by the gateway but absent from Triton: Triton's error comes back as 502.
    with pytest.raises(openai.APIStatusError) as upstream:
        client.chat.completions.create(model="missing", messages=QUESTION)  # type: ignore[arg-type]
    assert upstream.value.status_code == 502
    assert upstream.value.body["code"] == "upstream_error"  # type: ignore[index]


def test_models_and_metrics(gateway: Gateway) -> None:
    ids = {m.id for m in gateway.client().models.list()}
    assert {TINY, SMOL} <= ids
    metrics = httpx.get(gateway.url + "/metrics").text
    assert "gateway_requests_total" in metrics and "gateway_time_to_first_token_seconds_bucket" in metrics
