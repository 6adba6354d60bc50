"""roles/triton's vLLM model files (model.json, config.pbtxt), rendered by Ansible on localhost.

The vLLM backend (Triton 25.01, vLLM 0.6.x) passes model.json to ``AsyncEngineArgs(**...)``,
so every key must be one of its fields, with the type it expects. No GPU or vLLM here: the
templates are rendered by ``ansible.builtin.template`` exactly as the role does and checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.playbook import ansible_tool, run_playbook

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "roles" / "triton" / "templates"
FILES = (("vllm-model.json.j2", "model.json"), ("vllm-config.pbtxt.j2", "config.pbtxt"))
# AsyncEngineArgs fields the role writes (vLLM 0.6.3, the version in Triton 25.01's vllm image).
ENGINE_ARG_TYPES: dict[str, type] = {
    "model": str,
    "tokenizer": str,
    "dtype": str,
    "gpu_memory_utilization": float,
    "enforce_eager": bool,
    "tensor_parallel_size": int,
    "disable_log_requests": bool,
    "trust_remote_code": bool,
    "max_model_len": int,
    "max_num_seqs": int,
}


if ansible_tool() is None:
    print("skipping tests/engine/test_triton_vllm_model.py: no ansible-playbook (create .venv-ansible)")
    pytest.skip("ansible-playbook is missing", allow_module_level=True)


def render(tmp: Path, model: dict[str, Any], extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(model.json, config.pbtxt) for one served model, with the role's defaults plus ``extra``."""
    defaults = yaml.safe_load((ROOT / "roles/triton/defaults/main.yml").read_text())
    evars = {
        **{k: v for k, v in defaults.items() if k.startswith("triton_vllm_")},
        "stack_models_dir": "/var/lib/llm-stack/models",
        "item": model,
        "ansible_python_interpreter": sys.executable,
        **(extra or {}),
    }
    (tmp / "vars.json").write_text(json.dumps(evars))
    (tmp / "play.yml").write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {"ansible.builtin.template": {"src": str(TEMPLATES / name), "dest": f"{tmp}/{out}"}}
                        for name, out in FILES
                    ],
                }
            ]
        )
    )
    env = {"ANSIBLE_LOCAL_TEMP": str(tmp / ".ansible")}
    run = run_playbook(tmp / "play.yml", "localhost,", "-c", "local", "-e", f"@{tmp / 'vars.json'}", env=env)
    assert run.returncode == 0, run.tail()
    return json.loads((tmp / "model.json").read_text()), (tmp / "config.pbtxt").read_text()


def test_defaults(tmp_path: Path) -> None:
    args, config = render(tmp_path, {"name": "llama-3b", "source": "path", "path": "/srv/llama"})
    assert set(args) <= set(ENGINE_ARG_TYPES), set(args) - set(ENGINE_ARG_TYPES)
    for key, value in args.items():
        assert type(value) is ENGINE_ARG_TYPES[key], (key, value)
    # The model link the model role makes, not the source folder: the container mounts both.
    assert args["model"] == args["tokenizer"] == "/var/lib/llm-stack/models/llama-3b"
    assert args == {
        "model": "/var/lib/llm-stack/models/llama-3b",
        "tokenizer": "/var/lib/llm-stack/models/llama-3b",
        "dtype": "auto",
        "gpu_memory_utilization": 0.85,
        "enforce_eager": False,
        "tensor_parallel_size": 1,
        "disable_log_requests": True,
        "trust_remote_code": False,
    }
    assert 'backend: "vllm"' in config
    assert "decoupled: true" in config and "max_batch_size: 0" in config and "KIND_MODEL" in config
    settings = [line for line in config.splitlines() if line.strip() and not line.startswith("#")]
    assert not any(line.startswith("name:") for line in settings)  # Triton takes the folder name


def test_settings_and_context_length(tmp_path: Path) -> None:
    extra = {
        "triton_vllm_dtype": "float16",
        "triton_vllm_gpu_memory_utilization": "0.5",  # as -e passes it: a string
        "triton_vllm_enforce_eager": "true",
        "triton_vllm_max_num_seqs": 8,
        "triton_vllm_tensor_parallel_size": 2,
        "triton_vllm_engine_args": {"seed": 7, "enable_prefix_caching": True},
    }
    args, _ = render(tmp_path, {"name": "m", "source": "embedded", "context_length": 2048}, extra)
    assert args["dtype"] == "float16"
    assert args["gpu_memory_utilization"] == 0.5
    assert args["enforce_eager"] is True
    assert args["max_num_seqs"] == 8 and args["tensor_parallel_size"] == 2
    assert args["max_model_len"] == 2048  # the model's context_length
    assert args["seed"] == 7 and args["enable_prefix_caching"] is True

    args, _ = render(
        tmp_path, {"name": "m", "source": "embedded", "context_length": 2048}, {"triton_vllm_max_model_len": 4096}
    )
    assert args["max_model_len"] == 4096  # the explicit setting wins
