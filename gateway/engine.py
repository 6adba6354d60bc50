"""What the serving layer needs from an inference engine, as a ``typing.Protocol``.

``gateway.triton.TritonEngine`` is the real one; tests plug in their own. Keeping the
protocol this small is what lets one serving layer drive three Triton dialects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

GuideType = Literal["json", "json_schema", "regex", "ebnf_grammar"]


@dataclass(frozen=True, slots=True)
class Guide:
    """What constrained decoding must produce, in TensorRT-LLM's terms (``guided_decoding_*``).

    ``param`` names the request field it came from, for errors (``response_format``,
    ``tool_choice``): a backend that cannot honour the guide refuses it by that name.
    """

    type: GuideType
    text: str = ""  # the JSON schema (as JSON text), the regex or the grammar; empty for "json"
    param: str = "response_format"


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
    guide: Guide | None = None
    # None: no logprobs; k >= 0: each token's logprob and its k most likely alternatives.
    logprobs: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False


@dataclass(slots=True)
class TokenLogprobs:
    """The generated tokens a piece covers, with their logprobs (when they were asked for).

    ``top_ids`` / ``top_logprobs`` hold k alternatives per token, flattened row-major.
    """

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def extend(self, other: TokenLogprobs) -> None:
        self.ids += other.ids
        self.logprobs += other.logprobs
        self.top_ids += other.top_ids
        self.top_logprobs += other.top_logprobs


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
    tokens: TokenLogprobs | None = None


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
