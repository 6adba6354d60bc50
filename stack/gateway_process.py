"""The gateway as its own process (``python -m gateway --config FILE``): the one code that starts it.

``make serve``, ``make gpu-check``, the benchmark and the tests start it here; on a
provisioned host systemd runs the same command (roles/gateway).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gateway.config import load_settings
from stack import gateway_config
from stack.net import free_port, probe_host
from stack.paths import REPO_ROOT

if TYPE_CHECKING:
    from openai import OpenAI


class GatewayError(RuntimeError):
    """The gateway exited or did not answer in time; the message carries its log tail."""


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log: Path | None
    config: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self, **kw: Any) -> OpenAI:
        """The official ``openai`` client pointed at this gateway."""
        from openai import OpenAI

        return OpenAI(**{"base_url": self.v1, "api_key": "unused", "max_retries": 0, "timeout": 120, **kw})

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code < 500  # 401 without the API key: up all the same
    except (urllib.error.URLError, OSError):
        return False


def start_gateway(
    config: Mapping[str, Any],
    workdir: Path,
    env: Mapping[str, str] | None = None,
    port: int | None = 0,
    log_level: str = "warning",
    log: bool = True,
    timeout: float = 60.0,
) -> Gateway:
    """Write ``config`` into ``workdir`` and start the gateway on it; return once it answers.

    ``port=0`` picks a free port; ``None`` leaves host and port to the config and
    ``GATEWAY_HOST``/``GATEWAY_PORT``, as ``make serve`` does. ``log=False`` keeps the
    gateway's output on this terminal instead of a file in ``workdir``.
    """
    env = {**os.environ, **(env or {})}
    port = free_port() if port == 0 else port
    name = f"gateway-{port}" if port else "gateway"
    path = workdir / f"{name}.yaml"
    gateway_config.write(path, config)
    settings = load_settings(path, env)  # what the gateway itself will read
    host, port = probe_host(settings.host), port or settings.port
    command = [sys.executable, "-m", "gateway", "--config", str(path), "--log-level", log_level]
    if port != settings.port:
        command += ["--port", str(port)]
    log_path = workdir / f"{name}.log" if log else None
    with contextlib.ExitStack() as stack:
        out: IO[bytes] | None = stack.enter_context(log_path.open("wb")) if log_path else None
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out else None
        )
    gateway = Gateway(f"http://{host}:{port}", process, log_path, path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GatewayError(f"gateway exited with code {process.returncode}: {gateway.log_tail()}")
        if _answers(gateway.url + "/v1/models"):
            return gateway
        time.sleep(0.1)
    gateway.stop()
    raise GatewayError(f"gateway did not answer in {timeout:.0f} s: {gateway.log_tail()}")
