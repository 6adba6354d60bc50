"""How each kind of Triton model wants a request and gives back its answer.

A dialect turns a ``GenerationRequest`` into the JSON body of Triton's ``generate`` /
``generate_stream`` endpoints (each top-level key becomes the input tensor of that name)
and turns each reply event back into a ``GenerationChunk``. Which dialect a model speaks
is read from its ``/v2/models/<m>/config``: its backend and the names of its tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import orjson

from gateway.engine import GenerationChunk, GenerationRequest, TokenLogprobs
from gateway.errors import APIError, UpstreamError, invalid_request

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


def _list(value: Any) -> list[Any]:
    # A one-element tensor arrives as a scalar, an absent one as None.
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def refuse(param: str, what: str) -> APIError:
    """A 400 for a field this model cannot honour: never silently ignored."""
    return invalid_request(f"{param}: {what}", param=param)


# What each field is called when a model cannot honour it.
_GUIDE_WHY = "this model has no constrained decoding (no guided_decoding_guide_type input)"
_LOGPROBS_WHY = "this model does not return log probabilities"


def _guided_tensors(req: GenerationRequest, inputs: set[str] | None) -> dict[str, Any]:
    """TensorRT-LLM's ``guided_decoding_guide_type`` / ``guided_decoding_guide``, when asked for."""
    if req.guide is None:
        return {}
    if inputs is not None and "guided_decoding_guide_type" not in inputs:
        raise refuse(req.guide.param, _GUIDE_WHY)
    body: dict[str, Any] = {"guided_decoding_guide_type": req.guide.type}
    if req.guide.text:
        body["guided_decoding_guide"] = req.guide.text
    return body


def _tokens_from_tensors(event: Mapping[str, Any]) -> TokenLogprobs | None:
    """The ``output_ids`` / ``output_log_probs`` / ``output_top_log_prob*`` of one response."""
    ids = event.get("output_ids")
    if ids is None:
        return None
    return TokenLogprobs(
        [int(i) for i in _list(ids)],
        [float(v) for v in _list(event.get("output_log_probs"))],
        [int(i) for i in _list(event.get("output_top_log_prob_ids"))],
        [float(v) for v in _list(event.get("output_top_log_probs"))],
    )


class LlmDialect:
    """The project's own ``llm`` Python-backend model: deltas, finish reason and counts."""

    name = "llm"

    def __init__(self, inputs: set[str] | None = None) -> None:
        """``inputs``: the model's input tensors; None takes every tensor of the current template."""
        self.inputs = inputs

    def _has(self, tensor: str) -> bool:
        return self.inputs is None or tensor in self.inputs

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        body = {
            "text_input": req.prompt,
            "max_tokens": req.max_tokens,
            "stream": req.stream,
            "exclude_input_in_output": True,
            **_sampling(req, stop="stop_words"),
            **_guided_tensors(req, self.inputs),
        }
        if req.logprobs is not None:
            if not self._has("return_log_probs"):
                raise refuse("logprobs", _LOGPROBS_WHY)
            body["return_log_probs"] = True
            if req.logprobs:
                body["top_logprobs"] = req.logprobs
        for key in ("min_tokens", "ignore_eos"):
            if value := getattr(req, key):
                if not self._has(key):
                    raise refuse(key, f"this model has no {key} input (re-render its repository)")
                body[key] = value
        return body

    def parser(self, req: GenerationRequest) -> EventParser:
        with_tokens = req.logprobs is not None

        def parse(event: Mapping[str, Any]) -> GenerationChunk:
            finish = event.get("finish_reason")
            if finish is None:  # the hot path: a streamed delta
                chunk = GenerationChunk(_text(event.get("text_output")))
            else:
                chunk = GenerationChunk(
                    _text(event.get("text_output")),
                    _text(finish) or "stop",
                    _int(event.get("num_input_tokens")),
                    _int(event.get("num_output_tokens")),
                )
            if with_tokens:
                chunk.tokens = _tokens_from_tensors(event)
            return chunk

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
        body.update(_guided_tensors(req, self.inputs))
        if req.logprobs is not None:
            # output_log_probs comes without the tokens it belongs to: no logprobs object can be made.
            raise refuse("logprobs", _LOGPROBS_WHY + " with their tokens (TensorRT-LLM returns no token ids)")
        min_tokens = req.max_tokens if req.ignore_eos else req.min_tokens
        if min_tokens:
            if "min_tokens" not in self.inputs:
                raise refuse("ignore_eos" if req.ignore_eos else "min_tokens", "this model has no min_tokens input")
            body["min_tokens"] = min_tokens  # ignore_eos: no end before max_tokens
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

    # guided_decoding_guide_type → vLLM's StructuredOutputsParams field
    _STRUCTURED: ClassVar[dict[str, str]] = {"json_schema": "json", "regex": "regex", "ebnf_grammar": "grammar"}

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": req.max_tokens, **_sampling(req, stop="stop")}
        if req.guide is not None:
            # The backend builds StructuredOutputsParams from this JSON string.
            field = self._STRUCTURED.get(req.guide.type)
            spec: dict[str, Any] = {"json_object": True} if field is None else {field: req.guide.text}
            if field == "json":
                spec["json"] = orjson.loads(req.guide.text)
            params["structured_outputs"] = orjson.dumps(spec).decode()
        if req.logprobs is not None:
            if "return_logprobs" not in self.inputs:
                raise refuse("logprobs", _LOGPROBS_WHY + " (this vLLM backend predates return_logprobs)")
            params["logprobs"] = req.logprobs
        if req.min_tokens:
            params["min_tokens"] = req.min_tokens
        if req.ignore_eos:
            params["ignore_eos"] = True
        body: dict[str, Any] = {
            "text_input": req.prompt,
            "stream": req.stream,
            "sampling_parameters": orjson.dumps(params).decode(),
        }
        if req.logprobs is not None:
            body["return_logprobs"] = True
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
        top = req.logprobs

        def parse(event: Mapping[str, Any]) -> GenerationChunk:
            finish = _text(event.get("finish_reason")) or None
            if finish == "None":  # vLLM's str(None) on the responses before the last
                finish = None
            elif finish == "abort":
                raise UpstreamError("vLLM aborted the request")
            chunk = GenerationChunk(
                _text(event.get("text_output")), finish, _int(event.get("num_input_tokens")), counts.add(event)
            )
            if top is not None:
                chunk.tokens = self._tokens(event.get("logprobs"), top)
            return chunk

        return parse

    @staticmethod
    def _tokens(value: Any, k: int) -> TokenLogprobs:
        """The backend's ``logprobs`` JSON (per token: ``{token_id: {logprob, rank, ...}}``, the
        sampled token first, then the top ones) → ids, logprobs and k alternatives each."""
        out = TokenLogprobs()
        raw = _text(value)
        for position in orjson.loads(raw) if raw and raw != "null" else []:
            entries = list(position.items())
            chosen, info = entries[0]
            out.ids.append(int(chosen))
            out.logprobs.append(float(info["logprob"]))
            best = sorted(entries, key=lambda e: e[1].get("rank") or 1 << 30)[:k]
            out.top_ids += [int(t) for t, _ in best]
            out.top_logprobs += [float(e["logprob"]) for _, e in best]
        return out


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
        body.update(_guided_tensors(req, self.inputs))
        if req.logprobs is not None:
            raise refuse("logprobs", _LOGPROBS_WHY)
        for key in ("min_tokens", "ignore_eos"):
            if value := getattr(req, key):
                if p + key not in self.inputs:
                    raise refuse(key, f"this model has no {p}{key} input")
                body[p + key] = value
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
        return LlmDialect(inputs)
    if "max_tokens" in inputs:
        return TrtllmDialect(inputs)
    raise UnknownDialect(f"model {config.get('name')!r}: cannot tell which dialect it speaks")
