"""Thin HTTP routers: parse, call ``Serving``, wrap the result in a response."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.admission import shutting_down
from gateway.errors import UpstreamUnavailable, unauthorized
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from gateway.serving import Serving

JSON = "application/json"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def serving(request: Request) -> Serving:
    return request.app.state.serving  # type: ignore[no-any-return]


async def check_api_key(request: Request) -> None:
    # async on purpose: FastAPI runs plain-def dependencies in a thread pool, a thread hop per request.
    key = request.app.state.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
        raise unauthorized()


def _answer(result: bytes | AsyncIterator[bytes]) -> Response:
    if isinstance(result, bytes):
        return Response(result, media_type=JSON)
    return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)


async def _cancel_when_gone(request: Request, task: asyncio.Task[object]) -> None:
    # The body has been read, so the next ASGI message is the client hanging up.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    task.cancel()


async def _serve(request: Request, work: Awaitable[bytes | AsyncIterator[bytes]]) -> Response:
    """Answer with ``work``'s result, unless the client leaves first or shutdown cuts it off.

    Until the response starts (queued for admission, tokenizing, waiting for the first piece,
    or the whole of a non-streaming answer) a hang-up cancels the work, and with it the engine
    requests in Triton; once a stream runs, its next write notices.
    """
    shutdown = serving(request).shutdown
    task = asyncio.current_task()
    assert task is not None
    watcher = asyncio.create_task(_cancel_when_gone(request, task))
    try:
        with shutdown.guard():
            return _answer(await work)
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            task.uncancel()
            return Response(status_code=499)  # nobody reads it; uvicorn drops it
        if shutdown.stopping:
            task.uncancel()
            raise shutting_down() from None
        raise
    finally:
        watcher.cancel()


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


@v1.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _serve(request, serving(request).chat(body))


@v1.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _serve(request, serving(request).completion(body))


@v1.get("/models")
async def list_models(request: Request) -> ModelList:
    return serving(request).model_list()


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    return serving(request).model_card(model_id)


ops = APIRouter()


@ops.get("/health")
async def health(request: Request) -> Response:
    if serving(request).draining:
        raise shutting_down()
    states = await serving(request).health()
    not_ready = sorted(name for name, ok in states.items() if not ok)
    if not_ready:
        raise UpstreamUnavailable(f"not ready: {', '.join(not_ready)}")
    return Response(b'{"status":"ok"}', media_type=JSON)


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(serving(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
