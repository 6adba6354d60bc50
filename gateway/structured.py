"""``response_format`` → the guide that constrained decoding follows (``engine.Guide``).

The gateway only checks that a schema is a schema (``jsonschema``'s meta-schema check, so a
typo gets a 400 naming it before any GPU time is spent); compiling it into a grammar is the
backend's job (xgrammar in the ``llm`` model, vLLM and TensorRT-LLM alike), and a schema
that compiler refuses comes back as a 400 too (``gateway.triton.engine``).
"""

from __future__ import annotations

from typing import Any

import orjson
from jsonschema import SchemaError, validators

from gateway.engine import Guide
from gateway.errors import invalid_request
from gateway.protocol import JsonObjectFormat, JsonSchemaFormat, ResponseFormat

# OpenAI's JSON mode promises an object, not any JSON value.
ANY_OBJECT = '{"type":"object"}'


def check_schema(schema: Any, param: str) -> str:
    """The schema as compact JSON text, or a 400 naming ``param`` and the schema's problem."""
    if not isinstance(schema, dict):
        raise invalid_request(f"{param}: a JSON schema must be an object", param=param)
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise invalid_request(f"{param}: invalid JSON schema at {where}: {exc.message}", param=param) from None
    return orjson.dumps(schema).decode()


def response_guide(fmt: ResponseFormat | None) -> Guide | None:
    if isinstance(fmt, JsonObjectFormat):
        return Guide("json_schema", ANY_OBJECT)
    if isinstance(fmt, JsonSchemaFormat):
        schema = fmt.json_schema.schema_
        if schema is None:  # OpenAI allows a name without a schema: any JSON object
            return Guide("json_schema", ANY_OBJECT)
        return Guide("json_schema", check_schema(schema, "response_format.json_schema.schema"))
    return None
