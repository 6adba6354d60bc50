"""The load generator: one async client, the same for every target.

Why aiohttp (and not httpx): the load generator shares two cores with the servers it
measures, so its own cost per request and per streamed event has to be small. aiohttp
parses HTTP in C (llhttp) and hands over the body as raw byte chunks; httpx/httpcore parse
HTTP in pure Python (h11) and cost several times more per request and per chunk. The
gateway itself talks to Triton with aiohttp, LiteLLM with httpx; neither matters here.

Fairness rules every target gets alike:

* one ``aiohttp.ClientSession`` per level with a connector of exactly ``concurrency``
  keep-alive connections, opened during the warm-up and reused by the measured requests;
* ``concurrency`` workers that pull from one fixed request count until it is done (or the
  level's time limit passes: what was not sent by then counts as errors);
* the same per-event work on the client: split the SSE stream on blank lines, one
  ``orjson.loads`` per event, take the text;
* timestamps with ``time.perf_counter`` when a chunk of bytes arrives.

A request counts as an error when the status is not 200, the connection fails, the stream
carries an ``error`` event, or (synthetic model) the text is not exactly ``max_tokens``
pieces.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psutil

# The Triton HTTP endpoints and the OpenAI chat endpoint, as the targets speak them.
TRITON = "triton"
OPENAI = "openai"
STREAM = "stream"
NOSTREAM = "nostream"
_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and how they are spelled."""

    target: str  # triton | gateway | litellm
    dialect: str  # TRITON (generate / generate_stream) | OPENAI (/v1/chat/completions)
    base_url: str
    model: str  # Triton model name, or the served model name
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    """What each request asks for; the same semantics for every target."""

    mode: str  # STREAM | NOSTREAM
    max_tokens: int
    messages: tuple[Mapping[str, str], ...]
    # The chat-templated prompt: what the gateway sends Triton for ``messages``.
    prompt: str
    temperature: float | None = None
    # Synthetic model: the text must be exactly ``max_tokens`` of these pieces, in turn.
    expect_pieces: tuple[str, ...] | None = None

    @property
    def stream(self) -> bool:
        return self.mode == STREAM


def build_request(endpoint: Endpoint, work: Workload) -> tuple[str, bytes]:
    """URL and JSON body: Triton's own ``generate[_stream]`` gets what the gateway would send."""
    if endpoint.dialect == TRITON:
        path = "generate_stream" if work.stream else "generate"
        body: dict[str, Any] = {
            "text_input": work.prompt,
            "max_tokens": work.max_tokens,
            "stream": work.stream,
            "exclude_input_in_output": True,
        }
        if work.temperature is not None:
            body["temperature"] = work.temperature
        return f"{endpoint.base_url}/v2/models/{endpoint.model}/{path}", orjson.dumps(body)
    body = {
        "model": endpoint.model,
        "messages": list(work.messages),
        "max_tokens": work.max_tokens,
        "stream": work.stream,
    }
    if work.temperature is not None:
        body["temperature"] = work.temperature
    return f"{endpoint.base_url}/v1/chat/completions", orjson.dumps(body)


# --------------------------------------------------------------------------- one request


@dataclass
class Sample:
    ok: bool
    start: float
    end: float
    first: float | None = None  # first non-empty text
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # between consecutive text events
    error: str | None = None


class _Failed(Exception):
    pass


def _triton_text(event: Mapping[str, Any]) -> str:
    value = event.get("text_output")
    if isinstance(value, list):
        return "".join(map(str, value))
    return "" if value is None else str(value)


def _chat_delta(event: Mapping[str, Any]) -> str:
    choices = event.get("choices")
    if not choices:
        return ""
    return (choices[0].get("delta") or {}).get("content") or ""


def _chat_message(event: Mapping[str, Any]) -> str:
    choices = event.get("choices")
    if not choices:
        return ""
    return (choices[0].get("message") or {}).get("content") or ""


def _check(work: Workload, text: str, events: int) -> int:
    """Tokens this answer counts for; raises when the synthetic text is not what was asked."""
    if work.expect_pieces is None:
        return events
    pieces = work.expect_pieces
    expected = "".join(pieces[i % len(pieces)] for i in range(work.max_tokens))
    if text != expected:
        raise _Failed(f"unexpected text: {len(text)} characters, {text[:60]!r}…; expected {len(expected)}")
    return work.max_tokens


async def one_request(
    session: aiohttp.ClientSession, endpoint: Endpoint, work: Workload, url: str, body: bytes
) -> Sample:
    headers = {**_HEADERS, **endpoint.headers}
    start = time.perf_counter()
    sample = Sample(ok=False, start=start, end=start)
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise _Failed(f"HTTP {resp.status}: {(await resp.read())[:200].decode(errors='replace')}")
            if work.stream:
                await _read_stream(resp, endpoint, work, sample)
            else:
                payload = await resp.read()
                sample.end = sample.first = time.perf_counter()
                event = orjson.loads(payload)
                if "error" in event:
                    raise _Failed(f"error: {str(event['error'])[:200]}")
                text = _triton_text(event) if endpoint.dialect == TRITON else _chat_message(event)
                sample.tokens = _check(work, text, 1)
        sample.ok = True
    except _Failed as exc:
        sample.error = str(exc)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    if not sample.ok:
        sample.end = time.perf_counter()
    return sample


async def _read_stream(resp: aiohttp.ClientResponse, endpoint: Endpoint, work: Workload, sample: Sample) -> None:
    extract: Callable[[Mapping[str, Any]], str] = _triton_text if endpoint.dialect == TRITON else _chat_delta
    parts: list[str] = []
    gaps = sample.gaps
    last = 0.0
    buf = b""
    async for data in resp.content.iter_any():
        now = time.perf_counter()
        buf += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        while True:
            cut = buf.find(b"\n\n")
            if cut < 0:
                break
            event_bytes, buf = buf[:cut], buf[cut + 2 :]
            for line in event_bytes.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                event = orjson.loads(payload)
                if "error" in event:
                    raise _Failed(f"error event: {str(event['error'])[:200]}")
                text = extract(event)
                if not text:
                    continue
                parts.append(text)
                if sample.first is None:
                    sample.first = now
                else:
                    gaps.append(now - last)
                last = now
    sample.end = time.perf_counter()
    sample.tokens = _check(work, "".join(parts), len(parts))


# --------------------------------------------------------------------------- a level


class ProcessCpu:
    """CPU seconds (user + system, from /proc/<pid>/stat via psutil) of a process and of
    every descendant alive at the time of the snapshot (Triton's Python-backend stubs)."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.process = psutil.Process(pid)

    def snapshot(self) -> dict[tuple[int, float], float]:
        out: dict[tuple[int, float], float] = {}
        try:
            procs = [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return out
        for proc in procs:
            try:
                times = proc.cpu_times()
                out[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return out

    @staticmethod
    def used(before: Mapping[tuple[int, float], float], after: Mapping[tuple[int, float], float]) -> float:
        # A child that started during the level counts from zero; one that ended is lost.
        return sum(seconds - before.get(key, 0.0) for key, seconds in after.items())


@dataclass
class LevelResult:
    endpoint: Endpoint
    work: Workload
    concurrency: int
    requests: int
    samples: list[Sample]
    wall_s: float
    server_cpu_s: dict[str, float]
    loadgen_cpu_s: float
    machine_busy_cores: float  # average busy cores of the whole machine during the level

    @property
    def other_busy_cores(self) -> float:
        """Busy cores not explained by the measured servers and the load generator: other
        processes on the machine (noise), plus the kernel's share of network work."""
        if self.wall_s <= 0:
            return 0.0
        ours = (sum(self.server_cpu_s.values()) + self.loadgen_cpu_s) / self.wall_s
        return max(self.machine_busy_cores - ours, 0.0)


def self_cpu() -> float:
    """CPU seconds this process (the load generator) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """CPU seconds all cores of the machine have spent busy."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


async def _drive(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    work: Workload,
    concurrency: int,
    count: int,
    deadline: float,
) -> list[Sample]:
    url, body = build_request(endpoint, work)
    samples: list[Sample] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            samples.append(await one_request(session, endpoint, work, url, body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def run_level(
    endpoint: Endpoint,
    work: Workload,
    concurrency: int,
    requests: int,
    probes: list[ProcessCpu],
    warmup: int | None = None,
    time_limit_s: float = 300.0,
    request_timeout_s: float = 120.0,
) -> LevelResult:
    """Warm up, then send ``requests`` requests with ``concurrency`` workers, measuring."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=120)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        # Warm-up: every connection of the pool opened and used once, server caches filled.
        warm = max(concurrency, 4) if warmup is None else warmup
        if warm:
            await _drive(session, endpoint, work, concurrency, warm, time.perf_counter() + time_limit_s)
        before = {p.name: p.snapshot() for p in probes}
        self_before, busy_before = self_cpu(), machine_busy()
        started = time.perf_counter()
        samples = await _drive(session, endpoint, work, concurrency, requests, started + time_limit_s)
        wall = time.perf_counter() - started
        self_after, busy_after = self_cpu(), machine_busy()
        after = {p.name: p.snapshot() for p in probes}
    for _ in range(requests - len(samples)):
        samples.append(Sample(ok=False, start=started, end=started, error=f"not sent within {time_limit_s:.0f} s"))
    return LevelResult(
        endpoint=endpoint,
        work=work,
        concurrency=concurrency,
        requests=requests,
        samples=samples,
        wall_s=wall,
        server_cpu_s={p.name: ProcessCpu.used(before[p.name], after[p.name]) for p in probes},
        loadgen_cpu_s=self_after - self_before,
        machine_busy_cores=(busy_after - busy_before) / wall if wall > 0 else 0.0,
    )


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def summarize(result: LevelResult) -> dict[str, Any]:
    """One row of the results: the figures of one target, mode and concurrency."""
    ok = [s for s in result.samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    wall = result.wall_s or float("nan")
    ttft = [s.first - s.start for s in ok if s.first is not None]
    latency = [s.end - s.start for s in ok]
    gaps = [g for s in ok for g in s.gaps]
    # Time per output token after the first, per request (robust where events coalesce).
    tpot = [(s.end - s.first) / (s.tokens - 1) for s in ok if s.first is not None and s.tokens > 1]
    errors = [s.error for s in result.samples if not s.ok]
    per_token = {name: (round(cpu * 1e6 / tokens, 2) if tokens else None) for name, cpu in result.server_cpu_s.items()}
    return {
        "target": result.endpoint.target,
        "mode": result.work.mode,
        "concurrency": result.concurrency,
        "supported": True,
        "requests": result.requests,
        "errors": len(errors),
        "max_tokens": result.work.max_tokens,
        "tokens": tokens,
        "wall_s": round(result.wall_s, 3),
        "req_per_s": round(len(ok) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_ms_p50": _ms(percentile(ttft, 50)),
        "ttft_ms_p99": _ms(percentile(ttft, 99)),
        "itl_ms_p50": _ms(percentile(gaps, 50)) if result.work.stream else None,
        "tpot_ms_p50": _ms(percentile(tpot, 50)) if result.work.stream else None,
        "latency_ms_p50": _ms(percentile(latency, 50)),
        "latency_ms_p99": _ms(percentile(latency, 99)),
        "latency_ms_mean": _ms(sum(latency) / len(latency)) if latency else None,
        "server_cpu_us_per_token": per_token,
        "server_cpu_s": {name: round(cpu, 3) for name, cpu in result.server_cpu_s.items()},
        "loadgen_cpu_us_per_token": round(result.loadgen_cpu_s * 1e6 / tokens, 2) if tokens else None,
        # Share of one core the load generator used (it is one asyncio thread: near 1.0
        # would mean it may be the bottleneck).
        "loadgen_core_util": round(result.loadgen_cpu_s / wall, 3),
        "machine_busy_cores": round(result.machine_busy_cores, 2),
        "other_busy_cores": round(result.other_busy_cores, 2),
        "error_kinds": _kinds(errors),
        "error_samples": sorted(set(e for e in errors if e))[:3],
    }


def _kinds(errors: list[str | None]) -> dict[str, int]:
    """Errors counted by kind: ``unexpected text`` (a stream that came back short or wrong),
    ``HTTP 500``, ``ClientOSError``, ``error event``, ..."""
    kinds: dict[str, int] = {}
    for error in errors:
        text = error or "unknown"
        kind = text.split(":", 1)[0] if not text.startswith("HTTP ") else text[:8]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
