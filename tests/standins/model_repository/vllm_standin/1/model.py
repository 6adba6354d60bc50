"""Stand-in for a model served by Triton's vLLM backend: same tensors, fake generation.

No ML, no vLLM. The "tokens" are words " w0", " w1", ... What it mirrors of the real
backend (triton-inference-server/vllm_backend src/model.py, r25.01 era; see
tests/standins/README.md):

* `sampling_parameters` (a JSON string; when absent, the request's Triton parameters are
  used instead) is parsed like `_get_sampling_params_dict`: `max_tokens`, `min_tokens`, `n`,
  `best_of`, `top_k` go through int(); `temperature`, `top_p`, `presence_penalty`,
  `frequency_penalty`, `length_penalty` through float(); `ignore_eos`,
  `skip_special_tokens`, `use_beam_search` through bool() (so "false" is True!); other
  values are passed as they are. `lora_name` is popped (error: LoRA is not enabled here).
  The rest must be vLLM `SamplingParams` fields (vLLM 0.6.x): an unknown key fails like
  `SamplingParams(**d)` does ("Unexpected keyword argument 'x'"), and out-of-range values
  fail with vLLM's `_verify_args` messages.
* Errors: one final response with error "Error generating stream: <reason>".
* `stream` true: one response per token; `text_output` is the delta since the previous
  response (the backend has sent deltas since r24.03). `exclude_input_in_output` false with
  `stream` true is an error.
* `stream` false/absent: one final response with the whole text, the prompt prepended
  unless `exclude_input_in_output` is true (prepended by default!).
* `finish_reason` (when `return_finish_reason`): "None" on non-final streamed responses,
  then "length" or "stop". `num_output_tokens` (when requested) counts the tokens of that
  response (the total when not streaming); `num_input_tokens` the prompt's.
* `n` > 1: `text_output` etc. carry one element per sequence (all identical here).

Stand-in conventions (not real behaviour): a prompt containing `[[stop_after=K]]` emits an
end-of-sequence token after K words (counted in `num_output_tokens`, no text, finish "stop",
disabled by `ignore_eos`); stop strings are matched in the generated text and cut off
(kept with `include_stop_str_in_output`); "tokens" are whitespace-separated words;
env `STANDIN_LOG` (JSON line per request with the inputs) and `STANDIN_TOKEN_DELAY_S`.
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
_SAMPLING_EPS = 1e-5
_MAX_MODEL_LEN_WORDS = 64  # max_tokens=None (unreachable at the pin: int(None) fails first)

# vLLM 0.6.x SamplingParams fields a request may set (msgspec Struct: others are rejected).
_SAMPLING_FIELDS = {
    "n",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "detokenize",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "logits_processors",
    "include_stop_str_in_output",
    "truncate_prompt_tokens",
    "output_kind",
    "guided_decoding",
    "structured_outputs",  # the newest backend's name (StructuredOutputsParams), see _sampling_params
    "logit_bias",
    "allowed_token_ids",
}
_DEFAULTS = {
    "n": 1,
    "best_of": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "seed": None,
    "stop": None,
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "include_stop_str_in_output": False,
}


def _jsonable(value):
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _describe_inputs(request) -> dict:
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


def _get_sampling_params_dict(params_json: str) -> dict:
    """Same conversions as vllm_backend's `_get_sampling_params_dict` (r25.01 era)."""
    params_dict = json.loads(params_json)
    for k in ("ignore_eos", "skip_special_tokens", "use_beam_search"):
        if k in params_dict:
            params_dict[k] = bool(params_dict[k])
    for k in ("frequency_penalty", "length_penalty", "presence_penalty", "temperature", "top_p"):
        if k in params_dict:
            params_dict[k] = float(params_dict[k])
    for k in ("best_of", "max_tokens", "min_tokens", "n", "top_k"):
        if k in params_dict:
            params_dict[k] = int(params_dict[k])
    return params_dict


def _sampling_params(params: dict) -> dict:
    """Imitates `SamplingParams(**params)` of vLLM 0.6.x: unknown keys + `_verify_args`."""
    for key in params:
        if key not in _SAMPLING_FIELDS:
            raise TypeError(f"Unexpected keyword argument '{key}'")
    if "structured_outputs" in params:
        # Newer backends (vLLM >= 0.10.2): TritonSamplingParams.from_dict builds
        # StructuredOutputsParams(**json.loads(value)); its fields, one of which is set.
        spec = json.loads(params["structured_outputs"])
        unknown = set(spec) - {"json", "regex", "choice", "grammar", "json_object", "structural_tag"}
        if unknown or len(spec) != 1:
            raise ValueError(f"StructuredOutputsParams: exactly one known field, got {sorted(spec)}")
    sp = dict(_DEFAULTS)
    sp.update(params)
    if sp["best_of"] is None:
        sp["best_of"] = sp["n"]
    stop = sp["stop"]
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    else:
        stop = list(stop)
    sp["stop"] = stop
    # vllm/sampling_params.py::_verify_args (0.6.x wording)
    if sp["n"] < 1:
        raise ValueError(f"n must be at least 1, got {sp['n']}.")
    if sp["best_of"] < sp["n"]:
        raise ValueError(f"best_of must be greater than or equal to n, got n={sp['n']} and best_of={sp['best_of']}.")
    if not -2.0 <= sp["presence_penalty"] <= 2.0:
        raise ValueError(f"presence_penalty must be in [-2, 2], got {sp['presence_penalty']}.")
    if not -2.0 <= sp["frequency_penalty"] <= 2.0:
        raise ValueError(f"frequency_penalty must be in [-2, 2], got {sp['frequency_penalty']}.")
    if sp["repetition_penalty"] <= 0.0:
        raise ValueError(f"repetition_penalty must be greater than zero, got {sp['repetition_penalty']}.")
    if sp["temperature"] < 0.0:
        raise ValueError(f"temperature must be non-negative, got {sp['temperature']}.")
    if not 0.0 < sp["top_p"] <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {sp['top_p']}.")
    if sp["top_k"] < -1 or sp["top_k"] == 0:
        raise ValueError(f"top_k must be -1 (disable), or at least 1, got {sp['top_k']}.")
    if not 0.0 <= sp["min_p"] <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {sp['min_p']}.")
    if sp["max_tokens"] is not None and sp["max_tokens"] < 1:
        raise ValueError(f"max_tokens must be at least 1, got {sp['max_tokens']}.")
    if sp["min_tokens"] < 0:
        raise ValueError(f"min_tokens must be greater than or equal to 0, got {sp['min_tokens']}.")
    if sp["max_tokens"] is not None and sp["min_tokens"] > sp["max_tokens"]:
        raise ValueError(
            f"min_tokens must be less than or equal to max_tokens={sp['max_tokens']}, got {sp['min_tokens']}."
        )
    if sp["logprobs"] is not None and sp["logprobs"] < 0:
        raise ValueError(f"logprobs must be non-negative, got {sp['logprobs']}.")
    if any(s == "" for s in stop):
        raise ValueError("stop cannot contain an empty string.")
    if sp["temperature"] < _SAMPLING_EPS and sp["best_of"] > 1:
        raise ValueError(f"best_of must be 1 when using greedy sampling.Got {sp['best_of']}.")
    return sp


class _Seq:
    """One output sequence's state: generated text/tokens and what was already sent."""

    def __init__(self):
        self.text = ""
        self.tokens = 0
        self.finish_reason = None
        self.sent_text = 0
        self.sent_tokens = 0
        self.sent_logprobs = 0


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
        self.delay = float(os.environ.get("STANDIN_TOKEN_DELAY_S", "0") or 0)

    def execute(self, requests):
        for request in requests:
            _log_request(self.model_name, request)
            threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return None

    # -- request parsing (mirrors `_get_input_tensors`) ------------------------------------
    @staticmethod
    def _input_tensors(request):
        prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0]
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")

        stream = pb_utils.get_input_tensor_by_name(request, "stream")
        stream = bool(stream.as_numpy()[0]) if stream else False

        prepend_input = pb_utils.get_input_tensor_by_name(request, "exclude_input_in_output")
        if prepend_input:
            prepend_input = not prepend_input.as_numpy()[0]
        elif prepend_input is None and stream:
            prepend_input = False
        else:
            prepend_input = True
        if prepend_input and stream:
            raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")

        sampling_parameters = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
        parameters = sampling_parameters.as_numpy()[0].decode("utf-8") if sampling_parameters else request.parameters()

        additional = {}
        for name in (
            "return_finish_reason",
            "return_cumulative_logprob",
            "return_logprobs",
            "return_num_input_tokens",
            "return_num_output_tokens",
        ):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            additional[name] = bool(tensor.as_numpy()[0]) if tensor else False
        return prompt, stream, bool(prepend_input), parameters, additional

    # -- responses --------------------------------------------------------------------------
    @staticmethod
    def _error(sender, message, code=None):
        try:
            err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
        except TypeError:  # older stubs without error codes
            err = pb_utils.TritonError(message)
        text = pb_utils.Tensor("text_output", np.asarray([b"N/A"], dtype=np.object_))
        sender.send(
            pb_utils.InferenceResponse(output_tensors=[text] if code is None else [], error=err),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )

    @staticmethod
    def _response(seqs, prompt, n_in, additional, sp, prepend, delta):
        """Like `_create_response`: deltas since the last call when `delta`, else totals."""
        outs = []
        texts, counts, logprobs = [], [], []
        for seq in seqs:
            start_text = seq.sent_text if delta else 0
            start_tok = seq.sent_tokens if delta else 0
            start_lp = seq.sent_logprobs if delta else 0
            texts.append(((prompt if prepend else "") + seq.text[start_text:]).encode("utf-8"))
            counts.append(seq.tokens - start_tok)
            if sp["logprobs"] is None:
                logprobs.append(b"null")
            else:
                entries = [
                    {str(1000 + i): {"logprob": -0.5, "rank": 1, "decoded_token": f" w{i}"}}
                    for i in range(start_lp, seq.tokens)
                ]
                logprobs.append(json.dumps(entries).encode("utf-8"))
            seq.sent_text, seq.sent_tokens, seq.sent_logprobs = len(seq.text), seq.tokens, seq.tokens
        outs.append(pb_utils.Tensor("text_output", np.asarray(texts, dtype=np.object_)))
        if additional["return_finish_reason"]:
            reasons = [str(seq.finish_reason).encode() for seq in seqs]
            outs.append(pb_utils.Tensor("finish_reason", np.asarray(reasons, dtype=np.object_)))
        if additional["return_cumulative_logprob"]:
            cum = [-0.5 * seq.tokens for seq in seqs]
            outs.append(pb_utils.Tensor("cumulative_logprob", np.asarray(cum, dtype=np.float32)))
        if additional["return_logprobs"]:
            outs.append(pb_utils.Tensor("logprobs", np.asarray(logprobs, dtype=np.object_)))
        if additional["return_num_input_tokens"]:
            outs.append(pb_utils.Tensor("num_input_tokens", np.asarray(n_in, dtype=np.uint32)))
        if additional["return_num_output_tokens"]:
            outs.append(pb_utils.Tensor("num_output_tokens", np.asarray(counts, dtype=np.uint32)))
        return pb_utils.InferenceResponse(output_tensors=outs)

    # -- generation -------------------------------------------------------------------------
    def _run(self, request):
        sender = request.get_response_sender()
        try:
            # _verify_loras: only looks at the `sampling_parameters` input
            sp_tensor = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
            if sp_tensor:
                lora = _get_sampling_params_dict(sp_tensor.as_numpy()[0].decode("utf-8")).get("lora_name")
                if lora is not None:
                    err = pb_utils.TritonError("LoRA feature is not enabled.")
                    text = pb_utils.Tensor("text_output", np.asarray([b"[Error] Unsupported LoRA."], dtype=np.object_))
                    sender.send(
                        pb_utils.InferenceResponse(output_tensors=[text], error=err),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                    )
                    return
            self._generate(request, sender)
        except Exception as exc:
            self._error(sender, f"Error generating stream: {exc}")

    def _cancelled(self, request, sender) -> bool:
        try:
            return bool(sender.is_cancelled())
        except Exception:
            try:
                return bool(request.is_cancelled())
            except Exception:
                return False

    def _generate(self, request, sender):
        prompt, stream, prepend, parameters, additional = self._input_tensors(request)
        params = _get_sampling_params_dict(parameters or "{}")
        params.pop("lora_name", None)
        sp = _sampling_params(params)

        n_in = len(prompt.split())
        match = _STOP_AFTER.search(prompt)
        natural_end = None if (match is None or sp["ignore_eos"]) else int(match.group(1))
        limit = sp["max_tokens"] if sp["max_tokens"] is not None else _MAX_MODEL_LEN_WORDS
        seqs = [_Seq() for _ in range(sp["n"])]

        step = 0
        while True:
            if self._cancelled(request, sender):
                _log_event(self.model_name, "cancelled", tokens=seqs[0].tokens)
                if stream:
                    self._error(sender, "Request was cancelled", getattr(pb_utils.TritonError, "CANCELLED", None))
                    return
                break  # non-streaming: the partial output is still sent (as the real backend)
            if self.delay:
                time.sleep(self.delay)
            finished = False
            if natural_end is not None and step >= natural_end and step >= sp["min_tokens"]:
                for seq in seqs:  # an EOS token: counted, no text
                    seq.tokens += 1
                    seq.finish_reason = "stop"
                finished = True
            else:
                word = f" w{step}"
                for seq in seqs:
                    seq.text += word
                    seq.tokens += 1
                    if seq.tokens >= sp["min_tokens"]:
                        for s in sp["stop"]:
                            idx = seq.text.find(s)
                            if idx != -1:
                                keep = idx + len(s) if sp["include_stop_str_in_output"] else idx
                                seq.text = seq.text[:keep]
                                seq.finish_reason = "stop"
                                break
                    if seq.finish_reason is None and seq.tokens >= limit:
                        seq.finish_reason = "length"
                finished = all(seq.finish_reason is not None for seq in seqs)
            step += 1
            if stream:
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if finished else 0
                sender.send(self._response(seqs, prompt, n_in, additional, sp, False, True), flags=flags)
            if finished:
                break
        if not stream:
            sender.send(
                self._response(seqs, prompt, n_in, additional, sp, prepend, False),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )

    def finalize(self):
        pass
