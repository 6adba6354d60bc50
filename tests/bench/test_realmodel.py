"""Smoke test of the real-model section's code path (``python -m bench --peers-only``) without
any real server: ``bench.peers.start`` is replaced by a stand-in OpenAI streaming server, so
neither Triton, vLLM nor llama.cpp is needed. No timing is checked."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import peers
from bench.report import ROW_KEYS

_MISSING = [m for m in ("matplotlib", "psutil") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"bench extra not installed ({_MISSING}): make bench-setup")


class StandIn:
    """An OpenAI-style streaming chat server on a free port, in a thread of its own."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.url = ""

    async def _chat(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.bodies.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")

        await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for _ in range(body["max_tokens"]):
            await asyncio.sleep(0.001)
            await send({"choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]})
        await send({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": None})
        usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"], "total_tokens": 7 + body["max_tokens"]}
        await send({"choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> StandIn:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    with StandIn() as server:
        stopped: list[str] = []

        def start(name: str, workdir: Path, log: Any = None) -> peers.Peer:
            if name == "vllm":
                raise peers.PeerUnavailable("not installed here (stand-in)")
            return peers.Peer(
                name=name,
                url=server.url,
                model="smollm2-135m-instruct",
                version=f"stand-in for {name}",
                versions={"stand-in": "1"},
                precision=peers.PRECISION[name],
                accepts=("ignore_eos",) if name == "llama.cpp" else (),
                processes={"standin": os.getpid()},
                _stops=[lambda: stopped.append(name)],
            )

        monkeypatch.setattr(peers, "start", start)
        yield server
        assert stopped == ["stack-llm", "llama.cpp"]  # every server that started was stopped


def test_real_model_section_writes_rows_table_and_chart(
    stand_in: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.__main__ import main

    out = tmp_path / "results" / "peers.json"
    argv = ["--peers-only", "--peers", "stack-llm,vllm,llama.cpp", "--peer-concurrency", "1,4"]
    argv += ["--peer-requests-per-c", "2", "--peer-tokens", "24", "--out", str(out), "--workdir", str(tmp_path)]
    assert main(argv) == 0

    rows = json.loads(out.read_text())
    assert [(r["target"], r["concurrency"]) for r in rows] == [
        (name, c) for name in ("stack-llm", "vllm", "llama.cpp") for c in (1, 4)
    ]
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        assert row["mode"] == "realmodel"
        if row["target"] == "vllm":
            assert row["supported"] is False and "not installed" in row["note"]
            continue
        assert row["supported"] is True
        assert row["requests"] == 2 * row["concurrency"]
        assert row["errors"] == 0, row["error_samples"]
        assert row["completion_tokens"] == 24 * row["requests"]
        assert row["tokens_per_s"] > 0 and row["req_per_s"] > 0
        for key in ("ttft_ms_p50", "ttft_ms_p95", "decode_tokens_per_s_p50", "server_cores_busy"):
            assert isinstance(row[key], (int, float)) and row[key] >= 0, (key, row)
        assert set(row["server_cpu_s"]) == {"standin"}
        assert row["server_version"] == f"stand-in for {row['target']}"
        assert row["sent_ignore_eos"] is (row["target"] == "llama.cpp")

    # The request each server got: streamed, usage asked for, max_tokens, temperature 0;
    # ignore_eos only where the server takes it (the gateway would silently drop it).
    measured = [b for b in stand_in.bodies if b["max_tokens"] == 24]  # not the warm-ups (16)
    assert measured and all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in measured)
    assert all(b["temperature"] == 0 for b in measured)
    assert sum("ignore_eos" in b for b in measured) == 2 * (1 + 4)  # the llama.cpp stand-in's levels
    assert not any("min_tokens" in b for b in measured)

    meta = json.loads(out.with_suffix(".meta.json").read_text())
    servers = meta["realmodel"]["servers"]
    assert servers["llama.cpp"]["version"] == "stand-in for llama.cpp"
    assert "not installed" in servers["vllm"]["error"]
    assert meta["config"]["peer_concurrency"] == [1, 4]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Real model" in printed and "Q4_1" in printed and "NOT RUN" in printed
