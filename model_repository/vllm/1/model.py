"""Triton Python-backend model: vLLM's engine with in-flight batching, same tensors as ``llm``.

vLLM's ``AsyncLLM`` runs on an asyncio loop in a thread of this stub; its engine core
(scheduler, paged KV cache, the model) runs in a child process. ``execute`` only parses
and hands each request to the loop, so requests join the running batch at the next step
and leave it when done. A watcher polls every live request's ``is_cancelled()`` (queued
ones too) and cancels its task, which aborts it in the engine within one step; a request
already cancelled when its task starts never reaches the engine.

Guided decoding (``guided_decoding_guide_type`` / ``guided_decoding_guide``: json,
json_schema, regex, ebnf_grammar) runs on vLLM's xgrammar backend; logprobs
(``return_log_probs``, ``top_logprobs``) are vLLM's raw ones (before temperature and
penalties), sent as ``output_ids`` / ``output_log_probs`` / ``output_top_log_probs`` /
``output_top_log_prob_ids`` with the text of the tokens they cover.

Runs in vLLM's own venv (``python -m stack.engines vllm``): Triton starts the stub with
that interpreter (``stack.triton_native --python``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import sys
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.02  # within one decode step (~10-40 ms on a CPU)
MAX_TOP_LOGPROBS = 20  # the engine's max_logprobs
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
GUIDE = "guided_decoding_guide: "  # the prefix of every error about the guide
LOGPROB_FLOOR = -9999.0  # for -inf (a token a guide forbids), as OpenAI and vLLM's server: JSON has no -inf


class BadRequest(ValueError):
    """The request cannot be served as sent; the message goes back to the client."""


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


def _finite(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR) if not math.isnan(logprob) else LOGPROB_FLOOR


@dataclass
class Logprobs:
    """Per-token logprobs not sent yet: the chosen token's and its top k alternatives."""

    k: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)

    def add(self, token_ids: list[int], entries: Any) -> None:
        """One entry per token (vLLM's dict token id -> Logprob: the chosen token plus the top k)."""
        for i, token in enumerate(token_ids):
            entry = entries[i] if entries is not None and i < len(entries) else None
            chosen = entry.get(token) if entry else None
            self.ids.append(int(token))
            self.logprobs.append(_finite(chosen.logprob) if chosen is not None else LOGPROB_FLOOR)
            if self.k:
                ranked = sorted((entry or {}).items(), key=lambda item: -item[1].logprob)[: self.k]
                ranked += [(-1, None)] * (self.k - len(ranked))  # never seen: vLLM always gives k
                self.top_ids.extend(int(t) for t, _ in ranked)
                self.top_logprobs.extend(_finite(lp.logprob) if lp is not None else LOGPROB_FLOOR for _, lp in ranked)

    def take(self) -> list[Any]:
        """The tensors for the tokens gathered so far (none when there are none), and forget them."""
        if not self.ids:
            return []
        tensors = [
            pb_utils.Tensor("output_ids", np.array(self.ids, dtype=np.int32)),
            pb_utils.Tensor("output_log_probs", np.array(self.logprobs, dtype=np.float32)),
        ]
        if self.k:
            tensors.append(pb_utils.Tensor("output_top_log_probs", np.array(self.top_logprobs, dtype=np.float32)))
            tensors.append(pb_utils.Tensor("output_top_log_prob_ids", np.array(self.top_ids, dtype=np.int32)))
        self.ids, self.logprobs, self.top_logprobs, self.top_ids = [], [], [], []
        return tensors


def _response(
    text: str, finish: str | None = None, counts: tuple[int, int] | None = None, extra: list[Any] | None = None
) -> Any:
    outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
    if finish is not None:
        outputs.append(pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)))
    if counts is not None:
        outputs.append(pb_utils.Tensor("num_input_tokens", np.array([counts[0]], dtype=np.int32)))
        outputs.append(pb_utils.Tensor("num_output_tokens", np.array([counts[1]], dtype=np.int32)))
    outputs.extend(extra or [])
    return pb_utils.InferenceResponse(output_tensors=outputs)


def _error(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _guide(guide_type: str, guide: str) -> Any:
    """vLLM's StructuredOutputsParams for a guide; BadRequest (naming the guide) when it is unusable."""
    from vllm.exceptions import VLLMError
    from vllm.sampling_params import StructuredOutputsParams

    fields: dict[str, Any]
    if guide_type == "json":  # any JSON object, as vLLM's (and OpenAI's) json_object
        fields = {"json_object": True}
    elif guide_type == "json_schema":
        if not guide.strip():
            raise BadRequest(f"{GUIDE}a json_schema guide needs the schema")
        try:
            schema = json.loads(guide)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{GUIDE}the schema is not valid JSON ({exc})") from None
        fields = {"json": schema if isinstance(schema, dict) else guide}
    elif guide_type == "regex":
        fields = {"regex": guide}
    elif guide_type == "ebnf_grammar":
        fields = {"grammar": guide}
    else:
        raise BadRequest(f"{GUIDE}unknown guided_decoding_guide_type {guide_type!r} (one of {', '.join(GUIDE_TYPES)})")
    try:
        return StructuredOutputsParams(**fields)
    except (VLLMError, ValueError, TypeError) as exc:
        raise BadRequest(f"{GUIDE}{exc}") from None


def _reason(exc: BaseException) -> str:
    """vLLM's message, with the parser's own where vLLM only says the guide is invalid."""
    message = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in message:
        message = f"{message} {cause}"
    # xgrammar prefixes its errors with a time and its C++ source line: "[23:09:13] /project/cpp/x.cc:83: ".
    return re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", message).strip()


@dataclass
class Job:
    """One parsed request."""

    ids: list[int]
    sampling: Any
    stream: bool
    echo: str
    top_logprobs: int | None  # None: no logprobs asked for
    guided: bool


@dataclass
class Live:
    """One request in flight: its sender and the task that streams it."""

    sender: Any
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    pieces: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- model


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        if int(np.__version__.split(".")[0]) >= 2 and os.environ.get("LLM_ALLOW_NUMPY2") != "1":
            raise pb_utils.TritonModelException(
                f"numpy {np.__version__} in the stub's Python ({sys.prefix}): this Triton's Python backend "
                "needs numpy<2; reinstall the engine venv (python -m stack.engines vllm)"
            )
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = args.get("model_name", config.get("name", "vllm"))
        path = params.get("model_path") or os.environ.get("LLM_MODEL_PATH", "")
        if not path or not os.path.isdir(path):
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: no model folder (parameter model_path={path!r}, "
                "or environment variable LLM_MODEL_PATH)"
            )
        if params.get("device", "auto") == "cuda":
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: the vllm template runs vLLM's CPU build; on a GPU use the "
                "llm template (stack_llm_engine: llm) or TensorRT-LLM"
            )
        try:
            self.default_max_tokens = int(params.get("default_max_tokens", ""))
            max_num_seqs = int(params.get("max_num_seqs") or 16)
            kv_cache_gb = float(params.get("kv_cache_gb") or 1)
            max_model_len = int(params["max_model_len"]) if params.get("max_model_len") else None
        except ValueError as exc:
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: a numeric parameter is not a number ({exc}); "
                "render the repository with `python -m stack.repository`"
            ) from None
        dtype = params.get("dtype") or "auto"
        if dtype == "auto":
            # bf16 halves memory traffic where the CPU computes it natively; else full precision.
            dtype = "bfloat16" if _cpu_has_bf16() else "float32"
        self.add_special_tokens = (params.get("add_special_tokens") or "false").lower() == "true"

        # vLLM reads these when the engine starts; the engine-core child inherits them.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gb)))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if os.environ.get("STACK_CACHE"):
            # Keep torch.compile's artefacts with the stack's other caches (a second start is quicker).
            os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(os.environ["STACK_CACHE"], "vllm"))
        import locale
        import multiprocessing

        # The stub never calls setlocale, so open() would read files as ASCII; torch's
        # inductor templates (imported by vLLM) are UTF-8. Take the environment's locale.
        locale.setlocale(locale.LC_CTYPE, "")

        # The engine core is a spawned child: it must start the venv's python, not this stub.
        python = os.path.join(os.environ.get("VIRTUAL_ENV", sys.prefix), "bin", "python")
        multiprocessing.set_executable(python if os.path.exists(python) else (shutil.which("python3") or python))

        from transformers import AutoTokenizer
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        engine_args = AsyncEngineArgs(
            model=path,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            disable_log_stats=True,
            # Guides: xgrammar, as the llm model, so every engine constrains alike (no fallback);
            # compact JSON like the llm model: small models otherwise wander into whitespace.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            # Logprobs: up to 20 alternatives, before temperature and penalties (OpenAI's limit).
            max_logprobs=MAX_TOP_LOGPROBS,
            logprobs_mode="raw_logprobs",
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self.thread.start()

        async def start() -> Any:
            return AsyncLLM.from_engine_args(engine_args)

        self.engine = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        self.context_limit = int(self.engine.model_config.max_model_len)
        self.live: dict[str, Live] = {}
        self.watcher = asyncio.run_coroutine_threadsafe(self._watch_cancellations(), self.loop)

        labels = {"model": self.model_name}
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
        pb_utils.Logger.log_info(
            f"{self.model_name}: vLLM engine on {path} ({dtype}, max_num_seqs={max_num_seqs}, "
            f"kv cache {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB, context {self.context_limit})"
        )

    # ------------------------------------------------------------------ requests

    def _parse(self, request: Any) -> Job:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMError
        from vllm.sampling_params import RequestOutputKind

        text = _scalar(request, "text_input")
        if text is None:
            raise BadRequest("text_input is required")
        max_tokens = _scalar(request, "max_tokens")
        max_tokens = self.default_max_tokens if max_tokens is None else int(max_tokens)
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
        fields: dict[str, Any] = {}
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = _scalar(request, name)
            if value is not None:
                fields[name] = float(value)
        top_k = _scalar(request, "top_k")
        seed = _scalar(request, "seed")
        temperature = fields.get("temperature", 1.0)
        top_p = fields.get("top_p", 1.0)
        if temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and int(top_k) < 0:
            raise BadRequest(f"top_k must be >= 0, got {top_k}")
        if fields.get("repetition_penalty", 1.0) <= 0:
            raise BadRequest(f"repetition_penalty must be > 0, got {fields['repetition_penalty']}")
        guide_type = (_scalar(request, "guided_decoding_guide_type") or "").strip()
        guide = _scalar(request, "guided_decoding_guide") or ""
        if guide_type:
            fields["structured_outputs"] = _guide(guide_type, guide)
        elif guide:
            raise BadRequest(f"{GUIDE}sent without guided_decoding_guide_type ({', '.join(GUIDE_TYPES)})")
        top_logprobs: int | None = None
        if _scalar(request, "return_log_probs"):
            top_logprobs = int(_scalar(request, "top_logprobs") or 0)
            if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
                raise BadRequest(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
            fields["logprobs"] = top_logprobs  # vLLM adds the chosen token to these
        min_tokens = _scalar(request, "min_tokens")
        if min_tokens is not None:
            if not 0 <= int(min_tokens) <= max_tokens:
                raise BadRequest(f"min_tokens must be in 0..max_tokens ({max_tokens}), got {min_tokens}")
            fields["min_tokens"] = int(min_tokens)
        fields["ignore_eos"] = bool(_scalar(request, "ignore_eos") or False)
        ids = self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]
        if not ids:
            raise BadRequest("text_input is empty after tokenization")
        if len(ids) + max_tokens > self.context_limit:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.context_limit} tokens"
            )
        try:
            sampling = SamplingParams(
                max_tokens=max_tokens,
                top_k=int(top_k) if top_k else 0,  # 0: all tokens, as in the llm model
                seed=int(seed) if seed is not None else None,
                stop=[s for s in _strings(request, "stop_words") if s] or None,
                output_kind=RequestOutputKind.DELTA,
                skip_special_tokens=True,
                **fields,
            )
        except (VLLMError, ValueError, TypeError) as exc:  # vLLM's own validation, e.g. penalties out of range
            raise BadRequest(str(exc)) from None
        stream = bool(_scalar(request, "stream") or False)
        exclude = _scalar(request, "exclude_input_in_output")
        echo = "" if exclude is not False else text
        return Job(ids, sampling, stream, echo, top_logprobs, guided="structured_outputs" in fields)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._parse(request)
            except (BadRequest, ValueError, UnicodeDecodeError) as exc:
                sender.send(_error(str(exc)), flags=FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._start(sender, job), self.loop)
        return None

    # ------------------------------------------------------------------ on the loop

    async def _start(self, sender: Any, job: Job) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if sender.is_cancelled():  # the client left while the request waited for the loop
            self.cancelled_metric.increment(1)
            sender.send(flags=FINAL)
            return
        rid = uuid.uuid4().hex
        live = Live(sender)
        self.live[rid] = live
        live.task = asyncio.current_task()
        try:
            await self._generate(rid, live, job)
        except asyncio.CancelledError:
            # generate() aborts the request in the engine before re-raising, except when cancelled
            # while still adding it (its output queue not made yet): abort it by our id then too.
            try:
                await self.engine.abort(rid)
            except Exception as exc:
                pb_utils.Logger.log_warn(f"{self.model_name}: abort after cancellation: {exc!r}")
            self.cancelled_metric.increment(1)
            sender.send(flags=FINAL)
        except VLLMClientError as exc:  # refused by vLLM's input processor, e.g. a guide it cannot parse
            prefix = GUIDE if job.guided and not _reason(exc).startswith(GUIDE) else ""
            sender.send(_error(prefix + _reason(exc)), flags=FINAL)
        except Exception as exc:  # one failed request must not stop the others
            if job.guided and not isinstance(exc, EngineDeadError) and isinstance(exc.__cause__, ValueError):
                sender.send(_error(GUIDE + _reason(exc.__cause__)), flags=FINAL)
                return
            pb_utils.Logger.log_error(f"{self.model_name}: generation failed: {exc!r}")
            sender.send(_error(f"generation failed: {exc}"), flags=FINAL)
        finally:
            self.live.pop(rid, None)

    async def _generate(self, rid: str, live: Live, job: Job) -> None:
        from vllm.inputs import TokensPrompt

        ids, stream = job.ids, job.stream
        generated = 0
        finish = "length"
        # Logprobs wait here until the response that carries their tokens' text (a token whose
        # text is held back, e.g. a partial character or a possible stop string, goes with a later one).
        logprobs = Logprobs(job.top_logprobs) if job.top_logprobs is not None else None
        prompt = TokensPrompt(prompt_token_ids=ids)
        async for out in self.engine.generate(prompt, job.sampling, request_id=rid):
            choice = out.outputs[0]
            generated += len(choice.token_ids)
            self.tokens_metric.increment(len(choice.token_ids))
            if logprobs is not None:
                logprobs.add(list(choice.token_ids), choice.logprobs)
            if out.finished:
                if choice.finish_reason == "error" and job.guided:  # xgrammar could not compile the guide
                    live.sender.send(_error(f"{GUIDE}vLLM could not compile it (see Triton's log)"), flags=FINAL)
                    return
                # "length" also when max_tokens ran out before a guide's grammar completed.
                finish = "stop" if choice.finish_reason == "stop" else "length"
                text = choice.text if stream else job.echo + "".join(live.pieces) + choice.text
                extra = logprobs.take() if logprobs is not None else None
                live.sender.send(_response(text, finish, (len(ids), generated), extra), flags=FINAL)
                return
            if choice.text and stream:
                live.sender.send(_response(choice.text, extra=logprobs.take() if logprobs is not None else None))
            elif choice.text:
                live.pieces.append(choice.text)
        # The stream ended without a finished output (the engine shut down).
        extra = logprobs.take() if logprobs is not None else None
        live.sender.send(_response("", finish, (len(ids), generated), extra), flags=FINAL)

    async def _watch_cancellations(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            for live in list(self.live.values()):
                if not live.cancelled and live.task is not None and live.sender.is_cancelled():
                    live.cancelled = True
                    live.task.cancel()

    def finalize(self) -> None:
        self.watcher.cancel()
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
