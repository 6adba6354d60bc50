"""``make serve``: native Triton + the gateway in the foreground, with the default model.

Ports: ``GATEWAY_PORT`` (9000), ``TRITON_HTTP_PORT`` (8000), ``TRITON_GRPC_PORT`` (8001),
``TRITON_METRICS_PORT`` (8002); everything binds to 127.0.0.1 unless ``GATEWAY_HOST`` says
otherwise. Engine: ``LLM_ENGINE`` (auto | vllm | llm; auto is vllm without a GPU),
``LLM_MAX_SEQS``, ``LLM_KV_CACHE_GB``, ``LLM_DTYPE`` (see docs/configuration.md). Ctrl-C stops both.
"""

from __future__ import annotations

import signal
import sys
import time

from stack import repository
from stack.engines import EngineError, engine_from_env, ensure_engine
from stack.gateway_config import gateway_config
from stack.gateway_process import GatewayError, start_gateway
from stack.models import DEFAULT_MODEL_NAME, prepare_default_model
from stack.paths import cache_dir
from stack.triton_native import TritonError, ports_from_env, start_triton


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    # SIGTERM as SystemExit still runs the `finally` below, which stops both processes.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    work = cache_dir() / "serve"
    models = {DEFAULT_MODEL_NAME: prepare_default_model()}
    try:
        engine, params = engine_from_env()
        python = ensure_engine(engine) if engine == "vllm" else None
    except EngineError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    repository.render(work / "model_repository", models, template=repository.ENGINE_TEMPLATES[engine], params=params)
    ports = ports_from_env()
    print(
        f"starting Triton on 127.0.0.1:{ports['http']} with the {engine} engine (log: {work / 'triton.log'}; "
        "vLLM's first start compiles for a few minutes)",
        flush=True,
    )
    triton = gateway = None
    try:
        triton = start_triton(
            work / "model_repository", list(models), work / "triton.log", ports=ports, python=python, timeout=900
        )
        config = gateway_config(triton.url, {name: (name, folder) for name, folder in models.items()})
        # Host and port from GATEWAY_HOST / GATEWAY_PORT or the gateway's defaults; its log on this terminal.
        gateway = start_gateway(config, work, port=None, log_level="info", log=False)
        print(f"Triton ready; gateway on {gateway.v1} serving {', '.join(models)} (Ctrl-C stops both)", flush=True)
        while True:  # until Ctrl-C, or until one of them dies
            for name, process in (("gateway", gateway.process), ("Triton", triton.process)):
                if process is not None and process.poll() is not None:
                    print(f"serve: {name} exited with code {process.returncode}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except (TritonError, GatewayError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C must not cut the clean-up short: Triton runs in its own session.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stopping the gateway and Triton", flush=True)
        if gateway:
            gateway.stop()
        if triton:
            triton.stop()


if __name__ == "__main__":
    sys.exit(main())
