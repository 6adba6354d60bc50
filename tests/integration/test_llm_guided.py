"""Constrained decoding, logprobs, min_tokens and ignore_eos in the ``llm`` model, per request,
inside the running batch: SmolLM2 on a real Triton, through its generate endpoints."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stack.triton_native import TritonServer
from tests.integration.conftest import SMOL
from tests.integration.test_llm_batching import Streamer

pytestmark = pytest.mark.triton


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def post(triton: TritonServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{triton.url}/v2/models/{SMOL}/generate", json=body, timeout=300)


def generate(triton: TritonServer, body: dict[str, Any]) -> dict[str, Any]:
    resp = post(triton, body)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def stream(triton: TritonServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    url = f"{triton.url}/v2/models/{SMOL}/generate_stream"
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(orjson.loads(line[6:]))
    return events


def as_list(value: Any) -> list[Any]:
    """Triton's generate endpoint writes a one-element tensor as a scalar."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def guided(kind: str, guide: str | dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"guided_decoding_guide_type": kind}
    if guide is not None:
        body["guided_decoding_guide"] = guide if isinstance(guide, str) else json.dumps(guide)
    return body


SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "required and optional, integer with bounds": (
        "Describe a person named Ada as JSON.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 18, "maximum": 99},
                "email": {"type": "string"},
            },
            "required": ["name", "age"],
        },
    ),
    "nested objects": (
        "Give a user profile as JSON.",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "address": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                            "required": ["city", "zip"],
                        },
                    },
                    "required": ["name", "address"],
                },
                "active": {"type": "boolean"},
            },
            "required": ["user", "active"],
        },
    ),
    "array of enums, enum": (
        "Pick a t-shirt as JSON.",
        {
            "type": "object",
            "properties": {
                "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
                "size": {"enum": ["S", "M", "L"]},
            },
            "required": ["colors", "size"],
        },
    ),
    "array of objects": (
        "List three fruits with prices as JSON.",
        {
            "type": "object",
            "properties": {
                "fruits": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "price": {"type": "number"}},
                        "required": ["name", "price"],
                    },
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["fruits"],
        },
    ),
    "integer out of the model's habits": (
        "How old is the universe, in years? Answer in JSON.",
        {
            "type": "object",
            "properties": {"years": {"type": "integer", "minimum": -5, "maximum": 7}},
            "required": ["years"],
        },
    ),
}


def test_json_schema_output_validates_for_several_shapes(triton: TritonServer) -> None:
    """Five schemas at once, in one batch: each answer parses, validates and ends with "stop"."""

    def ask(item: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        question, schema = item
        return generate(
            triton, {"text_input": chat(question), "max_tokens": 200, "temperature": 0, **guided("json_schema", schema)}
        )

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(ask, SCHEMAS.values()))
    for (name, (_, schema)), result in zip(SCHEMAS.items(), results, strict=True):
        print(f"{name}: {result['text_output']}")
        assert result["finish_reason"] == "stop", (name, result)
        jsonschema.validate(json.loads(result["text_output"]), schema)
    # The optional field is allowed but not needed; the bounds hold even against the model's habits.
    assert 18 <= json.loads(results[0]["text_output"])["age"] <= 99
    assert -5 <= json.loads(results[4]["text_output"])["years"] <= 7


def test_json_gives_parseable_json_streamed_and_not(triton: TritonServer) -> None:
    body = {"text_input": chat("Describe a cat as JSON."), "max_tokens": 200, "temperature": 0, **guided("json")}
    result = generate(triton, body)
    assert result["finish_reason"] == "stop"
    value = json.loads(result["text_output"])
    assert isinstance(value, dict | list)
    events = stream(triton, body)
    assert "".join(e["text_output"] for e in events) == result["text_output"]
    assert events[-1]["finish_reason"] == "stop"


def test_regex(triton: TritonServer) -> None:
    pattern = r"[A-Z][a-z]+ is [0-9]{2} years old\."
    body = {"text_input": chat("How old is Tom?"), "max_tokens": 40, "temperature": 0, **guided("regex", pattern)}
    result = generate(triton, body)
    assert result["finish_reason"] == "stop"
    assert re.fullmatch(pattern, result["text_output"]), result["text_output"]


def test_ebnf_grammar_and_logprobs_count_the_eos(triton: TritonServer, smollm2_dir: Path) -> None:
    grammar = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no" | "maybe"'
    body = {
        "text_input": chat("Is the sky blue?"),
        "max_tokens": 30,
        "temperature": 0,
        "return_log_probs": True,
        **guided("ebnf_grammar", grammar),
    }
    result = generate(triton, body)
    assert result["finish_reason"] == "stop"
    assert re.fullmatch(r"The answer is (yes|no|maybe)\.", result["text_output"])
    # The grammar ended with the EOS token: counted, so it has its entry too.
    ids = as_list(result["output_ids"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(ids) == len(as_list(result["output_log_probs"])) == result["num_output_tokens"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == result["text_output"]
    assert "output_top_log_probs" not in result  # top_logprobs 0: no alternatives


@pytest.mark.parametrize(
    ("kind", "guide"),
    [
        ("json_schema", '{"type": "nonsense"}'),
        ("json_schema", "{not json"),
        ("json_schema", ""),
        ("regex", "(ab"),
        ("ebnf_grammar", "root ::= ("),
        ("ebnf_grammar", 'start ::= "x"'),  # no root rule
        ("xml", "<a/>"),
    ],
)
def test_a_bad_guide_gets_an_error_response(triton: TritonServer, kind: str, guide: str) -> None:
    resp = post(triton, {"text_input": chat("Hi"), "max_tokens": 8, **guided(kind, guide)})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith("guided_decoding_guide: "), resp.text


def test_bad_guides_do_not_disturb_the_running_batch(triton: TritonServer) -> None:
    running = Streamer(triton, {"text_input": chat("Tell me a story."), "max_tokens": 40, "temperature": 0}, SMOL)
    running.start()
    running.wait_first()
    for kind, guide in (("json_schema", '{"type": "nonsense"}'), ("regex", "(ab"), ("ebnf_grammar", "root ::= (")):
        assert post(triton, {"text_input": chat("Hi"), "max_tokens": 8, **guided(kind, guide)}).status_code == 400
    running.join(timeout=300)
    assert running.end is not None
    alone = generate(triton, {"text_input": chat("Tell me a story."), "max_tokens": 40, "temperature": 0})
    assert running.text() == alone["text_output"]
    assert running.events[-1]["num_output_tokens"] == alone["num_output_tokens"]


def test_max_tokens_too_small_is_length_not_a_complete_object(triton: TritonServer) -> None:
    schema = SCHEMAS["nested objects"][1]
    body = {"text_input": chat("Give a user profile as JSON."), "max_tokens": 6, "temperature": 0}
    result = generate(triton, {**body, **guided("json_schema", schema)})
    assert (result["finish_reason"], result["num_output_tokens"]) == ("length", 6)
    assert result["text_output"].startswith('{"user"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(result["text_output"])


def test_constrained_and_unconstrained_in_one_batch(triton: TritonServer) -> None:
    question, schema = SCHEMAS["array of objects"]
    free_body = {"text_input": chat(question), "max_tokens": 60, "temperature": 0}
    alone = generate(triton, free_body)["text_output"]
    constrained = Streamer(triton, {**free_body, "max_tokens": 200, **guided("json_schema", schema)}, SMOL)
    free = Streamer(triton, free_body, SMOL)
    constrained.start()
    free.start()
    constrained.join(timeout=300)
    free.join(timeout=300)
    assert constrained.end is not None and free.end is not None
    assert constrained.first is not None and free.first is not None
    # Both were decoding at the same time: one batch.
    assert constrained.first < free.end and free.first < constrained.end
    assert constrained.events[-1]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(constrained.text()), schema)
    # The unconstrained row was left alone: the same greedy text as without a neighbour (a
    # batched near-tie could flip a token late, docs/llm-model.md; never early).
    together = free.text()
    assert together == alone or together[:40] == alone[:40]
    assert not together.startswith("{")


def _check_greedy_logprobs(result: dict[str, Any], ids: list[int], values: list[float], tops: Any, k: int) -> None:
    top_values, top_ids = tops
    assert len(ids) == len(values) == result["num_output_tokens"]
    assert len(top_values) == len(top_ids) == k * len(ids)
    for n, (token, value) in enumerate(zip(ids, values, strict=True)):
        row_values, row_ids = top_values[n * k : (n + 1) * k], top_ids[n * k : (n + 1) * k]
        assert row_values == sorted(row_values, reverse=True)
        # Greedy: the chosen token is the most likely one, and its logprob is the top one.
        assert value == pytest.approx(max(row_values), abs=1e-5)
        assert row_ids[0] == token
        assert all(v <= 0 for v in row_values)


def test_logprobs_greedy_non_streamed_and_streamed(triton: TritonServer, smollm2_dir: Path) -> None:
    k = 5
    prompt = chat("Write a haiku about the sea.")
    body = {"text_input": prompt, "max_tokens": 24, "temperature": 0, "return_log_probs": True, "top_logprobs": k}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    result = generate(triton, body)
    ids, values = as_list(result["output_ids"]), as_list(result["output_log_probs"])
    tops = (as_list(result["output_top_log_probs"]), as_list(result["output_top_log_prob_ids"]))
    _check_greedy_logprobs(result, ids, values, tops, k)
    assert tokenizer.decode(ids, skip_special_tokens=True) == result["text_output"]

    # The first position against transformers' own log_softmax of the raw logits.
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        reference = torch.log_softmax(model(prompt_ids).logits[0, -1].float(), dim=-1)
    top = torch.topk(reference, k)
    assert tops[1][:k] == top.indices.tolist()
    assert tops[0][:k] == pytest.approx(top.values.tolist(), abs=1e-3)

    events = stream(triton, body)
    s_ids = [i for e in events for i in as_list(e.get("output_ids"))]
    s_values = [v for e in events for v in as_list(e.get("output_log_probs"))]
    s_tops = (
        [v for e in events for v in as_list(e.get("output_top_log_probs"))],
        [i for e in events for i in as_list(e.get("output_top_log_prob_ids"))],
    )
    last = events[-1]
    _check_greedy_logprobs(last, s_ids, s_values, s_tops, k)
    assert s_ids == ids and s_values == pytest.approx(values, abs=1e-5)
    # Each response carries the tokens it covers: the text so far decodes from the ids so far.
    seen: list[int] = []
    text = ""
    for event in events:
        seen += as_list(event.get("output_ids"))
        text += event["text_output"]
        assert tokenizer.decode(seen, skip_special_tokens=True).startswith(text)
    assert tokenizer.decode(seen, skip_special_tokens=True) == text


def test_no_logprob_tensors_unless_asked(triton: TritonServer) -> None:
    result = generate(triton, {"text_input": chat("Hi"), "max_tokens": 4, "temperature": 0})
    assert not {"output_ids", "output_log_probs", "output_top_log_probs"} & result.keys()
    events = stream(triton, {"text_input": chat("Hi"), "max_tokens": 4, "temperature": 0})
    assert all("output_ids" not in e for e in events)


def test_min_tokens_and_ignore_eos(triton: TritonServer) -> None:
    body = {"text_input": chat("What is 2+2? Answer with a number."), "max_tokens": 40, "temperature": 0}
    natural = generate(triton, body)
    assert natural["finish_reason"] == "stop" and natural["num_output_tokens"] < 20, natural

    at_least = generate(triton, {**body, "min_tokens": 20, "return_log_probs": True})
    assert at_least["num_output_tokens"] >= 20
    assert len(as_list(at_least["output_ids"])) == at_least["num_output_tokens"]

    started = time.monotonic()
    forced = stream(triton, {**body, "ignore_eos": True})
    print(f"ignore_eos: 40 tokens in {time.monotonic() - started:.1f} s")
    assert (forced[-1]["finish_reason"], forced[-1]["num_output_tokens"]) == ("length", 40)
