"""One chat or text completion in flight: ``Run`` owns its state, its metrics and its answer.

``Serving`` validates a request and turns it into engine requests (one per choice); a
``Run`` then drives the engine, gathers each choice's pieces, and answers either with the
whole body or with an async iterator of SSE events. Its metrics are recorded in one place,
``Run._record``, once per request whatever the outcome. The bytes themselves are written by
the request's ``responses.Shape``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway import logprobs as lp
from gateway.admission import Admission, shutting_down
from gateway.engine import Engine, GenerationChunk, GenerationRequest, TokenLogprobs, take_reports
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.responses import DONE, ChatShape, ChoiceOut, Shape, error_event, usage
from gateway.shutdown import Shutdown
from gateway.tokenizer import OFF_LOOP_CHARS, ChatTokenizer
from gateway.tools import CallStream, Event, ToolPlan, whole_answer

Item = tuple[int, GenerationChunk | None]  # (choice index, chunk); None marks that choice's end


@dataclass
class Prompt:
    """A prompt whose token count is only worked out when something needs it.

    The context check can mostly be settled by cheap bounds, and the engines that report
    their own count make tokenizing in the gateway unnecessary: that keeps the tokenizer off
    the path to the first token (and a huge prompt off the event loop: ``count``).
    """

    text: str
    tokenizer: ChatTokenizer
    _tokens: int | None = None
    _bytes: int | None = None

    def size(self) -> int:
        """UTF-8 bytes."""
        if self._bytes is None:
            self._bytes = len(self.text.encode())
        return self._bytes

    def tokens(self) -> int:
        if self._tokens is None:
            self._tokens = self.tokenizer.count(self.text)
        return self._tokens

    async def count(self) -> int:
        if self._tokens is None:
            self._tokens = await self.tokenizer.count_off_loop(self.text)
        return self._tokens

    def at_most(self) -> int:
        if self._tokens is not None:
            return self._tokens
        # A huge text is not even encoded on the event loop: 4 bytes a character at most.
        return (len(self.text) * 4 if len(self.text) >= OFF_LOOP_CHARS else self.size()) + 1

    def at_least(self) -> int:
        if self._tokens is not None:
            return self._tokens
        return self.tokenizer.lower_bound(len(self.text) if len(self.text) >= OFF_LOOP_CHARS else self.size())


@dataclass
class Choice:
    """What one choice accumulates; the text is kept for token counting and non-streaming."""

    max_tokens: int
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens: TokenLogprobs | None = None  # every token's logprobs, when asked for (whole answers)
    calls: CallStream | None = None  # when tools are in play and the answer streams

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.text:
            self.parts.append(chunk.text)
        take_reports(self, chunk)

    def settle(self, tokenizer: ChatTokenizer) -> None:
        """Fill in what the engine did not report (TensorRT-LLM reports neither)."""
        if self.completion_tokens is None:
            self.completion_tokens = tokenizer.count("".join(self.parts))
        if self.finish_reason is None:
            self.finish_reason = "length" if self.completion_tokens >= self.max_tokens else "stop"


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


class Run:
    """One request from its engine requests to its last byte.

    ``requests`` holds one engine request per choice, prompt after prompt (``n`` each);
    ``echo`` puts each choice's prompt in front of its text (text completions).
    """

    def __init__(
        self,
        engine: Engine,
        metrics: GatewayMetrics,
        admission: Admission,
        tokenizer: ChatTokenizer,
        shape: Shape,
        prompts: list[Prompt],
        requests: list[GenerationRequest],
        *,
        include_usage: bool = False,
        echo: bool = False,
        logprobs: int | None = None,
        tools: ToolPlan | None = None,
        shutdown: Shutdown | None = None,
    ) -> None:
        self.engine = engine
        self.shutdown = shutdown or Shutdown()
        self.metrics = metrics
        self.admission = admission
        self.tokenizer = tokenizer
        self.shape = shape
        self.prompts = prompts
        self.requests = requests
        self.include_usage = include_usage
        self.echo = echo
        self.top = logprobs  # None: no logprobs; else the alternatives per token
        self.tools = tools
        self.choices = [Choice(r.max_tokens, calls=CallStream(tools) if tools and r.stream else None) for r in requests]
        self.started = time.perf_counter()
        self.first_text_at: float | None = None
        self.usage: dict[str, int] | None = None  # set once every choice has ended

    async def answer(self) -> bytes | AsyncIterator[bytes]:
        """The whole body, or the SSE events when streaming.

        An ``APIError`` before the first piece is raised (it becomes the HTTP status);
        after it, it becomes an event of the stream.
        """
        if self.requests[0].stream:
            return await self._stream()
        return await self._body()

    # ------------------------------------------------------------------ state

    async def _pieces(self) -> AsyncGenerator[Item, None]:
        """Every choice's pieces as (index, chunk), interleaved when there are several.

        The engine is only asked once admission lets the request in; its room is given back
        when the pieces end, however they end (finished, failed, or the client left).
        """
        model = self.shape.model
        async with self.admission.slot(len(self.requests)):
            if len(self.requests) == 1:
                pieces = _single(self.engine.generate(model, self.requests[0]))
            else:
                pieces = _merge([self.engine.generate(model, r) for r in self.requests])
            try:
                async for item in pieces:
                    yield item
            finally:
                await pieces.aclose()

    def _prompt(self, index: int) -> Prompt:
        return self.prompts[index * len(self.prompts) // len(self.choices)]

    def _settle(self) -> dict[str, int]:
        """Usage once every choice has ended: each prompt counted once (whatever n is), the
        engine's counts first."""
        for choice in self.choices:
            choice.settle(self.tokenizer)
        per_prompt = len(self.choices) // len(self.prompts)
        prompt_tokens = sum(
            self.choices[i * per_prompt].prompt_tokens or p.tokens() for i, p in enumerate(self.prompts)
        )
        self.usage = usage(prompt_tokens, sum(c.completion_tokens or 0 for c in self.choices))
        return self.usage

    def _record(self, status: str) -> None:
        """Every metric of the request, once, when it is over."""
        m, endpoint, model = self.metrics, self.shape.endpoint, self.shape.model
        m.requests.labels(endpoint, model, status).inc()
        m.latency.labels(endpoint, model).observe(time.perf_counter() - self.started)
        if self.first_text_at is not None:
            m.ttft.labels(model).observe(self.first_text_at - self.started)
        if self.usage is not None:
            m.prompt_tokens.labels(model).inc(self.usage["prompt_tokens"])
            m.completion_tokens.labels(model).inc(self.usage["completion_tokens"])

    # ------------------------------------------------------------------ answers

    async def _body(self) -> bytes:
        status = "200"
        try:
            async for index, chunk in self._pieces():
                if chunk is not None:
                    choice = self.choices[index]
                    choice.add(chunk)
                    if chunk.tokens is not None:
                        if choice.tokens is None:
                            choice.tokens = chunk.tokens
                        else:
                            choice.tokens.extend(chunk.tokens)
            counts = self._settle()
        except APIError as exc:
            status = str(exc.status)
            raise
        except asyncio.CancelledError:
            status = "503" if self.shutdown.stopping else "499"
            raise
        finally:
            self._record(status)
        return self.shape.body([self._whole(i, c) for i, c in enumerate(self.choices)], counts)

    def _whole(self, index: int, choice: Choice) -> ChoiceOut:
        prefix = self._prompt(index).text if self.echo else ""
        out = ChoiceOut(prefix + "".join(choice.parts), choice.finish_reason)
        if self.tools is not None and choice.finish_reason != "length":
            out.text, out.tool_calls = whole_answer(out.text or "", self.tools)
            if out.tool_calls:
                out.finish_reason = "tool_calls"
        if self.top is not None:
            out.logprobs = self._logprobs(choice.tokens or TokenLogprobs(), len(prefix))
        return out

    def _logprobs(self, tokens: TokenLogprobs, offset: int = 0) -> Any:
        """The shape's logprobs object for these tokens."""
        assert self.top is not None
        if isinstance(self.shape, ChatShape):
            return {"content": lp.chat_content(tokens, self.top, self.tokenizer), "refusal": None}
        return lp.completion_logprobs(tokens, self.top, self.tokenizer, offset)

    def _tool_event(self, index: int, event: Event) -> bytes:
        shape = self.shape
        assert isinstance(shape, ChatShape)
        if event[0] == "text":
            return shape.content(index, event[1])
        if event[0] == "call":
            return shape.tool_call(index, event[1], event[2], event[3])
        return shape.tool_arguments(index, event[1], event[2])

    async def _stream(self) -> AsyncIterator[bytes]:
        pieces = self._pieces()
        try:
            # Wait for the first piece before answering, so that a Triton that is down or
            # rejects the request gives a proper HTTP status instead of a 200 stream.
            first = await anext(pieces)
        except APIError as exc:
            await pieces.aclose()
            self._record(str(exc.status))
            raise
        return self._events(pieces, first)

    async def _events(self, pieces: AsyncGenerator[Item, None], first: Item) -> AsyncIterator[bytes]:
        # The stream runs in a task of its own (Starlette's): shutdown interrupts it there.
        with self.shutdown.guard():
            shape, choices = self.shape, self.choices
            status = "200"
            # The role (and echo) chunks leave together with the first piece: one write, not three.
            out = b"".join(
                shape.role(i) + (shape.content(i, self._prompt(i).text) if self.echo else b"")
                for i in range(len(choices))
            )
            try:
                item: Item | None = first
                while item is not None:
                    index, chunk = item
                    choice = choices[index]
                    if chunk is None:
                        choice.settle(self.tokenizer)
                        reason = choice.finish_reason or "stop"
                        if choice.calls is not None:
                            for event in choice.calls.finish():
                                out += self._tool_event(index, event)
                            if choice.calls.made_calls and reason != "length":
                                reason = "tool_calls"
                        out += shape.finish(index, reason)
                    else:
                        choice.add(chunk)
                        if chunk.text and self.first_text_at is None:
                            self.first_text_at = time.perf_counter()
                        if choice.calls is not None:
                            for event in choice.calls.feed(chunk.text):
                                out += self._tool_event(index, event)
                        elif self.top is not None and chunk.tokens is not None:
                            out += shape.content_with_logprobs(index, chunk.text, self._logprobs(chunk.tokens))
                        elif chunk.text:
                            out += shape.content(index, chunk.text)
                    if out:
                        yield out
                        out = b""
                    item = await anext(pieces, None)
                counts = self._settle()
                if self.include_usage:
                    yield shape.usage_chunk(counts)
            except APIError as exc:
                status = f"{exc.status}-midstream"
                yield error_event(exc)
            except asyncio.CancelledError:
                if not self.shutdown.stopping:
                    status = "499"  # the client went away
                    raise
                # Shutdown's grace ran out (Serving.stop): say so, then end the stream properly.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                status = "503-midstream"
                yield error_event(shutting_down())
            except GeneratorExit:
                status = "499"
                raise
            finally:
                await pieces.aclose()
                self._record(status)
            yield DONE
