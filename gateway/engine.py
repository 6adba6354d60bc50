"""What the serving layer needs from an inference engine, as a ``typing.Protocol``.

``gateway.triton.TritonEngine`` is the real one; tests plug in their own. Keeping the
protocol this small is what lets one serving layer drive three Triton dialects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class GenerationRequest:
    """One completion to produce, in engine terms (already templated and validated)."""

    prompt: str
    max_tokens: int
    stream: bool
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(slots=True)
class GenerationChunk:
    """A piece of generated text; the last one of a request carries ``finish_reason``.

    Token counts are filled in by engines that report them (None otherwise: the serving
    layer then counts with the tokenizer).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Reports(Protocol):
    """What a piece may report besides its text; the later report wins."""

    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def take_reports(into: Reports, later: GenerationChunk) -> None:
    """Copy ``later``'s finish reason and token counts onto ``into`` where it has them."""
    if later.finish_reason is not None:
        into.finish_reason = later.finish_reason
    if later.prompt_tokens is not None:
        into.prompt_tokens = later.prompt_tokens
    if later.completion_tokens is not None:
        into.completion_tokens = later.completion_tokens


class Engine(Protocol):
    def generate(self, model: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Yield the answer's pieces (one chunk when not streaming).

        Raises ``errors.UpstreamUnavailable`` before the first piece when the engine cannot
        be reached, ``errors.UpstreamError`` when it fails (also midway).
        """
        ...

    async def ready(self, models: list[str]) -> dict[str, bool]:
        """Readiness of the server and of each engine model: ``{"<server>": bool, model: bool}``."""
        ...

    async def close(self) -> None: ...
