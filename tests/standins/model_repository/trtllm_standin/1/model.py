"""Stand-in for TensorRT-LLM's Triton `ensemble` model: same tensors, fake generation.

No ML. The "tokens" are words: " w0", " w1", ... (one word per token). What it mirrors
of the real ensemble (TensorRT-LLM triton_backend templates, see ../config.pbtxt and
tests/standins/README.md):

* `stream` true: one response per generated token whose `text_output` is the delta
  (the executor's default `returnAllGeneratedTokens=false`); the prompt is never part of a
  streamed response. The last response carries the FINAL flag; when generation ends before
  `max_tokens` (end_id / stop word) the last response has an empty `text_output`.
* `stream` false/absent: one response with the whole text, the prompt prepended unless
  `exclude_input_in_output` is true (request input, else the model parameter, default false).
* No `finish_reason` output exists: a client infers "length" when the number of generated
  tokens reached `max_tokens`, else "stop".
* `num_input_tokens` / `num_output_tokens` only when `return_num_input_tokens` /
  `return_num_output_tokens` are true; when streaming `num_output_tokens` counts the tokens
  of that response, otherwise the total.

Stand-in conventions (not real behaviour):

* a prompt containing `[[stop_after=K]]` ends "naturally" (as if `end_id` was produced)
  after K words;
* `stop_words`: generation stops *before* a word equal (after stripping blanks) to one of
  them, the word is not emitted;
* "token" counts are whitespace-separated words (prompt) and generated words (output);
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


def _describe_inputs(request) -> dict:
    """name -> value (scalar when one element, else flat list), plus shapes and dtypes."""
    inputs, shapes, dtypes = {}, {}, {}
    for tensor in request.inputs():
        arr = tensor.as_numpy()
        flat = [_jsonable(v) for v in arr.reshape(-1).tolist()]
        name = tensor.name()
        inputs[name] = flat[0] if len(flat) == 1 else flat
        shapes[name] = list(arr.shape)
        dtypes[name] = str(arr.dtype)
    try:
        params = json.loads(request.parameters() or "{}")
    except Exception:  # pragma: no cover - defensive
        params = {}
    return {"inputs": inputs, "shapes": shapes, "dtypes": dtypes, "parameters": params}


def _log_request(model_name: str, request) -> None:
    path = os.environ.get("STANDIN_LOG")
    if not path:
        return
    record = {"model": model_name, "time": time.time(), **_describe_inputs(request)}
    line = json.dumps(record, ensure_ascii=False)
    with _LOG_LOCK, open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _log_event(model_name: str, event: str, **fields) -> None:
    """Extra JSON line (``{"model", "event", ...}``), e.g. when a request was cancelled."""
    path = os.environ.get("STANDIN_LOG")
    if not path:
        return
    line = json.dumps({"model": model_name, "event": event, "time": time.time(), **fields})
    with _LOG_LOCK, open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    arr = tensor.as_numpy().reshape(-1)
    if arr.size == 0:
        return default
    return _jsonable(arr[0])


def _strings(request, name) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [_jsonable(v) for v in tensor.as_numpy().reshape(-1).tolist()]


def _words(prompt: str) -> int:
    return len(prompt.split())


def _check_numpy() -> None:
    """Triton 2.51's Python-backend stub (nvidia-pytriton 0.7.0) corrupts tensors under numpy 2.

    Inputs arrive with every element equal to the first one and outputs arrive empty. The
    stub ignores PYTHONPATH: its sys.path is '' (tritonserver's working directory) and then
    the base interpreter's paths, so start tritonserver from the venv's site-packages (or
    give the base interpreter numpy<2). Fail the load loudly instead of crashing per request.
    """
    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {np.__version__} from {np.__file__} is loaded in the Python-backend stub; "
            "Triton 2.51's stub needs numpy<2: start tritonserver with the venv's site-packages "
            "as its working directory (the stub ignores PYTHONPATH)"
        )


class TritonPythonModel:
    def initialize(self, args):
        _check_numpy()
        self.model_config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        params = self.model_config.get("parameters", {})
        value = params.get("exclude_input_in_output", {}).get("string_value", "")
        self.param_exclude_input = value.strip().lower() in ("true", "1", "yes")
        self.delay = float(os.environ.get("STANDIN_TOKEN_DELAY_S", "0") or 0)

    def execute(self, requests):
        # Decoupled: answer from a thread per request so that slow (STANDIN_TOKEN_DELAY_S)
        # requests run concurrently, like the real in-flight batcher.
        for request in requests:
            _log_request(self.model_name, request)
            threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return None

    def _run(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except Exception as exc:  # error -> one final error response
            sender.send(
                pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _cancelled(request, sender) -> bool:
        try:
            if request.is_cancelled():
                return True
        except Exception:
            pass
        try:
            return bool(sender.is_cancelled())
        except Exception:
            return False

    def _tensors(self, text, n_new, opts, seq_index, now_ns, first_ns):
        out = [
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor(
                "cum_log_probs",
                np.array([[-0.5 * opts["generated"] if opts["log_probs"] else 0.0]], dtype=np.float32),
            ),
            pb_utils.Tensor(
                "output_log_probs",
                np.full((1, 1, max(n_new, 1)), -0.5 if opts["log_probs"] else 0.0, dtype=np.float32),
            ),
            pb_utils.Tensor("batch_index", np.array([[0]], dtype=np.int32)),
            pb_utils.Tensor("sequence_index", np.array([[seq_index]], dtype=np.int32)),
        ]
        if opts["context_logits"]:
            out.append(pb_utils.Tensor("context_logits", np.zeros((1, max(opts["n_in"], 1), 8), np.float32)))
        if opts["generation_logits"]:
            out.append(pb_utils.Tensor("generation_logits", np.zeros((1, 1, max(n_new, 1), 8), np.float32)))
        if opts["perf"]:
            for name in ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks"):
                out.append(pb_utils.Tensor(name, np.array([[1]], dtype=np.int32)))
            out.append(pb_utils.Tensor("arrival_time_ns", np.array([[opts["arrival_ns"]]], dtype=np.int64)))
            out.append(pb_utils.Tensor("first_scheduled_time_ns", np.array([[opts["arrival_ns"]]], dtype=np.int64)))
            out.append(pb_utils.Tensor("first_token_time_ns", np.array([[first_ns]], dtype=np.int64)))
            out.append(pb_utils.Tensor("last_token_time_ns", np.array([[now_ns]], dtype=np.int64)))
            out.append(pb_utils.Tensor("acceptance_rate", np.array([[0.0]], dtype=np.float32)))
            out.append(pb_utils.Tensor("total_accepted_draft_tokens", np.array([[0]], dtype=np.int32)))
            out.append(pb_utils.Tensor("total_draft_tokens", np.array([[0]], dtype=np.int32)))
        if opts["ret_in"]:
            out.append(pb_utils.Tensor("num_input_tokens", np.array([[opts["n_in"]]], dtype=np.int32)))
        if opts["ret_out"]:
            out.append(pb_utils.Tensor("num_output_tokens", np.array([[n_new]], dtype=np.int32)))
        return out

    # -- generation ----------------------------------------------------------------------
    def _generate(self, request, sender):
        prompt = _scalar(request, "text_input", "") or ""
        max_tokens = _scalar(request, "max_tokens", None)
        max_tokens = 16 if max_tokens is None else int(max_tokens)  # input is required anyway
        if max_tokens <= 0:
            raise ValueError("max_tokens must be a single value > 0")
        stream = bool(_scalar(request, "stream", False))
        exclude = _scalar(request, "exclude_input_in_output", None)
        exclude = self.param_exclude_input if exclude is None else bool(exclude)
        stop_words = {w.strip() for w in _strings(request, "stop_words") if w.strip()}
        num_seq = int(_scalar(request, "num_return_sequences", 1) or 1)
        if num_seq < 1:
            raise ValueError("num_return_sequences must be >= 1")
        match = _STOP_AFTER.search(prompt)
        natural_end = int(match.group(1)) if match else None

        arrival_ns = time.time_ns()
        opts = {
            "n_in": _words(prompt),
            "log_probs": bool(_scalar(request, "return_log_probs", False)),
            "context_logits": bool(_scalar(request, "return_context_logits", False)),
            "generation_logits": bool(_scalar(request, "return_generation_logits", False)),
            "perf": bool(_scalar(request, "return_perf_metrics", False)),
            "ret_in": bool(_scalar(request, "return_num_input_tokens", False)),
            "ret_out": bool(_scalar(request, "return_num_output_tokens", False)),
            "arrival_ns": arrival_ns,
            "generated": 0,
        }

        for seq_index in range(num_seq):
            last_seq = seq_index == num_seq - 1
            opts["generated"] = 0
            words: list[str] = []
            first_ns = None
            cancelled = False
            hit_max = False
            for i in range(max_tokens + 1):
                if self._cancelled(request, sender):
                    cancelled = True
                    _log_event(self.model_name, "cancelled", tokens=len(words), sequence=seq_index)
                    break
                if i == max_tokens:
                    hit_max = True
                    break
                if natural_end is not None and i >= natural_end:
                    break
                word = f" w{i}"
                if word.strip() in stop_words:
                    break
                if self.delay:
                    time.sleep(self.delay)
                words.append(word)
                opts["generated"] = len(words)
                first_ns = first_ns or time.time_ns()
                if stream:
                    final = last_seq and len(words) == max_tokens
                    sender.send(
                        pb_utils.InferenceResponse(
                            output_tensors=self._tensors(word, 1, opts, seq_index, time.time_ns(), first_ns)
                        ),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0,
                    )
                    if final:
                        return
            if cancelled:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            now_ns = time.time_ns()
            first_ns = first_ns or now_ns
            if stream:
                if hit_max and not last_seq:
                    continue  # every token of this sequence has been sent already
                # ended early (end_id / stop word): empty final chunk for this sequence
                sender.send(
                    pb_utils.InferenceResponse(output_tensors=self._tensors("", 0, opts, seq_index, now_ns, first_ns)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last_seq else 0,
                )
                if last_seq:
                    return
            else:
                text = "".join(words)
                if not exclude:
                    text = prompt + text
                sender.send(
                    pb_utils.InferenceResponse(
                        output_tensors=self._tensors(text, len(words), opts, seq_index, now_ns, first_ns)
                    ),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last_seq else 0,
                )

    def finalize(self):
        pass
