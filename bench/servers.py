"""The processes the benchmark measures: native Triton, the gateway, LiteLLM's proxy.

Triton and the gateway are started by the stack's own launchers, as ``make serve`` and the
integration tests start them: the real ``tritonserver`` binary (``stack.triton_native``),
and ``python -m gateway --config FILE --port P`` as its own process (``stack.gateway_process``).
LiteLLM's proxy is its own ``litellm --config FILE`` process. Every port is a free one on
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from stack import gateway_config as stack_gateway_config
from stack.gateway_process import Gateway, start_gateway
from stack.net import free_port
from stack.paths import REPO_ROOT
from stack.triton_native import TritonServer, start_triton

BENCH_REPOSITORY = REPO_ROOT / "bench" / "model_repository"
SYNTHETIC = "synthetic"

__all__ = [
    "BENCH_REPOSITORY",
    "SYNTHETIC",
    "Gateway",
    "LiteLLMProxy",
    "TritonServer",
    "gateway_config",
    "start_gateway",
    "start_litellm",
    "start_synthetic_triton",
    "start_triton",
]


# The synthetic model runs any number of requests at once: admission must not be what is measured.
UNLIMITED: dict[str, object] = {"limits": {"max_in_flight": 100_000, "max_queue": 100_000}}


def gateway_config(
    triton_url: str, models: dict[str, tuple[str, Path]], model_settings: dict[str, object] | None = None
) -> dict[str, object]:
    """The stack's gateway config with a 60 s read timeout: a stalled stream fails the run fast.

    ``model_settings``: e.g. ``UNLIMITED`` for the synthetic model; a real engine keeps the
    gateway's default admission (its batch)."""
    return stack_gateway_config.gateway_config(triton_url, models, model_settings, triton_read_timeout_s=60)


def start_synthetic_triton(workdir: Path, piece_delay_ms: float = 0.0) -> TritonServer:
    """Native Triton serving only the bench's synthetic model."""
    env = {"BENCH_PIECE_DELAY_MS": str(piece_delay_ms)}
    return start_triton(BENCH_REPOSITORY, [SYNTHETIC], workdir / "triton-synthetic.log", env=env)


@dataclass
class LiteLLMProxy:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    config: Path

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        # Its own session: the proxy and anything it spawned go together.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def chat_template_of(tokenizer_dir: Path) -> dict[str, object]:
    """The tokenizer's chat template and special tokens, as LiteLLM caches a Hub tokenizer config."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {
        "status": "success",
        "tokenizer": {
            "chat_template": tokenizer.chat_template,
            "bos_token": tokenizer.bos_token or "",
            "eos_token": tokenizer.eos_token or "",
        },
    }


def litellm_config(triton_url: str, model: str, tokenizer_dir: Path) -> dict[str, object]:
    """LiteLLM's Triton provider: ``triton/<model>`` with ``api_base`` ending in ``/generate``.

    LiteLLM (litellm/llms/triton/completion/transformation.py) picks its ``/generate``
    flavour from that suffix, posts ``{"text_input", "parameters": {"max_tokens"}, "stream"}``
    there, and for ``stream: true`` posts the same to ``api_base + "_stream"``
    (``generate_stream``).

    ``text_input`` comes from LiteLLM's ``prompt_factory``, which for a model it does not
    know fetches ``tokenizer_config.json`` from the Hugging Face Hub *on every request*
    until one fetch succeeds. Offline that is a failed DNS lookup per request (seen: some
    took 5 s). ``known_tokenizer_config`` is LiteLLM's own cache of those fetches: filled
    with the chat template of the gateway's tokenizer, LiteLLM renders exactly the prompt
    the gateway sends, and never leaves the machine.
    """
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"triton/{model}",
                    "api_base": f"{triton_url}/v2/models/{model}/generate",
                },
            }
        ],
        "litellm_settings": {
            "telemetry": False,
            "drop_params": True,
            "request_timeout": 300,
            "known_tokenizer_config": {model: chat_template_of(tokenizer_dir)},
        },
    }


def start_litellm(
    triton_url: str, model: str, tokenizer_dir: Path, workdir: Path, timeout: float = 180.0
) -> LiteLLMProxy:
    port = free_port()
    config = workdir / f"litellm-{port}.yaml"
    config.write_text(yaml.safe_dump(litellm_config(triton_url, model, tokenizer_dir), sort_keys=False))
    log = workdir / f"litellm-{port}.log"
    env = {
        **os.environ,
        # No fetch of the model price map from the internet at start: the bundled copy.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        # Errors only: no uvicorn access log (the gateway runs without one too).
        "LITELLM_LOG": "ERROR",
        # Like the gateway without an api_key: no authentication on either (loopback only).
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    }
    binary = Path(sys.executable).parent / "litellm"
    process = subprocess.Popen(
        [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        cwd=workdir,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proxy = LiteLLMProxy(f"http://127.0.0.1:{port}", process, log, config)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"litellm exited ({process.returncode}): {log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(proxy.url + "/health/liveliness", timeout=1) as resp:
                if resp.status == 200:
                    return proxy
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    proxy.stop()
    raise RuntimeError(f"litellm did not start in {timeout:.0f} s: {log.read_text(errors='replace')[-2000:]}")
