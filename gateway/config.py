"""Gateway configuration: one YAML file, then environment overrides.

Example (``gateway/config.example.yaml`` has every key with comments)::

    triton:
      urls: [http://127.0.0.1:8000]
    models:
      smollm2-135m-instruct:
        triton_model: smollm2-135m-instruct
        tokenizer: /var/lib/llm/models/smollm2-135m-instruct
        defaults: {temperature: 0.7}

Environment overrides: ``GATEWAY_CONFIG`` (file path), ``GATEWAY_HOST``, ``GATEWAY_PORT``,
``GATEWAY_TRITON_URL`` (comma-separated), ``GATEWAY_API_KEY`` (or ``GATEWAY_API_KEY_FILE``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# The gateway's defaults, defined here only: `make serve`, `make smoke`, the model repository
# renderer (stack/) and the Ansible roles leave these out and let them apply.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9000
DEFAULT_MAX_TOKENS = 256
# The llm and vllm models decode 16 sequences at once unless told otherwise.
DEFAULT_MAX_IN_FLIGHT = 16


class SamplingDefaults(BaseModel):
    """Used when a request leaves a field out."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)


class Limits(BaseModel):
    """How much one served model takes on: admission (in flight, queue) and work per request.

    ``max_in_flight`` counts engine requests (a request with ``n`` choices, or several
    prompts, takes that many) and should match what the backend decodes at once: the llm
    and vllm models' ``max_batch_seqs`` / ``max_num_seqs`` (16 unless set). Beyond it,
    requests wait in a FIFO queue (``max_queue`` long, ``max_queue_wait_s`` at most); a full
    queue is an immediate 429, a wait that runs out a 503, both with ``Retry-After``.
    """

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1)
    max_queue: int = Field(default=256, ge=0)
    max_queue_wait_s: float = Field(default=30.0, gt=0)
    # Work one request may ask for; each is a 400 naming the field.
    max_prompts: int = Field(default=32, ge=1)  # prompts per /v1/completions request
    max_n: int = Field(default=8, ge=1)
    # prompts × n × max_tokens in all (max_tokens: the request's, or the model's default)
    max_requested_tokens: int = Field(default=32768, ge=1)


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    triton_model: str = Field(min_length=1)
    tokenizer: Path
    defaults: SamplingDefaults = SamplingDefaults()
    limits: Limits = Limits()
    # Prompt + completion limit; taken from the tokenizer/model config when not set.
    context_length: int | None = Field(default=None, ge=1)


class TritonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"], min_length=1)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Longest silence between two pieces of one answer before the request fails.
    read_timeout_s: float = Field(default=300.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    # Whole (non-streaming) answers that may run longer than this are streamed from Triton and
    # gathered, so that a client that leaves cancels them (Triton notices a gone client only
    # when it writes); shorter ones are asked whole, which costs Triton and the gateway less.
    stream_whole_answers_above_tokens: int = Field(default=64, ge=0)

    @field_validator("urls")
    @classmethod
    def _strip_slash(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"Triton URL must start with http:// or https://: {url!r}")
        return [u.rstrip("/") for u in urls]


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    api_key: SecretStr | None = None
    triton: TritonSettings = TritonSettings()
    models: dict[str, ModelSettings] = Field(min_length=1)
    log_requests: bool = False
    # Larger bodies are a 413 before they are read; larger request headers a 431.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    # SIGTERM: new requests get 503, queued ones 503, running ones this long to finish before
    # their streams end with an error event and [DONE]. Keep it under systemd's TimeoutStopSec.
    shutdown_grace_s: float = Field(default=10.0, ge=0)


class ConfigError(ValueError):
    """The configuration file or an override is wrong; the message says where."""


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> GatewaySettings:
    env = os.environ if env is None else env
    path = path or (Path(env["GATEWAY_CONFIG"]) if env.get("GATEWAY_CONFIG") else None)
    if path is None:
        raise ConfigError("no configuration: pass --config FILE or set GATEWAY_CONFIG")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")

    if env.get("GATEWAY_HOST"):
        raw["host"] = env["GATEWAY_HOST"]
    if env.get("GATEWAY_PORT"):
        raw["port"] = env["GATEWAY_PORT"]
    if env.get("GATEWAY_TRITON_URL"):
        raw.setdefault("triton", {})["urls"] = [u.strip() for u in env["GATEWAY_TRITON_URL"].split(",") if u.strip()]
    if env.get("GATEWAY_API_KEY_FILE"):
        raw["api_key"] = Path(env["GATEWAY_API_KEY_FILE"]).read_text().strip()
    if env.get("GATEWAY_API_KEY"):
        raw["api_key"] = env["GATEWAY_API_KEY"]
    if raw.get("api_key") == "":
        raw["api_key"] = None
    # Relative tokenizer folders are relative to the config file.
    for model in (raw.get("models") or {}).values():
        if isinstance(model, dict) and model.get("tokenizer"):
            tok = Path(model["tokenizer"])
            model["tokenizer"] = tok if tok.is_absolute() else (path.parent / tok)
    try:
        return GatewaySettings.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
