"""The real-model section: the same streamed chat load against this stack, vLLM and llama.cpp.

One load generator (httpx, one ``AsyncClient`` per level with ``concurrency`` keep-alive
connections) sends every server the same request: one user message, ``stream: true``,
``stream_options: {include_usage: true}``, ``max_tokens`` (128), temperature 0; plus
``ignore_eos: true`` / ``min_tokens`` to the servers that take them (vLLM and this stack
both, llama.cpp ``ignore_eos``), so every answer is ``max_tokens`` long. Each server runs
alone (started, measured at every concurrency, stopped), see ``bench.peers``.

Servers that take ``response_format`` (this stack) are also measured with constrained
decoding: ``requests_per_c`` requests one after the other with a ``json_schema`` (a title
and a story) and as many without, the same prompt and ``max_tokens``, and the ratio of their
median decode rates (``json_schema`` in the run's metadata per server; the acceptance is
≥ 0.8).

Per level: a warm-up of ``concurrency`` short requests (16 tokens) on the level's
connections, then ``requests_per_c × concurrency`` measured requests pulled by
``concurrency`` workers. Figures per level:

* ``tokens_per_s``: the sum of ``usage.completion_tokens`` of the answered requests over the
  level's wall time;
* ``ttft_ms_p50`` / ``_p95`` / ``_p99``: request sent → first non-empty content delta;
* ``decode_tokens_per_s_p50``: per request (completion tokens − 1) / (last − first content
  delta), the median over requests;
* ``server_cpu_s``: CPU seconds of each server process and all its children during the
  measured part (psutil), ``server_cores_busy`` = their sum / wall time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen, peers
from bench.loadgen import ProcessCpu, percentile
from bench.report import REAL_MODE, Row, unsupported_row

MODE = REAL_MODE
MESSAGES = ({"role": "user", "content": "Write a long story about a dragon who learns to bake bread."},)
WARMUP_TOKENS = 16
STORY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}


@dataclass
class RealConfig:
    servers: tuple[str, ...] = peers.PEERS
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests_per_c: int = 4
    max_tokens: int = 128
    time_limit_s: float = 900.0  # per level: what was not sent by then counts as errors


@dataclass
class Answer:
    """One streamed request as the client saw it."""

    ok: bool
    start: float
    end: float
    first: float | None = None  # first non-empty content delta
    last: float | None = None  # last one
    events: int = 0  # content deltas
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


def request_body(peer: peers.Peer, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": peer.model,
        "messages": list(MESSAGES),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if "ignore_eos" in peer.accepts:
        body["ignore_eos"] = True
    if "min_tokens" in peer.accepts:
        body["min_tokens"] = max_tokens
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Answer:
    answer = Answer(ok=False, start=time.perf_counter(), end=0.0)
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                answer.error = f"HTTP {resp.status_code}: {text[:300]}"
                answer.end = time.perf_counter()
                return answer
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    answer.error = f"error event: {str(event['error'])[:300]}"
                    break
                for choice in event.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        now = time.perf_counter()
                        if answer.first is None:
                            answer.first = now
                        elif answer.last is not None:
                            answer.gaps.append(now - answer.last)
                        answer.last = now
                        answer.events += 1
                    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                if event.get("usage"):
                    usage = event["usage"]
    except (httpx.HTTPError, ValueError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"[:300]
    answer.end = time.perf_counter()
    if answer.error is None:
        if usage is None:
            answer.error = "no usage chunk"
        elif answer.first is None:
            answer.error = "no text"
        else:
            answer.completion_tokens = int(usage.get("completion_tokens") or 0)
            answer.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            answer.ok = True
    return answer


async def _drive(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], concurrency: int, count: int, deadline: float
) -> list[Answer]:
    answers: list[Answer] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            answers.append(await one_request(client, url, body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def run_level(peer: peers.Peer, cfg: RealConfig, concurrency: int, probes: Sequence[ProcessCpu]) -> Row:
    url = peer.url + "/v1/chat/completions"
    count = cfg.requests_per_c * concurrency
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(cfg.time_limit_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        # Warm-up: opens the level's connections, and the server's paths for this batch size.
        await _drive(
            client, url, request_body(peer, WARMUP_TOKENS), concurrency, concurrency, time.perf_counter() + 300
        )
        before = {p.name: p.snapshot() for p in probes}
        own_before, busy_before = loadgen.self_cpu(), loadgen.machine_busy()
        start = time.perf_counter()
        answers = await _drive(
            client, url, request_body(peer, cfg.max_tokens), concurrency, count, start + cfg.time_limit_s
        )
        wall = time.perf_counter() - start
        own, busy = loadgen.self_cpu() - own_before, loadgen.machine_busy() - busy_before
        after = {p.name: p.snapshot() for p in probes}
    cpu = {p.name: ProcessCpu.used(before[p.name], after[p.name]) for p in probes}
    return level_row(peer, cfg, concurrency, count, answers, wall, cpu, own, busy)


async def structured_comparison(peer: peers.Peer, cfg: RealConfig) -> dict[str, Any]:
    """One request at a time, ``json_schema`` against unconstrained: decode rate of each."""
    url = f"{peer.url}/v1/chat/completions"
    out: dict[str, Any] = {"requests": cfg.requests_per_c, "schema": STORY_SCHEMA}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for label in ("plain", "json_schema"):
            body = request_body(peer, cfg.max_tokens)
            body.pop("ignore_eos", None)  # a grammar that is done must be able to end
            body.pop("min_tokens", None)
            if label == "json_schema":
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": STORY_SCHEMA}}
            await one_request(client, url, {**body, "max_tokens": WARMUP_TOKENS})
            answers = [await one_request(client, url, body) for _ in range(cfg.requests_per_c)]
            ok = [a for a in answers if a.ok]
            decode = [
                (a.completion_tokens - 1) / (a.last - a.first)
                for a in ok
                if a.first is not None and a.last is not None and a.last > a.first and a.completion_tokens > 1
            ]
            out[label] = {
                "errors": len(answers) - len(ok),
                "error_samples": [a.error for a in answers if not a.ok][:2],
                "completion_tokens_mean": round(sum(a.completion_tokens for a in ok) / len(ok), 1) if ok else None,
                "decode_tokens_per_s_p50": round(statistics.median(decode), 2) if decode else None,
                "ttft_ms_p50": round(1000 * statistics.median([a.first - a.start for a in ok if a.first]), 1)
                if ok
                else None,
            }
    plain, constrained = out["plain"]["decode_tokens_per_s_p50"], out["json_schema"]["decode_tokens_per_s_p50"]
    out["ratio"] = round(constrained / plain, 3) if plain and constrained else None
    return out


def level_row(
    peer: peers.Peer,
    cfg: RealConfig,
    concurrency: int,
    count: int,
    answers: Sequence[Answer],
    wall: float,
    cpu: dict[str, float],
    loadgen_cpu_s: float,
    machine_busy_s: float,
) -> Row:
    ok = [a for a in answers if a.ok]
    errors = count - len(ok)  # failed, plus not sent before the time limit
    tokens = sum(a.completion_tokens for a in ok)
    ttft = [a.first - a.start for a in ok if a.first is not None]
    decode = [
        (a.completion_tokens - 1) / (a.last - a.first)
        for a in ok
        if a.first is not None and a.last is not None and a.last > a.first and a.completion_tokens > 1
    ]
    gaps = [g for a in ok for g in a.gaps]
    latency = [a.end - a.start for a in ok]
    kinds: dict[str, int] = {}
    for a in answers:
        if not a.ok:
            kind = (a.error or "failed").split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    if len(answers) < count:
        kinds["not sent (time limit)"] = count - len(answers)
    finish: dict[str, int] = {}
    for a in ok:
        finish[str(a.finish_reason)] = finish.get(str(a.finish_reason), 0) + 1
    server_cpu = sum(cpu.values())

    def ms(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value * 1000.0, 3)

    return {
        "target": peer.name,
        "mode": MODE,
        "concurrency": concurrency,
        "supported": True,
        "server": peer.label,
        "server_version": peer.version,
        "versions": peer.versions,
        "precision": peer.precision,
        "requests": count,
        "errors": errors,
        "error_kinds": kinds,
        "error_samples": [a.error for a in answers if not a.ok][:3],
        "max_tokens": cfg.max_tokens,
        "sent_ignore_eos": "ignore_eos" in peer.accepts,
        "sent_min_tokens": "min_tokens" in peer.accepts,
        "completion_tokens": tokens,
        "completion_tokens_mean": round(tokens / len(ok), 2) if ok else None,
        "prompt_tokens_mean": round(sum(a.prompt_tokens for a in ok) / len(ok), 2) if ok else None,
        "finish_reasons": finish,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_ms_p50": ms(ttft, 50),
        "ttft_ms_p95": ms(ttft, 95),
        "ttft_ms_p99": ms(ttft, 99),
        "itl_ms_p50": ms(gaps, 50),
        "decode_tokens_per_s_p50": round(statistics.median(decode), 2) if decode else None,
        "latency_ms_p50": ms(latency, 50),
        "latency_ms_p95": ms(latency, 95),
        "server_cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "server_cpu_us_per_token": {k: round(1e6 * v / tokens, 1) if tokens else None for k, v in cpu.items()},
        "server_cores_busy": round(server_cpu / wall, 3) if wall > 0 else None,
        "loadgen_cpu_s": round(loadgen_cpu_s, 3),
        "machine_busy_cores": round(machine_busy_s / wall, 3) if wall > 0 else None,
    }


def run_section(
    cfg: RealConfig,
    workdir: Path,
    run: Callable[[Any], Any],
    log: Callable[[str], None],
) -> tuple[list[Row], dict[str, Any]]:
    """Each server in turn: start it, measure every concurrency, stop it.

    ``run`` runs a coroutine to completion (the runner's event loop). Returns the rows and,
    per server, its versions (or why it could not run) for the run's metadata.
    """
    rows: list[Row] = []
    meta: dict[str, Any] = {}
    for name in cfg.servers:
        try:
            peer = peers.start(name, workdir, log)
        except Exception as exc:  # any failure to start is reported in the rows
            note = f"{peers.LABELS.get(name, name)} did not run: {exc}"
            log(f"  {name}: NOT RUN: {str(exc)[:2000]}")
            meta[name] = {"label": peers.LABELS.get(name, name), "error": str(exc)[-3000:]}
            for c in cfg.concurrency:
                row = unsupported_row(name, MODE, c, cfg.requests_per_c * c, note[:1000])
                row.update(server=peers.LABELS.get(name, name), precision=peers.PRECISION.get(name))
                rows.append(row)
            continue
        meta[name] = {
            "label": peer.label,
            "version": peer.version,
            "versions": peer.versions,
            "precision": peer.precision,
            "sends": sorted(peer.accepts),
            "logs": [str(p) for p in peer.logs],
        }
        try:
            probes = [ProcessCpu(proc, pid) for proc, pid in peer.processes.items()]
            for c in cfg.concurrency:
                row = run(run_level(peer, cfg, c, probes))
                log(
                    f"  {name:<10} c={c:<3} {row['tokens_per_s']:>8,.1f} tok/s"
                    f"  TTFT p50 {row['ttft_ms_p50'] or 0:8.1f} ms"
                    f"  decode p50 {row['decode_tokens_per_s_p50'] or 0:6.1f} tok/s"
                    f"  server cores {row['server_cores_busy'] or 0:.2f}  errors {row['errors']}"
                )
                if row["errors"]:
                    log(f"    errors: {row['error_samples']}")
                rows.append(row)
            if "response_format" in peer.accepts:
                result = run(structured_comparison(peer, cfg))
                meta[name]["json_schema"] = result
                log(
                    f"  {name:<10} json_schema decode p50 {result['json_schema']['decode_tokens_per_s_p50']} tok/s "
                    f"vs plain {result['plain']['decode_tokens_per_s_p50']} tok/s: ratio {result['ratio']} "
                    f"(errors {result['json_schema']['errors']}+{result['plain']['errors']})"
                )
        finally:
            peer.stop()
    return rows, meta
