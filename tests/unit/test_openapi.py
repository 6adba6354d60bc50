"""The gateway's OpenAPI document (gateway.openapi): model enum, real statuses, response schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.openapi import install_openapi
from gateway.protocol import ChatCompletionRequest, CompletionRequest

MODELS = ["tiny", "smollm2-135m-instruct"]


def document(api_key: str | None = None, models: list[str] = MODELS) -> dict[str, Any]:
    settings = GatewaySettings.model_validate(
        {"api_key": api_key, "models": {m: {"triton_model": m, "tokenizer": Path("/nonexistent")} for m in MODELS}}
    )
    app = create_app(settings)
    install_openapi(app, models)
    return app.openapi()


def validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


def test_model_is_an_enum_of_the_served_names() -> None:
    doc = document()
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        model = doc["components"]["schemas"][name]["properties"]["model"]
        assert model["enum"] == MODELS
        assert model["examples"] == ["tiny"]


def test_no_422_and_every_error_in_the_envelope() -> None:
    doc = document()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert "422" not in responses and "401" not in responses, (path, method)
            assert {"413", "431", "500", "503"} <= set(responses), (path, method)
            for status, response in responses.items():
                if status != "200":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) == {"200", "400", "404", "413", "429", "431", "500", "502", "503"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "Retry-After" in chat["429"]["headers"] and "Retry-After" in chat["503"]["headers"]
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_an_api_key_adds_401_and_bearer_security_to_v1_only() -> None:
    doc = document(api_key="secret")
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        for op in item.values():
            assert ("401" in op["responses"]) is path.startswith("/v1/"), path
            assert ("security" in op) is path.startswith("/v1/"), path


def test_install_is_idempotent_and_takes_the_latest_names() -> None:
    settings = GatewaySettings.model_validate({"models": {"tiny": {"triton_model": "t", "tokenizer": "/x"}}})
    app = create_app(settings)
    install_openapi(app, ["tiny"])
    first = app.openapi()
    install_openapi(app, ["tiny"])
    assert app.openapi() == first
    assert app.openapi() is app.openapi()
    install_openapi(app, ["other"])
    assert app.openapi()["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["other"]
    served = TestClient(app).get("/openapi.json").json()
    assert served["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["other"]


def test_answers_validate_against_the_documented_schemas() -> None:
    doc = document()
    chat = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "system_fingerprint": None,
    }
    validator(doc, "ChatCompletionResponse").validate(chat)
    with pytest.raises(jsonschema.ValidationError):
        validator(doc, "ChatCompletionResponse").validate({**chat, "object": "text_completion"})
    error = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    validator(doc, "ErrorResponse").validate(error)
    with pytest.raises(jsonschema.ValidationError):
        validator(doc, "ErrorResponse").validate({"error": {"message": "m", "type": "t"}})  # param, code: always sent


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("ChatCompletionRequest", {"messages": [{"role": "tool", "content": "x"}]}),
        ("ChatCompletionRequest", {"messages": [{"role": "user"}], "stream_options": {"include_usage": True}}),
        ("ChatCompletionRequest", {"messages": [{"role": "user"}], "top_logprobs": 2}),
        ("ChatCompletionRequest", {"messages": [{"role": "user"}], "tool_choice": "auto"}),
        ("CompletionRequest", {"prompt": []}),
        ("CompletionRequest", {"prompt": "x", "suffix": "y"}),
        ("CompletionRequest", {"prompt": ["a", "b"], "stream": True}),
    ],
)
def test_request_rules_the_gateway_enforces_are_in_the_document(name: str, body: dict[str, Any]) -> None:
    """What the document refuses, the gateway refuses too (here: Pydantic or the serving checks)."""
    doc = document()
    body = {"model": "tiny", **body}
    with pytest.raises(jsonschema.ValidationError):
        validator(doc, name).validate(body)
    fine = {"model": "tiny", **({"messages": [{"role": "user"}]} if name.startswith("Chat") else {"prompt": "x"})}
    validator(doc, name).validate(fine)
    if name == "ChatCompletionRequest":
        ChatCompletionRequest.model_validate(fine)
    else:
        CompletionRequest.model_validate(fine)
