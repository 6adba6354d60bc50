"""GPU checks, written once for three callers: ``make smoke`` (this machine),
``tests/infra/test_gpu.py`` (testinfra, locally or over SSH) and ``stack/gpu_check.py`` (``make gpu-check``).

Each check runs shell commands through a ``Shell`` (local subprocess or testinfra's
``host.run``) and returns a ``Result``: ok, fail, or skip with the reason. The checks that
need a GPU skip on a machine without one; the others skip when what they look at is not
installed (no CUDA toolkit, no Docker), so that the CPU profile passes them all.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

WSL_LIB = "/usr/lib/wsl/lib"  # the Windows driver's libcuda and nvidia-smi, seen from WSL
Status = Literal["ok", "fail", "skip"]


class Shell(Protocol):
    def __call__(self, command: str) -> tuple[int, str]:
        """Run ``command`` with /bin/sh; (exit status, stdout and stderr together)."""
        ...


@dataclass(frozen=True)
class Result:
    name: str
    status: Status
    detail: str


def local_shell(command: str) -> tuple[int, str]:
    proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=120)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def gpu_device(sh: Shell) -> str | None:
    """The GPU device node this machine has (/dev/dxg on WSL, /dev/nvidia0 natively), or None."""
    for node in ("/dev/dxg", "/dev/nvidia0"):
        if sh(f"test -e {node}")[0] == 0:
            return node
    return None


NO_GPU = "no GPU on this machine (no /dev/dxg, no /dev/nvidia0)"


def check_device_node(sh: Shell) -> Result:
    node = gpu_device(sh)
    if node is None:
        return Result("GPU device node", "skip", NO_GPU)
    _, listing = sh("ls -d /dev/dxg /dev/nvidia* 2>/dev/null | tr '\\n' ' '")
    return Result("GPU device node", "ok", listing.strip() or node)


def _nvidia_smi(sh: Shell) -> str | None:
    rc, out = sh(f"command -v nvidia-smi || test -x {WSL_LIB}/nvidia-smi && echo {WSL_LIB}/nvidia-smi")
    return out.splitlines()[0] if rc == 0 and out else None


def check_nvidia_smi(sh: Shell) -> Result:
    if gpu_device(sh) is None:
        return Result("nvidia-smi lists a GPU", "skip", NO_GPU)
    smi = _nvidia_smi(sh)
    if smi is None:
        return Result("nvidia-smi lists a GPU", "fail", f"nvidia-smi not found (on PATH or in {WSL_LIB})")
    rc, out = sh(f"{shlex.quote(smi)} --query-gpu=name,driver_version,memory.total --format=csv,noheader")
    if rc != 0 or not out:
        return Result("nvidia-smi lists a GPU", "fail", f"{smi} failed: {out[-300:]}")
    return Result("nvidia-smi lists a GPU", "ok", out.splitlines()[0])


def check_libcuda(sh: Shell) -> Result:
    if gpu_device(sh) is None:
        return Result("libcuda.so.1 resolvable", "skip", NO_GPU)
    rc, out = sh("ldconfig -p | grep -m1 'libcuda.so.1 '")
    if rc == 0 and out:
        return Result("libcuda.so.1 resolvable", "ok", out.split("=>")[-1].strip())
    if sh(f"test -e {WSL_LIB}/libcuda.so.1")[0] == 0:
        # WSL: the loader finds it through /etc/ld.so.conf.d/ld.wsl.conf; this path is the same file.
        return Result("libcuda.so.1 resolvable", "ok", f"{WSL_LIB}/libcuda.so.1")
    return Result("libcuda.so.1 resolvable", "fail", "libcuda.so.1 is neither in the loader cache nor in " + WSL_LIB)


def check_nvcc(sh: Shell) -> Result:
    rc, out = sh("command -v nvcc || ls /usr/local/cuda/bin/nvcc")
    if rc != 0:
        return Result("CUDA toolkit (nvcc)", "skip", "no CUDA toolkit installed (the gpu profile installs one)")
    rc, out = sh(f"{shlex.quote(out.splitlines()[0])} --version")
    release = [line for line in out.splitlines() if "release" in line]
    if rc != 0 or not release:
        return Result("CUDA toolkit (nvcc)", "fail", f"nvcc --version failed: {out[-300:]}")
    return Result("CUDA toolkit (nvcc)", "ok", release[0].strip())


def _docker(sh: Shell) -> str | None:
    """None when Docker answers; else why not."""
    if sh("command -v docker")[0] != 0:
        return "no docker command"
    rc, out = sh("docker info --format '{{.ServerVersion}}'")
    if rc == 0:
        return None
    if "permission denied" in out.lower():
        return "permission denied"
    return f"docker info failed: {out[-200:]}"


NO_DOCKER_ACCESS = (
    "this user may not use Docker (permission denied on its socket): run as root, or join the "
    "docker group (docker_users) and log in again"
)


def check_docker_nvidia_runtime(sh: Shell) -> Result:
    if sh("command -v nvidia-ctk")[0] != 0:
        return Result(
            "docker: nvidia runtime", "skip", "no NVIDIA Container Toolkit (the container runtime installs it)"
        )
    why = _docker(sh)
    if why == "permission denied":
        return Result("docker: nvidia runtime", "skip", NO_DOCKER_ACCESS)
    if why is not None:
        return Result("docker: nvidia runtime", "fail", f"nvidia-ctk is installed but Docker does not answer: {why}")
    rc, out = sh("docker info --format '{{json .Runtimes}}'")
    if rc == 0 and '"nvidia"' in out:
        return Result("docker: nvidia runtime", "ok", "runtimes: " + ", ".join(sorted(_runtime_names(out))))
    return Result("docker: nvidia runtime", "fail", f"Docker has no nvidia runtime: {out[-300:]}")


def _runtime_names(json_text: str) -> list[str]:
    try:
        return list(json.loads(json_text))
    except ValueError:
        return []


def check_docker_gpu(sh: Shell, image: str | None = None) -> Result:
    name = "docker run --gpus all … nvidia-smi"
    if gpu_device(sh) is None:
        return Result(name, "skip", NO_GPU)
    why = _docker(sh)
    if why == "permission denied":
        return Result(name, "skip", NO_DOCKER_ACCESS)
    if why is not None:
        return Result(name, "skip", f"no Docker engine here ({why})")
    if image is None:
        # Any local image will do: the NVIDIA runtime mounts nvidia-smi into it. Prefer Triton's.
        rc, out = sh("docker image ls --format '{{.Repository}}:{{.Tag}}' | grep -v '<none>'")
        images = out.splitlines() if rc == 0 else []
        image = next((i for i in images if "tritonserver" in i), images[0] if images else None)
    if image is None:
        return Result(name, "skip", "no local image to run (pulls nothing)")
    rc, out = sh(f"docker run --rm --gpus all --entrypoint nvidia-smi {shlex.quote(image)} -L")
    if rc == 0 and "GPU 0" in out:
        return Result(name, "ok", f"{image}: {out.splitlines()[0]}")
    return Result(name, "fail", f"{image}: {out[-400:]}")


CHECKS: dict[str, Callable[[Shell], Result]] = {
    "device_node": check_device_node,
    "nvidia_smi": check_nvidia_smi,
    "libcuda": check_libcuda,
    "nvcc": check_nvcc,
    "docker_nvidia_runtime": check_docker_nvidia_runtime,
    "docker_gpu": check_docker_gpu,
}


def run_all(sh: Shell = local_shell) -> list[Result]:
    return [check(sh) for check in CHECKS.values()]


def print_results(results: list[Result]) -> bool:
    """Print one line per check; True when none failed."""
    for r in results:
        mark = {"ok": "ok", "fail": "FAIL", "skip": "skip"}[r.status]
        print(f"  [{mark}] {r.name}: {r.detail}", flush=True)
    return all(r.status != "fail" for r in results)
