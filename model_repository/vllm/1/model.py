"""Triton Python-backend model: vLLM's engine with in-flight batching, same tensors as ``llm``.

vLLM's ``AsyncLLM`` runs on an asyncio loop in a thread of this stub; its engine core
(scheduler, paged KV cache, the model) runs in a child process. ``execute`` only parses
and hands each request to the loop, so requests join the running batch at the next step
and leave it when done. A watcher polls every live request's ``is_cancelled()`` (queued
ones too) and cancels its task, which aborts it in the engine within one step.

Runs in vLLM's own venv (``python -m stack.engines vllm``): Triton starts the stub with
that interpreter (``stack.triton_native --python``).
"""

from __future__ import annotations

import asyncio
import json
import os
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


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        engine_args = AsyncEngineArgs(
            model=path,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            disable_log_stats=True,
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

    def _parse(self, request: Any) -> tuple[list[int], Any, bool, str]:
        from vllm import SamplingParams
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
        except (ValueError, TypeError) as exc:  # vLLM's own validation, e.g. penalties out of range
            raise BadRequest(str(exc)) from None
        stream = bool(_scalar(request, "stream") or False)
        exclude = _scalar(request, "exclude_input_in_output")
        return ids, sampling, stream, "" if exclude is not False else text

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids, sampling, stream, echo = self._parse(request)
            except (BadRequest, ValueError, UnicodeDecodeError) as exc:
                sender.send(_error(str(exc)), flags=FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._start(sender, ids, sampling, stream, echo), self.loop)
        return None

    # ------------------------------------------------------------------ on the loop

    async def _start(self, sender: Any, ids: list[int], sampling: Any, stream: bool, echo: str) -> None:
        rid = uuid.uuid4().hex
        live = Live(sender)
        self.live[rid] = live
        live.task = asyncio.current_task()
        try:
            await self._generate(rid, live, ids, sampling, stream, echo)
        except asyncio.CancelledError:
            # generate() aborted the request in the engine before re-raising.
            self.cancelled_metric.increment(1)
            sender.send(flags=FINAL)
        except Exception as exc:  # one failed request must not stop the others
            pb_utils.Logger.log_error(f"{self.model_name}: generation failed: {exc!r}")
            sender.send(_error(f"generation failed: {exc}"), flags=FINAL)
        finally:
            self.live.pop(rid, None)

    async def _generate(self, rid: str, live: Live, ids: list[int], sampling: Any, stream: bool, echo: str) -> None:
        from vllm.inputs import TokensPrompt

        generated = 0
        finish = "length"
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), sampling, request_id=rid):
            choice = out.outputs[0]
            generated += len(choice.token_ids)
            self.tokens_metric.increment(len(choice.token_ids))
            if out.finished:
                finish = "stop" if choice.finish_reason == "stop" else "length"
                text = choice.text if stream else echo + "".join(live.pieces) + choice.text
                live.sender.send(_response(text, finish, (len(ids), generated)), flags=FINAL)
                return
            if choice.text and stream:
                live.sender.send(_response(choice.text))
            elif choice.text:
                live.pieces.append(choice.text)
        # The stream ended without a finished output (the engine shut down).
        live.sender.send(_response("", finish, (len(ids), generated)), flags=FINAL)

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
