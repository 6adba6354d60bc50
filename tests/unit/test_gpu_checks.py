"""stack/gpu_checks.py against scripted shells: a WSL machine with a GPU, a native one, none."""

from __future__ import annotations

import re

from stack import gpu_checks


class FakeShell:
    """Answers commands by the first regex that matches; anything else exits 1."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers = answers
        self.seen: list[str] = []

    def __call__(self, command: str) -> tuple[int, str]:
        self.seen.append(command)
        for pattern, answer in self.answers.items():
            if re.search(pattern, command):
                return answer
        return 1, ""


WSL_GPU = {
    r"^test -e /dev/dxg$": (0, ""),
    r"^ls -d /dev/dxg": (0, "/dev/dxg"),
    r"command -v nvidia-smi": (0, "/usr/lib/wsl/lib/nvidia-smi"),
    r"nvidia-smi --query-gpu": (0, "NVIDIA GeForce RTX 4090, 566.36, 24564 MiB"),
    r"^test -e /usr/lib/wsl/lib/libcuda.so.1$": (0, ""),
    r"command -v nvcc": (0, "/usr/local/cuda/bin/nvcc"),
    r"nvcc --version": (0, "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.8, V12.8.93"),
    r"command -v nvidia-ctk": (0, "/usr/bin/nvidia-ctk"),
    r"^command -v docker$": (0, "/usr/bin/docker"),
    r"docker info --format '\{\{.ServerVersion\}\}'": (0, "27.5.1"),
    r"docker info --format '\{\{json .Runtimes\}\}'": (0, '{"io.containerd.runc.v2":{},"nvidia":{},"runc":{}}'),
    r"docker image ls": (0, "busybox:latest\nnvcr.io/nvidia/tritonserver:25.01-py3"),
    r"docker run --rm --gpus all": (0, "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1234)"),
}


def _by_name(sh: FakeShell) -> dict[str, gpu_checks.Result]:
    return {key: check(sh) for key, check in gpu_checks.CHECKS.items()}


def test_wsl_machine_with_a_gpu_passes_every_check() -> None:
    sh = FakeShell(WSL_GPU)
    results = _by_name(sh)
    assert {k: r.status for k, r in results.items()} == dict.fromkeys(gpu_checks.CHECKS, "ok")
    assert results["nvidia_smi"].detail.startswith("NVIDIA GeForce RTX 4090")
    assert results["libcuda"].detail == "/usr/lib/wsl/lib/libcuda.so.1"
    assert "release 12.8" in results["nvcc"].detail
    # Triton's image is preferred for the --gpus run, and nothing is pulled.
    assert any("nvcr.io/nvidia/tritonserver:25.01-py3" in c and "--gpus all" in c for c in sh.seen)
    assert not any("docker pull" in c for c in sh.seen)


def test_no_gpu_skips_the_gpu_checks_with_the_reason() -> None:
    answers = {k: v for k, v in WSL_GPU.items() if "dxg" not in k and "nvidia0" not in k}
    results = _by_name(FakeShell(answers))
    for key in ("device_node", "nvidia_smi", "libcuda", "docker_gpu"):
        assert results[key].status == "skip"
        assert results[key].detail == gpu_checks.NO_GPU
    # What needs no GPU is still checked.
    assert results["nvcc"].status == "ok"
    assert results["docker_nvidia_runtime"].status == "ok"


def test_gpu_without_nvidia_smi_or_libcuda_fails() -> None:
    answers = {r"^test -e /dev/nvidia0$": (0, "")}
    results = _by_name(FakeShell(answers))
    assert results["device_node"].status == "ok"
    assert results["nvidia_smi"].status == "fail"
    assert "not found" in results["nvidia_smi"].detail
    assert results["libcuda"].status == "fail"
    assert results["nvcc"].status == "skip"  # no toolkit: not this check's business
    assert results["docker_nvidia_runtime"].status == "skip"
    assert results["docker_gpu"].status == "skip"


def test_toolkit_installed_but_docker_lacks_the_runtime_fails() -> None:
    answers = dict(WSL_GPU)
    answers[r"docker info --format '\{\{json .Runtimes\}\}'"] = (0, '{"runc":{}}')
    result = gpu_checks.check_docker_nvidia_runtime(FakeShell(answers))
    assert result.status == "fail"
    assert "no nvidia runtime" in result.detail


def test_docker_run_that_sees_no_gpu_fails() -> None:
    answers = dict(WSL_GPU)
    answers[r"docker run --rm --gpus all"] = (125, 'could not select device driver "" with capabilities: [[gpu]]')
    result = gpu_checks.check_docker_gpu(FakeShell(answers))
    assert result.status == "fail"
    assert "could not select device driver" in result.detail


def test_print_results_is_false_when_one_failed() -> None:
    result = gpu_checks.Result
    assert (
        gpu_checks.print_results([result("a", "ok", "fine"), result("b", "skip", "why"), result("c", "fail", "x")])
        is False
    )
    assert gpu_checks.print_results([result("b", "skip", "why")]) is True


def test_a_user_outside_the_docker_group_skips_the_docker_checks_with_the_reason() -> None:
    answers = dict(WSL_GPU)
    denied = (1, "permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock")
    answers[r"docker info --format '\{\{.ServerVersion\}\}'"] = denied
    results = _by_name(FakeShell(answers))
    for key in ("docker_nvidia_runtime", "docker_gpu"):
        assert results[key].status == "skip"
        assert results[key].detail == gpu_checks.NO_DOCKER_ACCESS


def test_toolkit_installed_but_docker_down_fails() -> None:
    answers = dict(WSL_GPU)
    answers[r"docker info --format '\{\{.ServerVersion\}\}'"] = (
        1,
        "Cannot connect to the Docker daemon. Is it running?",
    )
    result = gpu_checks.check_docker_nvidia_runtime(FakeShell(answers))
    assert result.status == "fail"
    assert "Cannot connect to the Docker daemon" in result.detail
