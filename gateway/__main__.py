"""``python -m gateway --config FILE``: run the gateway with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.config import ConfigError, load_settings
from gateway.shutdown import DrainingServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="YAML file (default: $GATEWAY_CONFIG)")
    parser.add_argument("--host", default=None, help="overrides the config and GATEWAY_HOST")
    parser.add_argument("--port", type=int, default=None, help="overrides the config and GATEWAY_PORT")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    run(
        create_app(settings),
        args.host or settings.host,
        args.port or settings.port,
        args.log_level,
        settings.log_requests,
        settings.shutdown_grace_s,
    )
    return 0


def run(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "info",
    access_log: bool = False,
    shutdown_grace_s: float = 10.0,
) -> None:
    """uvicorn with the fast loop and parser, no per-response work we don't need, and a drain
    on SIGTERM (gateway.shutdown)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        access_log=access_log,
        # Clients reach us directly (or through a proxy that sets its own headers).
        proxy_headers=False,
        server_header=False,
        # After the drain every answer has ended; this only bounds closing the connections.
        timeout_graceful_shutdown=5,
    )
    DrainingServer(config, shutdown_grace_s).run()


if __name__ == "__main__":
    sys.exit(main())
