"""stack/gpu_check.py (`make gpu-check`) as a user runs it, on this machine.

Without a GPU it must say so and exit 0; `--rehearse-on-cpu` runs its whole path (Triton
with two copies of the model, the gateway, the measurements, the round trip) on the CPU.
On a machine with a GPU, `make gpu-check` itself is the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stack import gpu_checks
from stack.paths import REPO_ROOT


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stack.gpu_check", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def _table(stdout: str) -> dict[str, str]:
    rows = [line.strip("| ").split(" | ", 1) for line in stdout.splitlines() if line.startswith("| ")]
    return {key.strip(): value.strip() for key, value in rows[2:] if key}


@pytest.fixture(scope="module")
def no_gpu() -> None:
    if gpu_checks.gpu_device(gpu_checks.local_shell) is not None:
        pytest.skip("this machine has a GPU: run `make gpu-check` for the real table")


def test_without_a_gpu_it_says_so_and_exits_0(no_gpu: None) -> None:
    proc = _run(timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU: nothing to verify on this machine" in proc.stdout
    table = _table(proc.stdout)
    assert table["GPU"].startswith("none (")
    assert table["GPU device node"] == f"skip: {gpu_checks.NO_GPU}"


@pytest.mark.triton
def test_rehearsal_on_the_cpu_runs_the_whole_path(no_gpu: None, tiny_model_dir: Path) -> None:
    proc = _run("--rehearse-on-cpu", "--max-tokens", "16", "--model-dir", str(tiny_model_dir), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = _table(proc.stdout)
    assert table["mode"].startswith("rehearsal")
    assert float(table["Triton ready"].removesuffix(" s")) > 0
    for model in ("llm-cuda", "llm-cpu"):
        assert float(table[f"{model}: tokens/s"].split()[0]) > 0
        assert table[f"{model}: time to first token"].endswith(" ms")
    assert table["chat round trip (CUDA)"].startswith("ok: ")
