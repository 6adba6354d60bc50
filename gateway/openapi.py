"""The gateway's OpenAPI document: what FastAPI derives, completed with what it cannot know.

FastAPI documents the request models and a 422 the gateway never sends (validation errors
are 400s in OpenAI's envelope, ``gateway.app``). ``install_openapi`` replaces ``app.openapi``
with a document that

- lists the served model names as the ``enum`` of ``model`` in both request bodies, so that a
  client generator, or a fuzzer, reaches the model instead of stopping at the 404 for an
  unknown name;
- documents, on every operation, the statuses the gateway really answers with, each error in
  the envelope ``{"error": {"message", "type", "param", "code"}}`` (``gateway.errors``), and no 422;
- describes the 200 of ``/v1/chat/completions`` and ``/v1/completions``: a whole answer
  (``application/json``) or a stream (``text/event-stream``, one schema per event:
  ``data`` is a chunk, an error envelope, or ``[DONE]``), from ``gateway.protocol``'s
  response models; ``/metrics`` as Prometheus text.

A wrong method for a route is a 405 with ``Allow``: it belongs to no operation, so no
operation lists it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)

_REF = "#/components/schemas/{model}"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_RETRY_AFTER = {
    "description": "Seconds to wait before retrying",
    "schema": {"type": "integer", "minimum": 0},
}
_SECURITY_SCHEME = "bearerAuth"

# status -> (description, whether it carries Retry-After)
_ERRORS: dict[int, tuple[str, bool]] = {
    400: (
        "Invalid request: a field (`param` names it), a body that is not JSON, a prompt that does not "
        "fit the context (`code: context_length_exceeded`), or more work than the model's limits allow",
        False,
    ),
    401: ("API key missing or wrong (`code: invalid_api_key`)", False),
    404: ("Unknown model (`param: model`, `code: model_not_found`)", False),
    413: ("Request body larger than the gateway accepts", False),
    429: ("The model's queue is full: retry after `Retry-After` seconds", True),
    431: ("Request headers larger than the gateway accepts", False),
    500: ("Unexpected error in the gateway (`type: server_error`)", False),
    502: ("Triton answered with an error or broke off the answer (`code: upstream_error`)", False),
    503: (
        "Triton unreachable or not ready (`code: upstream_unavailable`), the wait in the model's queue "
        "ran out, or the gateway is shutting down; `Retry-After` when waiting helps",
        True,
    ),
}
_EVERYWHERE = (413, 431, 500, 503)  # transport limits, the catch-all, shutdown
_GENERATION = (400, 404, 429, 502, *_EVERYWHERE)
# (path, method) -> error statuses besides 401
_OPERATION_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("/v1/chat/completions", "post"): _GENERATION,
    ("/v1/completions", "post"): _GENERATION,
    ("/v1/models", "get"): _EVERYWHERE,
    ("/v1/models/{model_id}", "get"): (404, *_EVERYWHERE),
    ("/health", "get"): _EVERYWHERE,
    ("/metrics", "get"): _EVERYWHERE,
}
# request model -> (whole answer, streamed chunk, request example without "model")
_GENERATION_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel], dict[str, Any]]] = {
    ChatCompletionRequest.__name__: (
        ChatCompletionResponse,
        ChatCompletionChunk,
        {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16},
    ),
    CompletionRequest.__name__: (CompletionResponse, CompletionResponse, {"prompt": "Hello,", "max_tokens": 16}),
}
# Always written by gateway.responses though the models give them defaults.
_ALWAYS_SENT = {
    "ChatCompletionResponse": ("object",),
    "ChatCompletionChunk": ("object",),
    "CompletionResponse": ("object",),
    "ErrorBody": ("param", "code"),
}


def install_openapi(app: FastAPI, models: Iterable[str]) -> None:
    """Make ``app.openapi()`` return the completed document (see the module doc); idempotent."""
    names = list(models)
    if not names:
        raise ValueError("install_openapi needs at least one served model name")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            base = FastAPI.openapi(app)  # FastAPI's own document (it caches it on the app)
            api_key = getattr(app.state, "api_key", None) is not None
            app.openapi_schema = complete(copy.deepcopy(base), names, api_key=api_key)
        return app.openapi_schema

    app.openapi_schema = None  # a second install (other names) starts from FastAPI's document again
    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any], models: list[str], *, api_key: bool) -> dict[str, Any]:
    """``document`` (FastAPI's) completed in place, and returned."""
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    _add_response_schemas(schemas)
    if api_key:
        document["components"].setdefault("securitySchemes", {})[_SECURITY_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "The gateway's API key: `Authorization: Bearer <key>`",
        }
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            _complete_operation(path, method, operation, schemas, models, api_key)
    _drop_unused(document, ("HTTPValidationError", "ValidationError"))
    _add_request_rules(schemas)
    return document


def _present(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": [field], "properties": {field: schema}}


def _add_request_rules(schemas: dict[str, Any]) -> None:
    """What ``gateway.protocol``'s validators and ``gateway.serving`` check beyond the field types,
    where JSON schema can say it: a body the document accepts then gets past them."""
    not_null = {"not": {"type": "null"}}
    needs_stream = {"if": _present("stream_options", not_null), "then": _present("stream", {"const": True})}
    chat = schemas.get(ChatCompletionRequest.__name__)
    if chat is not None:
        no_tools = {
            "anyOf": [
                {"not": {"required": ["tools"]}},
                {"properties": {"tools": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}},
            ]
        }
        chat["allOf"] = [
            needs_stream,
            {"if": _present("top_logprobs", not_null), "then": _present("logprobs", {"const": True})},
            # tool_choice other than "none" needs tools; logprobs do not go with tools
            {
                "if": no_tools,
                "then": {"properties": {"tool_choice": {"anyOf": [{"type": "null"}, {"const": "none"}]}}},
                "else": {"properties": {"logprobs": {"anyOf": [{"type": "null"}, {"const": False}]}}},
            },
        ]
    message = schemas.get("ChatMessage")
    if message is not None:
        message["if"] = _present("role", {"const": "tool"})
        message["then"] = _present("tool_call_id", {"type": "string", "minLength": 1})
    completion = schemas.get(CompletionRequest.__name__)
    if completion is not None:
        completion["allOf"] = [
            needs_stream,
            # a stream answers one prompt
            {
                "if": _present("stream", {"const": True}),
                "then": {"properties": {"prompt": {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 1}]}}},
            },
        ]
        props = completion["properties"]
        for branch in props["prompt"].get("anyOf", []):
            if branch.get("type") == "array":
                branch["minItems"] = 1
        props["suffix"] = {
            "anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}],
            "title": "Suffix",
            "description": "Not supported: only empty or null",
        }
        props["best_of"] = {
            **props.get("best_of", {}),
            "description": "Not supported: only null or equal to n",
        }


def _complete_operation(
    path: str, method: str, operation: dict[str, Any], schemas: dict[str, Any], models: list[str], api_key: bool
) -> None:
    responses: dict[str, Any] = operation["responses"]
    responses.pop("422", None)
    statuses = list(_OPERATION_ERRORS.get((path, method), _EVERYWHERE))
    if api_key and path.startswith("/v1/"):
        statuses.append(401)
        operation["security"] = [{_SECURITY_SCHEME: []}]
    for status in sorted(statuses):
        description, retry_after = _ERRORS[status]
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": dict(_ERROR_REF)}},
        }
        if retry_after:
            response["headers"] = {"Retry-After": dict(_RETRY_AFTER)}
        responses[str(status)] = response

    body_model = _request_model(operation)
    if body_model in _GENERATION_BODIES:
        answer, chunk, example = _GENERATION_BODIES[body_model]
        model = schemas[body_model]["properties"]["model"]
        model["enum"] = list(models)
        model["examples"] = [models[0]]
        operation["requestBody"]["content"]["application/json"]["example"] = {"model": models[0], **example}
        responses["200"] = {
            "description": (
                "The whole answer (`application/json`), or with `stream: true` server-sent events "
                "(`text/event-stream`): each `data` is a chunk, or once an answer has begun an error "
                "envelope, and the last is `[DONE]`"
            ),
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=answer.__name__)}},
                "text/event-stream": {"schema": _event_schema(chunk.__name__)},
            },
        }
    elif path == "/health":
        responses["200"] = {
            "description": "Triton and every served model are ready",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"status": {"const": "ok"}},
                        "required": ["status"],
                    }
                }
            },
        }
    elif path == "/metrics":
        responses["200"] = {
            "description": "Prometheus metrics (text exposition format)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    elif path == "/v1/models/{model_id}":
        for parameter in operation.get("parameters", []):
            if parameter.get("name") == "model_id":
                parameter["example"] = models[0]


def _request_model(operation: dict[str, Any]) -> str | None:
    try:
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    except (KeyError, TypeError):
        return None
    return str(ref).rsplit("/", 1)[-1]


def _event_schema(chunk: str) -> dict[str, Any]:
    """One server-sent event, as schemathesis (and OpenAPI 3.2's ``itemSchema``) read them."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [{"$ref": _REF.format(model=chunk)}, dict(_ERROR_REF)]},
                },
            },
        },
    }


def _add_response_schemas(schemas: dict[str, Any]) -> None:
    """gateway.protocol's response models as components (shared ones must agree with FastAPI's)."""
    models: list[type[BaseModel]] = [ErrorResponse]
    for answer, chunk, _ in _GENERATION_BODIES.values():
        models += [answer, chunk]
    _, generated = models_json_schema([(m, "validation") for m in dict.fromkeys(models)], ref_template=_REF)
    for name, schema in generated.get("$defs", {}).items():
        for field in _ALWAYS_SENT.get(name, ()):
            if field not in schema["required"]:
                schema["required"].append(field)
        if name in schemas and schemas[name] != schema:
            raise RuntimeError(f"OpenAPI component {name!r}: the request and the response schemas differ")
        schemas[name] = schema


def _drop_unused(document: dict[str, Any], names: Iterable[str]) -> None:
    """Remove the named components (in order) that nothing else refers to any more."""
    schemas = document["components"]["schemas"]
    for name in names:
        if name not in schemas:
            continue
        schema = schemas.pop(name)
        if f'"{_REF.format(model=name)}"' in json.dumps(document):
            schemas[name] = schema
