"""``Engine`` on Triton Inference Server over HTTP.

Generation goes through Triton's ``generate_stream`` endpoint on one pooled keep-alive
``aiohttp`` session (whole answers from our own models are streamed and gathered here, see
``_streams_whole_answers``); health, readiness and model configs through
``tritonclient.http.aio``. Closing a stream early closes its connection, which is how Triton
learns that the client is gone and cancels the request.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

import aiohttp
import orjson
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from gateway.config import TritonSettings
from gateway.engine import GenerationChunk, GenerationRequest, take_reports
from gateway.errors import APIError, UpstreamError, UpstreamUnavailable, invalid_request
from gateway.triton.dialects import Dialect, UnknownDialect, detect

_JSON = {"Content-Type": "application/json"}
_DATA = b"data: "
SERVER = "<server>"


def _error_message(body: bytes) -> str:
    """Triton's ``{"error": "..."}`` (plain or as an SSE event) → its message."""
    text = body.strip()
    if text.startswith(_DATA):
        text = text[len(_DATA) :].strip()
    try:
        return str(orjson.loads(text).get("error", text.decode(errors="replace")))
    except (orjson.JSONDecodeError, AttributeError):
        return text.decode(errors="replace")[:500] or "empty reply"


def _failed(what: str, message: str, req: GenerationRequest) -> APIError:
    """A model's error: a 400 naming the field when the model refused the request's guide
    (a schema or grammar its compiler cannot take), else a 502."""
    if req.guide is not None and "guided_decoding_guide" in message:
        return invalid_request(f"{req.guide.param}: the model cannot decode with it: {message}", param=req.guide.param)
    return UpstreamError(f"{what}: {message}")


def _streams_whole_answers(dialect: Dialect, req: GenerationRequest, above_tokens: int) -> bool:
    """Whether a whole answer is asked for as a stream and gathered here.

    Triton notices that a client has gone only when it writes to it: a request answered in
    one piece at the end runs to its end even after the gateway closed the connection for a
    client that left. Streamed, it is cancelled at the next token, but each token then costs
    Triton and the gateway an event (3x fewer short answers per second on the bench's
    synthetic model). So only answers that may run longer than ``above_tokens``
    (``triton.stream_whole_answers_above_tokens``) are streamed: a short one costs little
    when nobody waits for it. Only our own models (``llm``, ``vllm``) stream exactly what they
    would answer whole; the other dialects differ between the two modes (stop strings,
    cumulative text), so they keep answering whole.
    """
    return not req.stream and dialect.name == "llm" and req.max_tokens > above_tokens


def _merge(first: GenerationChunk, then: GenerationChunk) -> GenerationChunk:
    """Two consecutive pieces as one (the later one's finish reason and counts win)."""
    first.text += then.text
    if then.tokens is not None:
        if first.tokens is None:
            first.tokens = then.tokens
        else:
            first.tokens.extend(then.tokens)
    take_reports(first, then)
    return first


class TritonEngine:
    def __init__(self, settings: TritonSettings, models: Mapping[str, str]) -> None:
        """``models`` maps each served model name to its Triton model name."""
        self.settings = settings
        self.models = dict(models)
        self._urls = itertools.cycle(settings.urls)
        self._dialects: dict[tuple[str, str], Dialect] = {}
        self._session: aiohttp.ClientSession | None = None
        self._admin: dict[str, triton_http.InferenceServerClient] = {}

    # ------------------------------------------------------------------ plumbing

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.max_connections, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self.settings.connect_timeout_s,
                    sock_read=self.settings.read_timeout_s,
                ),
                # Responses are read as raw bytes; skip aiohttp's cookie and redirect work.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session

    def admin(self, url: str) -> triton_http.InferenceServerClient:
        if url not in self._admin:
            self._admin[url] = triton_http.InferenceServerClient(
                url.split("://", 1)[1], conn_timeout=self.settings.connect_timeout_s
            )
        return self._admin[url]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        for client in self._admin.values():
            await client.close()
        self._admin.clear()

    # ------------------------------------------------------------------ readiness

    async def _ready_at(self, url: str, triton_models: list[str]) -> dict[str, bool]:
        client = self.admin(url)
        try:
            server = await client.is_server_ready()
            states = await asyncio.gather(*(client.is_model_ready(m) for m in triton_models))
        except (InferenceServerException, aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return {SERVER: False, **{m: False for m in triton_models}}
        return {SERVER: bool(server), **dict(zip(triton_models, map(bool, states), strict=True))}

    async def ready(self, models: list[str]) -> dict[str, bool]:
        """Served model → ready on at least one Triton; ``<server>`` → some Triton is ready."""
        triton_models = sorted({self.models[m] for m in models})
        per_url = await asyncio.gather(*(self._ready_at(u, triton_models) for u in self.settings.urls))
        result = {SERVER: any(r[SERVER] for r in per_url)}
        for model in models:
            result[model] = any(r[self.models[model]] for r in per_url)
        return result

    async def dialect(self, url: str, triton_model: str) -> Dialect:
        key = (url, triton_model)
        if key not in self._dialects:
            try:
                config = await self.admin(url).get_model_config(triton_model)
            except InferenceServerException as exc:
                if "connect" in str(exc).lower() or exc.status() is None:
                    raise UpstreamUnavailable(f"Triton at {url} is unreachable: {exc.message()}") from exc
                raise UpstreamError(f"Triton model {triton_model!r}: {exc.message()}") from exc
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise UpstreamUnavailable(f"Triton at {url} is unreachable: {exc}") from exc
            try:
                self._dialects[key] = detect(config)
            except UnknownDialect as exc:
                raise UpstreamError(str(exc)) from exc
        return self._dialects[key]

    # ------------------------------------------------------------------ generation

    async def _open(self, triton_model: str, req: GenerationRequest) -> tuple[aiohttp.ClientResponse, Dialect, bool]:
        """POST to the first Triton that answers; fail over on connection errors."""
        last: Exception | None = None
        for _ in range(len(self.settings.urls)):
            url = next(self._urls)
            try:
                dialect = await self.dialect(url, triton_model)
                gathered = _streams_whole_answers(dialect, req, self.settings.stream_whole_answers_above_tokens)
                # generate_stream for whole answers too: Triton cancels a request when its
                # stream's connection closes, but runs a plain `generate` to the end even after
                # the client (the gateway, for a client that left) has hung up.
                resp = await self.session.post(
                    f"{url}/v2/models/{triton_model}/generate_stream",
                    data=orjson.dumps(dialect.payload(replace(req, stream=True) if gathered else req)),
                    headers=_JSON,
                )
            except UpstreamUnavailable as exc:
                last = exc
                continue
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
                last = UpstreamUnavailable(f"Triton at {url} is unreachable: {exc}")
                continue
            except aiohttp.ClientError as exc:  # e.g. a reply that is not HTTP
                raise UpstreamError(f"Triton at {url} answered with something unreadable: {exc!r}") from exc
            return resp, dialect, gathered
        assert last is not None
        raise last

    async def generate(self, model: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        triton_model = self.models[model]
        resp, dialect, gathered = await self._open(triton_model, request)
        parse = dialect.parser(request)
        done = False
        whole: GenerationChunk | None = None  # a whole answer gathered from a stream
        try:
            if resp.status != 200:
                message = _error_message(await resp.read())
                raise _failed(f"Triton rejected the request for {triton_model!r}", message, request)
            if not request.stream and not gathered:
                # Usually one event (stream=false: the model answers once); pieces are joined.
                for line in (await resp.read()).split(b"\n"):
                    if line.startswith(_DATA):
                        event = orjson.loads(line[6:])
                        if "error" in event:
                            raise _failed("Triton failed", str(event["error"]), request)
                        chunk = parse(event)
                        whole = chunk if whole is None else _merge(whole, chunk)
                if whole is None:
                    raise UpstreamError(f"Triton sent no answer for {triton_model!r}")
                yield whole
                done = True
                return
            # Everything that arrived in one read becomes one chunk: when Triton produces
            # faster than the client reads, pieces coalesce instead of queueing up as
            # events (one downstream write per read, not per piece).
            pending = b""
            async for data in resp.content.iter_any():
                *lines, pending = (pending + data).split(b"\n")
                merged: GenerationChunk | None = None
                for line in lines:
                    if not line.startswith(_DATA):
                        continue
                    event = orjson.loads(line[6:])
                    if "error" in event:
                        if merged is not None and request.stream:
                            yield merged
                        raise _failed("Triton failed midway", str(event["error"]), request)
                    chunk = parse(event)
                    merged = chunk if merged is None else _merge(merged, chunk)
                if merged is not None:
                    if request.stream:
                        yield merged
                    else:
                        whole = merged if whole is None else _merge(whole, merged)
            if not request.stream:
                if whole is None:
                    raise UpstreamError(f"Triton sent no answer for {triton_model!r}")
                yield whole
            done = True
        except aiohttp.ClientError as exc:  # reset, truncated, or garbled mid-answer
            raise UpstreamError(f"Triton broke off the answer: {exc!r}") from exc
        except asyncio.TimeoutError as exc:
            raise UpstreamError(
                f"Triton sent nothing for {self.settings.read_timeout_s:.0f} s (read_timeout_s)"
            ) from exc
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"Triton sent something that is not JSON: {exc}") from exc
        finally:
            if done:
                resp.release()
            else:
                # Closing (not releasing) drops the connection: Triton cancels the request.
                resp.close()
