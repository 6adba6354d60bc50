"""One benchmark run: start the servers, drive each target in turn, write the results.

Order: Triton (synthetic model) runs for the whole synthetic phase; the targets follow
each other — ``triton`` (its own ``generate_stream`` / ``generate``), ``gateway`` (started
for its turn, stopped after), ``litellm`` (likewise) — each through every mode and level.
Then the real-model line: a Triton with SmolLM2 through ``model_repository/llm`` and a
gateway in front of it, direct and gateway requests alternating. Last, the real-model
section (``bench.realmodel``): this stack, vLLM and llama.cpp, each alone, same streamed load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen, peers, realmodel
from bench.loadgen import NOSTREAM, OPENAI, STREAM, TRITON, Endpoint, LevelResult, ProcessCpu, Sample, Workload
from bench.report import Row, unsupported_row

TARGETS = ("triton", "gateway", "litellm")
MODES = (STREAM, NOSTREAM)
# The synthetic model's pieces, in turn (its config.pbtxt parameter `pieces`).
PIECES = (" tok", " tik")
MESSAGES = ({"role": "user", "content": "Say 'tok' as many times as you are allowed to."},)
REAL_MESSAGES = ({"role": "user", "content": "Write a long story about a dragon who learns to bake bread."},)

# What LiteLLM's Triton provider does with each mode (litellm/llms/triton/completion/
# transformation.py): both go to Triton's generate extension.
LITELLM_MODES = {
    STREAM: "supported: LiteLLM posts to api_base + '_stream' (Triton generate_stream) and re-emits SSE chunks",
    NOSTREAM: "supported: LiteLLM posts to api_base (Triton generate) and wraps text_output in a chat.completion",
}


@dataclass
class BenchConfig:
    targets: tuple[str, ...] = TARGETS
    modes: tuple[str, ...] = MODES
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    stream_tokens: int = 256
    nostream_tokens: int = 16
    stream_requests: int = 256
    nostream_requests: int = 1024
    warmup: int | None = None  # default: max(concurrency, 4) requests before each level
    piece_delay_ms: float = 0.0
    level_time_limit_s: float = 300.0
    real_model: bool = True
    real_requests: int = 10
    real_tokens: int = 64
    # The real-model section (bench/realmodel.py): servers in turn, each at every concurrency.
    peers: tuple[str, ...] = peers.PEERS
    peer_concurrency: tuple[int, ...] = (1, 4, 16)
    peer_requests_per_c: int = 4
    peer_tokens: int = 128
    out: Path = Path("bench/results/latest.json")
    chart: bool = True
    workdir: Path | None = None
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    def requests_for(self, mode: str) -> int:
        return self.stream_requests if mode == STREAM else self.nostream_requests

    def tokens_for(self, mode: str) -> int:
        return self.stream_tokens if mode == STREAM else self.nostream_tokens

    def real_config(self) -> realmodel.RealConfig:
        return realmodel.RealConfig(
            servers=self.peers,
            concurrency=self.peer_concurrency,
            requests_per_c=self.peer_requests_per_c,
            max_tokens=self.peer_tokens,
        )


def quick_config(**overrides: Any) -> BenchConfig:
    """``make bench-quick``: one level of each mode, every target, no real-model line; of the
    real-model section only this stack (llm engine: it starts in seconds), 4 short requests at c=4."""
    base: dict[str, Any] = {
        "concurrency": (8,),
        "stream_requests": 48,
        "nostream_requests": 192,
        "real_model": False,
        "peers": ("stack-llm",),
        "peer_concurrency": (4,),
        "peer_requests_per_c": 1,
        "peer_tokens": 32,
    }
    base.update(overrides)
    return BenchConfig(**base)


def chat_prompt(tokenizer_dir: Path, messages: tuple[dict[str, str], ...]) -> str:
    """The chat-templated prompt the gateway sends Triton for ``messages``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))


class Runner:
    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.rows: list[Row] = []
        self.peer_meta: dict[str, Any] = {}
        self.log = config.log
        self.loop_runner = asyncio.Runner(loop_factory=_loop_factory())

    # ------------------------------------------------------------------ plumbing

    def _level(self, endpoint: Endpoint, work: Workload, concurrency: int, probes: list[ProcessCpu]) -> Row:
        cfg = self.config
        result = self.loop_runner.run(
            loadgen.run_level(
                endpoint,
                work,
                concurrency,
                cfg.requests_for(work.mode),
                probes,
                warmup=cfg.warmup,
                time_limit_s=cfg.level_time_limit_s,
            )
        )
        row = loadgen.summarize(result)
        self.log(
            f"  {row['target']:<8} {row['mode']:<8} c={concurrency:<3} {row['tokens_per_s']:>10,.0f} tok/s "
            f"{row['req_per_s']:>8,.1f} req/s  TTFT p50 {row['ttft_ms_p50'] or 0:8.2f} ms  errors {row['errors']}"
            f"  loadgen core {row['loadgen_core_util']:.2f}"
        )
        if row["errors"]:
            self.log(f"    errors: {row['error_samples']}")
        return row

    def _workload(self, mode: str, prompt: str) -> Workload:
        return Workload(
            mode=mode,
            max_tokens=self.config.tokens_for(mode),
            messages=MESSAGES,
            prompt=prompt,
            expect_pieces=PIECES,
        )

    def _probe(self, endpoint: Endpoint, work: Workload) -> str | None:
        """One request; the error text when the target cannot serve this mode at all."""

        async def once() -> Sample:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                url, body = loadgen.build_request(endpoint, work)
                return await loadgen.one_request(session, endpoint, work, url, body)

        sample = self.loop_runner.run(once())
        return None if sample.ok else sample.error or "failed"

    # ------------------------------------------------------------------ phases

    def synthetic(self, workdir: Path) -> None:
        from bench import servers
        from stack.models import build_tiny_model
        from stack.paths import cache_dir

        cfg = self.config
        tiny = build_tiny_model(cache_dir() / "models" / "tiny-llama")
        prompt = chat_prompt(tiny, MESSAGES)
        self.log(f"starting Triton with the synthetic model (piece delay {cfg.piece_delay_ms} ms)")
        triton = servers.start_synthetic_triton(workdir, cfg.piece_delay_ms)
        try:
            assert triton.process is not None
            triton_cpu = ProcessCpu("triton", triton.process.pid)
            for target in cfg.targets:
                with self._target(target, triton.url, tiny, workdir) as (endpoint, probes):
                    for mode in cfg.modes:
                        work = self._workload(mode, prompt)
                        if target == "litellm":
                            error = self._probe(endpoint, work)
                            if error is not None:
                                note = f"LiteLLM's triton provider failed this mode: {error}"
                                self.log(f"  litellm {mode}: not supported ({error})")
                                for c in cfg.concurrency:
                                    self.rows.append(unsupported_row(target, mode, c, cfg.requests_for(mode), note))
                                continue
                        for c in cfg.concurrency:
                            row = self._level(endpoint, work, c, [*probes, triton_cpu])
                            if target == "litellm":
                                row["note"] = LITELLM_MODES[mode]
                            self.rows.append(row)
        finally:
            triton.stop()

    @contextlib.contextmanager
    def _target(
        self, target: str, triton_url: str, tokenizer: Path, workdir: Path
    ) -> Iterator[tuple[Endpoint, list[ProcessCpu]]]:
        from bench import servers

        if target == "triton":
            yield Endpoint("triton", TRITON, triton_url, servers.SYNTHETIC), []
        elif target == "gateway":
            self.log("starting the gateway (python -m gateway)")
            config = servers.gateway_config(
                triton_url, {servers.SYNTHETIC: (servers.SYNTHETIC, tokenizer)}, servers.UNLIMITED
            )
            gateway = servers.start_gateway(config, workdir)
            try:
                yield (
                    Endpoint("gateway", OPENAI, gateway.url, servers.SYNTHETIC),
                    [ProcessCpu("gateway", gateway.process.pid)],
                )
            finally:
                gateway.stop()
        elif target == "litellm":
            self.log("starting LiteLLM's proxy (litellm --config, triton provider)")
            proxy = servers.start_litellm(triton_url, servers.SYNTHETIC, tokenizer, workdir)
            try:
                yield (
                    Endpoint("litellm", OPENAI, proxy.url, servers.SYNTHETIC),
                    [ProcessCpu("litellm", proxy.process.pid)],
                )
            finally:
                proxy.stop()
        else:
            raise ValueError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")

    def real_model(self, workdir: Path) -> None:
        """SmolLM2 on the CPU: 10 streamed requests of 64 tokens, direct vs gateway, alternating."""
        from bench import servers
        from stack import repository
        from stack.models import DEFAULT_MODEL_NAME, prepare_default_model

        cfg = self.config
        smol = prepare_default_model()
        repo = workdir / "real-model-repository"
        repository.render(repo, {DEFAULT_MODEL_NAME: smol})
        self.log(f"starting Triton with {DEFAULT_MODEL_NAME} (model_repository/llm, CPU)")
        triton = servers.start_triton(repo, [DEFAULT_MODEL_NAME], workdir / "triton-smollm2.log")
        try:
            gateway = servers.start_gateway(
                servers.gateway_config(triton.url, {DEFAULT_MODEL_NAME: (DEFAULT_MODEL_NAME, smol)}), workdir
            )
            try:
                assert triton.process is not None
                probes = {
                    "triton": [ProcessCpu("triton", triton.process.pid)],
                    "gateway": [ProcessCpu("gateway", gateway.process.pid), ProcessCpu("triton", triton.process.pid)],
                }
                work = Workload(
                    mode=STREAM,
                    max_tokens=cfg.real_tokens,
                    messages=REAL_MESSAGES,
                    prompt=chat_prompt(smol, REAL_MESSAGES),
                    temperature=0.0,
                )
                endpoints = {
                    "triton": Endpoint("triton", TRITON, triton.url, DEFAULT_MODEL_NAME),
                    "gateway": Endpoint("gateway", OPENAI, gateway.url, DEFAULT_MODEL_NAME),
                }
                results = self.loop_runner.run(self._alternate(endpoints, work, probes))
            finally:
                gateway.stop()
        finally:
            triton.stop()
        rows = {name: loadgen.summarize(result) for name, result in results.items()}
        for row in rows.values():
            row["mode"] = "smollm2"
            row["model"] = f"{DEFAULT_MODEL_NAME} on the CPU (model_repository/llm), streamed, temperature 0"
        direct, via = rows["triton"], rows["gateway"]
        pairs = [
            (t.end - t.start, g.end - g.start)
            for t, g in zip(results["triton"].samples, results["gateway"].samples, strict=True)
            if t.ok and g.ok
        ]
        if pairs:
            # Request i of each path ran back to back: the median of the paired differences
            # shrugs off a stall of the machine that hit one request (other work on it).
            paired = loadgen.percentile([g - t for t, g in pairs], 50) or 0.0
            gw_median = loadgen.percentile([g for _, g in pairs], 50) or float("nan")
            added_mean = via["latency_ms_mean"] - direct["latency_ms_mean"]
            via["gateway_added_ms_paired_median"] = round(paired * 1000.0, 3)
            via["gateway_share_pct"] = round(100.0 * paired / gw_median, 3)
            via["gateway_added_ms_mean"] = round(added_mean, 3)
            via["gateway_share_pct_mean"] = round(100.0 * added_mean / via["latency_ms_mean"], 3)
        self.rows += [direct, via]
        self.log(
            f"  smollm2: direct {direct['latency_ms_mean']} ms, gateway {via['latency_ms_mean']} ms mean "
            f"→ gateway share {via.get('gateway_share_pct')}% (paired median)"
        )

    async def _alternate(
        self, endpoints: dict[str, Endpoint], work: Workload, probes: dict[str, list[ProcessCpu]]
    ) -> dict[str, LevelResult]:
        import aiohttp

        cfg = self.config
        samples: dict[str, list[Sample]] = {name: [] for name in endpoints}
        cpu: dict[str, dict[str, float]] = {name: {p.name: 0.0 for p in probes[name]} for name in endpoints}
        own: dict[str, float] = dict.fromkeys(endpoints, 0.0)
        busy: dict[str, float] = dict.fromkeys(endpoints, 0.0)
        requests = {name: loadgen.build_request(ep, work) for name, ep in endpoints.items()}
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for name, ep in endpoints.items():  # warm-up: one each (model, caches, connections)
                await loadgen.one_request(session, ep, work, *requests[name])
            for i in range(cfg.real_requests):
                # Alternate which goes first so that drift (thermal, caches) hits both alike.
                order = list(endpoints) if i % 2 == 0 else list(reversed(endpoints))
                for name in order:
                    before = {p.name: p.snapshot() for p in probes[name]}
                    own_before, busy_before = loadgen.self_cpu(), loadgen.machine_busy()
                    sample = await loadgen.one_request(session, endpoints[name], work, *requests[name])
                    own[name] += loadgen.self_cpu() - own_before
                    busy[name] += loadgen.machine_busy() - busy_before
                    after = {p.name: p.snapshot() for p in probes[name]}
                    for p in probes[name]:
                        cpu[name][p.name] += ProcessCpu.used(before[p.name], after[p.name])
                    samples[name].append(sample)
        results = {}
        for name in endpoints:
            wall = sum(s.end - s.start for s in samples[name])
            results[name] = LevelResult(
                endpoint=endpoints[name],
                work=work,
                concurrency=1,
                requests=cfg.real_requests,
                samples=samples[name],
                wall_s=wall,
                server_cpu_s=cpu[name],
                loadgen_cpu_s=own[name],
                machine_busy_cores=busy[name] / wall if wall > 0 else 0.0,
            )
        return results

    # ------------------------------------------------------------------ all

    def run(self) -> list[Row]:
        cfg = self.config
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.loop_runner)
            workdir = cfg.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
            workdir.mkdir(parents=True, exist_ok=True)
            if cfg.targets and cfg.modes and cfg.concurrency:
                self.synthetic(workdir)
            if cfg.real_model:
                self.real_model(workdir)
            if cfg.peers and cfg.peer_concurrency:
                self.real_section(workdir)
        return self.rows

    def real_section(self, workdir: Path) -> None:
        """This stack, vLLM and llama.cpp on SmolLM2, each alone (bench/realmodel.py)."""
        cfg = self.config
        self.log(
            f"real-model section: {', '.join(cfg.peers)} at c={','.join(map(str, cfg.peer_concurrency))}, "
            f"{cfg.peer_requests_per_c}×c requests of {cfg.peer_tokens} tokens"
        )
        rows, meta = realmodel.run_section(cfg.real_config(), workdir, self.loop_runner.run, self.log)
        self.rows += rows
        self.peer_meta.update(meta)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.new_event_loop


def metadata(config: BenchConfig, servers: dict[str, Any] | None = None) -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cfg = asdict(config)
    cfg.pop("log", None)
    cfg["out"] = str(config.out)
    cfg["workdir"] = str(config.workdir) if config.workdir else None
    try:  # which gateway code ran (read-only git)
        git = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git or None,
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "versions": {n: version(n) for n in ("litellm", "aiohttp", "fastapi", "uvicorn", "nvidia-pytriton", "uvloop")},
        "config": cfg,
        "litellm_modes": LITELLM_MODES,
        "loadgen": "aiohttp + uvloop, one process, keep-alive pool of `concurrency` connections per level",
        # The real-model section: each server's versions, or why it did not run.
        "realmodel": {
            "loadgen": "httpx AsyncClient, one per level with `concurrency` keep-alive connections",
            "servers": servers or {},
        },
    }


# --------------------------------------------------------------------------- profiling


def profile_gateway(
    out_dir: Path,
    concurrency: int = 32,
    requests: int = 512,
    rate: int = 100,
    log: Callable[[str], None] = print,
) -> Path:
    """Stream at ``concurrency`` through the gateway while py-spy samples it; summarise."""
    from bench import servers
    from stack.models import build_tiny_model
    from stack.paths import cache_dir

    py_spy = Path(sys.executable).parent / "py-spy"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"gateway-stream-c{concurrency}.pyspy.txt"
    summary = out_dir / f"gateway-stream-c{concurrency}.profile.txt"
    tiny = build_tiny_model(cache_dir() / "models" / "tiny-llama")
    work = Workload(STREAM, 256, MESSAGES, chat_prompt(tiny, MESSAGES), expect_pieces=PIECES)
    with (
        tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp,
        asyncio.Runner(loop_factory=_loop_factory()) as runner,
    ):
        workdir = Path(tmp)
        triton = servers.start_synthetic_triton(workdir)
        try:
            gateway = servers.start_gateway(
                servers.gateway_config(triton.url, {servers.SYNTHETIC: (servers.SYNTHETIC, tiny)}, servers.UNLIMITED),
                workdir,
            )
            try:
                endpoint = Endpoint("gateway", OPENAI, gateway.url, servers.SYNTHETIC)
                probes = [ProcessCpu("gateway", gateway.process.pid)]
                assert triton.process is not None
                probes.append(ProcessCpu("triton", triton.process.pid))
                # Warm up without the profiler, then sample during a measured level.
                runner.run(loadgen.run_level(endpoint, work, concurrency, concurrency, probes, warmup=0))
                spy = subprocess.Popen(
                    [
                        str(py_spy),
                        "record",
                        "--pid",
                        str(gateway.process.pid),
                        "--rate",
                        str(rate),
                        "--format",
                        "raw",
                        "--threads",
                        "--idle",
                        "--output",
                        str(raw),
                        "--duration",
                        "600",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                time.sleep(1.0)  # py-spy attaches
                result = runner.run(loadgen.run_level(endpoint, work, concurrency, requests, probes, warmup=0))
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
                try:
                    _, err = spy.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, err = spy.communicate()
            finally:
                gateway.stop()
        finally:
            triton.stop()
    row = loadgen.summarize(result)
    text = summarize_profile(raw) if raw.exists() else f"py-spy wrote nothing: {err.decode(errors='replace')[-1000:]}"
    header = (
        f"gateway, stream c={concurrency}, {requests} requests × 256 pieces, py-spy --rate {rate} --threads --idle\n"
        f"under the profiler: {row['tokens_per_s']:,.0f} tokens/s, errors {row['errors']}, "
        f"CPU µs/token {row['server_cpu_us_per_token']}\n"
        + (f"errors seen: {row['error_samples']}\n" if row["errors"] else "")
        + "\n"
    )
    summary.write_text(header + text)
    log(header + text)
    return summary


_LINE = re.compile(r":\d+\)$")


def _function(frame: str) -> str:
    """``f (file.py:123)`` → ``f (file.py)``: lines of one function counted together."""
    return _LINE.sub(")", frame)


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Where the gateway's event-loop thread spends its time, from py-spy's collapsed stacks
    (recorded with ``--threads --idle``): shares of that thread's samples, i.e. of wall time."""
    threads: dict[str, list[tuple[list[str], int]]] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        while frames and frames[0].startswith("process "):
            frames = frames[1:]
        thread = frames.pop(0) if frames and frames[0].startswith("thread ") else "thread (?)"
        threads.setdefault(thread, []).append((frames, int(count_text)))
    if not threads:
        return "no samples\n"

    def loop_samples(thread: str) -> int:
        return sum(c for f, c in threads[thread] if any("Server.run (uvicorn" in x for x in f))

    main = max(threads, key=loop_samples)
    total = sum(c for _, c in threads[main])
    idle = 0
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    for frames, count in threads[main]:
        leaf = frames[-1] if frames else "?"
        # uvloop's loop is C code: a thread waiting for I/O shows the Python frame that
        # entered it (asyncio's Runner.run) as its innermost frame.
        if leaf.startswith(("Runner.run (", "select (", "run_forever (")):
            idle += count
            continue
        self_counts[_function(leaf)] = self_counts.get(_function(leaf), 0) + count
        for frame in {_function(f) for f in frames}:
            incl_counts[frame] = incl_counts.get(frame, 0) + count
    others = sum(c for t, rows in threads.items() if t != main for f, c in rows if f and "wait" not in f[-1].lower())
    busy = total - idle
    pct = 100.0 / total if total else 0.0
    lines = [
        f"event-loop thread: {total} samples; waiting for I/O {idle * pct:.1f}%, running Python {busy * pct:.1f}%",
        "(wall-clock samples: on a saturated machine 'running' includes waiting for a core; compare with the",
        " gateway's CPU µs/token above for its real CPU use — the shares show where that time goes)",
        f"other threads ({len(threads) - 1}): {others} busy samples (≈ {others * pct:.1f}% of one core)",
        "",
        f"top {top} functions by self time (% of the event-loop thread's wall time):",
    ]
    for frame, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {count * pct:6.2f}%  ({100 * count / max(busy, 1):5.1f}% of running)  {frame}")
    lines.append(f"\ntop {top} functions by inclusive time (% of the event-loop thread's wall time):")
    for frame, count in sorted(incl_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {count * pct:6.2f}%  ({100 * count / max(busy, 1):5.1f}% of running)  {frame}")
    return "\n".join(lines) + "\n"


def dump_meta(config: BenchConfig, path: Path, servers: dict[str, Any] | None = None) -> None:
    path.write_text(json.dumps(metadata(config, servers), indent=1, default=str) + "\n")
