"""OpenAI Chat Completions / Completions / Models, as Pydantic v2 models.

Pure data: no I/O, no knowledge of Triton. Request models validate what the OpenAI API
validates (ranges, types, required fields) so the serving layer can trust them.

The response models are the documented schema of what the gateway sends, not the code
that sends it: ``gateway.responses`` writes every answer (whole bodies with orjson, stream
chunks from pre-serialised templates, so that no answer pays for Pydantic), and the tests
validate what it writes against these models. ``ModelCard`` / ``ModelList`` are the
exception: FastAPI serialises those answers from the models themselves.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ------------------------------------------------------------------------------ requests


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text: a string, or its text parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: Annotated[str, Field(min_length=1)] | StopList | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    # Extensions many OpenAI-compatible servers accept.
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)

    def token_limit(self) -> int | None:
        return self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @model_validator(mode="after")
    def _options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


# Fields of OpenAI's API that this gateway does not implement: refused rather than ignored,
# so a client never silently gets something other than what it asked for.
UNSUPPORTED_CHAT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


# ----------------------------------------------------------------------------- responses

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class _Choice(BaseModel):
    index: int
    logprobs: None = None


class ChatChoice(_Choice):
    message: AssistantMessage
    finish_reason: FinishReason


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Choice):
    delta: ChunkDelta
    finish_reason: FinishReason | None = None


class CompletionChoice(_Choice):
    text: str
    finish_reason: FinishReason | None


class Answer(BaseModel):
    """What every answer and chunk starts with (``object`` comes between ``id`` and
    ``created`` on the wire; the subclasses name it)."""

    id: str
    created: int
    model: str


class ChatCompletionResponse(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletionChunk(Answer):
    """A streamed chunk; the usage chunk (``include_usage``) has no choices."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionResponse(Answer):
    """A whole text completion, and each of its streamed chunks (same object name)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "triton"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
