"""Serving logic: OpenAI requests in, engine generations out, OpenAI answers back.

No FastAPI here: the routers hand over validated protocol models and get back either a
JSON body or an async iterator of SSE bytes. Errors are ``APIError``; an error before the
first generated piece surfaces as the HTTP status, an error after it as an SSE event.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import orjson

from gateway.config import GatewaySettings, ModelSettings
from gateway.engine import Engine, GenerationChunk, GenerationRequest
from gateway.errors import APIError, invalid_request, model_not_found
from gateway.metrics import GatewayMetrics
from gateway.protocol import (
    UNSUPPORTED_CHAT_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from gateway.sse import DONE, ChatChunks, CompletionChunks, error_event
from gateway.tokenizer import ChatTokenizer

_UINT64 = (1 << 64) - 1
Item = tuple[int, GenerationChunk | None]  # (choice index, chunk); None marks that choice's end


@dataclass
class ServedModel:
    name: str
    settings: ModelSettings
    tokenizer: ChatTokenizer
    context_length: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.context_length = self.settings.context_length or self.tokenizer.context_length()


@dataclass
class Choice:
    """What one choice accumulates; the text is kept for token counting and non-streaming."""

    max_tokens: int
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.text:
            self.parts.append(chunk.text)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.prompt_tokens is not None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self.completion_tokens = chunk.completion_tokens

    def settle(self, tokenizer: ChatTokenizer) -> None:
        """Fill in what the engine did not report (TensorRT-LLM reports neither)."""
        if self.completion_tokens is None:
            self.completion_tokens = tokenizer.count("".join(self.parts))
        if self.finish_reason is None:
            self.finish_reason = "length" if self.completion_tokens >= self.max_tokens else "stop"


@dataclass
class Prompt:
    """A prompt whose token count is only worked out when something needs it.

    The context check can mostly be settled by a cheap upper bound, and the engines that
    report their own count make tokenizing in the gateway unnecessary: that keeps the
    tokenizer off the path to the first token.
    """

    text: str
    tokenizer: ChatTokenizer
    _tokens: int | None = None

    def tokens(self) -> int:
        if self._tokens is None:
            self._tokens = self.tokenizer.count(self.text)
        return self._tokens

    def at_most(self) -> int:
        return self._tokens if self._tokens is not None else self.tokenizer.upper_bound(self.text)


def prompt_usage(prompts: Sequence[Prompt], choices: Sequence[Choice]) -> int:
    """Prompt tokens of a request: each prompt once (whatever n is), the engine's count first."""
    per_prompt = len(choices) // len(prompts)
    return sum(choices[i * per_prompt].prompt_tokens or p.tokens() for i, p in enumerate(prompts))


async def _single(iterator: AsyncIterator[GenerationChunk]) -> AsyncGenerator[Item, None]:
    async for chunk in iterator:
        yield 0, chunk
    yield 0, None


async def _merge(iterators: Sequence[AsyncIterator[GenerationChunk]]) -> AsyncGenerator[Item, None]:
    """Interleave several generations as their pieces arrive."""
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, iterator: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in iterator:
                await queue.put((index, chunk))
            await queue.put((index, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Serving:
    def __init__(
        self,
        settings: GatewaySettings,
        engine: Engine,
        tokenizers: Mapping[str, ChatTokenizer],
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or GatewayMetrics()
        self.created = int(time.time())
        self.models = {name: ServedModel(name, model, tokenizers[name]) for name, model in settings.models.items()}

    # ------------------------------------------------------------------ models

    def model_list(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in self.models])

    def model_card(self, name: str) -> ModelCard:
        if name not in self.models:
            raise model_not_found(name)
        return ModelCard(id=name, created=self.created)

    def served(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise model_not_found(name) from None

    async def health(self) -> dict[str, bool]:
        return await self.engine.ready(list(self.models))

    # ------------------------------------------------------------------ requests

    def _generation(
        self, served: ServedModel, body: SamplingFields, prompt: Prompt, limit: int | None
    ) -> GenerationRequest:
        defaults = served.settings.defaults
        context = served.context_length
        max_tokens = limit if limit is not None else defaults.max_tokens
        # The cheap bound settles almost every request; only a near miss is tokenized.
        if context is not None and prompt.at_most() + max_tokens > context and prompt.tokens() + max_tokens > context:
            prompt_tokens = prompt.tokens()
            room = context - prompt_tokens
            if limit is not None or room < 1:
                raise invalid_request(
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
                    "the completion). Please reduce the length of the messages or completion.",
                    param="messages" if room < 1 else "max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = room  # no explicit limit asked: fill what the context leaves
        temperature = body.temperature if body.temperature is not None else defaults.temperature
        top_k = defaults.top_k if body.top_k is None else body.top_k
        if top_k is not None and top_k <= 0:
            top_k = None  # 0 and -1 both mean "no top-k"; engines disagree on which, so send neither
        top_p = body.top_p if body.top_p is not None else defaults.top_p
        if top_p == 0:  # OpenAI clients sometimes send 0 for "most likely only"
            top_p, top_k = None, 1
        return GenerationRequest(
            prompt=prompt.text,
            max_tokens=max_tokens,
            stream=body.stream,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=(
                body.repetition_penalty if body.repetition_penalty is not None else defaults.repetition_penalty
            ),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed & _UINT64 if body.seed is not None else None,
            stop=body.stop_list(),
        )

    def _fan_out(self, req: GenerationRequest, n: int) -> list[GenerationRequest]:
        # n choices with one seed must still differ: choice i samples with seed + i.
        if n == 1:
            return [req]
        return [replace(req, seed=((req.seed + i) & _UINT64) if req.seed is not None else None) for i in range(n)]

    async def chat(self, body: ChatCompletionRequest) -> bytes | AsyncIterator[bytes]:
        for name in UNSUPPORTED_CHAT_FIELDS:
            if (body.model_extra or {}).get(name) is not None:
                raise invalid_request(f"{name} is not supported by this server", param=name)
        if body.logprobs:
            raise invalid_request("logprobs are not supported by this server", param="logprobs")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise invalid_request("only response_format type 'text' is supported", param="response_format")
        served = self.served(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompts = [Prompt(served.tokenizer.chat_prompt(messages), served.tokenizer)]
        requests = self._fan_out(self._generation(served, body, prompts[0], body.token_limit()), body.n)
        writer = ChatChunks(f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), served.name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(served, requests, prompts, writer, include_usage, "chat", "")
        choices = await self._collect(served, requests, prompts, "chat")
        usage = self._usage(prompt_usage(prompts, choices), choices)
        return orjson.dumps(
            {
                "id": writer.request_id,
                "object": "chat.completion",
                "created": writer.created,
                "model": served.name,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": "".join(c.parts), "refusal": None},
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": usage,
                "system_fingerprint": None,
            }
        )

    async def completion(self, body: CompletionRequest) -> bytes | AsyncIterator[bytes]:
        if body.logprobs is not None:
            raise invalid_request("logprobs are not supported by this server", param="logprobs")
        if body.suffix:
            raise invalid_request("suffix is not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise invalid_request("best_of is not supported by this server", param="best_of")
        served = self.served(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise invalid_request("prompt must not be empty", param="prompt")
        if len(texts) > 1 and body.stream:
            raise invalid_request("streaming supports one prompt per request", param="prompt")
        prompts = [Prompt(text, served.tokenizer) for text in texts]
        requests: list[GenerationRequest] = []
        for prompt in prompts:
            requests += self._fan_out(self._generation(served, body, prompt, body.token_limit()), body.n)
        writer = CompletionChunks(f"cmpl-{secrets.token_hex(12)}", int(time.time()), served.name)
        echo = texts[0] if body.echo else ""
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(served, requests, prompts, writer, include_usage, "completions", echo)
        choices = await self._collect(served, requests, prompts, "completions")
        return orjson.dumps(
            {
                "id": writer.request_id,
                "object": "text_completion",
                "created": writer.created,
                "model": served.name,
                "choices": [
                    {
                        "index": i,
                        "text": (texts[i // body.n] if body.echo else "") + "".join(c.parts),
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": self._usage(prompt_usage(prompts, choices), choices),
            }
        )

    # ------------------------------------------------------------------ engine calls

    @staticmethod
    def _usage(prompt_tokens: int, choices: Sequence[Choice]) -> dict[str, int]:
        completion = sum(c.completion_tokens or 0 for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    async def _collect(
        self, served: ServedModel, requests: list[GenerationRequest], prompts: list[Prompt], endpoint: str
    ) -> list[Choice]:
        started = time.perf_counter()
        status = "200"
        try:
            choices = [Choice(r.max_tokens) for r in requests]
            items = self._pieces(served.name, requests)
            async for index, chunk in items:
                if chunk is not None:
                    choices[index].add(chunk)
            for choice in choices:
                choice.settle(served.tokenizer)
            self._count_tokens(served.name, prompt_usage(prompts, choices), choices)
            return choices
        except APIError as exc:
            status = str(exc.status)
            raise
        finally:
            self.metrics.requests.labels(endpoint, served.name, status).inc()
            self.metrics.latency.labels(endpoint, served.name).observe(time.perf_counter() - started)

    def _pieces(self, model: str, requests: list[GenerationRequest]) -> AsyncGenerator[Item, None]:
        """Every choice's pieces as (index, chunk), interleaved when there are several."""
        if len(requests) == 1:
            return _single(self.engine.generate(model, requests[0]))
        return _merge([self.engine.generate(model, r) for r in requests])

    def _count_tokens(self, model: str, prompt_tokens: int, choices: Sequence[Choice]) -> None:
        self.metrics.prompt_tokens.labels(model).inc(prompt_tokens)
        self.metrics.completion_tokens.labels(model).inc(sum(c.completion_tokens or 0 for c in choices))

    async def _stream(
        self,
        served: ServedModel,
        requests: list[GenerationRequest],
        prompts: list[Prompt],
        writer: ChatChunks | CompletionChunks,
        include_usage: bool,
        endpoint: str,
        echo: str,
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        items = self._pieces(served.name, requests)
        try:
            # Wait for the first piece before answering, so that a Triton that is down or
            # rejects the request gives a proper HTTP status instead of a 200 stream.
            first = await anext(items)
        except APIError as exc:
            await items.aclose()
            self.metrics.requests.labels(endpoint, served.name, str(exc.status)).inc()
            raise
        return self._events(served, requests, prompts, writer, include_usage, endpoint, echo, items, first, started)

    async def _events(
        self,
        served: ServedModel,
        requests: list[GenerationRequest],
        prompts: list[Prompt],
        writer: ChatChunks | CompletionChunks,
        include_usage: bool,
        endpoint: str,
        echo: str,
        items: AsyncGenerator[Item, None],
        first: Item,
        started: float,
    ) -> AsyncIterator[bytes]:
        choices = [Choice(r.max_tokens) for r in requests]
        status = "200"
        first_text = True
        # The role (and echo) chunks leave together with the first piece: one write, not three.
        out = b"".join(writer.role(i) + (writer.content(i, echo) if echo else b"") for i in range(len(choices)))
        try:
            item: Item | None = first
            while item is not None:
                index, chunk = item
                choice = choices[index]
                if chunk is None:
                    choice.settle(served.tokenizer)
                    out += writer.finish(index, choice.finish_reason or "stop")
                else:
                    choice.add(chunk)
                    if chunk.text:
                        if first_text:
                            first_text = False
                            self.metrics.ttft.labels(served.name).observe(time.perf_counter() - started)
                        out += writer.content(index, chunk.text)
                if out:
                    yield out
                    out = b""
                item = await anext(items, None)
            prompt_tokens = prompt_usage(prompts, choices)
            self._count_tokens(served.name, prompt_tokens, choices)
            if include_usage:
                usage = self._usage(prompt_tokens, choices)
                yield writer.usage(usage["prompt_tokens"], usage["completion_tokens"])
        except APIError as exc:
            status = f"{exc.status}-midstream"
            yield error_event(exc)
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"  # the client went away
            raise
        finally:
            await items.aclose()
            self.metrics.requests.labels(endpoint, served.name, status).inc()
            self.metrics.latency.labels(endpoint, served.name).observe(time.perf_counter() - started)
        yield DONE
