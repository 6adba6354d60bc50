"""``make serve``: native Triton + the gateway in the foreground, with the default model.

Ports: ``GATEWAY_PORT`` (9000), ``TRITON_HTTP_PORT`` (8000), ``TRITON_GRPC_PORT`` (8001),
``TRITON_METRICS_PORT`` (8002); everything binds to 127.0.0.1 unless ``GATEWAY_HOST`` says
otherwise. Engine: ``LLM_ENGINE`` (auto | vllm | llm; auto is vllm without a GPU),
``LLM_MAX_SEQS``, ``LLM_KV_CACHE_GB``, ``LLM_DTYPE`` (see docs/configuration.md). Ctrl-C stops both.

A Triton that dies is started again (with backoff) while the gateway keeps running; the
gateway exiting stops both (``stack.supervise``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Mapping

from gateway.config import DEFAULT_MAX_IN_FLIGHT
from stack import repository
from stack.engines import EngineError, engine_from_env, ensure_engine
from stack.gateway_config import gateway_config
from stack.gateway_process import Gateway, GatewayError, start_gateway
from stack.models import DEFAULT_MODEL_NAME, prepare_default_model
from stack.paths import cache_dir
from stack.supervise import Supervisor
from stack.triton_native import TritonError, TritonServer, ports_from_env


def max_in_flight(params: Mapping[str, str]) -> int:
    """The gateway's admission limit: the engine's batch (LLM_MAX_SEQS as the engine's
    max_num_seqs / max_batch_seqs), else what both engines decode at once by default (16)."""
    seqs = (params.get("max_num_seqs") or params.get("max_batch_seqs") or "").strip()
    return int(seqs) if seqs.isdigit() and int(seqs) > 0 else DEFAULT_MAX_IN_FLIGHT


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
    triton = TritonServer(
        work / "model_repository",
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        log_file=work / "triton.log",
        python=python,
    )
    config = gateway_config(
        triton.url,
        {name: (name, folder) for name, folder in models.items()},
        model_settings={"limits": {"max_in_flight": max_in_flight(params)}},
    )

    def gateway() -> Gateway:
        # Host and port from GATEWAY_HOST / GATEWAY_PORT or the gateway's defaults; its log on this terminal.
        gw = start_gateway(config, work, port=None, log_level="info", log=False)
        print(f"Triton ready; gateway on {gw.v1} serving {', '.join(models)} (Ctrl-C stops both)", flush=True)
        return gw

    supervisor = Supervisor(triton, list(models), gateway, ready_timeout=900)
    try:
        return supervisor.serve()  # until Ctrl-C, or until the gateway dies; restarts Triton
    except (TritonError, GatewayError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C must not cut the clean-up short: Triton runs in its own session.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        supervisor.shutdown()


if __name__ == "__main__":
    sys.exit(main())
