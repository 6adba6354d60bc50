#!/usr/bin/env python3
"""STAND-IN for the `docker` client (tests only; no Docker engine, no GPU, no image).

Records its argv (one JSON list a line) in $DOCKER_STANDIN_LOG and fakes what the real
commands run inside the Triton TRT-LLM image would leave in the mounted folders:
- `python3 .../convert_checkpoint.py ... --output_dir D`: a TensorRT-LLM checkpoint in D
- `trtllm-build ... --output_dir D`: an engine in D (after $DOCKER_STANDIN_BUILD_SECONDS)
- `cp -r <templates>/. /repo/`: minimal STAND-IN templates with ${key} placeholders
  (not TensorRT-LLM's templates: just the placeholders the role fills); from a folder
  named `llmapi`, a STAND-IN of the LLM API template instead: tensorrt_llm/config.pbtxt,
  tensorrt_llm/1/model.py and an example tensorrt_llm/1/model.yaml (which the role replaces)
- `python3 .../fill_template.py -i F k:v,...`: string.Template substitution, like the real one
$DOCKER_STANDIN_FAIL=build makes trtllm-build exit 1.
"""

from __future__ import annotations

import json
import os
import string
import sys
import time
from pathlib import Path

TEMPLATE_KEYS = {
    "ensemble": ["triton_max_batch_size", "logits_datatype"],
    "preprocessing": ["tokenizer_dir", "triton_max_batch_size", "preprocessing_instance_count"],
    "tensorrt_llm": [
        "triton_backend",
        "triton_max_batch_size",
        "decoupled_mode",
        "engine_dir",
        "max_queue_delay_microseconds",
        "max_queue_size",
        "batching_strategy",
        "kv_cache_free_gpu_mem_fraction",
        "exclude_input_in_output",
        "encoder_input_features_data_type",
        "logits_datatype",
    ],
    "postprocessing": ["tokenizer_dir", "triton_max_batch_size", "postprocessing_instance_count"],
    "tensorrt_llm_bls": ["triton_max_batch_size", "decoupled_mode", "bls_instance_count", "logits_datatype"],
}

# The shape of the template's example model.yaml (a hub model id, batching off).
LLMAPI_EXAMPLE_YAML = (
    "model: example/hub-model\n"
    "backend: pytorch\n"
    "tensor_parallel_size: 1\n"
    "triton_config:\n"
    "  max_batch_size: 0\n"
    "  decoupled: false\n"
)


def main(argv: list[str]) -> int:
    with open(os.environ["DOCKER_STANDIN_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(argv) + "\n")
    if not argv or argv[0] != "run":
        print(f"docker stand-in: unsupported {argv[:1]}", file=sys.stderr)
        return 2
    mounts: dict[str, Path] = {}
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        opt = argv[i]
        if opt in ("-v", "--volume"):
            host, ctr = argv[i + 1].split(":")[:2]
            mounts[ctr] = Path(host)
            i += 2
        elif opt in ("--gpus", "--ulimit", "-e", "--entrypoint"):
            i += 2
        else:
            i += 1
    cmd = argv[i + 1 :]  # argv[i] is the image

    def host(path: str) -> Path:
        for ctr, h in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if path == ctr or path.startswith(ctr + "/"):
                return h / path[len(ctr) :].lstrip("/")
        raise SystemExit(f"docker stand-in: {path} is not under a mount {sorted(mounts)}")

    def opt(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    if cmd[:1] == ["python3"] and cmd[1].endswith("/convert_checkpoint.py"):
        out = host(opt("--output_dir"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"dtype": opt("--dtype")}))
        (out / "rank0.safetensors").write_bytes(b"stand-in")
        print("stand-in convert_checkpoint: done")
    elif cmd[:1] == ["trtllm-build"]:
        time.sleep(float(os.environ.get("DOCKER_STANDIN_BUILD_SECONDS", "0")))
        if os.environ.get("DOCKER_STANDIN_FAIL") == "build":
            print("stand-in trtllm-build: failing as asked")
            return 1
        out = host(opt("--output_dir"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"max_batch_size": int(opt("--max_batch_size"))}))
        (out / "rank0.engine").write_bytes(b"stand-in")
        print("stand-in trtllm-build: engine written")
    elif cmd[:2] == ["cp", "-r"] and cmd[2].rstrip("/.").endswith("/llmapi"):
        dest = host(cmd[3])
        (dest / "tensorrt_llm" / "1").mkdir(parents=True, exist_ok=True)
        (dest / "tensorrt_llm" / "config.pbtxt").write_text('name: "tensorrt_llm"\nbackend: "python"\n')
        (dest / "tensorrt_llm" / "1" / "model.py").write_text("# stand-in\n")
        (dest / "tensorrt_llm" / "1" / "model.yaml").write_text(LLMAPI_EXAMPLE_YAML)
    elif cmd[:2] == ["cp", "-r"]:
        dest = host(cmd[3])
        for model, keys in TEMPLATE_KEYS.items():
            (dest / model / "1").mkdir(parents=True, exist_ok=True)
            text = f'name: "{model}"\n' + "".join(f"# {k}: ${{{k}}}\n" for k in keys)
            (dest / model / "config.pbtxt").write_text(text)
    elif cmd[:1] == ["python3"] and cmd[1].endswith("/fill_template.py"):
        path = host(opt("-i"))
        values = dict(kv.split(":", 1) for kv in cmd[cmd.index("-i") + 2].split(","))
        path.write_text(string.Template(path.read_text()).safe_substitute(values))
    else:
        print(f"docker stand-in: unsupported command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
