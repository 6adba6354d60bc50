"""One error type for the whole gateway, rendered as OpenAI's error envelope."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


class APIError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on 429/503

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        return orjson.dumps(self.body())


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send `Authorization: Bearer <key>`",
        type="authentication_error",
        code="invalid_api_key",
    )


class UpstreamUnavailable(APIError):
    """Triton cannot be reached (connection refused, reset before any answer, not ready)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message, type="server_error", code="upstream_unavailable", headers={"Retry-After": "5"})


class UpstreamError(APIError):
    """Triton answered with an error, or broke off an answer."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, type="server_error", code="upstream_error")


def param_from_loc(loc: Sequence[int | str]) -> str | None:
    """Pydantic's error location → OpenAI's ``param`` (``messages[0].content``)."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextContentPart]", "function-after[_options_need_stream()]"):
            continue  # union branch names add nothing for the client
        elif not str(part).startswith(("list[", "constrained-str", "str")):
            out += f".{part}" if out else str(part)
    return out or None
