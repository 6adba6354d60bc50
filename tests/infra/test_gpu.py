"""GPU verification of a provisioned host (stack/gpu_checks.py through testinfra).

Device node, nvidia-smi, libcuda, the CUDA toolkit, Docker's nvidia runtime and a
`docker run --gpus all` that sees the GPU. Each check that needs a GPU skips with the
reason on a host without one; `make smoke` runs the same checks on this machine.
"""

from __future__ import annotations

from typing import Any

import pytest

from stack import gpu_checks


def _shell(host: Any) -> gpu_checks.Shell:
    def run(command: str) -> tuple[int, str]:
        out = host.run(command)
        return out.rc, (out.stdout + out.stderr).strip()

    return run


@pytest.mark.parametrize("check", sorted(gpu_checks.CHECKS))
def test_gpu(host: Any, check: str) -> None:
    result = gpu_checks.CHECKS[check](_shell(host))
    if result.status == "skip":
        pytest.skip(f"{result.name}: {result.detail}")
    assert result.status == "ok", f"{result.name}: {result.detail}"
