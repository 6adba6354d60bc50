"""BENCH ONLY: a decoupled Python-backend model that emits text pieces and computes nothing.

It speaks the tensors of ``model_repository/llm`` (see ../config.pbtxt), so the gateway's
``llm`` dialect drives it unchanged:

* ``stream`` true: ``max_tokens`` responses of one piece each; the pieces take turns from
  the ``pieces`` parameter (a JSON list, default ``[" tok", " tik"]``: real models do not
  send one chunk many times over, and LiteLLM's proxy breaks off a stream that does, after
  100 identical chunks in a row). The last response also carries ``finish_reason``
  ("length"), ``num_input_tokens`` and ``num_output_tokens`` and the FINAL flag: no
  separate empty final response, so a stream has exactly ``max_tokens`` events.
* ``stream`` false or absent: one response with all the pieces joined, same extra outputs.
* ``max_tokens`` comes from the input tensor, else from the request's parameters (LiteLLM's
  Triton provider sends ``{"text_input", "parameters": {"max_tokens"}, "stream"}``), else
  the ``default_max_tokens`` parameter.
* Sampling inputs, ``stop_words`` and ``exclude_input_in_output`` are accepted and ignored
  (the prompt is never echoed). ``num_input_tokens`` is the prompt's number of
  whitespace-separated words: a stand-in count, no tokenizer is loaded.

Scheduling works like an in-flight batcher: one thread runs "steps"; each step gives every
active request its next piece (a non-streaming request just counts the step and gets its
whole text after its last one). New requests join at the next step, so concurrent
requests progress together and a new one gets its first piece within one step, as with a
real LLM server. ``piece_delay_ms`` (parameter; the environment variable
``BENCH_PIECE_DELAY_MS`` wins) is the pause between steps, i.e. the time per output token;
0 means as fast as the backend takes the responses. A cancelled request (the HTTP client
went away) is dropped at the next check.

Why one thread: with several threads calling ``response_sender.send`` at once (a thread
per request, or several step threads), this Triton build (2.51 from nvidia-pytriton
0.7.0) lost streamed events under load: streams came back short, and SSE data of one
request showed up on the keep-alive connection after its response had ended ("Bad status
line: data: ..."). One sending thread never did, and keeps requests fair. The instance
count stays 1 for the same reason (two instances were faster but much less fair: TTFT
p50 at concurrency 32 went from ~12 ms to ~77 ms).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Asking Triton whether a request was cancelled is a round trip to the server process;
# without a delay we ask every this many steps.
CANCEL_CHECK_EVERY = 32


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value.item()


def _error(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


@dataclass
class _Active:
    sender: Any
    stream: bool
    max_tokens: int
    input_tokens: int
    done: int = 0


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        pieces = json.loads(params.get("pieces") or '[" tok", " tik"]')
        if not pieces or not all(isinstance(p, str) and p for p in pieces):
            raise pb_utils.TritonModelException(
                f"parameter pieces must be a JSON list of non-empty strings: {pieces!r}"
            )
        self.pieces = [p.encode("utf-8") for p in pieces]
        delay_ms = os.environ.get("BENCH_PIECE_DELAY_MS") or params.get("piece_delay_ms") or "0"
        self.delay = max(float(delay_ms), 0.0) / 1000.0
        self.default_max_tokens = int(params.get("default_max_tokens") or 16)
        self.pending: list[_Active] = []
        self.wake = threading.Condition()
        self.running = True
        self.loop = threading.Thread(target=self._steps, name="synthetic-steps", daemon=True)
        self.loop.start()

    def finalize(self) -> None:
        with self.wake:
            self.running = False
            self.wake.notify()
        self.loop.join(timeout=5)

    def execute(self, requests: list[Any]) -> None:
        admitted = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                admitted.append(self._parse(request, sender))
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                sender.send(_error(str(exc)), flags=FINAL)
        if admitted:
            with self.wake:
                self.pending.extend(admitted)
                self.wake.notify()
        return None

    # ------------------------------------------------------------------ requests

    def _parse(self, request: Any, sender: Any) -> _Active:
        text = _scalar(request, "text_input")
        if text is None:
            raise ValueError("text_input is required")
        for name in ("guided_decoding_guide_type", "return_log_probs", "min_tokens", "ignore_eos"):
            if _scalar(request, name) is not None:  # declared for the dialect, refused: never ignored
                raise ValueError(f"{name}: the synthetic benchmark model does not implement it")
        value = _scalar(request, "max_tokens")
        if value is None:
            try:
                params = json.loads(request.parameters() or "{}")
            except (ValueError, TypeError):
                params = {}
            value = params.get("max_tokens", params.get("max_completion_tokens"))
        max_tokens = self.default_max_tokens if value is None else int(value)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        stream = bool(_scalar(request, "stream") or False)
        return _Active(sender, stream, max_tokens, len(str(text).split()))

    def _text(self, count: int) -> bytes:
        pieces = self.pieces
        return b"".join(pieces[i % len(pieces)] for i in range(count))

    def _final(self, text: bytes, req: _Active) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("text_output", np.array([text], dtype=np.object_)),
                pb_utils.Tensor("finish_reason", np.array([b"length"], dtype=np.object_)),
                pb_utils.Tensor("num_input_tokens", np.array([req.input_tokens], dtype=np.int32)),
                pb_utils.Tensor("num_output_tokens", np.array([req.max_tokens], dtype=np.int32)),
            ]
        )

    # ------------------------------------------------------------------ the step loop

    def _steps(self) -> None:
        active: list[_Active] = []
        pieces, n_pieces = self.pieces, len(self.pieces)
        check_every = 1 if self.delay else CANCEL_CHECK_EVERY
        while True:
            with self.wake:
                while self.running and not active and not self.pending:
                    self.wake.wait()
                if not self.running:
                    return
                if self.pending:
                    active.extend(self.pending)
                    self.pending.clear()
            still: list[_Active] = []
            for req in active:
                try:
                    if req.done and req.done % check_every == 0 and req.sender.is_cancelled():
                        req.sender.send(flags=FINAL)
                        continue
                    i = req.done
                    req.done += 1
                    if req.done == req.max_tokens:
                        text = pieces[i % n_pieces] if req.stream else self._text(req.max_tokens)
                        req.sender.send(self._final(text, req), flags=FINAL)
                        continue
                    if req.stream:
                        req.sender.send(
                            pb_utils.InferenceResponse(
                                output_tensors=[
                                    pb_utils.Tensor("text_output", np.array([pieces[i % n_pieces]], dtype=np.object_))
                                ]
                            )
                        )
                    still.append(req)
                except Exception as exc:  # the client went away mid-send, or Triton is stopping
                    pb_utils.Logger.log_warn(f"synthetic: dropped a request: {exc}")
            active = still
            if self.delay and active:
                time.sleep(self.delay)
