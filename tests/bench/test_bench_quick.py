"""Smoke test of the benchmark (``make test-bench``): its code path runs end to end and
writes well-formed results. No timing is checked here: the figures are ``make bench``'s."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.report import ROW_KEYS
from stack.paths import REPO_ROOT

# find_spec, not import: importing litellm fetches a price list from the internet.
_MISSING = [m for m in ("litellm", "matplotlib", "psutil") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"bench extra not installed ({_MISSING}): make bench-setup")

TARGETS = {"triton", "gateway", "litellm"}
MODES = {"stream", "nostream"}


def _tensors(config: str) -> list[str]:
    """The input and output declarations of a config.pbtxt, comments dropped."""
    text = "\n".join(line.split("#", 1)[0] for line in config.splitlines())
    blocks = re.findall(r"^(input|output) \[(.*?)^\]", text, re.S | re.M)
    return [f"{kind}: {' '.join(body.split())}" for kind, body in blocks]


def test_synthetic_model_declares_the_llm_tensors() -> None:
    llm = (REPO_ROOT / "model_repository" / "llm" / "config.pbtxt").read_text()
    synthetic = (REPO_ROOT / "bench" / "model_repository" / "synthetic" / "config.pbtxt").read_text()
    assert _tensors(llm), "no tensors found in the llm config"
    assert _tensors(synthetic) == _tensors(llm)
    assert "decoupled: true" in synthetic


def _quick_bench(out: Path, work: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """`make bench-quick`'s code path with fewer requests per level."""
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--stream-requests",
        "16",
        "--nostream-requests",
        "32",
        # Not the real-model section (a Triton with SmolLM2 would double this test's time):
        # test_realmodel.py runs its code path against a stand-in server.
        "--peers",
        "none",
        "--out",
        str(out),
        "--workdir",
        str(work),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    return proc, rows


def _short_streams_only(rows: list[dict[str, Any]]) -> bool:
    """Every error of the Triton and gateway rows is a stream that came back short."""
    kinds = [k for r in rows if r["target"] in ("triton", "gateway") for k in r.get("error_kinds") or {}]
    return bool(kinds) and set(kinds) == {"unexpected text"}


@pytest.mark.triton
def test_quick_bench_writes_well_formed_results(tmp_path: Path) -> None:
    out = tmp_path / "results" / "quick.json"
    proc, rows = _quick_bench(out, tmp_path / "work")
    if _short_streams_only(rows):
        # Triton 2.51 (nvidia-pytriton 0.7.0) has been seen, rarely, to end a stream early
        # under load (bench/README.md, "Seen on this machine"): say so loudly and measure once
        # more; a second short stream, or any other error, fails below.
        samples = [r.get("error_samples") for r in rows if r["errors"]]
        print(f"WARNING: short streams in the first quick bench, running it again: {samples}", file=sys.stderr)
        out = tmp_path / "results-again" / "quick.json"
        proc, rows = _quick_bench(out, tmp_path / "work-again")

    assert {(r["target"], r["mode"]) for r in rows} == {(t, m) for t in TARGETS for m in MODES}
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        assert row["concurrency"] == 8
        assert isinstance(row["server_cpu_us_per_token"], dict)
        if not row["supported"]:
            assert row["note"], row  # an unsupported mode says why instead of a number
            continue
        assert row["requests"] > 0
        assert isinstance(row["errors"], int)
        for key in ("req_per_s", "tokens_per_s", "ttft_ms_p50", "ttft_ms_p99"):
            assert isinstance(row[key], (int, float)) and row[key] >= 0, (key, row)
        expected_procs = {"triton"} | ({row["target"]} - {"triton"})
        assert set(row["server_cpu_us_per_token"]) == expected_procs, row
        if row["mode"] == "stream":
            assert isinstance(row["itl_ms_p50"], (int, float)), row
    # The synthetic model and the gateway answer every request with the asked-for text.
    for row in rows:
        if row["target"] in ("triton", "gateway"):
            assert row["errors"] == 0, row

    chart = out.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["config"]["concurrency"] == [8]
    # The table is printed at the end.
    assert "tok/s" in proc.stdout and "gateway" in proc.stdout
