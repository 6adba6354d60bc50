"""The wire shape of every answer: the one module that writes OpenAI's response JSON.

``ChatShape`` writes ``chat.completion`` (the whole answer) and ``chat.completion.chunk``
(streamed); ``CompletionShape`` writes ``text_completion`` (both); ``usage`` the usage
object of either. Whole answers are dicts serialised by orjson. Streamed chunks are the
same JSON but for the choice index, the text and the finish reason, so the fixed parts of a
request's chunks are serialised once, when its shape is made, and the per-piece work is one
``orjson.dumps`` of the text. ``gateway.protocol``'s response models document these shapes;
tests validate what this module writes against them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from gateway.errors import APIError

DONE = b"data: [DONE]\n\n"
_OPEN_CHOICE = b',"logprobs":null,"finish_reason":null}]}\n\n'  # the end of a chunk that finishes nothing

_OPEN_END = b',"finish_reason":null}]}\n\n'


@dataclass
class ChoiceOut:
    """One choice of a whole answer."""

    text: str | None
    finish_reason: str | None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: Any = None  # the shape's logprobs object, when asked for


def error_event(error: APIError) -> bytes:
    """An error after the stream began: an event of its own (``[DONE]`` still follows)."""
    return b"data: " + error.json() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Shape:
    """One request's answer: its id and creation time, chunks and whole body.

    A subclass names its objects and the bytes around a piece's text in a chunk.
    """

    endpoint: ClassVar[str]  # the metrics label
    id_prefix: ClassVar[str]
    chunk_object: ClassVar[bytes]
    text_key: ClassVar[bytes]  # between the index and a piece's text
    text_end: ClassVar[bytes]  # after it, to the end of the event
    finish_key: ClassVar[bytes]  # between the index and the finish reason
    logprobs_key: ClassVar[bytes]  # after a piece's text, before its logprobs object

    def __init__(self, model: str, choices: int) -> None:
        self.id = self.id_prefix + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model
        self.head = (
            b'data: {"id":'
            + orjson.dumps(self.id)
            + b',"object":"'
            + self.chunk_object
            + b'","created":'
            + str(self.created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":['
        )
        self._choice = [self.head + b'{"index":' + str(i).encode() for i in range(choices)]
        self._text = [c + self.text_key for c in self._choice]
        self._finish = [c + self.finish_key for c in self._choice]

    # ----------------------------------------------------------------- streamed chunks

    def role(self, index: int) -> bytes:
        """The chunk that opens a choice, where the object has one."""
        return b""

    def content(self, index: int, text: str) -> bytes:
        return self._text[index] + orjson.dumps(text) + self.text_end

    def content_with_logprobs(self, index: int, text: str, logprobs: Any) -> bytes:
        """A piece with its tokens' logprobs (``logprobs`` is the shape's object for them)."""
        return self._text[index] + orjson.dumps(text) + self.logprobs_key + orjson.dumps(logprobs) + _OPEN_END

    def finish(self, index: int, reason: str) -> bytes:
        return self._finish[index] + orjson.dumps(reason) + b"}]}\n\n"

    def usage_chunk(self, counts: dict[str, int]) -> bytes:
        """The last chunk when the client asked for ``stream_options.include_usage``: no choices."""
        return self.head + b'],"usage":' + orjson.dumps(counts) + b"}\n\n"

    # ----------------------------------------------------------------- whole answer

    def body(self, choices: Sequence[ChoiceOut], counts: dict[str, int]) -> bytes:
        raise NotImplementedError

    def _body(self, obj: str, choices: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": counts,
        }


class ChatShape(Shape):
    endpoint = "chat"
    id_prefix = "chatcmpl-"
    chunk_object = b"chat.completion.chunk"
    text_key = b',"delta":{"content":'
    text_end = b"}" + _OPEN_CHOICE
    finish_key = b',"delta":{},"logprobs":null,"finish_reason":'
    logprobs_key = b'},"logprobs":'

    def role(self, index: int) -> bytes:
        return self._choice[index] + b',"delta":{"role":"assistant","content":""}' + _OPEN_CHOICE

    def tool_call(self, index: int, call: int, call_id: str, name: str) -> bytes:
        """The first delta of a call: its id, type and name (arguments follow in pieces)."""
        delta = {"index": call, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return self._tool_delta(index, delta)

    def tool_arguments(self, index: int, call: int, piece: str) -> bytes:
        return self._tool_delta(index, {"index": call, "function": {"arguments": piece}})

    def _tool_delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return self._choice[index] + b',"delta":{"tool_calls":[' + orjson.dumps(delta) + b"]}" + _OPEN_CHOICE

    def body(self, choices: Sequence[ChoiceOut], counts: dict[str, int]) -> bytes:
        out = []
        for i, c in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            out.append({"index": i, "message": message, "logprobs": c.logprobs, "finish_reason": c.finish_reason})
        body = self._body("chat.completion", out, counts)
        body["system_fingerprint"] = None
        return orjson.dumps(body)


class CompletionShape(Shape):
    endpoint = "completions"
    id_prefix = "cmpl-"
    chunk_object = b"text_completion"
    text_key = b',"text":'
    text_end = _OPEN_CHOICE
    finish_key = b',"text":"","logprobs":null,"finish_reason":'
    logprobs_key = b',"logprobs":'

    def body(self, choices: Sequence[ChoiceOut], counts: dict[str, int]) -> bytes:
        out = [
            {"index": i, "text": c.text or "", "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ]
        return orjson.dumps(self._body("text_completion", out, counts))
