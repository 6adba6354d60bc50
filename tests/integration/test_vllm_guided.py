"""Guided decoding, logprobs, min_tokens and ignore_eos in the vllm engine (model_repository/vllm).

A real native Triton runs the vllm template on SmolLM2 in vLLM's own venv; the tests talk
to Triton's HTTP ``generate`` / ``generate_stream`` endpoints directly (no gateway), with
the tensors the gateway sends: ``guided_decoding_guide_type`` / ``guided_decoding_guide``,
``return_log_probs`` / ``top_logprobs``, ``min_tokens``, ``ignore_eos``.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from stack.triton_native import TritonServer
from tests.integration.conftest import SMOL

pytestmark = pytest.mark.triton
TOP = 5


@pytest.fixture(scope="module")
def chat(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def render(content: str) -> str:
        messages = [{"role": "user", "content": content}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    render.tokenizer = tokenizer  # type: ignore[attr-defined]
    return render


def _list(value: Any) -> list[Any]:
    """Triton's generate endpoint writes a one-element tensor as a scalar."""
    return value if isinstance(value, list) else [value]


def generate(triton: TritonServer, prompt: str, **inputs: Any) -> httpx.Response:
    body = {"text_input": prompt, "temperature": 0.0, "max_tokens": 64, "exclude_input_in_output": True} | inputs
    return httpx.post(f"{triton.url}/v2/models/{SMOL}/generate", json=body, timeout=300)


def ok(triton: TritonServer, prompt: str, **inputs: Any) -> dict[str, Any]:
    response = generate(triton, prompt, **inputs)
    assert response.status_code == 200, response.text
    return dict(response.json())


def stream(triton: TritonServer, prompt: str, **inputs: Any) -> list[dict[str, Any]]:
    body = {"text_input": prompt, "temperature": 0.0, "max_tokens": 64, "stream": True} | inputs
    events = []
    with httpx.stream("POST", f"{triton.url}/v2/models/{SMOL}/generate_stream", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def guided(kind: str, guide: str = "") -> dict[str, str]:
    return {"guided_decoding_guide_type": kind, "guided_decoding_guide": guide}


SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "array": {
        "type": "object",
        "properties": {
            "fruits": {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 2, "maxItems": 4}
        },
        "required": ["fruits"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
        "required": ["color", "sure"],
    },
    "integer_bounds": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99}, "score": {"type": "number"}},
        "required": ["age", "score"],
    },
    "required_and_optional": {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 30}, "pages": {"type": "integer", "minimum": 1}},
        "required": ["title"],
    },
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 5},
}


@pytest.mark.parametrize("shape", sorted(SCHEMAS))
def test_json_schema_output_validates(vllm_triton: TritonServer, chat: Any, shape: str) -> None:
    schema = SCHEMAS[shape]
    prompt = chat(f"Answer in JSON following this schema: {json.dumps(schema)}")
    out = ok(vllm_triton, prompt, max_tokens=160, **guided("json_schema", json.dumps(schema)))
    print(f"{shape}: {out['text_output']!r} ({out['finish_reason']}, {out['num_output_tokens']} tokens)")
    assert out["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["text_output"]), schema)


def test_json_gives_a_json_object(vllm_triton: TritonServer, chat: Any) -> None:
    prompt = chat("Give a JSON object with the name and the age of a cat.")
    out = ok(vllm_triton, prompt, max_tokens=160, **guided("json"))
    print(f"json: {out['text_output']!r} ({out['finish_reason']})")
    assert out["finish_reason"] == "stop"
    assert isinstance(json.loads(out["text_output"]), dict)


def test_regex(vllm_triton: TritonServer, chat: Any) -> None:
    pattern = r"(Paris|London|Rome), founded in [0-9]{3,4}\."
    out = ok(vllm_triton, chat("Name a European capital and when it was founded."), **guided("regex", pattern))
    print(f"regex: {out['text_output']!r} ({out['finish_reason']})")
    assert out["finish_reason"] == "stop"
    assert re.fullmatch(pattern, out["text_output"])


def test_ebnf_grammar_streamed(vllm_triton: TritonServer, chat: Any) -> None:
    grammar = 'root ::= answer "; confidence: " digit digit "%"\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
    events = stream(vllm_triton, chat("Is the sky blue? Answer yes or no."), **guided("ebnf_grammar", grammar))
    text = "".join(e["text_output"] for e in events)
    print(f"ebnf: {text!r} in {len(events)} pieces ({events[-1]['finish_reason']})")
    assert events[-1]["finish_reason"] == "stop"
    assert re.fullmatch(r"(yes|no); confidence: [0-9]{2}%", text)


BAD_GUIDES = {
    "schema not JSON": guided("json_schema", "{not json"),
    "schema vLLM refuses": guided("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": 5}}})),
    "bad regex": guided("regex", "(unclosed"),
    "bad grammar": guided("ebnf_grammar", 'root ::= ("a" | '),
    "grammar without root": guided("ebnf_grammar", 'start ::= "a"'),
    "unknown type": guided("xml", "<a/>"),
}


def test_bad_guide_is_an_error_of_its_own(vllm_triton: TritonServer, chat: Any) -> None:
    running: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: running.update(
            ok(vllm_triton, chat("Write a story about a fox."), max_tokens=96, ignore_eos=True)
        )
    )
    thread.start()
    for name, inputs in BAD_GUIDES.items():
        response = generate(vllm_triton, "hi", **inputs)
        print(f"{name}: {response.status_code} {response.text[:300]}")
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith("guided_decoding_guide: "), response.text
    events = stream(vllm_triton, "hi", **BAD_GUIDES["bad regex"])
    assert len(events) == 1 and events[0]["error"].startswith("guided_decoding_guide: "), events
    # The next request is served, and the one running all along was not disturbed.
    out = ok(vllm_triton, chat("Pick a color."), **guided("json_schema", json.dumps(SCHEMAS["enum"])))
    jsonschema.validate(json.loads(out["text_output"]), SCHEMAS["enum"])
    thread.join(timeout=300)
    assert running.get("num_output_tokens") == 96, running


def test_max_tokens_too_small_is_length(vllm_triton: TritonServer, chat: Any) -> None:
    schema = SCHEMAS["nested"]
    out = ok(vllm_triton, chat("A person in JSON."), max_tokens=6, **guided("json_schema", json.dumps(schema)))
    events = stream(vllm_triton, chat("A person in JSON."), max_tokens=6, **guided("json_schema", json.dumps(schema)))
    print(f"6 tokens: {out['text_output']!r} ({out['finish_reason']}); streamed {events[-1]['finish_reason']}")
    assert out["finish_reason"] == "length" and out["num_output_tokens"] == 6
    assert events[-1]["finish_reason"] == "length" and events[-1]["num_output_tokens"] == 6


def _check_logprobs(ids: list[int], logprobs: list[float], top: list[float], top_ids: list[int], k: int) -> None:
    assert len(logprobs) == len(ids) and len(top) == len(top_ids) == k * len(ids)
    for i, (token, lp) in enumerate(zip(ids, logprobs, strict=True)):
        row, row_ids = top[i * k : (i + 1) * k], top_ids[i * k : (i + 1) * k]
        assert row == sorted(row, reverse=True), row
        assert len(set(row_ids)) == k
        assert all(x <= 0 for x in row) and lp <= 0
        # Greedy: the chosen token is the best one, its logprob the row's max.
        assert math.isclose(lp, row[0], abs_tol=1e-4), (i, lp, row)
        assert token == row_ids[0] or math.isclose(row[0], row[1], abs_tol=1e-4), (i, token, row_ids)


def test_logprobs_greedy_plain_and_streamed(vllm_triton: TritonServer, chat: Any) -> None:
    prompt = chat("What is the capital of France? Explain briefly.")
    asked = {"return_log_probs": True, "top_logprobs": TOP, "max_tokens": 40}
    out = ok(vllm_triton, prompt, **asked)
    n = out["num_output_tokens"]
    ids = _list(out["output_ids"])
    print(f"logprobs: {n} tokens, ids {ids[:8]}..., logprobs {_list(out['output_log_probs'])[:4]}...")
    assert len(ids) == n > 0
    _check_logprobs(
        ids,
        _list(out["output_log_probs"]),
        _list(out["output_top_log_probs"]),
        _list(out["output_top_log_prob_ids"]),
        TOP,
    )
    tokenizer = chat.tokenizer
    assert tokenizer.decode(ids, skip_special_tokens=True) == out["text_output"]

    events = stream(vllm_triton, prompt, **asked)
    s_ids: list[int] = []
    s_lps: list[float] = []
    s_top: list[float] = []
    s_top_ids: list[int] = []
    text = ""
    for e in events:
        text += e["text_output"]
        if "output_ids" in e:
            s_ids += _list(e["output_ids"])
            s_lps += _list(e["output_log_probs"])
            s_top += _list(e["output_top_log_probs"])
            s_top_ids += _list(e["output_top_log_prob_ids"])
        # Each response carries the text of the tokens it covers: the two never drift apart.
        assert text == tokenizer.decode(s_ids, skip_special_tokens=True), (text, s_ids)
    print(f"streamed: {len(events)} responses, {len(s_ids)} ids")
    assert events[-1]["num_output_tokens"] == len(s_ids) == n
    assert s_ids == ids  # greedy, alone: the same tokens either way
    _check_logprobs(s_ids, s_lps, s_top, s_top_ids, TOP)
    assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(s_lps, _list(out["output_log_probs"]), strict=True))


def test_logprobs_without_alternatives_and_when_not_asked(vllm_triton: TritonServer, chat: Any) -> None:
    prompt = chat("Say hello.")
    out = ok(vllm_triton, prompt, return_log_probs=True, max_tokens=16)
    assert len(_list(out["output_ids"])) == len(_list(out["output_log_probs"])) == out["num_output_tokens"]
    assert "output_top_log_probs" not in out and "output_top_log_prob_ids" not in out
    plain = ok(vllm_triton, prompt, max_tokens=16, top_logprobs=3)
    assert "output_ids" not in plain and "output_log_probs" not in plain
    bad = generate(vllm_triton, prompt, return_log_probs=True, top_logprobs=21)
    assert bad.status_code == 400 and "top_logprobs" in bad.text
    # Sampled, with a guide: logprobs are raw (before temperature), every token still has one.
    sampled = ok(
        vllm_triton, chat("Pick a color."), temperature=1.5, seed=7, return_log_probs=True, top_logprobs=2,
        max_tokens=60, **guided("json_schema", json.dumps(SCHEMAS["enum"])),
    )  # fmt: skip
    assert len(_list(sampled["output_ids"])) == sampled["num_output_tokens"]
    assert all(lp <= 0 for lp in _list(sampled["output_log_probs"]))
    # Tokens the guide forbids come as -9999 (JSON has no -inf), as in OpenAI's API.
    assert all(-9999 <= lp <= 0 for lp in _list(sampled["output_top_log_probs"]))
    # Greedy under a guide: the mask applies before the logprobs, the pick is still the best.
    greedy = ok(
        vllm_triton, chat("Pick a color."), return_log_probs=True, top_logprobs=3, max_tokens=60,
        **guided("json_schema", json.dumps(SCHEMAS["enum"])),
    )  # fmt: skip
    g_ids = _list(greedy["output_ids"])
    print(f"guided greedy top-3 rows: {_list(greedy['output_top_log_probs'])[:9]}")
    assert len(g_ids) == greedy["num_output_tokens"]
    _check_logprobs(
        g_ids, _list(greedy["output_log_probs"]), _list(greedy["output_top_log_probs"]),
        _list(greedy["output_top_log_prob_ids"]), 3,
    )  # fmt: skip


def test_min_tokens_and_ignore_eos(vllm_triton: TritonServer, chat: Any) -> None:
    prompt = chat("Say hi.")
    free = ok(vllm_triton, prompt, max_tokens=80)
    held = ok(vllm_triton, prompt, max_tokens=80, min_tokens=40)
    endless = ok(vllm_triton, prompt, max_tokens=50, ignore_eos=True)
    events = stream(vllm_triton, prompt, max_tokens=50, ignore_eos=True)
    print(
        f"free {free['num_output_tokens']} ({free['finish_reason']}), min_tokens=40: {held['num_output_tokens']}, "
        f"ignore_eos: {endless['num_output_tokens']} / streamed {events[-1]['num_output_tokens']}"
    )
    assert free["finish_reason"] == "stop" and free["num_output_tokens"] < 40, "the prompt ends too late to tell"
    assert held["num_output_tokens"] >= 40
    assert endless["num_output_tokens"] == 50 and endless["finish_reason"] == "length"
    assert events[-1]["num_output_tokens"] == 50 and events[-1]["finish_reason"] == "length"
    bad = generate(vllm_triton, prompt, max_tokens=10, min_tokens=11)
    assert bad.status_code == 400 and "min_tokens" in bad.text


def test_guided_throughput(vllm_triton: TritonServer, chat: Any) -> None:
    """tokens/s of one json_schema request vs the same unconstrained one (same token count)."""
    n = 128
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 200},
        },
        "required": ["title", "numbers"],
    }
    prompt = chat("Write a title and a long list of numbers in JSON.")
    rates = {}
    for name, inputs in (("unconstrained", {}), ("json_schema", guided("json_schema", json.dumps(schema)))):
        for attempt in range(2):  # the second run: the grammar compiled and cached, the engine warm
            start = time.monotonic()
            out = ok(vllm_triton, prompt, max_tokens=n, min_tokens=n, ignore_eos=True, **inputs)
            elapsed = time.monotonic() - start
            assert out["num_output_tokens"] == n and out["finish_reason"] == "length", out
            rates[name, attempt] = n / elapsed
    print(
        f"tokens/s, {n} tokens, first/second run: "
        + ", ".join(f"{k[0]} #{k[1] + 1}: {v:.1f}" for k, v in rates.items())
    )
