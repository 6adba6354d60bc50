"""Payloads and reply parsing per Triton dialect, and dialect detection from model configs."""

from __future__ import annotations

import orjson
import pytest

from gateway.engine import GenerationRequest
from gateway.triton.dialects import LlmDialect, TrtllmDialect, UnknownDialect, VllmDialect, detect


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
