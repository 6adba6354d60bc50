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
from gateway.errors import UpstreamError

EventParser = Callable[[Mapping[str, Any]], GenerationChunk]

_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def _sampling(req: GenerationRequest, stop: str) -> dict[str, Any]:
    """The sampling fields, seed and stop strings (under the key ``stop``) that are set."""
    out: dict[str, Any] = {key: value for key in _SAMPLING_FIELDS if (value := getattr(req, key)) is not None}
    if req.seed is not None:
        out["seed"] = req.seed
    if req.stop:
        out[stop] = req.stop
    return out


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
        return {
            "text_input": req.prompt,
            "max_tokens": req.max_tokens,
            "stream": req.stream,
            "exclude_input_in_output": True,
            **_sampling(req, stop="stop_words"),
        }

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


class _Counts:
    """Token counts over a stream whose responses each report only their own tokens."""

    def __init__(self, per_response: bool) -> None:
        self.per_response = per_response
        self.total = 0

    def add(self, event: Mapping[str, Any]) -> int | None:
        n = _int(event.get("num_output_tokens"))
        if n is None:
            return None
        self.total = self.total + n if self.per_response else n
        return self.total


class TrtllmDialect:
    """TensorRT-LLM's ``ensemble`` / ``tensorrt_llm_bls`` models.

    They stream deltas but report no finish reason: the stream simply ends. Releases with
    ``return_num_*_tokens`` report token counts (per response when streaming); with older
    ones the serving layer counts with the tokenizer. Either way it infers ``length`` when
    the completion used all of ``max_tokens``.
    """

    name = "trtllm"

    def __init__(self, inputs: set[str]) -> None:
        self.inputs = inputs

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"text_input": req.prompt, "max_tokens": req.max_tokens, "stream": req.stream}
        for flag in ("exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens"):
            if flag in self.inputs:
                body[flag] = True
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
        counts = _Counts(per_response=req.stream)
        stops = req.stop if not req.stream else []

        def parse(event: Mapping[str, Any]) -> GenerationChunk:
            text = _text(event.get("text_output"))
            if strip_prompt and text.startswith(prompt):
                text = text[len(prompt) :]
            finish = None
            # TensorRT-LLM leaves the matched stop word at the end of the text.
            for stop in stops:
                if text.endswith(stop):
                    text, finish = text[: -len(stop)], "stop"
                    break
            return GenerationChunk(text, finish, _int(event.get("num_input_tokens")), counts.add(event))

        return parse


class VllmDialect:
    """Triton's vLLM backend: sampling parameters travel as one JSON string."""

    name = "vllm"

    def __init__(self, inputs: set[str]) -> None:
        self.inputs = inputs

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        params = {"max_tokens": req.max_tokens, **_sampling(req, stop="stop")}
        body: dict[str, Any] = {
            "text_input": req.prompt,
            "stream": req.stream,
            "sampling_parameters": orjson.dumps(params).decode(),
        }
        for flag in (
            "exclude_input_in_output",
            "return_finish_reason",
            "return_num_input_tokens",
            "return_num_output_tokens",
        ):
            if flag in self.inputs:
                body[flag] = True
        return body

    def parser(self, req: GenerationRequest) -> EventParser:
        counts = _Counts(per_response=req.stream)

        def parse(event: Mapping[str, Any]) -> GenerationChunk:
            finish = _text(event.get("finish_reason")) or None
            if finish == "None":  # vLLM's str(None) on the responses before the last
                finish = None
            elif finish == "abort":
                raise UpstreamError("vLLM aborted the request")
            return GenerationChunk(
                _text(event.get("text_output")), finish, _int(event.get("num_input_tokens")), counts.add(event)
            )

        return parse


class LlmapiDialect:
    """TensorRT-LLM's LLM API model (``all_models/llmapi``, TensorRT-LLM >= 1.0, PyTorch backend).

    One Python-backend model, ``tensorrt_llm``: ``streaming`` instead of ``stream``, the
    sampling arguments as ``sampling_param_<name>`` (``max_tokens`` is optional there:
    always sent, never left to the LLM API's default), ``finish_reason`` only when
    ``return_finish_reason`` is true (``"None"`` until the last response), no token
    counts. Each streamed ``text_output`` is the text generated **so far**, not a delta:
    the parser turns it into deltas. Stop strings are cut by TensorRT-LLM.
    ``sampling_param_exclude_input_from_output`` defaults to false in the template, so it
    is always sent.
    """

    name = "llmapi"
    _PREFIX = "sampling_param_"

    def __init__(self, inputs: set[str]) -> None:
        self.inputs = inputs

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        p = self._PREFIX
        body: dict[str, Any] = {"text_input": req.prompt, p + "max_tokens": req.max_tokens, "streaming": req.stream}
        for flag in (p + "exclude_input_from_output", "return_finish_reason"):
            if flag in self.inputs:
                body[flag] = True
        for key in _SAMPLING_FIELDS:
            value = getattr(req, key)
            if value is not None and p + key in self.inputs:
                body[p + key] = value
        if req.temperature == 0 and p + "top_k" in self.inputs:
            body[p + "top_k"] = 1  # top-1 sampling is greedy, whatever the sampler does with 0
            body.pop(p + "temperature", None)
        if req.seed is not None and p + "seed" in self.inputs:
            body[p + "seed"] = req.seed
        if req.stop and p + "stop" in self.inputs:
            body[p + "stop"] = req.stop
        return body

    def parser(self, req: GenerationRequest) -> EventParser:
        prompt = req.prompt
        strip_prompt = self._PREFIX + "exclude_input_from_output" not in self.inputs
        sent = ""  # what the client has so far: streamed texts are cumulative

        def parse(event: Mapping[str, Any]) -> GenerationChunk:
            nonlocal sent
            text = _text(event.get("text_output"))
            if strip_prompt and text.startswith(prompt):
                text = text[len(prompt) :]
            # Past what was sent. Should the text so far change behind us (a stop string
            # cut off the end, a character decoded anew), nothing is taken back or repeated.
            delta = text[len(sent) :]
            if len(text) > len(sent):
                sent = text
            finish = _text(event.get("finish_reason")) or None
            if finish == "None":  # str(None) on every response before the last
                finish = None
            elif finish in ("cancelled", "timeout"):
                raise UpstreamError(f"TensorRT-LLM ended the request: {finish}")
            elif finish not in (None, "stop", "length"):
                finish = None  # unknown: the serving layer infers stop or length
            return GenerationChunk(delta, finish)

        return parse


Dialect = LlmDialect | TrtllmDialect | VllmDialect | LlmapiDialect


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
    if "sampling_param_max_tokens" in inputs:
        return LlmapiDialect(inputs)
    if "finish_reason" in outputs and "max_tokens" in inputs:
        return LlmDialect()
    if "max_tokens" in inputs:
        return TrtllmDialect(inputs)
    raise UnknownDialect(f"model {config.get('name')!r}: cannot tell which dialect it speaks")
