"""The benchmark's outputs: the table, the JSON rows, the chart and the acceptance figures."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
# The mode of the real-model section's rows (bench/realmodel.py): this stack, vLLM, llama.cpp.
REAL_MODE = "realmodel"

# Every row has these keys (tests/bench checks them).
ROW_KEYS = (
    "target",
    "mode",
    "concurrency",
    "supported",
    "requests",
    "errors",
    "req_per_s",
    "tokens_per_s",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "itl_ms_p50",
    "server_cpu_us_per_token",
)


def unsupported_row(target: str, mode: str, concurrency: int, requests: int, note: str) -> Row:
    return {
        "target": target,
        "mode": mode,
        "concurrency": concurrency,
        "supported": False,
        "note": note,
        "requests": requests,
        "errors": None,
        "req_per_s": None,
        "tokens_per_s": None,
        "ttft_ms_p50": None,
        "ttft_ms_p99": None,
        "itl_ms_p50": None,
        "server_cpu_us_per_token": {},
    }


def write_json(rows: Sequence[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=1) + "\n")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(rows: Iterable[Row]) -> str:
    rows = list(rows)
    real = [r for r in rows if r["mode"] == REAL_MODE]
    rows = [r for r in rows if r["mode"] != REAL_MODE]
    if real and not rows:
        return real_table(real)
    text = _table(rows)
    return text + ("\n\n" + real_table(real) if real else "")


def _table(rows: Iterable[Row]) -> str:
    head = [
        "target",
        "mode",
        "c",
        "req",
        "err",
        "req/s",
        "tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "TPOT p50",
        "server CPU µs/token",
        "loadgen µs/tok",
        "lg core",
        "busy cores",
        "other",
    ]
    lines: list[list[str]] = []
    notes: list[str] = []
    for r in rows:
        if not r.get("supported", True):
            lines.append([r["target"], r["mode"], str(r["concurrency"]), str(r["requests"]), "-", *["n/a"] * 11])
            notes.append(f"{r['target']} {r['mode']} c={r['concurrency']}: NOT SUPPORTED: {r.get('note', '')}")
            continue
        cpu = ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("server_cpu_us_per_token") or {}).items())
        lines.append(
            [
                r["target"],
                r["mode"],
                str(r["concurrency"]),
                str(r["requests"]),
                str(r["errors"]),
                _fmt(r["req_per_s"]),
                _fmt(r["tokens_per_s"], 0),
                _fmt(r["ttft_ms_p50"], 2),
                _fmt(r["ttft_ms_p99"], 2),
                _fmt(r.get("itl_ms_p50"), 3),
                _fmt(r.get("tpot_ms_p50"), 3),
                cpu,
                _fmt(r.get("loadgen_cpu_us_per_token")),
                _fmt(r.get("loadgen_core_util"), 2),
                _fmt(r.get("machine_busy_cores"), 2),
                _fmt(r.get("other_busy_cores"), 2),
            ]
        )
        if r.get("gateway_share_pct") is not None:
            notes.append(
                f"{r['mode']} ({r['requests']} requests × {r['max_tokens']} tokens, c=1, direct and gateway "
                f"alternating): the gateway adds {r['gateway_added_ms_paired_median']:.1f} ms (median of paired "
                f"differences) to {r['latency_ms_p50']:.1f} ms end to end = {r['gateway_share_pct']:.2f}% of "
                f"the latency; by means: {r['gateway_added_ms_mean']:.1f} ms = {r['gateway_share_pct_mean']:.2f}%"
            )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append(
            "  ".join(v.rjust(w) if i >= 2 else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True)))
        )
    text = "\n".join(out)
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text + "\n(times in ms; TTFT in non-streaming mode = the whole answer's latency)"


def real_table(rows: Sequence[Row]) -> str:
    """The real-model section: one line per server and concurrency."""
    head = [
        "server",
        "precision",
        "c",
        "req",
        "err",
        "tok/s",
        "tok/req",
        "TTFT p50",
        "TTFT p95",
        "decode tok/s p50",
        "server CPU s",
        "server cores",
        "busy cores",
    ]
    lines: list[list[str]] = []
    notes: list[str] = []
    versions: dict[str, str] = {}
    for r in rows:
        name = r.get("server") or r["target"]
        if not r.get("supported", True):
            lines.append(
                [name, r.get("precision") or "-", str(r["concurrency"]), str(r["requests"]), "-"] + ["n/a"] * 8
            )
            note = f"{name}: NOT RUN: {r.get('note', '')}"
            if note not in notes:
                notes.append(note)
            continue
        versions[name] = r.get("server_version") or ""
        cpu = r.get("server_cpu_s") or {}
        lines.append(
            [
                name,
                r.get("precision") or "-",
                str(r["concurrency"]),
                str(r["requests"]),
                str(r["errors"]),
                _fmt(r["tokens_per_s"]),
                _fmt(r.get("completion_tokens_mean")),
                _fmt(r["ttft_ms_p50"], 0),
                _fmt(r.get("ttft_ms_p95"), 0),
                _fmt(r.get("decode_tokens_per_s_p50")),
                ", ".join(f"{k} {_fmt(v)}" for k, v in cpu.items()),
                _fmt(r.get("server_cores_busy"), 2),
                _fmt(r.get("machine_busy_cores"), 2),
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = [
        "Real model: SmolLM2-135M-Instruct on the CPU, streamed chat, temperature 0, each server alone",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    for line in lines:
        out.append(
            "  ".join(v.rjust(w) if i >= 2 else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True)))
        )
    max_tokens = next((r.get("max_tokens") for r in rows if r.get("max_tokens")), None)
    out.append("")
    out.append(
        f"(max_tokens {max_tokens}; tok/s = usage.completion_tokens of the level / its wall time; tok/req = mean "
        "completion tokens per request: every server is sent ignore_eos where it takes it (llama.cpp, vLLM, this "
        "stack); TTFT in ms; decode = per request, after the first token; "
        "server CPU = CPU seconds of the server's processes during the level)"
    )
    out.append(
        "Caveat: llama.cpp runs a 4-bit quantisation (Q4_1 GGUF); vLLM and the stack's vllm engine bf16, "
        "the llm engine fp32: not the same arithmetic, only the same model."
    )
    for name, version in versions.items():
        out.append(f"  {name}: {version}")
    return "\n".join(out + notes)


def _find(rows: Sequence[Row], target: str, mode: str, concurrency: int) -> Row | None:
    for r in rows:
        if r["target"] == target and r["mode"] == mode and r["concurrency"] == concurrency and r.get("supported", True):
            return r
    return None


def acceptance(rows: Sequence[Row]) -> list[str]:
    """The issue's acceptance figures, computed from this run (information, not a gate)."""
    out: list[str] = []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"[{'pass' if ok else 'FAIL' if ok is not None else ' -- '}] {text}")

    tri, gw = _find(rows, "triton", "stream", 32), _find(rows, "gateway", "stream", 32)
    if tri and gw and tri["tokens_per_s"]:
        ratio = gw["tokens_per_s"] / tri["tokens_per_s"]
        line(ratio >= 0.8, f"stream c=32: gateway tokens/s {gw['tokens_per_s']:,.0f} = {ratio:.2f} × Triton's (≥ 0.80)")
        cpu = gw["server_cpu_us_per_token"]
        if cpu.get("gateway") is not None and cpu.get("triton"):
            share = cpu["gateway"] / cpu["triton"]
            line(
                share <= 0.5,
                f"stream c=32: gateway CPU {cpu['gateway']:.1f} µs/token = {share:.2f} × Triton's own "
                f"{cpu['triton']:.1f} µs/token in the same run (≤ 0.50)",
            )
    tri1, gw1 = _find(rows, "triton", "stream", 1), _find(rows, "gateway", "stream", 1)
    if tri1 and gw1 and tri1["ttft_ms_p50"] is not None and gw1["ttft_ms_p50"] is not None:
        delta = gw1["ttft_ms_p50"] - tri1["ttft_ms_p50"]
        line(delta <= 2.0, f"stream c=1: gateway TTFT p50 {gw1['ttft_ms_p50']:.2f} ms = direct + {delta:.2f} ms (≤ 2)")
    for mode in ("stream", "nostream"):
        g, lite = _find(rows, "gateway", mode, 32), _find(rows, "litellm", mode, 32)
        if g and lite and lite["tokens_per_s"]:
            ratio = g["tokens_per_s"] / lite["tokens_per_s"]
            line(ratio >= 3, f"{mode} c=32: gateway tokens/s = {ratio:.2f} × LiteLLM's (≥ 3)")
        elif g and any(r["target"] == "litellm" and r["mode"] == mode and not r.get("supported", True) for r in rows):
            line(None, f"{mode} c=32: LiteLLM does not support this mode")
    gw_rows = [r for r in rows if r["target"] == "gateway" and r.get("supported", True) and r["mode"] != "smollm2"]
    if gw_rows:
        errors = sum(r["errors"] or 0 for r in gw_rows)
        top = max(r["concurrency"] for r in gw_rows)
        line(errors == 0, f"gateway errors at every level up to c={top}: {errors}")
    real = [r for r in rows if r["target"] == "gateway" and r.get("gateway_share_pct") is not None]
    for r in real:
        line(
            r["gateway_share_pct"] <= 2.0,
            f"{r['mode']}: gateway share of end-to-end latency {r['gateway_share_pct']:.2f}% (≤ 2)",
        )
    return out


def chart(rows: Sequence[Row], path: Path) -> Path | None:
    """tokens/s and TTFT p50 by concurrency, one line per target, one row of plots per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synthetic = [r for r in rows if r.get("supported", True) and r["mode"] in ("stream", "nostream")]
    modes = [m for m in ("stream", "nostream") if any(r["mode"] == m for r in synthetic)]
    real = [r for r in rows if r["mode"] == REAL_MODE]
    if not modes and not real:
        return None
    panels = len(modes) + (1 if real else 0)
    fig, axes = plt.subplots(panels, 2, figsize=(11, 4.2 * panels), squeeze=False)
    styles: Mapping[str, str] = {"triton": "o-", "gateway": "s-", "litellm": "^-"}
    for i, mode in enumerate(modes):
        for target in sorted(
            {r["target"] for r in synthetic}, key=lambda t: list(styles).index(t) if t in styles else 9
        ):
            pts = sorted((r["concurrency"], r) for r in synthetic if r["mode"] == mode and r["target"] == target)
            if not pts:
                continue
            xs = [c for c, _ in pts]
            axes[i][0].plot(xs, [r["tokens_per_s"] for _, r in pts], styles.get(target, "x-"), label=target)
            axes[i][1].plot(xs, [r["ttft_ms_p50"] for _, r in pts], styles.get(target, "x-"), label=target)
        tokens = "256 pieces/request" if mode == "stream" else "16 pieces/request"
        axes[i][0].set_title(f"{mode} ({tokens}): tokens/s")
        axes[i][1].set_title(f"{mode}: TTFT p50 (ms)" + ("" if mode == "stream" else " = latency"))
        levels = sorted({r["concurrency"] for r in synthetic if r["mode"] == mode})
        for ax in axes[i]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_xlabel("concurrency")
            ax.grid(True, alpha=0.3)
            ax.legend()
        axes[i][1].set_yscale("log")
        for r in rows:
            if r["mode"] == mode and not r.get("supported", True):
                axes[i][0].annotate(f"{r['target']}: not supported", xy=(0.02, 0.02), xycoords="axes fraction")
    if real:
        _real_panel(axes[len(modes)], real)
    if modes:
        fig.suptitle("Gateway vs direct Triton vs LiteLLM (synthetic model, same Triton)")
    else:
        fig.suptitle("SmolLM2-135M-Instruct on the CPU: this stack vs vLLM vs llama.cpp")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _real_panel(axes: Any, rows: Sequence[Row]) -> None:
    """tokens/s and TTFT p50 by concurrency, one line per server of the real-model section."""
    styles = {"stack-vllm": "s-", "stack-llm": "D-", "vllm": "o-", "llama.cpp": "^-"}
    measured = [r for r in rows if r.get("supported", True)]
    for target in dict.fromkeys(r["target"] for r in measured):
        pts = sorted((r["concurrency"], r) for r in measured if r["target"] == target)
        label = f"{pts[0][1].get('server') or target} ({pts[0][1].get('precision') or '?'})"
        xs = [c for c, _ in pts]
        axes[0].plot(xs, [r["tokens_per_s"] for _, r in pts], styles.get(target, "x-"), label=label)
        axes[1].plot(xs, [r["ttft_ms_p50"] for _, r in pts], styles.get(target, "x-"), label=label)
    max_tokens = next((r.get("max_tokens") for r in rows if r.get("max_tokens")), "?")
    axes[0].set_ylim(bottom=0)
    axes[0].set_title(f"SmolLM2-135M, streamed chat ({max_tokens} tokens): output tokens/s")
    axes[1].set_title("SmolLM2-135M: TTFT p50 (ms)")
    levels = sorted({r["concurrency"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.grid(True, alpha=0.3)
        if measured:
            ax.legend(fontsize=8)
    not_run = sorted({r.get("server") or r["target"] for r in rows if not r.get("supported", True)})
    if not_run:
        axes[0].annotate("not run: " + ", ".join(not_run), xy=(0.02, 0.02), xycoords="axes fraction", fontsize=8)
    axes[0].annotate(
        "llama.cpp: Q4_1 (4-bit); others bf16/fp32", xy=(0.02, 0.95), xycoords="axes fraction", fontsize=8, va="top"
    )
