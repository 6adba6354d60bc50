"""Payloads and reply parsing per Triton dialect, and dialect detection from model configs."""

from __future__ import annotations

import orjson
import pytest

from gateway.engine import GenerationRequest
from gateway.errors import UpstreamError
from gateway.triton.dialects import (
    LlmapiDialect,
    LlmDialect,
    TrtllmDialect,
    UnknownDialect,
    VllmDialect,
    detect,
)


def tensors(*names: str) -> list[dict[str, str]]:
    return [{"name": n} for n in names]


def req(**kw: object) -> GenerationRequest:
    base: dict[str, object] = {"prompt": "P", "max_tokens": 8, "stream": True}
    base.update(kw)
    return GenerationRequest(**base)  # type: ignore[arg-type]


def test_detect() -> None:
    llm = {
        "backend": "python",
        "input": tensors("text_input", "max_tokens"),
        "output": tensors("text_output", "finish_reason"),
    }
    trt = {
        "platform": "ensemble",
        "input": tensors("text_input", "max_tokens", "random_seed"),
        "output": tensors("text_output", "cum_log_probs"),
    }
    vllm = {
        "backend": "vllm",
        "input": tensors("text_input", "stream", "sampling_parameters"),
        "output": tensors("text_output"),
    }
    assert isinstance(detect(llm), LlmDialect)
    assert isinstance(detect(trt), TrtllmDialect)
    assert isinstance(detect(vllm), VllmDialect)
    with pytest.raises(UnknownDialect):
        detect({"name": "resnet", "input": tensors("image"), "output": tensors("probs")})


def test_llm_payload_only_sends_what_was_set() -> None:
    body = LlmDialect().payload(req(temperature=0.0, seed=3, stop=["x"]))
    assert body == {
        "text_input": "P",
        "max_tokens": 8,
        "stream": True,
        "exclude_input_in_output": True,
        "temperature": 0.0,
        "seed": 3,
        "stop_words": ["x"],
    }


def test_llm_parser() -> None:
    parse = LlmDialect().parser(req())
    assert parse({"text_output": "ab"}).text == "ab"
    last = parse({"text_output": "", "finish_reason": "length", "num_input_tokens": 4, "num_output_tokens": 8})
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 4, 8)


def test_trtllm_payload_maps_names_and_greedy() -> None:
    d = TrtllmDialect({"text_input", "max_tokens", "stream", "top_k", "temperature", "random_seed", "stop_words"})
    body = d.payload(req(temperature=0.0, seed=5, stop=["END"], presence_penalty=0.2))
    assert body["top_k"] == 1 and "temperature" not in body
    assert body["random_seed"] == 5 and "seed" not in body
    assert "presence_penalty" not in body  # not an input of this model: not sent
    assert body["stop_words"] == ["END"]


def test_trtllm_strips_echoed_prompt_when_not_streaming() -> None:
    d = TrtllmDialect({"text_input", "max_tokens", "stream"})
    assert d.parser(req(stream=False, prompt="Q: "))({"text_output": "Q: A"}).text == "A"


def test_vllm_payload_packs_sampling_parameters() -> None:
    d = VllmDialect(
        {
            "text_input",
            "stream",
            "sampling_parameters",
            "exclude_input_in_output",
            "return_finish_reason",
            "return_num_output_tokens",
        }
    )
    body = d.payload(req(temperature=0.7, stop=["\n"], seed=1))
    params = orjson.loads(body["sampling_parameters"])
    assert params == {"max_tokens": 8, "temperature": 0.7, "seed": 1, "stop": ["\n"]}
    assert body["return_finish_reason"] is True and body["exclude_input_in_output"] is True
    assert "return_num_input_tokens" not in body


# TensorRT-LLM's LLM API model (triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt,
# TensorRT-LLM 1.0 era): its inputs and outputs, as Triton's model config reports them.
LLMAPI_INPUTS = (
    "text_input",
    "streaming",
    "sampling_param_best_of",
    "sampling_param_temperature",
    "sampling_param_top_k",
    "sampling_param_top_p",
    "sampling_param_frequency_penalty",
    "sampling_param_presence_penalty",
    "sampling_param_max_tokens",
    "sampling_param_stop",
    "sampling_param_seed",
    "sampling_param_exclude_input_from_output",
    "sampling_param_return_perf_metrics",
    "return_finish_reason",
    "return_stop_reason",
    "return_cumulative_logprob",
    "stop",
)
LLMAPI_OUTPUTS = ("text_output", "finish_reason", "stop_reason", "cumulative_logprob", "kv_cache_hit_rate")


def llmapi() -> LlmapiDialect:
    d = detect(
        {
            "name": "tensorrt_llm",
            "backend": "python",
            "input": tensors(*LLMAPI_INPUTS),
            "output": tensors(*LLMAPI_OUTPUTS),
        }
    )
    assert isinstance(d, LlmapiDialect)
    return d


def test_llmapi_payload() -> None:
    body = llmapi().payload(
        req(temperature=0.7, top_p=0.9, seed=7, stop=["END"], presence_penalty=0.1, repetition_penalty=1.2)
    )
    assert body == {
        "text_input": "P",
        "sampling_param_max_tokens": 8,
        "streaming": True,
        "sampling_param_exclude_input_from_output": True,
        "return_finish_reason": True,
        "sampling_param_temperature": 0.7,
        "sampling_param_top_p": 0.9,
        "sampling_param_presence_penalty": 0.1,
        "sampling_param_seed": 7,
        "sampling_param_stop": ["END"],
    }  # repetition_penalty: no such input, not sent; `stop` (cancel by id) never sent


def test_llmapi_payload_greedy_and_plain() -> None:
    body = llmapi().payload(req(stream=False, temperature=0.0))
    assert body["streaming"] is False
    assert body["sampling_param_top_k"] == 1 and "sampling_param_temperature" not in body


def test_llmapi_parser_turns_cumulative_text_into_deltas() -> None:
    parse = llmapi().parser(req())
    events = [
        {"text_output": " w0", "finish_reason": "None"},
        {"text_output": " w0 w1", "finish_reason": "None"},
        {"text_output": " w0 w1", "finish_reason": "None"},  # no new text in this response
        {"text_output": " w0 w1 w2", "finish_reason": "length"},
    ]
    chunks = [parse(e) for e in events]
    assert [c.text for c in chunks] == [" w0", " w1", "", " w2"]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert all(c.prompt_tokens is None and c.completion_tokens is None for c in chunks)  # counted by the gateway


def test_llmapi_parser_never_repeats_when_the_text_shrinks() -> None:
    parse = llmapi().parser(req(stop=["STOP"]))
    assert parse({"text_output": "a ST"}).text == "a ST"
    # TensorRT-LLM cut the matched stop string: the text so far got shorter.
    last = parse({"text_output": "a ", "finish_reason": "stop"})
    assert (last.text, last.finish_reason) == ("", "stop")


def test_llmapi_parser_not_streaming() -> None:
    chunk = llmapi().parser(req(stream=False))({"text_output": "whole answer", "finish_reason": "stop"})
    assert (chunk.text, chunk.finish_reason) == ("whole answer", "stop")


def test_llmapi_parser_without_finish_reason_or_exclude_input() -> None:
    # A template without those inputs: no finish reason (inferred later), prompt stripped.
    d = LlmapiDialect({"text_input", "streaming", "sampling_param_max_tokens"})
    assert "return_finish_reason" not in d.payload(req())
    chunk = d.parser(req(stream=False, prompt="Q: "))({"text_output": "Q: A"})
    assert (chunk.text, chunk.finish_reason) == ("A", None)


@pytest.mark.parametrize("reason", ["cancelled", "timeout"])
def test_llmapi_parser_raises_on_an_ended_request(reason: str) -> None:
    with pytest.raises(UpstreamError, match=reason):
        llmapi().parser(req())({"text_output": "x", "finish_reason": reason})


# ------------------------------------------------------------------ constrained decoding, logprobs

SCHEMA = '{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}'


def test_exactly_what_each_dialect_sends_for_a_schema() -> None:
    from gateway.engine import Guide

    r = req(guide=Guide("json_schema", SCHEMA), min_tokens=2)
    llm = LlmDialect().payload(r)
    assert {k: llm[k] for k in ("guided_decoding_guide_type", "guided_decoding_guide", "min_tokens")} == {
        "guided_decoding_guide_type": "json_schema",
        "guided_decoding_guide": SCHEMA,
        "min_tokens": 2,
    }
    trt = TrtllmDialect({"text_input", "max_tokens", "guided_decoding_guide_type", "min_tokens"}).payload(r)
    assert trt == {
        "text_input": "P",
        "max_tokens": 8,
        "stream": True,
        "guided_decoding_guide_type": "json_schema",
        "guided_decoding_guide": SCHEMA,
        "min_tokens": 2,
    }
    vllm = VllmDialect({"text_input", "stream", "sampling_parameters"}).payload(r)
    params = orjson.loads(vllm["sampling_parameters"])
    assert params == {"max_tokens": 8, "min_tokens": 2, "structured_outputs": params["structured_outputs"]}
    # Triton's vLLM backend builds StructuredOutputsParams(**json.loads(this string)).
    assert orjson.loads(params["structured_outputs"]) == {"json": orjson.loads(SCHEMA)}
    any_json = orjson.loads(VllmDialect(set()).payload(req(guide=Guide("json")))["sampling_parameters"])
    assert orjson.loads(any_json["structured_outputs"]) == {"json_object": True}


def test_a_forced_tool_call_is_a_schema_guide_for_every_dialect() -> None:
    from gateway.protocol import ChatCompletionRequest
    from gateway.tools import plan

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [tool], "tool_choice": "required"}
    )
    tools = plan(body)
    assert tools is not None
    guide = tools.guide()
    assert guide is not None
    sent = TrtllmDialect({"guided_decoding_guide_type"}).payload(req(guide=guide))
    assert sent["guided_decoding_guide_type"] == "json_schema"
    assert orjson.loads(sent["guided_decoding_guide"]) == {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": ["f"]}, "arguments": {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 1,
    }


def test_what_cannot_be_honoured_is_a_400_naming_the_field() -> None:
    from gateway.engine import Guide
    from gateway.errors import APIError

    cases = [
        (TrtllmDialect({"text_input", "max_tokens"}), req(guide=Guide("json")), "response_format"),
        (TrtllmDialect({"guided_decoding_guide_type"}), req(logprobs=0), "logprobs"),
        (TrtllmDialect({"text_input"}), req(ignore_eos=True), "ignore_eos"),
        (VllmDialect({"sampling_parameters"}), req(logprobs=2), "logprobs"),  # backend before return_logprobs
        (LlmDialect({"text_input", "max_tokens"}), req(guide=Guide("regex", "a+", "tool_choice")), "tool_choice"),
        (LlmapiDialect({"text_input"}), req(logprobs=1), "logprobs"),
    ]
    for dialect, r, param in cases:
        with pytest.raises(APIError) as info:
            dialect.payload(r)
        assert (info.value.status, info.value.param) == (400, param), (dialect.name, r)


def test_logprobs_are_asked_for_and_read_back() -> None:
    body = LlmDialect().payload(req(logprobs=2))
    assert body["return_log_probs"] is True and body["top_logprobs"] == 2
    chunk = LlmDialect().parser(req(logprobs=2))(
        {
            "text_output": "ab",
            "output_ids": [5, 6],
            "output_log_probs": [-0.1, -0.2],
            "output_top_log_prob_ids": [5, 9, 6, 8],
            "output_top_log_probs": [-0.1, -3.0, -0.2, -2.5],
        }
    )
    assert chunk.tokens is not None and chunk.tokens.ids == [5, 6] and chunk.tokens.top_ids == [5, 9, 6, 8]
    one = LlmDialect().parser(req(logprobs=0))({"text_output": "a", "output_ids": 5, "output_log_probs": -0.1})
    assert one.tokens is not None and one.tokens.ids == [5] and one.tokens.logprobs == [-0.1]
    # Triton's vLLM backend: JSON per token, the sampled token first, then the top ones by rank.
    vllm = VllmDialect({"return_logprobs", "sampling_parameters"})
    sent = vllm.payload(req(logprobs=1))
    assert sent["return_logprobs"] is True and orjson.loads(sent["sampling_parameters"])["logprobs"] == 1
    event = {
        "text_output": "ab",
        "logprobs": orjson.dumps(
            [
                {"7": {"logprob": -2.0, "rank": 3}, "5": {"logprob": -0.1, "rank": 1}},
                {"6": {"logprob": -0.2, "rank": 1}},
            ]
        ).decode(),
    }
    tokens = vllm.parser(req(logprobs=1))(event).tokens
    assert tokens is not None
    assert (tokens.ids, tokens.logprobs, tokens.top_ids, tokens.top_logprobs) == (
        [7, 6],
        [-2.0, -0.2],
        [5, 6],
        [-0.1, -0.2],
    )
