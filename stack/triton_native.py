"""Run the real ``tritonserver`` binary that ships inside the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51, its shared libraries (``nvidia_pytriton.libs/``), the
Python backend and one Python-backend stub per interpreter version. Triton wants a
backend folder holding ``libtriton_python.so`` *and* the stub of the interpreter that
will run ``model.py``, so we assemble one in a cache folder and point Triton at it.
This is the runtime of the CPU profile, of CI and of ``make serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stack.net import free_port, port_in_use
from stack.paths import cache_dir

# Triton's own default ports; TRITON_HTTP_PORT / TRITON_GRPC_PORT / TRITON_METRICS_PORT override.
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def ports_from_env(env: Mapping[str, str] = os.environ) -> dict[str, int]:
    return {kind: int(env.get(f"TRITON_{kind.upper()}_PORT") or port) for kind, port in DEFAULT_PORTS.items()}


class TritonError(RuntimeError):
    """Triton could not be found, started, or made ready."""


# The Python backend's stub processes: Triton forks them into its own process group. They
# ignore SIGTERM, and when tritonserver is SIGKILLed they can outlive it (holding the model's
# memory), so whoever reaps tritonserver SIGKILLs the rest of its group (``kill_group``).
STUB_NAME = "triton_python_backend_stub"
_PR_SET_PDEATHSIG = 1


def _pdeathsig_setter(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when its parent thread dies (Linux).

    ``prctl`` is looked up here, in the parent, so that the forked child only calls it.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux/glibc: no parent-death signal
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: act as if it came in time
            os.kill(os.getpid(), sig)

    return preexec


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _stub_shm_regions(pids: Sequence[int]) -> set[Path]:
    """The Python backend's shared-memory files that ``pids`` have mapped."""
    regions = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if path.startswith("/dev/shm/triton_python_backend_shm_region"):
                regions.add(Path(path.removesuffix(" (deleted)")))
    return regions


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the wheel's Triton live."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path

    @classmethod
    def locate(cls, python_version: str | None = None) -> TritonInstall:
        """Find the wheel's tritonserver and the stub for ``python_version`` (default: ours)."""
        try:
            import pytriton
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise TritonError(
                "nvidia-pytriton is not installed: run `make setup` (pip install nvidia-pytriton==0.7.0)"
            ) from exc
        root = Path(pytriton.__file__).parent / "tritonserver"
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            binary=root / "bin" / "tritonserver",
            libs=root.parent.parent / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for path in (install.binary, install.libs, install.python_backend, install.stub):
            if not path.exists():
                raise TritonError(f"incomplete nvidia-pytriton install: {path} is missing")
        return install

    def backend_dir(self, dest: Path | None = None) -> Path:
        """A backend folder with the Python backend plus the matching stub (cached)."""
        dest = dest or cache_dir() / "triton-backends"
        python_dir = dest / "python"
        stub_dest = python_dir / "triton_python_backend_stub"
        if stub_dest.exists() and stub_dest.stat().st_size == self.stub.stat().st_size:
            return dest
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.python_backend, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.stub, tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return dest


_PYTHON_FACTS = (
    "import json, sys, sysconfig; print(json.dumps({'purelib': sysconfig.get_paths()['purelib'], "
    "'libdir': sysconfig.get_config_var('LIBDIR') or '', 'prefix': sys.prefix, 'base_prefix': sys.base_prefix, "
    "'version': '%d.%d' % sys.version_info[:2]}))"
)


def python_facts(python: Path | None = None) -> dict[str, str]:
    """Where ``python`` (default: this interpreter) keeps its packages and libpython."""
    if python is None:
        return {
            "purelib": sysconfig.get_paths()["purelib"],
            "libdir": sysconfig.get_config_var("LIBDIR") or "",
            "prefix": sys.prefix,
            "base_prefix": sys.base_prefix,
            "version": f"{sys.version_info.major}.{sys.version_info.minor}",
        }
    try:
        out = subprocess.run([str(python), "-c", _PYTHON_FACTS], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise TritonError(f"cannot run the stub's interpreter {python}: {exc}") from exc
    facts: dict[str, str] = json.loads(out)
    return facts


def _python_env(python: Path | None = None) -> dict[str, str]:
    """Environment that lets the stub's embedded Python import the packages of ``python``'s venv.

    ``python`` is this interpreter by default; an engine with pins of its own (vLLM) gives
    the interpreter of its venv (``stack.engines``), which must be the same Python version.
    """
    facts = python_facts(python)
    env = dict(os.environ)
    # The stub's embedded Python finds its prefix through the `python3` on PATH: put ours
    # first (a venv that was never activated would otherwise not be seen at all).
    bin_dir = os.path.dirname(str(python)) if python else os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    if facts["prefix"] != facts["base_prefix"]:
        env["VIRTUAL_ENV"] = facts["prefix"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (facts["purelib"], env.get("PYTHONPATH", "")) if p)
    env["_TRITON_LIBPYTHON_DIR"] = facts["libdir"]
    # Models keep their own caches beside ours (the vllm model: torch.compile's artefacts).
    env.setdefault("STACK_CACHE", str(cache_dir()))
    # systemd and bare shells set no locale; the vllm model takes this one for its file
    # encoding (the stub's embedded Python would read UTF-8 files as ASCII otherwise).
    if "UTF-8" not in (env.get("LC_ALL") or env.get("LC_CTYPE") or env.get("LANG") or "").upper():
        env["LC_CTYPE"] = "C.UTF-8"
    return env


@dataclass
class TritonServer:
    """One tritonserver process: ``start()``, ``wait_ready()``, ``stop()`` (or use ``with``)."""

    model_repository: Path
    http_port: int = DEFAULT_PORTS["http"]
    grpc_port: int = DEFAULT_PORTS["grpc"]
    metrics_port: int = DEFAULT_PORTS["metrics"]
    host: str = "127.0.0.1"
    log_file: Path | None = None
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    install: TritonInstall | None = None
    # The interpreter whose venv the Python stub uses (None: this one); see _python_env.
    python: Path | None = None
    # Signal tritonserver gets when the thread that started it dies (PR_SET_PDEATHSIG; None:
    # none). SIGTERM: it unloads its models and stops their stubs, so that a supervisor that
    # is killed leaves nothing behind. Start it from a thread that lives as long as it should.
    parent_death_signal: int | None = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _locate(self) -> TritonInstall:
        # The stub must match the Python version of the interpreter that runs model.py.
        return TritonInstall.locate(python_facts(self.python)["version"] if self.python else None)

    def command(self) -> list[str]:
        install = self.install or self._locate()
        return [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backend_dir()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            # A model that fails to load should fail the start loudly, not half-serve.
            "--exit-on-error=true",
            "--strict-readiness=true",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        install = self.install or self._locate()
        env = _python_env(self.python)
        libpython = env.pop("_TRITON_LIBPYTHON_DIR")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.libs), libpython, env.get("LD_LIBRARY_PATH", "")) if p
        )
        env.update(self.env)
        return env

    def ports_in_use(self) -> list[int]:
        return [p for p in (self.http_port, self.grpc_port, self.metrics_port) if port_in_use(self.host, p)]

    def start(self) -> TritonServer:
        if self.process and self.process.poll() is None:
            return self
        # Another server on our ports would answer our readiness checks in our place.
        busy = self.ports_in_use()
        if busy:
            raise TritonError(
                f"port(s) {', '.join(map(str, busy))} on {self.host} already in use: another Triton "
                "(or `make serve`) is running? Stop it or set TRITON_HTTP_PORT/TRITON_GRPC_PORT/TRITON_METRICS_PORT"
            )
        self.install = self.install or self._locate()
        log_file = self.log_file or cache_dir() / "logs" / f"triton-{self.http_port}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log_file
        with log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: Ctrl-C in a terminal reaches us, and we stop Triton cleanly.
                # The Python backend's stubs join this group (see kill_group).
                start_new_session=True,
                preexec_fn=_pdeathsig_setter(self.parent_death_signal) if self.parent_death_signal else None,
            )
        return self

    def kill_group(self) -> list[int]:
        """SIGKILL what is left of tritonserver's process group once tritonserver has exited
        (the Python-backend stubs, which ignore SIGTERM), and remove the shared-memory files
        they held. Returns the pids it killed. Call it after ``process`` has been reaped:
        the group id stays reserved while any member lives, so it cannot hit another process.
        """
        proc = self.process
        if proc is None or proc.poll() is None:
            return []
        left = group_members(proc.pid)
        if not left:
            return []
        regions = _stub_shm_regions(left)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for region in regions:  # tritonserver, which unlinks them, died first
            with contextlib.suppress(OSError):
                region.unlink()
        return left

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def is_ready(self, models: Sequence[str] = ()) -> bool:
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
        try:
            for path in paths:
                with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                    if resp.status != 200:
                        return False
        except (urllib.error.URLError, OSError):
            return False
        return True

    def wait_ready(self, models: Sequence[str] = (), timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"log tail ({self.log_file}):\n{self.log_tail()}"
                )
            if self.is_ready(models):
                return
            time.sleep(0.2)
        raise TritonError(
            f"tritonserver not ready after {timeout:.0f}s (models: {', '.join(models) or '-'}); "
            f"log tail ({self.log_file}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            # SIGTERM lets Triton unload models (and their stub processes) before it exits.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # A stub that outlived tritonserver (it died hard, or did not wait for it).
        self.kill_group()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_triton(
    repo: Path,
    models: Sequence[str],
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    ports: Mapping[str, int] | None = None,
    python: Path | None = None,
) -> TritonServer:
    """Start Triton on ``repo`` and wait until it and ``models`` are ready (stopped again on failure).

    ``ports`` maps http/grpc/metrics to ports; free ones are picked when it is left out.
    ``python``: the interpreter whose venv runs the models (``stack.engines``); default ours.
    """
    chosen = dict(ports) if ports else {kind: free_port() for kind in DEFAULT_PORTS}
    server = TritonServer(
        repo,
        http_port=chosen["http"],
        grpc_port=chosen["grpc"],
        metrics_port=chosen["metrics"],
        log_file=log,
        env=dict(env or {}),
        python=python,
    )
    server.start()
    try:
        server.wait_ready(models, timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the native tritonserver from nvidia-pytriton.")
    ports = ports_from_env()
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default=os.environ.get("TRITON_HOST", "127.0.0.1"))
    parser.add_argument("--http-port", type=int, default=ports["http"])
    parser.add_argument("--grpc-port", type=int, default=ports["grpc"])
    parser.add_argument("--metrics-port", type=int, default=ports["metrics"])
    parser.add_argument(
        "--python",
        type=Path,
        default=None,
        help="interpreter whose venv runs model.py (e.g. the vLLM engine's, python -m stack.engines vllm)",
    )
    parser.add_argument("--print-command", action="store_true", help="print the command line and exit")
    args, extra = parser.parse_known_args(argv)
    server = TritonServer(
        args.model_repository.resolve(),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        extra_args=extra,
        python=args.python,
    )
    if args.print_command:
        print(" ".join(server.command()))
        return 0
    # In the foreground (systemd, a terminal): become tritonserver, so signals go straight to it.
    # Nothing of ours stays to watch it: under systemd (llm-triton.service, KillMode=mixed) the
    # unit's cgroup is SIGKILLed when tritonserver exits, stubs included, and the unit restarts.
    env = server.environment()
    cmd = server.command()
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main())
