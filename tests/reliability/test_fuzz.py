"""Schemathesis against the live gateway on the real Triton: 1,000 seeded cases that reach the model.

The schema is the gateway's own (``gateway.openapi``): ``model`` is an enum of the served
names, so positive cases get past the model check and into Triton. Every case is sent over
HTTP to a gateway process (uvicorn, httptools) and its answer checked: no 5xx, only documented
statuses, content types and headers, every body (and every SSE event) valid against the
documented schema, every stream ending with exactly one ``[DONE]``.

For speed the fuzzed copy of the schema names only the tiny model and asks for few tokens
(``max_tokens`` / ``max_completion_tokens`` at most ``MAX_TOKENS``, ``n`` at most 2); the gateway's own limits
(``max_n``, ``max_requested_tokens``) answer what goes beyond with a 400.
"""

from __future__ import annotations

import collections
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from gateway.app import create_app
from gateway.config import load_settings
from gateway.openapi import install_openapi

from .conftest import SMOL, TINY, StartGateway

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.triton

SEED = 20240612
TOTAL_CASES = 1000
MAX_TOKENS = 8
LIMITS = {"max_n": 2, "max_requested_tokens": 64}
# (operation, generation mode, share of the cases); the last one takes what the others left.
PLAN: list[tuple[str, GenerationMode, int]] = [
    ("GET /health", GenerationMode.POSITIVE, 5),
    ("GET /metrics", GenerationMode.POSITIVE, 5),
    ("GET /v1/models", GenerationMode.POSITIVE, 5),
    ("GET /v1/models/{model_id}", GenerationMode.POSITIVE, 60),
    ("POST /v1/completions", GenerationMode.NEGATIVE, 100),
    ("POST /v1/chat/completions", GenerationMode.NEGATIVE, 100),
    ("POST /v1/completions", GenerationMode.POSITIVE, 330),
    ("POST /v1/chat/completions", GenerationMode.POSITIVE, 0),
]
CASE_TIMEOUT_S = 30
# What must never happen (asserted), and what is only reported.
ASSERTED: dict[str, Callable[..., Any]] = {
    "not_a_server_error": not_a_server_error,
    "status_code_conformance": status_code_conformance,
    "content_type_conformance": content_type_conformance,
    "response_headers_conformance": response_headers_conformance,
    "response_schema_conformance": response_schema_conformance,
}
REPORTED: dict[str, Callable[..., Any]] = {"negative_data_rejection": negative_data_rejection}
# What fuzz_schema narrows: a negative case that only breaks these is valid for the gateway.
NARROWED = ("max_tokens", "max_completion_tokens", "/properties/n ", "maxItems", "maxProperties", "/properties/model")


def fuzz_schema(document: dict[str, Any]) -> dict[str, Any]:
    """The gateway's document, narrowed to cheap cases (see the module doc)."""
    doc = copy.deepcopy(document)
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["model"]["enum"] = [TINY]
        props["model"]["examples"] = [TINY]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                _branch(props[field], "integer")["maximum"] = MAX_TOKENS
        props["max_tokens"] = _branch(props["max_tokens"], "integer")  # not null: that means the default
        props["n"]["maximum"] = 2
        schemas[name]["required"].append("max_tokens")  # else the default (256) is over the limit: a 400
    # Small bodies: generating big nested ones costs more than sending them (0.2 s a case).
    chat = schemas["ChatCompletionRequest"]["properties"]
    chat["messages"]["maxItems"] = 4
    _branch(chat["tools"], "array")["maxItems"] = 2
    _branch(schemas["CompletionRequest"]["properties"]["prompt"], "array")["maxItems"] = 4
    message = schemas["ChatMessage"]
    message["maxProperties"] = 6
    _branch(message["properties"]["content"], "array")["maxItems"] = 3
    _branch(message["properties"]["tool_calls"], "array")["maxItems"] = 2
    _branch(schemas["FunctionDefinition"]["properties"]["parameters"], "object")["maxProperties"] = 3
    _branch(schemas["JsonSchemaSpec"]["properties"]["schema"], "object")["maxProperties"] = 3
    return doc


def _branch(schema: dict[str, Any], type_: str) -> dict[str, Any]:
    """The branch of ``type_`` in an ``anyOf`` (or the schema itself)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == type_:
            return branch  # type: ignore[no-any-return]
    raise KeyError(type_)


def stream_problems(response: Any) -> str | None:
    """What is wrong with the end of an SSE answer, if anything: exactly one [DONE], last."""
    events = [line[5:].strip() for line in response.text.split("\n") if line.startswith("data:")]
    if not events or events[-1] != "[DONE]":
        return f"stream does not end with [DONE]: last event {events[-1:]!r}"
    if events.count("[DONE]") != 1:
        return f"stream has {events.count('[DONE]')} [DONE] events"
    return None


def _reason(response: Any) -> str:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return str(response.text[:80])
    return f"{error.get('param')}: {str(error.get('message'))[:90]}"


def fuzz_operation(
    operation: Any, mode: GenerationMode, budget: int, handle: Callable[[Any, str, GenerationMode], None]
) -> int:
    """Hand up to ``budget`` seeded cases of ``operation`` to ``handle``; return how many."""
    ran = 0

    @seed(SEED)
    @settings(
        max_examples=budget,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        nonlocal ran
        if ran < budget:
            ran += 1
            handle(case, operation.label, mode)

    fuzz()
    return ran


def test_fuzz_reaches_the_model(start_gw: StartGateway) -> None:
    started = time.monotonic()
    gw = start_gw(limits=LIMITS)
    settings_ = load_settings(gw.config)
    app = create_app(settings_)
    install_openapi(app, list(settings_.models))
    document = app.openapi()
    assert document["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"] == [TINY, SMOL]
    schema = schemathesis.openapi.from_dict(fuzz_schema(document))
    operations = {op.label: op for op in (r.ok() for r in schema.get_all_operations())}
    assert set(operations) == {label for label, _, _ in PLAN}, sorted(operations)

    session = requests.Session()
    statuses: collections.Counter[int] = collections.Counter()
    per_operation: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    problems: dict[str, list[str]] = collections.defaultdict(list)
    reported: dict[str, list[str]] = collections.defaultdict(list)
    rejected: collections.Counter[str] = collections.Counter()  # why valid-looking cases got a 400
    timing: dict[str, float] = collections.defaultdict(float)  # seconds in requests, in checks
    server_errors: list[tuple[int, str, Any]] = []
    slowest: list[tuple[float, int, str]] = []
    cases = 0
    model_answers = 0  # 200s from the generation endpoints: cases that reached Triton

    def record(bucket: dict[str, list[str]], name: str, case: Any, detail: str) -> None:
        if len(bucket[name]) < 5:  # the first few of each kind, with the request that caused them
            bucket[name].append(f"{case.operation.label} {json.dumps(case.body, default=str)}\n    {detail[:3000]}")
        else:
            bucket[name].append("")

    def handle(case: Any, label: str, mode: GenerationMode) -> None:
        nonlocal cases, model_answers
        cases += 1
        t0 = time.perf_counter()
        response = case.call(base_url=gw.url, session=session, timeout=CASE_TIMEOUT_S)
        took = time.perf_counter() - t0
        timing["call"] += took
        slowest.append((took, response.status_code, json.dumps(case.body, default=str)[:300]))
        slowest.sort(reverse=True)
        del slowest[5:]
        t0 = time.perf_counter()
        statuses[response.status_code] += 1
        per_operation[f"{label} ({mode.value})"][response.status_code] += 1
        content_type = (response.headers.get("content-type") or [""])[0]
        if response.status_code == 400 and mode is GenerationMode.POSITIVE:
            rejected[_reason(response)] += 1
        if response.status_code == 200 and label.startswith("POST"):
            model_answers += 1
            if content_type.startswith("text/event-stream"):
                problem = stream_problems(response)
                if problem:
                    record(problems, "sse_stream_end", case, f"{problem}\n{response.text}")
        if response.status_code >= 500:
            server_errors.append((response.status_code, response.text, case.body))
        for checks, bucket in ((ASSERTED, problems), (REPORTED, reported)):
            for name, check in checks.items():
                if name == "not_a_server_error":
                    continue  # counted above, and matched against the known bugs
                try:
                    case.validate_response(response, checks=[check])
                except (Failure, FailureGroup) as exc:
                    if bucket is reported and any(word in str(exc) for word in NARROWED):
                        continue  # invalid only for the narrowed copy of the schema
                    record(bucket, name, case, f"{response.status_code} {response.text[:400]!r}: {exc}")
        timing["checks"] += time.perf_counter() - t0

    for label, mode, share in PLAN:
        begun = time.monotonic()
        ran = fuzz_operation(operations[label], mode, share or TOTAL_CASES - cases, handle)
        print(f"{label} ({mode.value}): {ran} cases in {time.monotonic() - begun:.1f} s")
        assert ran > 0, label

    elapsed = time.monotonic() - started
    print(f"\n{cases} cases in {elapsed:.1f} s (gateway start included); {model_answers} answered by the model")
    print(f"in requests {timing['call']:.1f} s, in checks {timing['checks']:.1f} s")
    for took, status, body in slowest:
        print(f"  slow: {took:.2f} s {status} {body}")
    print("status counts:", dict(sorted(statuses.items())))
    for key, counter in per_operation.items():
        print(f"  {key}: {dict(sorted(counter.items()))}")
    print("400s of positive cases, by reason:")
    for reason, n in rejected.most_common(12):
        print(f"  {n:4d}  {reason}")
    for title, bucket in (("PROBLEMS", problems), ("reported only", reported)):
        for name, found in bucket.items():
            print(f"{title}: {name}: {len(found)} case(s)")
            for line in found:
                if line:
                    print("  -", line)
    documented = {int(code) for op in operations.values() for code in op.definition.raw["responses"]}
    assert set(statuses) <= documented
    assert cases == TOTAL_CASES
    assert model_answers > 0, "no case reached the model"
    unknown = [f"{status} {text[:300]} <- {json.dumps(body, default=str)}" for status, text, body in server_errors]
    print(f"server errors: {len(server_errors)}")
    if problems or unknown:
        dump = gw.config.parent / "fuzz-problems.json"
        dump.write_text(json.dumps({"unknown_server_errors": unknown, "problems": problems}, indent=1, default=str))
        print("full bodies:", dump)
    assert not unknown, f"{len(unknown)} server errors: {unknown[:5]}; gateway log:\n{gw.log_tail(6000)}"
    assert not problems, f"{sum(map(len, problems.values()))} problems: {sorted(problems)}"
