"""The FastAPI application: wiring, lifespan, and one error envelope for everything."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.config import GatewaySettings
from gateway.engine import Engine
from gateway.errors import APIError, param_from_loc
from gateway.http_limits import SizeLimits
from gateway.openapi import install_openapi
from gateway.routes import ops, v1
from gateway.serving import Serving
from gateway.tokenizer import ChatTokenizer

log = logging.getLogger("gateway")


def _error_response(error: APIError) -> Response:
    return Response(error.json(), status_code=error.status, media_type="application/json", headers=error.headers)


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error", "") if isinstance(ctx, dict) else ""
        return _error_response(APIError(400, f"Invalid JSON body: {detail}".strip()))
    param = param_from_loc(loc)
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return _error_response(APIError(400, message, param=param))


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not_found", 413: "request_too_large"}.get(exc.status_code)
    response = _error_response(APIError(exc.status_code, str(exc.detail), code=kind))
    response.headers.update(exc.headers or {})  # e.g. a 405's Allow
    return response


async def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    # Closing the connection: whatever broke may have left the request half read.
    return _error_response(APIError(500, "internal server error", type="server_error", headers={"Connection": "close"}))


def create_app(
    settings: GatewaySettings,
    engine: Engine | None = None,
    tokenizers: Mapping[str, ChatTokenizer] | None = None,
) -> FastAPI:
    """Build the app; ``engine`` and ``tokenizers`` default to Triton and the config's folders."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal engine, tokenizers
        if tokenizers is None:
            tokenizers = {name: ChatTokenizer(m.tokenizer) for name, m in settings.models.items()}
        if engine is None:
            from gateway.triton import TritonEngine

            engine = TritonEngine(settings.triton, {n: m.triton_model for n, m in settings.models.items()})
        app.state.serving = Serving(settings, engine, tokenizers)
        log.info("serving %s via %s", ", ".join(settings.models), ", ".join(settings.triton.urls))
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="LLM gateway (OpenAI-compatible, Triton)", lifespan=lifespan)
    app.state.api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
    app.include_router(v1)
    app.include_router(ops)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(SizeLimits, max_body_bytes=settings.max_body_bytes, max_header_bytes=settings.max_header_bytes)
    install_openapi(app, list(settings.models))  # the served names as an enum: clients and fuzzers see them
    return app
