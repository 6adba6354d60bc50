"""``make serve``'s supervisor (stack.supervise) under a Triton that is SIGKILLed mid-stream.

Its own Triton (llm engine, tiny model) and gateway, as ``make serve`` runs them: streams in
flight end with an error event and ``[DONE]``, Triton is back and the gateway healthy within
30 s (1.5 times the first start on a slower machine) without a gateway restart, no
Python-backend stub outlives its tritonserver, and stopping the supervisor leaves no process
of this Triton behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from stack import repository
from stack.gateway_config import gateway_config
from stack.gateway_process import Gateway, start_gateway
from stack.net import free_port
from stack.serve import max_in_flight
from stack.supervise import Backoff, Supervisor
from stack.triton_native import STUB_NAME, TritonServer
from tests.reliability.conftest import TINY

STREAMS = 4  # 3 read as raw SSE with httpx, 1 with the openai client
BATCH = 4
# Recovery is a cold start of Triton (about 12 s with the tiny model on an idle 2-core box):
# 30 s, or 1.5 times the first start where the machine is that much slower (busy).
RECOVERY_BOUND_S = 30.0
CHAT: dict[str, Any] = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


# --------------------------------------------------------------------------- no processes


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_long_uptime() -> None:
    b = Backoff(initial=1, factor=2, cap=8, reset_after=60)
    assert [b.delay(uptime=0.5) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert b.delay(uptime=61) == 1  # stayed up a while: from the start again
    assert b.delay(uptime=3) == 2


def test_serve_admits_what_the_engine_batches() -> None:
    assert max_in_flight({"max_batch_seqs": "8", "kv_cache_mb": ""}) == 8
    assert max_in_flight({"max_num_seqs": "32"}) == 32
    assert max_in_flight({"max_batch_seqs": ""}) == 16  # unset: both engines' default
    assert max_in_flight({"max_num_seqs": "0"}) == 16


# --------------------------------------------------------------------------- /proc


def _proc(pid: int) -> tuple[str, int, int] | None:
    """(cmdline, ppid, pgrp) of a live process, None when it is gone or a zombie."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return cmdline, int(fields[1]), int(fields[2])


def processes_of(repo: Path) -> dict[int, tuple[str, int, int]]:
    """Live processes whose command line names ``repo``: its tritonserver and its stubs."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _proc(int(entry.name))) and str(repo) in info[0]:
            found[int(entry.name)] = info
    return found


def stubs_of(repo: Path) -> dict[int, tuple[str, int, int]]:
    return {pid: info for pid, info in processes_of(repo).items() if STUB_NAME in info[0]}


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.2) -> float:
    """Poll ``check()`` until true; the seconds it took. Fails after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - t0


def health(gw: Gateway) -> int:
    try:
        return httpx.get(gw.url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


# --------------------------------------------------------------------------- streams


class RawStream(threading.Thread):
    """One streamed chat completion read as raw SSE lines (httpx)."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(daemon=True)
        self.gw = gw
        self.lines: list[str] = []
        self.status = 0
        self.error: BaseException | None = None
        self.flowing = threading.Event()  # a few chunks arrived

    def run(self) -> None:
        body = {**CHAT, "stream": True, "max_tokens": 3000, "ignore_eos": True}
        try:
            with httpx.stream("POST", self.gw.v1 + "/chat/completions", json=body, timeout=60) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if line:
                        self.lines.append(line)
                    if len(self.lines) >= 3:
                        self.flowing.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.flowing.set()


class ClientStream(threading.Thread):
    """One streamed chat completion through the official openai client."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(daemon=True)
        self.gw = gw
        self.chunks = 0
        self.error: BaseException | None = None
        self.flowing = threading.Event()

    def run(self) -> None:
        try:
            client = self.gw.client(timeout=60)
            stream = client.chat.completions.create(
                **CHAT, stream=True, max_tokens=3000, extra_body={"ignore_eos": True}
            )
            for _ in stream:
                self.chunks += 1
                if self.chunks >= 3:
                    self.flowing.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.flowing.set()


# --------------------------------------------------------------------------- the test


@pytest.mark.triton
def test_triton_killed_under_load_comes_back_without_orphans(tmp_path: Path, tiny_model_dir: Path) -> None:
    repo = tmp_path / "model_repository"
    repository.render(repo, {TINY: tiny_model_dir}, params={"max_batch_seqs": str(BATCH)})
    triton = TritonServer(
        repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path / "triton.log",
    )
    limits = {"max_in_flight": max_in_flight({"max_batch_seqs": str(BATCH)})}
    config = gateway_config(triton.url, {TINY: (TINY, tiny_model_dir)}, {"limits": limits}, triton_read_timeout_s=60)
    messages: list[str] = []

    def log(msg: str) -> None:
        messages.append(msg)
        print(f"supervisor: {msg}", flush=True)

    sup = Supervisor(
        triton,
        [TINY],
        lambda: start_gateway(config, tmp_path),
        backoff=Backoff(initial=1.0, cap=8.0),
        ready_timeout=180,
        log=log,
    )
    result: dict[str, Any] = {}

    def serve() -> None:  # tritonserver's parent-death signal follows this thread
        try:
            result["rc"] = sup.serve()
        except BaseException as exc:
            result["error"] = exc

    runner = threading.Thread(target=serve, name="supervisor", daemon=True)
    t_start = time.monotonic()
    runner.start()
    try:
        wait_for("Triton and the gateway started", lambda: sup.ready.is_set() or not runner.is_alive(), 240)
        assert "error" not in result and sup.gateway is not None, result
        gw = sup.gateway
        startup = time.monotonic() - t_start
        bound = max(RECOVERY_BOUND_S, 1.5 * startup)
        print(f"\nstarted in {startup:.1f} s (recovery bound {bound:.0f} s); Triton {triton.url}, gateway {gw.url}")
        assert health(gw) == 200
        assert triton.process is not None
        first_pid = triton.process.pid
        stubs_before = stubs_of(repo)
        assert stubs_before, f"no {STUB_NAME} found for {repo}"
        for pid, (_, ppid, pgrp) in stubs_before.items():
            print(f"stub {pid}: parent {ppid}, process group {pgrp} (tritonserver {first_pid})")
            assert ppid == first_pid
        # The stub shares tritonserver's process group: killing that group reaches it.
        assert all(pgrp == first_pid for _, _, pgrp in stubs_before.values())

        # Load: STREAMS long streams, all decoding, then tritonserver (alone) gets SIGKILL.
        raw = [RawStream(gw) for _ in range(STREAMS - 1)]
        sdk = ClientStream(gw)
        streams: list[RawStream | ClientStream] = [*raw, sdk]
        for s in streams:
            s.start()
        for s in streams:
            assert s.flowing.wait(60), "a stream did not start within 60 s"
        assert all(s.error is None for s in streams), [s.error for s in streams]
        os.kill(first_pid, signal.SIGKILL)
        t_kill = time.monotonic()

        for s in streams:
            s.join(60)
            assert not s.is_alive(), "a stream did not end within 60 s of the kill"
        t_streams = time.monotonic() - t_kill
        for s in raw:
            assert s.error is None and s.status == 200, (s.error, s.status)
            assert s.lines[-1] == "data: [DONE]", s.lines[-3:]
            event = orjson.loads(s.lines[-2].removeprefix("data: "))
            assert event["error"]["code"] == "upstream_error", event
            assert len(s.lines) >= 4  # chunks, then the error event, then [DONE]
        assert isinstance(sdk.error, openai.APIError), repr(sdk.error)
        assert sdk.chunks >= 3

        # Back: a new tritonserver on the same ports, the same gateway healthy again.
        t_health = wait_for("gateway /health 200 again", lambda: health(gw) == 200, bound - t_streams)
        t_recovered = time.monotonic() - t_kill
        assert gw.process.poll() is None, "the gateway must not have restarted"
        assert triton.process is not None and triton.process.pid != first_pid and triton.process.poll() is None
        assert len(sup.restarts) == 1, sup.restarts
        restart = sup.restarts[0]
        assert restart.exit_code == -signal.SIGKILL and restart.delay_s == 1.0

        reply = gw.client(timeout=30).chat.completions.create(**CHAT, max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens == 4

        # No stub of the killed tritonserver survives; the new ones belong to the new one.
        gone = wait_for(
            "stubs of the killed tritonserver gone", lambda: not set(stubs_before) & set(stubs_of(repo)), 10
        )
        new_pid = triton.process.pid
        stubs_after = stubs_of(repo)
        orphans = {pid: info for pid, info in stubs_after.items() if info[1] != new_pid}
        assert not orphans, f"stubs whose tritonserver is gone: {orphans}"
        assert stubs_after, "the new tritonserver has no stub"
        print(
            f"kill → streams ended {t_streams:.1f} s, /health 200 after {t_recovered:.1f} s "
            f"(polled {t_health:.1f} s after the streams ended); restart after {restart.delay_s:.0f} s backoff, "
            f"Triton ready {restart.ready_after_s or float('nan'):.1f} s after the kill "
            f"(supervisor's view); stubs killed by the supervisor: {restart.killed_stubs or 'none (already gone)'}; "
            f"old stubs gone {gone:.1f} s after the check began"
        )
    finally:
        sup.stop()
        runner.join(90)
    assert not runner.is_alive(), "the supervisor did not stop within 90 s"
    assert result.get("rc") == 0, result
    left = processes_of(repo)
    assert not left, f"left behind after stopping: {left}"
