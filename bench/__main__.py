"""``python -m bench``: the full benchmark (``make bench``), ``--quick`` (``make bench-quick``),
or ``python -m bench profile`` (py-spy on the gateway while it streams)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench import report
from bench.peers import PEERS
from bench.run import MODES, TARGETS, BenchConfig, Runner, dump_meta, profile_gateway, quick_config


def _csv(kind: type, allowed: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    def parse(text: str) -> tuple[object, ...]:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        bad = [v for v in values if allowed and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return values

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    prof = sub.add_parser("profile", help="py-spy on the gateway while it streams at one concurrency")
    prof.add_argument("--concurrency", type=int, default=32)
    prof.add_argument("--requests", type=int, default=512)
    prof.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    prof.add_argument("--out-dir", type=Path, default=Path("bench/results"))

    parser.add_argument("--quick", action="store_true", help="one level (c=8) of each mode, no real-model line")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("BENCH_OUT", "bench/results/latest.json")))
    parser.add_argument("--targets", type=_csv(str, TARGETS), default=None, help="comma-separated, default all")
    parser.add_argument("--modes", type=_csv(str, MODES), default=None, help="stream,nostream")
    parser.add_argument("--concurrency", type=_csv(int), default=None, help="e.g. 1,8,32,64")
    parser.add_argument("--stream-requests", type=int, default=None, help="requests per streaming level")
    parser.add_argument("--nostream-requests", type=int, default=None, help="requests per non-streaming level")
    parser.add_argument("--stream-tokens", type=int, default=None)
    parser.add_argument("--nostream-tokens", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None, help="requests before each level (default max(c, 4))")
    parser.add_argument(
        "--piece-delay-ms",
        type=float,
        default=float(os.environ.get("BENCH_PIECE_DELAY_MS", "0") or 0),
        help="synthetic model: sleep between pieces (default 0: as fast as it can)",
    )
    parser.add_argument("--level-time-limit", type=float, default=None, help="seconds per level (default 300)")
    real = parser.add_mutually_exclusive_group()
    real.add_argument("--real-model", dest="real_model", action="store_true", default=None)
    real.add_argument("--no-real-model", dest="real_model", action="store_false")
    real.add_argument("--real-model-only", action="store_true", help="only the SmolLM2 line")
    parser.add_argument("--real-requests", type=int, default=None)
    section = parser.add_argument_group(
        "real-model section", "this stack vs vLLM vs llama.cpp on SmolLM2, each alone (bench/realmodel.py)"
    )
    section.add_argument(
        "--peers",
        type=_csv(str, (*PEERS, "none")),
        default=None,
        help=f"servers, in order (default all: {','.join(PEERS)}; 'none' skips the section)",
    )
    section.add_argument("--peers-only", action="store_true", help="only the real-model section")
    section.add_argument("--peer-concurrency", type=_csv(int), default=None, help="default 1,4,16")
    section.add_argument("--peer-requests-per-c", type=int, default=None, help="requests per level = this × c (4)")
    section.add_argument("--peer-tokens", type=int, default=None, help="max_tokens per request (128)")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and configs here (default: a temp dir)")
    args = parser.parse_args(argv)

    if args.command == "profile":
        profile_gateway(args.out_dir, args.concurrency, args.requests, args.rate)
        return 0

    overrides = {
        key: value
        for key, value in {
            "targets": args.targets,
            "modes": args.modes,
            "concurrency": args.concurrency,
            "stream_requests": args.stream_requests,
            "nostream_requests": args.nostream_requests,
            "stream_tokens": args.stream_tokens,
            "nostream_tokens": args.nostream_tokens,
            "warmup": args.warmup,
            "piece_delay_ms": args.piece_delay_ms,
            "level_time_limit_s": args.level_time_limit,
            "real_model": args.real_model,
            "real_requests": args.real_requests,
            "workdir": args.workdir,
            "peers": tuple(p for p in args.peers if p != "none") if args.peers is not None else None,
            "peer_concurrency": args.peer_concurrency,
            "peer_requests_per_c": args.peer_requests_per_c,
            "peer_tokens": args.peer_tokens,
        }.items()
        if value is not None
    }
    if args.real_model_only:
        overrides.update(targets=(), real_model=True)
        overrides.setdefault("peers", ())  # unless --peers names some
    if args.peers_only:
        overrides.update(targets=(), real_model=False)
    overrides["out"] = args.out
    overrides["chart"] = not args.no_chart
    config = quick_config(**overrides) if args.quick else BenchConfig(**overrides)
    runner = Runner(config)
    rows = runner.run()
    report.write_json(rows, config.out)
    dump_meta(config, config.out.with_suffix(".meta.json"), runner.peer_meta)
    chart = report.chart(rows, config.out.with_suffix(".png")) if config.chart else None
    print()
    print(report.table(rows))
    headline = report.acceptance(rows)
    if headline:
        print()
        print("Headline figures (information, not a gate):")
        for line in headline:
            print("  " + line)
    print(f"\nJSON: {config.out}" + (f"   chart: {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
