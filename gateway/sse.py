"""Server-sent events for streamed completions, from pre-serialised templates.

Each chunk is the same JSON but for the choice index, the text and the finish reason, so
the fixed parts are serialised once per request and the per-token work is one
``orjson.dumps`` of the text. The shapes are ``protocol.ChatCompletionChunk`` and
``protocol.CompletionResponse`` (object ``text_completion``); tests validate them against
those models.
"""

from __future__ import annotations

import orjson

from gateway.errors import APIError

DONE = b"data: [DONE]\n\n"


def error_event(error: APIError) -> bytes:
    return b"data: " + error.json() + b"\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    )


class _Writer:
    object_name: bytes

    def __init__(self, request_id: str, created: int, model: str) -> None:
        self.request_id = request_id
        self.created = created
        self.head = (
            b'data: {"id":'
            + orjson.dumps(request_id)
            + b',"object":"'
            + self.object_name
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":['
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self.head + b'],"usage":' + _usage(prompt_tokens, completion_tokens) + b"}\n\n"


class ChatChunks(_Writer):
    object_name = b"chat.completion.chunk"

    def role(self, index: int) -> bytes:
        return (
            self.head
            + b'{"index":'
            + str(index).encode()
            + b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def content(self, index: int, text: str) -> bytes:
        return (
            self.head
            + b'{"index":'
            + str(index).encode()
            + b',"delta":{"content":'
            + orjson.dumps(text)
            + b'},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def finish(self, index: int, reason: str) -> bytes:
        return (
            self.head
            + b'{"index":'
            + str(index).encode()
            + b',"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(reason)
            + b"}]}\n\n"
        )


class CompletionChunks(_Writer):
    object_name = b"text_completion"

    def role(self, index: int) -> bytes:
        return b""  # text completions have no role chunk

    def content(self, index: int, text: str) -> bytes:
        return (
            self.head
            + b'{"index":'
            + str(index).encode()
            + b',"text":'
            + orjson.dumps(text)
            + b',"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def finish(self, index: int, reason: str) -> bytes:
        return (
            self.head
            + b'{"index":'
            + str(index).encode()
            + b',"text":"","logprobs":null,"finish_reason":'
            + orjson.dumps(reason)
            + b"}]}\n\n"
        )
