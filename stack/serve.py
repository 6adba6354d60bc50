"""``make serve``: native Triton + the gateway in the foreground, with the default model.

Ports: ``GATEWAY_PORT`` (9000), ``TRITON_HTTP_PORT`` (8000), ``TRITON_GRPC_PORT`` (8001),
``TRITON_METRICS_PORT`` (8002); everything binds to 127.0.0.1 unless ``GATEWAY_HOST`` says
otherwise. Ctrl-C stops both.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from gateway.__main__ import run as run_gateway
from gateway.app import create_app
from gateway.config import load_settings
from stack import repository
from stack.models import DEFAULT_MODEL_NAME, prepare_default_model
from stack.paths import cache_dir
from stack.triton_native import TritonError, TritonServer


def write_gateway_config(path: Path, triton_url: str, models: dict[str, Path]) -> Path:
    config = {
        "host": "127.0.0.1",
        "port": 9000,
        "triton": {"urls": [triton_url]},
        "models": {name: {"triton_model": name, "tokenizer": str(folder)} for name, folder in models.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    # uvicorn re-raises SIGTERM after its own shutdown; as SystemExit it still lets the
    # `finally` below stop Triton (the default action would kill us first).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = os.environ
    http_port = int(env.get("TRITON_HTTP_PORT", 8000))
    work = cache_dir() / "serve"
    models = {DEFAULT_MODEL_NAME: prepare_default_model()}
    repo = repository.render(work / "model_repository", models)
    server = TritonServer(
        repo,
        http_port=http_port,
        grpc_port=int(env.get("TRITON_GRPC_PORT", 8001)),
        metrics_port=int(env.get("TRITON_METRICS_PORT", 8002)),
        log_file=work / "triton.log",
    )
    print(f"starting Triton on 127.0.0.1:{http_port} (log: {server.log_file})", flush=True)
    try:
        server.start()
        server.wait_ready(list(models))
        config = write_gateway_config(work / "gateway.yaml", server.url, models)
        settings = load_settings(config)  # GATEWAY_HOST / GATEWAY_PORT / GATEWAY_API_KEY apply
        print(
            f"Triton ready; gateway on http://{settings.host}:{settings.port}/v1 "
            f"serving {', '.join(models)} (Ctrl-C stops both)",
            flush=True,
        )
        run_gateway(create_app(settings), settings.host, settings.port)
    except TritonError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping Triton", flush=True)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
