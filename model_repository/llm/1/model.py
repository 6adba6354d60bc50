"""Triton Python-backend model: a Hugging Face causal LM that streams decoded text.

In-flight (continuous) batching with transformers' own ContinuousBatchingManager: execute()
queues each request and returns at once; the manager's generation thread runs one forward
pass per step for every active sequence, new requests join at the next step and finished
ones leave it (docs/llm-model.md). Each request keeps its own sampling settings and seeded
generator (``_Sampling``), and before every step all live requests are checked for
cancellation by Triton (the HTTP client went away). The incremental detokenizer and the
stop-string matcher live here, next to the loop, because the backend imports this file on
its own.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

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


# --------------------------------------------------------------------------- settings


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 on the CPU (bf16 measured no faster there: docs/llm-model.md)."""
    setting = (setting or "auto").lower()
    if setting != "auto":
        if setting not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {setting!r}")
        return DTYPES[setting]
    return torch.float16 if device.type == "cuda" else torch.float32


def _positive_int(params: dict[str, str], name: str, default: int) -> int:
    raw = params.get(name) or ""
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"parameter {name} is not a whole number: {raw!r}") from None
    if value < 1:
        raise ValueError(f"parameter {name} must be at least 1, got {value}")
    return value


# --------------------------------------------------------------------------- one request


class Sequence:
    """One request on the generation side: its sampling state, its text, and its response sender."""

    def __init__(
        self,
        rid: str,
        sender: Any,
        ids: list[int],
        s: Sampling,
        stops: list[str],
        stream: bool,
        echo: str,
        tokenizer: Any,
        device: torch.device,
    ) -> None:
        self.rid = rid
        self.sender = sender
        self.ids = ids
        self.s = s
        self.stream = stream
        self.echo = echo
        self.is_cancelled = getattr(sender, "is_cancelled", None)
        self.greedy = s.temperature == 0 or s.top_k == 1
        self.penalised = s.repetition_penalty != 1.0 or bool(s.presence_penalty) or bool(s.frequency_penalty)
        self.plain_greedy = self.greedy and not self.penalised  # the library's own argmax does it all
        self.generator: torch.Generator | None = None
        if not self.greedy:
            # One generator per request: its draws do not depend on what else is in the batch.
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
        self.device = device
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stops)
        self.seen: torch.Tensor | None = None  # prompt and output tokens (repetition penalty)
        self.counts: torch.Tensor | None = None  # output tokens (presence/frequency penalties)
        self.counted = 0  # output tokens already in ``counts``
        self.delivered = 0  # output tokens already turned into text
        self.pieces: list[str] = []  # the whole answer when not streaming
        self.failed: str | None = None

    def choose(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """This request's row of logits made so that its argmax is the token it picks."""
        s = self.s
        if self.penalised:
            if self.seen is None or self.counts is None:
                self.seen = torch.zeros(logits.numel(), dtype=torch.bool, device=self.device)
                self.seen[torch.tensor(self.ids, device=self.device)] = True
                self.counts = torch.zeros(logits.numel(), device=self.device)
            new = generated[self.counted :]
            if new:
                index = torch.tensor(new, device=self.device)
                self.counts.index_add_(0, index, torch.ones(len(new), device=self.device))
                self.seen[index] = True
                self.counted = len(generated)
            if s.repetition_penalty != 1.0:
                # HF/CTRL semantics: over prompt and output, shrink positive logits, grow negative.
                penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
                logits = torch.where(self.seen, penalised, logits)
            if s.presence_penalty or s.frequency_penalty:
                # OpenAI semantics: over generated tokens only.
                logits = logits - s.frequency_penalty * self.counts - s.presence_penalty * (self.counts > 0)
        if self.greedy:
            return logits
        logits = logits / s.temperature
        if 0 < s.top_k < logits.numel():
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(dim=-1) - probs >= s.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator)
        # No host sync: the pick becomes the row's only finite logit, and the library's argmax takes it.
        return torch.full_like(logits, float("-inf")).index_fill_(0, token, 0.0)


class _Sampling:
    """Stands in for transformers' ContinuousBatchingLogitsProcessorList (same duck type).

    The library samples with one setting for the whole batch; this applies each request's own
    penalties, temperature, top-k/top-p and seeded generator to its row, on the generation thread,
    once per step. ``prepare_tensor_args`` runs before every forward pass, also for steps that
    only prefill: that is where live requests are polled for cancellation.
    """

    tensors_required = 0
    do_processing = True

    def __init__(self, model: TritonPythonModel) -> None:
        self.model = model
        self.supported_keys: dict[str, type] = {}
        self.ignored_keys: set[str] = set()
        self.rows: list[Any] = []  # RequestState of each logits row of the coming step

    def check_kwargs(self, kwargs: dict[str, Any]) -> None:
        return None

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        return None

    def prepare_tensor_args(self, requests_in_batch: list[Any], arg_storage: torch.Tensor) -> torch.Tensor:
        self.model.poll_cancellations()
        self.rows = [future.state for future in requests_in_batch if future.has_new_token]
        return arg_storage

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        live = self.model.live
        for i, state in enumerate(self.rows[: scores.shape[0]]):
            seq = live.get(state.request_id)
            if seq is None or seq.plain_greedy or seq.failed:
                continue
            try:
                scores[i] = seq.choose(scores[i], state.generated_tokens)
            except Exception as exc:  # one request's failure must not stop the batch
                seq.failed = f"sampling failed: {exc}"
        return scores


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
        try:
            # Filled in by stack.repository from the gateway's default: one value for both.
            self.default_max_tokens = int(params.get("default_max_tokens", ""))
        except ValueError:
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: parameter default_max_tokens is not a number: "
                "render the repository with `python -m stack.repository`"
            ) from None
        try:
            dtype = resolve_dtype(params.get("dtype", ""), self.device)
            self.max_batch_seqs = _positive_int(params, "max_batch_seqs", 16)
            kv_cache_mb = _positive_int(params, "kv_cache_mb", 512)
            # Every core by default: measured on an idle 2-core machine, 2 threads gave 26 tok/s at
            # c=1 and 134 at c=16 against 16 and 64 with 1. On a machine busy with other work an
            # OpenMP team stalls when one of its threads loses its core: then set fewer.
            threads = _positive_int(params, "cpu_threads", len(os.sched_getaffinity(0)))
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"model {self.model_name}: {exc}") from None
        self.add_special_tokens = (params.get("add_special_tokens") or "false").lower() == "true"
        if self.device.type == "cpu":
            torch.set_num_threads(threads)

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # sdpa is paged under continuous batching (flash when installed, on CUDA: the library switches).
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        self.model = self.model.to(self.device).eval()
        self.context_limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids

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

        self.live: dict[str, Sequence] = {}  # request id -> its sequence, from add_request to its final response
        self.next_id = itertools.count()
        self.kv_tokens = self._start_batching(kv_cache_mb, dtype)
        pb_utils.Logger.log_info(
            f"{self.model_name}: loaded {path} on {self.device} ({dtype}); continuous batching of up to "
            f"{self.max_batch_seqs} sequences, KV cache {kv_cache_mb} MB ({self.kv_tokens} tokens), "
            f"{torch.get_num_threads()} CPU threads"
        )

    def _start_batching(self, kv_cache_mb: int, dtype: torch.dtype) -> int:
        """Start transformers' continuous batching; returns how many tokens the KV cache holds."""
        text = self.model.config.get_text_config()
        layers = int(text.num_hidden_layers)
        heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        bytes_per_token = 2 * layers * heads * head_dim * torch.finfo(dtype).bits // 8
        page = 64  # tokens per cache page: small pages waste little on short requests
        num_blocks = max(2, kv_cache_mb * 2**20 // (bytes_per_token * page))
        generation = GenerationConfig(
            do_sample=False,  # argmax over rows that _Sampling has already decided
            max_new_tokens=self.default_max_tokens,
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=page,
            num_blocks=num_blocks,
            max_batch_tokens=512,  # prompt tokens per step: a long prompt is prefilled in chunks beside decodes
            max_requests_per_batch=self.max_batch_seqs,
            # Per-request Python sampling runs every step: no CUDA graphs, no compile, no one-step-ahead batching.
            use_cuda_graph=False,
            use_async_batching=False,
            default_compile_level=0,
            max_memory_percent=1.0,
        )
        self.manager = self.model.init_continuous_batching(generation, continuous_batching_config=cb_config)
        self.sampling = _Sampling(self)
        self.manager.logit_processor = self.sampling  # type: ignore[assignment]
        router = self.manager.output_router
        router.deliver = self._deliver  # type: ignore[method-assign]
        router.deliver_batch = self._deliver_batch  # type: ignore[method-assign]
        with torch.inference_mode():
            self.manager.start()
        return num_blocks * page

    def finalize(self) -> None:
        manager = getattr(self, "manager", None)
        if manager is not None and manager.is_running():
            manager.stop(block=True, timeout=30, hard_stop=True)
        for seq in list(getattr(self, "live", {}).values()):
            self._fail(seq, "the model is unloading")

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
        if len(ids) + max_tokens > self.kv_tokens:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the KV cache of "
                f"{self.kv_tokens} tokens (parameter kv_cache_mb)"
            )
        stream = bool(_scalar(request, "stream") or False)
        exclude = _scalar(request, "exclude_input_in_output")
        return ids, s, _strings(request, "stop_words"), stream, exclude is not False, text

    def execute(self, requests: list[Any]) -> None:
        """Queue each request for the running batch and return at once (decoupled: the generation
        thread sends the responses)."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids, sampling, stops, stream, exclude, text = self._parse(request)
            except (BadRequest, ValueError, UnicodeDecodeError) as exc:
                sender.send(_error(str(exc)), flags=FINAL)
                continue
            rid = f"r{next(self.next_id)}"
            seq = Sequence(
                rid, sender, ids, sampling, stops, stream, "" if exclude else text, self.tokenizer, self.device
            )
            self.live[rid] = seq
            try:
                if not self.manager.is_running():
                    pb_utils.Logger.log_error(f"{self.model_name}: the generation loop had stopped; restarting it")
                    with torch.inference_mode():
                        self.manager.start()
                self.manager.add_request(
                    ids,
                    request_id=rid,
                    max_new_tokens=sampling.max_tokens,
                    streaming=True,
                    eos_token_id=sorted(self.eos_ids) or -1,
                )
            except Exception as exc:
                pb_utils.Logger.log_error(f"{self.model_name}: could not queue a request: {exc!r}")
                self._fail(seq, f"generation failed: {exc}")
        return None

    # ------------------------------------------------------------------ generation thread

    def poll_cancellations(self) -> None:
        """Drop every live request whose client went away (running or still queued): before each step."""
        for seq in list(self.live.values()):
            if seq.is_cancelled is not None and seq.is_cancelled():
                if self.live.pop(seq.rid, None) is None:
                    continue
                self.manager.cancel_request(seq.rid)
                self.cancelled_metric.increment(1)
                try:
                    seq.sender.send(flags=FINAL)
                except Exception as exc:
                    pb_utils.Logger.log_warn(f"{self.model_name}: final response after cancellation: {exc!r}")

    def _fail(self, seq: Any, message: str) -> None:
        if self.live.pop(seq.rid, None) is None:
            return
        try:
            seq.sender.send(_error(message), flags=FINAL)
        except Exception as exc:
            pb_utils.Logger.log_warn(f"{self.model_name}: error response not sent: {exc!r}")

    def _deliver_batch(self, outputs: list[Any]) -> None:
        for output in outputs:
            self._deliver(output)

    def _deliver(self, output: Any) -> None:
        """Called by the library on its generation thread with a request's tokens so far."""
        seq = self.live.get(output.request_id)
        if seq is None:
            return  # cancelled or finished already
        try:
            if output.error is not None or seq.failed:
                pb_utils.Logger.log_error(f"{self.model_name}: generation failed: {output.error or seq.failed}")
                self._fail(seq, f"generation failed: {output.error or seq.failed}")
                if not output.is_finished():
                    self.manager.cancel_request(seq.rid)
                return
            self._advance(seq, output.generated_tokens, output.is_finished())
        except Exception as exc:  # keep the batch going whatever one request does
            pb_utils.Logger.log_error(f"{self.model_name}: generation failed: {exc!r}")
            self._fail(seq, f"generation failed: {exc}")
            self.manager.cancel_request(seq.rid)

    def _advance(self, seq: Sequence, tokens: list[int], finished: bool) -> None:
        new = tokens[seq.delivered :]
        seq.delivered = len(tokens)
        finish = "length"
        matched = False
        last = ""  # text that goes out with the final response
        used = 0
        for token in new:
            used += 1
            if token in self.eos_ids:
                finish, finished = "stop", True
                break
            piece, matched = seq.matcher.feed(seq.decoder.push(token))
            if matched:
                last = piece
                break
            if piece and seq.stream:
                seq.sender.send(_response(piece))
            elif piece:
                seq.pieces.append(piece)
        self.tokens_metric.increment(used)
        if not (finished or matched):
            return
        if not matched:
            # The end of the text may still complete a stop string or an unfinished character.
            tail, matched = seq.matcher.feed(seq.decoder.flush())
            last = tail if matched else tail + seq.matcher.flush()
        if matched:
            finish = "stop"
            if not finished:
                self.manager.cancel_request(seq.rid)  # frees its slot and cache at the next step
        if not seq.stream:
            last = seq.echo + "".join(seq.pieces) + last
        generated = len(tokens) - len(new) + used
        if self.live.pop(seq.rid, None) is not None:
            seq.sender.send(_response(last, finish, (len(seq.ids), generated)), flags=FINAL)
