"""Triton Python-backend model: a Hugging Face causal LM that streams decoded text.

One request at a time per instance (raise ``instance_group.count`` for more); every decode
step checks whether Triton cancelled the request (the HTTP client went away) and stops
within that step. The incremental detokenizer and the stop-string matcher live here, next
to the loop, because the backend imports this file on its own.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
from transformers import AutoModelForCausalLM, AutoTokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BadRequest(ValueError):
    """The request cannot be served as sent; the message goes back to the client."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


# --------------------------------------------------------------------------- tensors


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value.item()


def _strings(request: Any, name: str) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


def _response(text: str, finish: str | None = None, counts: tuple[int, int] | None = None) -> Any:
    outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
    if finish is not None:
        outputs.append(pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)))
    if counts is not None:
        outputs.append(pb_utils.Tensor("num_input_tokens", np.array([counts[0]], dtype=np.int32)))
        outputs.append(pb_utils.Tensor("num_output_tokens", np.array([counts[1]], dtype=np.int32)))
    return pb_utils.InferenceResponse(output_tensors=outputs)


def _error(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


# --------------------------------------------------------------------------- text


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces.

    Decodes a short window of tokens so that tokenizers that drop a leading space at the
    start of a decode (SentencePiece) or split a character over several tokens (byte-level
    BPE) still give correct pieces: a piece is released only when the window's text is
    longer than before and does not end in an unfinished character (U+FFFD).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (e.g. an unfinished character)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Releases text only when it cannot be the start of a stop string.

    ``feed`` returns ``(safe_text, stopped)``; the stop string itself is never released.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:n]):
                    hold = n
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --------------------------------------------------------------------------- model


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        if int(np.__version__.split(".")[0]) >= 2 and os.environ.get("LLM_ALLOW_NUMPY2") != "1":
            # Stubs built against numpy 1 (Triton 2.51's) silently corrupt tensors under numpy 2.
            raise pb_utils.TritonModelException(
                f"numpy {np.__version__} in the stub's Python ({sys.prefix}): this Triton's Python backend "
                "needs numpy<2. Run Triton with the venv's interpreter (python -m stack.triton_native), "
                "or set LLM_ALLOW_NUMPY2=1 for a stub built against numpy 2."
            )
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = args.get("model_name", config.get("name", "llm"))
        path = params.get("model_path") or os.environ.get("LLM_MODEL_PATH", "")
        if not path or not os.path.isdir(path):
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: no model folder (parameter model_path={path!r}, "
                "or environment variable LLM_MODEL_PATH)"
            )
        device = params.get("device", "auto") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        try:
            # Filled in by stack.repository from the gateway's default: one value for both.
            self.default_max_tokens = int(params.get("default_max_tokens", ""))
        except ValueError:
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: parameter default_max_tokens is not a number: "
                "render the repository with `python -m stack.repository`"
            ) from None
        self.add_special_tokens = (params.get("add_special_tokens") or "false").lower() == "true"
        self.context_limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.vocab_size = int(self.model.config.vocab_size)

        labels = {"model": self.model_name}
        # Keep the families alive as long as their metrics (the backend insists).
        self.metric_families = tokens, cancelled = (
            pb_utils.MetricFamily(
                name="llm_generated_tokens_total",
                description="Tokens generated by the llm model",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
            pb_utils.MetricFamily(
                name="llm_cancelled_requests_total",
                description="Requests the llm model stopped because Triton cancelled them",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
        )
        self.tokens_metric = tokens.Metric(labels=labels)
        self.cancelled_metric = cancelled.Metric(labels=labels)
        pb_utils.Logger.log_info(f"{self.model_name}: loaded {path} on {self.device}")

    # ------------------------------------------------------------------ requests

    def _parse(self, request: Any) -> tuple[list[int], Sampling, list[str], bool, bool, str]:
        text = _scalar(request, "text_input")
        if text is None:
            raise BadRequest("text_input is required")
        max_tokens = _scalar(request, "max_tokens")
        max_tokens = self.default_max_tokens if max_tokens is None else int(max_tokens)
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
        s = Sampling(max_tokens=max_tokens)
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = _scalar(request, name)
            if value is not None:
                setattr(s, name, float(value))
        top_k = _scalar(request, "top_k")
        s.top_k = int(top_k) if top_k is not None else 0
        seed = _scalar(request, "seed")
        s.seed = int(seed) if seed is not None else None
        if s.temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {s.temperature}")
        if not 0 < s.top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {s.top_p}")
        if s.top_k < 0:
            raise BadRequest(f"top_k must be >= 0, got {s.top_k}")
        if s.repetition_penalty <= 0:
            raise BadRequest(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
        ids = self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]
        if not ids:
            raise BadRequest("text_input is empty after tokenization")
        if self.context_limit and len(ids) + max_tokens > self.context_limit:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.context_limit} tokens"
            )
        stream = bool(_scalar(request, "stream") or False)
        exclude = _scalar(request, "exclude_input_in_output")
        return ids, s, _strings(request, "stop_words"), stream, exclude is not False, text

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids, sampling, stops, stream, exclude, text = self._parse(request)
            except (BadRequest, ValueError, UnicodeDecodeError) as exc:
                sender.send(_error(str(exc)), flags=FINAL)
                continue
            try:
                self._generate(sender, ids, sampling, stops, stream, "" if exclude else text)
            except Exception as exc:  # keep serving other requests after one fails
                pb_utils.Logger.log_error(f"{self.model_name}: generation failed: {exc!r}")
                sender.send(_error(f"generation failed: {exc}"), flags=FINAL)
        return None

    # ------------------------------------------------------------------ generation

    def _next_token(
        self,
        logits: torch.Tensor,
        seen: torch.Tensor,
        counts: torch.Tensor,
        s: Sampling,
        generator: torch.Generator | None,
    ) -> int:
        if s.repetition_penalty != 1.0:
            # HF/CTRL semantics: over prompt and output, shrink positive logits, grow negative.
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
        if s.presence_penalty or s.frequency_penalty:
            # OpenAI semantics: over generated tokens only.
            logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)
        if s.temperature == 0 or s.top_k == 1:
            return int(torch.argmax(logits))
        logits = logits / s.temperature
        if 0 < s.top_k < logits.numel():
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= s.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _generate(self, sender: Any, ids: list[int], s: Sampling, stops: list[str], stream: bool, echo: str) -> None:
        generator = None
        if s.temperature != 0 and s.top_k != 1:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
        decoder = IncrementalDecoder(self.tokenizer)
        matcher = StopMatcher(stops)
        counts = torch.zeros(self.vocab_size, device=self.device)
        seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        seen[torch.tensor(ids, device=self.device)] = True
        cancelled = getattr(sender, "is_cancelled", None)

        pieces: list[str] = []  # the whole answer when not streaming
        last = ""  # text that goes out with the final response
        finish = "length"
        matched = False
        generated = 0
        past = None
        step_input = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            while generated < s.max_tokens:
                if cancelled is not None and cancelled():
                    self.cancelled_metric.increment(1)
                    sender.send(flags=FINAL)
                    return
                out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = self._next_token(out.logits[0, -1].float(), seen, counts, s, generator)
                generated += 1
                self.tokens_metric.increment(1)
                if token in self.eos_ids:
                    finish = "stop"
                    break
                counts[token] += 1
                seen[token] = True
                step_input = torch.tensor([[token]], device=self.device)
                piece, matched = matcher.feed(decoder.push(token))
                if matched:
                    last = piece
                    break
                if piece and stream:
                    sender.send(_response(piece))
                elif piece:
                    pieces.append(piece)
        if not matched:
            # The end of the text may still complete a stop string or an unfinished character.
            tail, matched = matcher.feed(decoder.flush())
            last = tail if matched else tail + matcher.flush()
        if matched:
            finish = "stop"
        if not stream:
            last = echo + "".join(pieces) + last
        sender.send(_response(last, finish, (len(ids), generated)), flags=FINAL)
