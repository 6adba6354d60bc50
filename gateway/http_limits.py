"""Request size limits, checked before FastAPI reads or parses anything (a pure ASGI layer).

A body over ``max_body_bytes`` is a 413 (at once when Content-Length says so, else as soon
as the streamed body passes the limit); request headers over ``max_header_bytes`` in total
are a 431. Both answers are OpenAI's error envelope and close the connection, since the
rest of an oversized body is not read.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import APIError


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; FastAPI passes it on to the app's 413 handler."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message, headers={"Connection": "close"})


def _refusal(status: int, message: str, param: str | None = None) -> tuple[dict[str, object], dict[str, object]]:
    body = APIError(status, message, param=param, code="request_too_large").json()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class SizeLimits:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_headers = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        size = sum(len(k) + len(v) + 4 for k, v in headers)  # "k: v\r\n"
        if size > self.max_headers:
            await self._refuse(send, 431, f"Request headers are {size} bytes; this server takes {self.max_headers}")
            return
        declared = next((v for k, v in headers if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._refuse(send, 413, self._body_message(int(declared)))
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self._body_message(seen, at_least=True))
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:  # raised outside the app's own handlers
            if not started:
                await self._refuse(send, 413, str(exc.detail))

    def _body_message(self, size: int, at_least: bool = False) -> str:
        more = "more than " if at_least else ""
        return f"Request body is {more}{size} bytes; this server takes at most {self.max_body} bytes"

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        start, body = _refusal(status, message)
        await send(start)
        await send(body)
