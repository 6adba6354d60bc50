"""Stand-in for TensorRT-LLM's LLM API Triton model: same tensors, fake generation.

No ML. The "tokens" are words: " w0", " w1", ... (one word per token). What it mirrors of
the real model (triton_backend/all_models/llmapi/tensorrt_llm/1/model.py and helpers.py,
see ../config.pbtxt):

* `streaming` true: one response per generated token whose `text_output` is the text
  generated **so far** (`CompletionOutput.text` of the LLM API, cumulative; the delta
  would be `text_diff`). The response with the last token carries the FINAL flag; when
  generation ends on end-of-sequence, that token adds no text.
* `streaming` false/absent: one response with the whole text.
* `sampling_param_exclude_input_from_output` defaults to **false** in the template's
  helpers: then the prompt is part of `text_output` (stand-in reading of "output tokens
  include the input tokens").
* `finish_reason` (`stop_reason`) only when `return_finish_reason` (`return_stop_reason`)
  is true, as `str()` of the LLM API value: "None" until the last response, then "stop" or
  "length". No token counts exist.
* Stop strings (`sampling_param_stop`) are cut from the text (LLM API default).
* `stop` true: the request is a cancellation by request id; answered with an error.
* A cancelled request gets a final CANCELLED error ("Request cancelled by client").

Stand-in conventions (not real behaviour):

* a prompt containing `[[stop_after=K]]` ends on end-of-sequence after K words;
* a stop string matches a whole word (after stripping blanks), which is not emitted;
* `sampling_param_max_tokens` absent: 16 (the real default is the LLM API's);
* env `STANDIN_LOG`: append one JSON line per request with the inputs received;
* env `STANDIN_TOKEN_DELAY_S`: sleep between tokens (default 0).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

_STOP_AFTER = re.compile(r"\[\[stop_after=(\d+)\]\]")
_LOG_LOCK = threading.Lock()


def _jsonable(value):
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _log(record: dict) -> None:
    path = os.environ.get("STANDIN_LOG")
    if not path:
        return
    with _LOG_LOCK, open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _log_request(model_name: str, request) -> None:
    inputs, shapes, dtypes = {}, {}, {}
    for tensor in request.inputs():
        arr = tensor.as_numpy()
        flat = [_jsonable(v) for v in arr.reshape(-1).tolist()]
        inputs[tensor.name()] = flat[0] if len(flat) == 1 else flat
        shapes[tensor.name()] = list(arr.shape)
        dtypes[tensor.name()] = str(arr.dtype)
    try:
        params = json.loads(request.parameters() or "{}")
    except Exception:  # pragma: no cover - defensive
        params = {}
    _log(
        {
            "model": model_name,
            "time": time.time(),
            "inputs": inputs,
            "shapes": shapes,
            "dtypes": dtypes,
            "parameters": params,
        }
    )


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    arr = tensor.as_numpy().reshape(-1)
    return _jsonable(arr[0]) if arr.size else default


def _strings(request, name) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [_jsonable(v) for v in tensor.as_numpy().reshape(-1).tolist()]


def _check_numpy() -> None:
    """Triton 2.51's Python-backend stub corrupts tensors under numpy 2 (tests/standins/README.md)."""
    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {np.__version__} from {np.__file__} is loaded in the Python-backend stub; "
            "Triton 2.51's stub needs numpy<2: start tritonserver with the venv's site-packages "
            "as its working directory (the stub ignores PYTHONPATH)"
        )


def _error(message: str, cancelled: bool = False):
    code = getattr(pb_utils.TritonError, "CANCELLED", None) if cancelled else None
    err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class TritonPythonModel:
    def initialize(self, args):
        _check_numpy()
        self.model_name = args["model_name"]
        self.delay = float(os.environ.get("STANDIN_TOKEN_DELAY_S", "0") or 0)

    def execute(self, requests):
        # Decoupled: a thread per request, so that requests overlap like in-flight batching.
        for request in requests:
            _log_request(self.model_name, request)
            threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return None

    def _run(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except Exception as exc:  # one final error response, like the real model
            sender.send(_error(f"Error generating request: {exc}"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _response(self, text, finish, stop_reason, opts):
        out = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        if opts["finish"]:
            out.append(pb_utils.Tensor("finish_reason", np.array([str(finish).encode()], dtype=np.object_)))
        if opts["stop_reason"]:
            out.append(pb_utils.Tensor("stop_reason", np.array([str(stop_reason).encode()], dtype=np.object_)))
        return pb_utils.InferenceResponse(output_tensors=out)

    def _generate(self, request, sender):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if _scalar(request, "stop", False):
            sender.send(_error("Request cancelled by client", cancelled=True), flags=final)
            return
        prompt = (_strings(request, "text_input") or [""])[0]
        max_tokens = int(_scalar(request, "sampling_param_max_tokens", 16))
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        streaming = bool(_scalar(request, "streaming", False))
        exclude = bool(_scalar(request, "sampling_param_exclude_input_from_output", False))
        stops = {s.strip() for s in _strings(request, "sampling_param_stop") if s.strip()}
        match = _STOP_AFTER.search(prompt)
        natural_end = int(match.group(1)) if match else None
        opts = {
            "finish": bool(_scalar(request, "return_finish_reason", False)),
            "stop_reason": bool(_scalar(request, "return_stop_reason", False)),
        }
        head = "" if exclude else prompt
        words: list[str] = []
        finish, stop_reason = None, None
        for i in range(max_tokens):
            if request.is_cancelled():
                _log({"model": self.model_name, "event": "cancelled", "tokens": len(words), "time": time.time()})
                sender.send(_error("Request cancelled by client", cancelled=True), flags=final)
                return
            word = f" w{i}"
            if natural_end is not None and i >= natural_end:
                finish = "stop"  # end-of-sequence: one more token, no text
                break
            if word.strip() in stops:
                finish, stop_reason = "stop", word.strip()
                break
            if self.delay:
                time.sleep(self.delay)
            words.append(word)
            if streaming:
                last = len(words) == max_tokens
                text = head + "".join(words)
                sender.send(self._response(text, "length" if last else None, None, opts), flags=final if last else 0)
                if last:
                    return
        else:
            finish = "length"
        text = head + "".join(words)
        sender.send(self._response(text, finish, stop_reason, opts), flags=final)

    def finalize(self):
        pass
