"""What ``gateway.responses`` writes matches the schema documented in ``gateway.protocol``."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import UpstreamError
from gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    Usage,
)
from gateway.responses import DONE, ChatShape, ChoiceOut, CompletionShape, Shape, error_event, usage


def event(data: bytes) -> dict[str, object]:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n") and data.count(b"\n\n") == 1
    parsed = orjson.loads(data[len(b"data: ") :])
    assert isinstance(parsed, dict)
    return parsed


def test_usage() -> None:
    assert Usage.model_validate(usage(3, 4)).total_tokens == 7


def test_chat_chunks() -> None:
    shape = ChatShape('m/odd "name"', 2)
    assert shape.id.startswith("chatcmpl-")
    role = ChatCompletionChunk.model_validate(event(shape.role(1)))
    assert (role.choices[0].index, role.choices[0].delta.role, role.choices[0].delta.content) == (1, "assistant", "")
    text = 'he said "hi"\n\u00e9\U0001f600'
    piece = ChatCompletionChunk.model_validate(event(shape.content(0, text)))
    assert piece.choices[0].delta.content == text and piece.choices[0].delta.role is None
    assert (piece.id, piece.created, piece.model) == (shape.id, shape.created, shape.model)
    end = ChatCompletionChunk.model_validate(event(shape.finish(1, "length")))
    assert end.choices[0].finish_reason == "length" and end.choices[0].delta.content is None
    last = ChatCompletionChunk.model_validate(event(shape.usage_chunk(usage(5, 6))))
    assert last.choices == [] and last.usage == Usage(prompt_tokens=5, completion_tokens=6, total_tokens=11)


def test_chat_body() -> None:
    shape = ChatShape("m", 2)
    body = orjson.loads(shape.body([ChoiceOut("a", "stop"), ChoiceOut("b", "length")], usage(1, 2)))
    parsed = ChatCompletionResponse.model_validate(body)
    assert [c.message.content for c in parsed.choices] == ["a", "b"]
    assert [c.finish_reason for c in parsed.choices] == ["stop", "length"]
    assert parsed.id == shape.id and parsed.usage.total_tokens == 3
    assert body["choices"][0]["message"]["refusal"] is None and "system_fingerprint" in body


def test_completion_chunks_and_body() -> None:
    shape = CompletionShape("m", 1)
    assert shape.id.startswith("cmpl-") and shape.role(0) == b""
    piece = CompletionResponse.model_validate(event(shape.content(0, "x")))
    assert piece.choices[0].text == "x" and piece.choices[0].finish_reason is None and piece.usage is None
    end = CompletionResponse.model_validate(event(shape.finish(0, "stop")))
    assert end.choices[0].text == "" and end.choices[0].finish_reason == "stop"
    last = CompletionResponse.model_validate(event(shape.usage_chunk(usage(1, 1))))
    assert last.choices == [] and last.usage is not None
    body = CompletionResponse.model_validate_json(shape.body([ChoiceOut("t", "stop")], usage(1, 1)))
    assert body.choices[0].text == "t" and body.object == "text_completion"


@pytest.mark.parametrize("shape", [ChatShape("m", 1), CompletionShape("m", 1)])
def test_chunks_are_whole_json_objects(shape: Shape) -> None:
    # Each chunk parses on its own: the templates close every bracket they open.
    for data in (shape.role(0) or shape.content(0, ""), shape.content(0, "}]"), shape.finish(0, "stop")):
        assert event(data)["object"] == shape.chunk_object.decode()


def test_error_event_and_done() -> None:
    ErrorResponse.model_validate(event(error_event(UpstreamError("broke"))))
    assert DONE == b"data: [DONE]\n\n"
