"""How each kind of Triton model wants a request and gives back its answer.

A dialect turns a ``GenerationRequest`` into the JSON body of Triton's ``generate`` /
``generate_stream`` endpoints (each top-level key becomes the input tensor of that name)
and turns each reply event back into a ``GenerationChunk``. Which dialect a model speaks
is read from its ``/v2/models/<m>/config``: its backend and the names of its tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway.engine import GenerationChunk, GenerationRequest

EventParser = Callable[[Mapping[str, Any]], GenerationChunk | None]

_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def _text(value: Any) -> str:
    # One-element outputs arrive unwrapped; BYTES arrays of several elements as lists.
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return "" if value is None else str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if value is not None else None


class LlmDialect:
    """The project's own ``llm`` Python-backend model: deltas, finish reason and counts."""

    name = "llm"

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "text_input": req.prompt,
            "max_tokens": req.max_tokens,
            "stream": req.stream,
            "exclude_input_in_output": True,
        }
        for key in _SAMPLING_FIELDS:
            value = getattr(req, key)
            if value is not None:
                body[key] = value
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop_words"] = req.stop
        return body

    def parser(self, req: GenerationRequest) -> EventParser:
        def parse(event: Mapping[str, Any]) -> GenerationChunk:
            finish = event.get("finish_reason")
            if finish is None:  # the hot path: a streamed delta
                return GenerationChunk(_text(event.get("text_output")))
            return GenerationChunk(
                _text(event.get("text_output")),
                _text(finish) or "stop",
                _int(event.get("num_input_tokens")),
                _int(event.get("num_output_tokens")),
            )

        return parse


class TrtllmDialect:
    """TensorRT-LLM's ``ensemble`` / ``tensorrt_llm_bls`` models.

    They stream deltas but report neither a finish reason nor token counts: the stream
    simply ends. The serving layer counts tokens with the tokenizer and infers ``length``
    when the completion used all of ``max_tokens``.
    """

    name = "trtllm"

    def __init__(self, inputs: set[str]) -> None:
        self.inputs = inputs

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"text_input": req.prompt, "max_tokens": req.max_tokens, "stream": req.stream}
        if "exclude_input_in_output" in self.inputs:
            body["exclude_input_in_output"] = True
        for key in _SAMPLING_FIELDS:
            value = getattr(req, key)
            if value is not None and key in self.inputs:
                body[key] = value
        if req.temperature == 0 and "top_k" in self.inputs:
            body["top_k"] = 1  # TensorRT-LLM has no greedy switch: top-1 sampling is greedy
            body.pop("temperature", None)
        if req.seed is not None:
            body["random_seed" if "random_seed" in self.inputs else "seed"] = req.seed
        if req.stop:
            body["stop_words"] = req.stop
        return body

    def parser(self, req: GenerationRequest) -> EventParser:
        prompt = req.prompt
        strip_prompt = not req.stream and "exclude_input_in_output" not in self.inputs

        def parse(event: Mapping[str, Any]) -> GenerationChunk:
            text = _text(event.get("text_output"))
            if strip_prompt and text.startswith(prompt):
                text = text[len(prompt) :]
            return GenerationChunk(text)

        return parse


class VllmDialect:
    """Triton's vLLM backend: sampling parameters travel as one JSON string."""

    name = "vllm"

    def __init__(self, inputs: set[str]) -> None:
        self.inputs = inputs

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": req.max_tokens}
        for key in _SAMPLING_FIELDS:
            value = getattr(req, key)
            if value is not None:
                params[key] = value
        if req.seed is not None:
            params["seed"] = req.seed
        if req.stop:
            params["stop"] = req.stop
        body: dict[str, Any] = {
            "text_input": req.prompt,
            "stream": req.stream,
            "sampling_parameters": orjson.dumps(params).decode(),
        }
        if "exclude_input_in_output" in self.inputs:
            body["exclude_input_in_output"] = True
        for flag in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
            if flag in self.inputs:
                body[flag] = True
        return body

    def parser(self, req: GenerationRequest) -> EventParser:
        def parse(event: Mapping[str, Any]) -> GenerationChunk:
            finish = event.get("finish_reason")
            return GenerationChunk(
                _text(event.get("text_output")),
                (_text(finish) or None) if finish is not None else None,
                _int(event.get("num_input_tokens")),
                _int(event.get("num_output_tokens")),
            )

        return parse


Dialect = LlmDialect | TrtllmDialect | VllmDialect


class UnknownDialect(ValueError):
    pass


def detect(config: Mapping[str, Any]) -> Dialect:
    """Pick the dialect from a model's Triton config (backend, platform, tensor names)."""
    inputs = {str(t.get("name")) for t in config.get("input", [])}
    outputs = {str(t.get("name")) for t in config.get("output", [])}
    backend = config.get("backend", "")
    if backend == "vllm" or "sampling_parameters" in inputs:
        return VllmDialect(inputs)
    if "text_input" not in inputs or "text_output" not in outputs:
        raise UnknownDialect(
            f"model {config.get('name')!r} has no text_input/text_output tensors: "
            "not a text-generation model this gateway can drive"
        )
    if "finish_reason" in outputs and "max_tokens" in inputs:
        return LlmDialect()
    if "max_tokens" in inputs:
        return TrtllmDialect(inputs)
    raise UnknownDialect(f"model {config.get('name')!r}: cannot tell which dialect it speaks")
