"""Triton Python-backend model: a Hugging Face causal LM that streams decoded text.

In-flight (continuous) batching with transformers' own ContinuousBatchingManager: execute()
queues each request and returns at once; the manager's generation thread runs one forward
pass per step for every active sequence, new requests join at the next step and finished
ones leave it (docs/llm-model.md). Each request keeps its own sampling settings and seeded
generator (``_Sampling``). At most ``max_batch_seqs`` requests are in the manager at once; the
rest wait here, unprefilled, and one that Triton cancels (the HTTP client went away) while it
waits is dropped without ever reaching the batch. Before every step the running requests
(and a few waiting ones, in turn) are checked for cancellation. The same per-row pass does constrained
decoding (an xgrammar matcher per request, its bitmask applied to its row only), logprobs
and min_tokens/ignore_eos. The incremental detokenizer and the stop-string matcher live
here, next to the loop, because the backend imports this file on its own.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

try:  # constrained decoding (the `model` extra); without it, guided requests are refused
    import xgrammar as xgr
except ImportError:  # pragma: no cover
    xgr = None

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
MAX_TOP_LOGPROBS = 20
# Waiting requests polled for cancellation per step, in turn (each poll is a round trip to
# Triton's process); every one is polled again right before it is admitted to the batch.
WAITING_POLLS_PER_STEP = 4


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
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


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


def _response(
    text: str,
    finish: str | None = None,
    counts: tuple[int, int] | None = None,
    logprobs: list[Any] | None = None,
) -> Any:
    outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
    if finish is not None:
        outputs.append(pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)))
    if counts is not None:
        outputs.append(pb_utils.Tensor("num_input_tokens", np.array([counts[0]], dtype=np.int32)))
        outputs.append(pb_utils.Tensor("num_output_tokens", np.array([counts[1]], dtype=np.int32)))
    if logprobs is not None:  # [ids, values, top values, top ids] of the tokens this response covers
        ids, values, top_values, top_ids = logprobs
        outputs.append(pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int32)))
        outputs.append(pb_utils.Tensor("output_log_probs", np.array(values, dtype=np.float32)))
        if top_values is not None:
            outputs.append(pb_utils.Tensor("output_top_log_probs", np.array(top_values, dtype=np.float32)))
            outputs.append(pb_utils.Tensor("output_top_log_prob_ids", np.array(top_ids, dtype=np.int32)))
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


def _xgrammar_reason(exc: Exception) -> str:
    """xgrammar's message without its C++ log prefix ("[12:00:00] /project/cpp/x.cc:12: Check failed: ...")."""
    text = str(exc).strip()
    text = re.sub(r"^\[[\d:.]+\]\s+\S+:\d+:\s*", "", text)
    text = re.sub(r"^Check failed: .*? is false:\s*", "", text)
    return text or type(exc).__name__


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
        grammar: Any = None,
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
        # Constrained decoding: this request's own matcher over the shared compiled grammar.
        self.guide: Any = xgr.GrammarMatcher(grammar) if grammar is not None else None
        # Logprobs: one pending (log_softmax row, top values, top ids) per step whose token is not
        # known yet (the library picks it after _Sampling), and what the next response carries.
        self.pending: deque[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = deque()
        self.out_ids: list[int] = []
        self.out_values: list[float] = []
        self.out_top_values: list[float] = []
        self.out_top_ids: list[int] = []
        # Whether _Sampling has anything to do on this request's row (else it costs nothing).
        self.touches_logits = (
            not self.plain_greedy or self.guide is not None or s.logprobs or s.ignore_eos or s.min_tokens > 0
        )

    def record_logprobs(self, logits: torch.Tensor) -> None:
        """Keep this step's raw log-probabilities until the library has picked the token."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if self.s.top_logprobs:
            top = torch.topk(logprobs, self.s.top_logprobs)
            self.pending.append((logprobs, top.values, top.indices))
        else:
            self.pending.append((logprobs, None, None))

    def add_logprob(self, token: int, entry: Any) -> None:
        self.out_ids.append(token)
        if entry is None:  # no row was seen for this token (cannot happen while it is live)
            self.out_values.append(float("nan"))
            self.out_top_values.extend([float("nan")] * self.s.top_logprobs)
            self.out_top_ids.extend([-1] * self.s.top_logprobs)
            return
        logprobs, top_values, top_ids = entry
        self.out_values.append(float(logprobs[token]))
        if top_values is not None and top_ids is not None:
            self.out_top_values.extend(top_values.tolist())
            self.out_top_ids.extend(top_ids.tolist())

    def take_logprobs(self) -> list[Any] | None:
        """The logprob tensors of the next response (the tokens since the last one), or None."""
        if not self.s.logprobs:
            return None
        out = [self.out_ids, self.out_values, self.out_top_values if self.s.top_logprobs else None, self.out_top_ids]
        self.out_ids, self.out_values, self.out_top_values, self.out_top_ids = [], [], [], []
        return out

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
    only prefill: that is where requests are polled for cancellation.
    """

    tensors_required = 0
    do_processing = True

    def __init__(self, model: TritonPythonModel) -> None:
        self.model = model
        self.supported_keys: dict[str, type] = {}
        self.ignored_keys: set[str] = set()
        self.rows: list[Any] = []  # RequestState of each logits row of the coming step
        self.bitmask: torch.Tensor | None = None  # xgrammar's token bitmask, one row per logits row
        self.bits: np.ndarray = np.zeros((0, 0), dtype=np.int32)  # the same memory, for numpy

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
        work = []  # (row, sequence, state) of the rows this step has anything to do on
        for i, state in enumerate(self.rows[: scores.shape[0]]):
            seq = live.get(state.request_id)
            if seq is not None and seq.touches_logits and not seq.failed:
                work.append((i, seq, state))
        if not work:
            return scores
        guided: list[int] = []
        for i, seq, _ in work:
            try:
                if seq.s.logprobs:
                    seq.record_logprobs(scores[i])  # raw: before penalties, temperature and masks
                mask_eos = seq.s.ignore_eos or seq.delivered < seq.s.min_tokens
                if seq.guide is not None and not seq.guide.is_terminated():
                    self._fill_bitmask(i, seq.guide, scores.shape[0], mask_eos)
                    guided.append(i)
                elif mask_eos:
                    scores[i].index_fill_(0, self.model.eos_index, float("-inf"))
            except Exception as exc:  # one request's failure must not stop the batch
                seq.failed = f"sampling failed: {exc}"
        if guided:
            self._apply_bitmask(scores, guided)
        for i, seq, state in work:
            if seq.plain_greedy or seq.failed:
                continue  # the library's argmax over the (masked) row is the pick
            try:
                scores[i] = seq.choose(scores[i], state.generated_tokens)
            except Exception as exc:  # one request's failure must not stop the batch
                seq.failed = f"sampling failed: {exc}"
        return scores

    def _fill_bitmask(self, row: int, guide: Any, rows: int, mask_eos: bool) -> None:
        """This request's allowed tokens into row ``row`` of the (CPU) bitmask."""
        if self.bitmask is None or self.bitmask.shape[0] < rows:
            self.bitmask = xgr.allocate_token_bitmask(max(rows, self.model.max_batch_seqs), self.model.vocab_size)
            self.bits = self.bitmask.numpy()
        guide.fill_next_token_bitmask(self.bitmask, row)
        if mask_eos:
            bits = self.bits[row]
            words, keep = self.model.eos_words, self.model.eos_keep
            saved = bits[words].copy()
            bits[words] &= keep
            if not bits.any():
                # The grammar allows nothing but its end: it wins over min_tokens/ignore_eos.
                bits[words] = saved

    def _apply_bitmask(self, scores: torch.Tensor, rows: list[int]) -> None:
        vocab = self.model.vocab_size
        if scores.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(scores, self.bitmask, vocab_size=vocab, indices=rows)
        else:  # filled on the CPU, applied on the device (no kernel to compile)
            bitmask = self.bitmask.to(scores.device, non_blocking=True)
            xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=vocab, indices=rows, backend="torch_native")


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
        self.eos_index = torch.tensor(sorted(eos_ids), dtype=torch.long, device=self.device)
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        self.vocab_size = (
            int(weight.shape[0]) if weight is not None else int(self.model.config.get_text_config().vocab_size)
        )
        # The EOS bits in a bitmask row: word index and the mask that clears them (min_tokens, ignore_eos).
        words: dict[int, int] = {}
        for token in eos_ids:
            words[token // 32] = words.get(token // 32, 0) | (1 << (token % 32))
        self.eos_words = np.array(sorted(words), dtype=np.int64)
        self.eos_keep = np.array([~words[w] & 0xFFFFFFFF for w in sorted(words)], dtype=np.uint32).view(np.int32)
        self.grammars: Any = None
        if xgr is not None:
            # One compiler (and compile cache) per model; one matcher per request. Its vocabulary is
            # the model's logits width, its stop tokens the library's EOS ids.
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(eos_ids) or None
            )
            self.grammars = xgr.GrammarCompiler(info, max_threads=max(1, min(threads, 8)))

        labels = {"model": self.model_name}
        # Keep the families alive as long as their metrics (the backend insists).
        self.metric_families = tokens, cancelled, admitted = (
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
            pb_utils.MetricFamily(
                name="llm_admitted_requests_total",
                description="Requests the llm model handed to its running batch (each is prefilled there)",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
        )
        self.tokens_metric = tokens.Metric(labels=labels)
        self.cancelled_metric = cancelled.Metric(labels=labels)
        self.admitted_metric = admitted.Metric(labels=labels)

        # Every request from execute() to its final response, by id; of those, the ones handed to the
        # manager (at most max_batch_seqs) and the others, FIFO, not prefilled yet. Changed under ``lock``
        # (execute() and the generation thread both admit).
        self.live: dict[str, Sequence] = {}
        self.running: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.RLock()
        self.poll_cursor = 0  # where the next step's cancellation poll of waiting requests starts
        self.closing = False
        self.restarting = False
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
        self.closing = True  # nothing more is admitted
        manager = getattr(self, "manager", None)
        if manager is not None and manager.is_running():
            manager.stop(block=True, timeout=30, hard_stop=True)
        for seq in list(getattr(self, "live", {}).values()):
            self._fail(seq, "the model is unloading")

    # ------------------------------------------------------------------ requests

    def _compile_guide(self, request: Any) -> Any:
        """The request's compiled grammar (xgrammar's cache makes a repeated guide free), or None."""
        kind = _scalar(request, "guided_decoding_guide_type")
        guide = _scalar(request, "guided_decoding_guide")
        if not kind:
            if guide:
                raise BadRequest("guided_decoding_guide: guided_decoding_guide_type is missing")
            return None
        kind = str(kind).strip().lower()
        if kind not in GUIDE_TYPES:
            raise BadRequest(f"guided_decoding_guide: unknown guide type {kind!r} (one of {', '.join(GUIDE_TYPES)})")
        if self.grammars is None:
            raise BadRequest("guided_decoding_guide: constrained decoding needs xgrammar in the model's Python")
        if kind != "json" and not guide:
            raise BadRequest(f"guided_decoding_guide: empty, but guide type {kind} needs one")
        try:
            if kind == "json":
                return self.grammars.compile_builtin_json_grammar()
            if kind == "json_schema":
                # Compact JSON (no free whitespace between tokens): a small model cannot wander off
                # into endless blank lines, and the text is what json.dumps would write.
                return self.grammars.compile_json_schema(guide, any_whitespace=False)
            if kind == "regex":
                return self.grammars.compile_regex(guide)
            return self.grammars.compile_grammar(guide)
        except Exception as exc:
            raise BadRequest(f"guided_decoding_guide: {_xgrammar_reason(exc)}") from None

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
        min_tokens = _scalar(request, "min_tokens")
        s.min_tokens = int(min_tokens) if min_tokens is not None else 0
        if not 0 <= s.min_tokens <= max_tokens:
            raise BadRequest(f"min_tokens must be in [0, max_tokens={max_tokens}], got {s.min_tokens}")
        s.ignore_eos = bool(_scalar(request, "ignore_eos") or False)
        s.logprobs = bool(_scalar(request, "return_log_probs") or False)
        top_logprobs = _scalar(request, "top_logprobs")
        s.top_logprobs = int(top_logprobs) if top_logprobs is not None and s.logprobs else 0
        if not 0 <= s.top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {s.top_logprobs}")
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
                # Compiled here, on Triton's thread: a few ms (cached after), the batch keeps decoding.
                grammar = self._compile_guide(request)
            except (BadRequest, ValueError, UnicodeDecodeError) as exc:
                sender.send(_error(str(exc)), flags=FINAL)
                continue
            rid = f"r{next(self.next_id)}"
            seq = Sequence(
                rid, sender, ids, sampling, stops, stream, "" if exclude else text, self.tokenizer, self.device, grammar
            )
            with self.lock:
                self.live[rid] = seq
                self.waiting.append(seq)
        self._admit()
        return None

    def _admit(self) -> None:
        """Hand waiting requests to the manager, oldest first, while the batch has room. Each is polled
        for cancellation right before: one whose client has gone is dropped here, never prefilled."""
        with self.lock:
            while self.waiting and len(self.running) < self.max_batch_seqs and not self.closing:
                seq = self.waiting.popleft()
                if seq.rid not in self.live:
                    continue  # answered already
                if seq.is_cancelled is not None and seq.is_cancelled():
                    self._drop(seq)
                    continue
                self.running[seq.rid] = seq
                try:
                    if not self.manager.is_running():
                        pb_utils.Logger.log_error(f"{self.model_name}: the generation loop had stopped; restarting it")
                        with torch.inference_mode():
                            self.manager.start()
                    queued = self.manager.add_request(
                        seq.ids,
                        request_id=seq.rid,
                        max_new_tokens=seq.s.max_tokens,
                        streaming=True,
                        eos_token_id=sorted(self.eos_ids) or -1,
                    )
                    if queued is None:  # the loop is stopping (a fatal error): admitted again once restarted
                        self.running.pop(seq.rid, None)
                        self.waiting.appendleft(seq)
                        self._restart_later()
                        return
                    self.admitted_metric.increment(1)
                except Exception as exc:
                    pb_utils.Logger.log_error(f"{self.model_name}: could not queue a request: {exc!r}")
                    self._fail(seq, f"generation failed: {exc}")

    # ------------------------------------------------------------------ generation thread

    def poll_cancellations(self) -> None:
        """Before each step: drop the requests whose client went away. Each poll is a round trip to
        Triton's process, so: every running one (at most max_batch_seqs), and a few waiting ones in
        turn (a waiting one costs nothing but its place in the queue, and is polled again right
        before it is admitted). Dropped ones make room: the queue's head is admitted at once."""
        dropped = False
        for seq in list(self.running.values()):
            if seq.is_cancelled is not None and seq.is_cancelled():
                dropped = self._drop(seq) or dropped
        if self.waiting:
            waiting = list(self.waiting)  # execute() appends meanwhile
            start = self.poll_cursor if self.poll_cursor < len(waiting) else 0
            polled = waiting[start : start + WAITING_POLLS_PER_STEP]
            self.poll_cursor = start + len(polled)
            for seq in polled:
                if seq.is_cancelled is not None and seq.is_cancelled():
                    self._drop(seq)
        if dropped:
            self._admit()

    def _drop(self, seq: Sequence) -> bool:
        """Forget a request that Triton cancelled, count it and close its stream. A running one is
        cancelled in the manager (gone at the next step); a waiting one never reaches it. True if it
        was running."""
        with self.lock:
            if self.live.pop(seq.rid, None) is None:
                return False
            running = self.running.pop(seq.rid, None) is not None
            if running:
                self.manager.cancel_request(seq.rid)
            elif seq in self.waiting:  # else _admit has just taken it off the queue
                self.waiting.remove(seq)
        self.cancelled_metric.increment(1)
        try:
            seq.sender.send(flags=FINAL)
        except Exception as exc:
            pb_utils.Logger.log_warn(f"{self.model_name}: final response after cancellation: {exc!r}")
        return running

    def _take(self, seq: Sequence) -> bool:
        """Take a request off the live ones (its slot in the batch is free); False if it was gone already."""
        with self.lock:
            if self.live.pop(seq.rid, None) is None:
                return False
            self.running.pop(seq.rid, None)
            return True

    def _fail(self, seq: Any, message: str) -> None:
        if not self._take(seq):
            return
        try:
            seq.sender.send(_error(message), flags=FINAL)
        except Exception as exc:
            pb_utils.Logger.log_warn(f"{self.model_name}: error response not sent: {exc!r}")

    def _deliver_batch(self, outputs: list[Any]) -> None:
        for output in outputs:
            self._deliver_one(output)
        self._admit()  # into the slots that finished requests left: they join at the next step

    def _deliver(self, output: Any) -> None:
        """The library's path for a failed request (a fatal error fails them all and stops its loop)."""
        self._deliver_one(output)
        if self.manager.background_thread_status.can_accept_new_requests() is None:
            self._admit()
        else:
            self._restart_later()

    def _restart_later(self) -> None:
        """Once the stopping generation loop has ended, restart it for the waiting requests (``_admit``)."""
        if self.closing or self.restarting:
            return
        self.restarting = True

        def restart() -> None:
            thread = getattr(self.manager, "_generation_thread", None)
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=60)
            self.restarting = False
            self._admit()

        threading.Thread(target=restart, name=f"{self.model_name}-restart", daemon=True).start()

    def _deliver_one(self, output: Any) -> None:
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
        # One pending logprob row per step, oldest first: the rows of exactly these tokens.
        entries = [seq.pending.popleft() if seq.pending else None for _ in new] if seq.s.logprobs else None
        finish = "length"
        matched = False
        ended = False  # the grammar is complete: the library does not know, it must be cancelled
        last = ""  # text that goes out with the final response
        used = 0
        for n, token in enumerate(new):
            used += 1
            if entries is not None:
                seq.add_logprob(token, entries[n])
            guide = seq.guide
            if guide is not None and not guide.is_terminated() and not guide.accept_token(token):
                raise RuntimeError(f"the grammar rejected token {token}")
            if token in self.eos_ids:
                finish, finished = "stop", True
                break
            piece, matched = seq.matcher.feed(seq.decoder.push(token))
            if matched:
                last = piece
                break
            if guide is not None and guide.is_terminated():
                ended = True
                last = piece
                break
            if piece and seq.stream:
                seq.sender.send(_response(piece, logprobs=seq.take_logprobs()))
            elif piece:
                seq.pieces.append(piece)
        self.tokens_metric.increment(used)
        if not (finished or matched or ended):
            return
        if not matched:
            # The end of the text may still complete a stop string or an unfinished character.
            tail, matched = seq.matcher.feed(seq.decoder.flush())
            last = last + tail if matched else last + tail + seq.matcher.flush()
        if matched or ended:
            finish = "stop"
            if not finished:
                self.manager.cancel_request(seq.rid)  # frees its slot and cache at the next step
        if not seq.stream:
            last = seq.echo + "".join(seq.pieces) + last
        generated = len(tokens) - len(new) + used
        if self._take(seq):
            seq.sender.send(_response(last, finish, (len(seq.ids), generated), seq.take_logprobs()), flags=FINAL)
