"""The trtllm_engine role against a STAND-IN `docker` (tests/engine/docker_standin.py).

No Docker engine, GPU or image here: the stand-in records every docker command line and
fakes the files the real commands leave behind. Proves the command lines, the manifest
logic (unchanged -> no build; one option changed -> rebuild), honest check mode, the
version switch (TensorRT-LLM >= 1.0 builds nothing) and the argument spec.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK_BIN = ROOT / ".venv-ansible" / "bin" / "ansible-playbook"
STANDIN = Path(__file__).with_name("docker_standin.py")
IMAGE = "nvcr.io/nvidia/tritonserver:25.01-trtllm-python-py3"

if not PLAYBOOK_BIN.exists():
    print(f"skipping tests/engine: {PLAYBOOK_BIN} is missing (run `make up` or create .venv-ansible)")
    pytest.skip(f"{PLAYBOOK_BIN} is missing", allow_module_level=True)


class Env:
    first: tuple[subprocess.CompletedProcess[str], list[list[str]]]

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model = tmp / "model"
        self.model.mkdir()
        (self.model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (self.model / "model.safetensors").write_bytes(b"\0" * 1234)
        self.engines = tmp / "engines" / "tiny"
        self.repo = tmp / "repo"
        self.log = tmp / "docker.log"
        bindir = tmp / "bin"
        bindir.mkdir()
        (bindir / "docker").symlink_to(STANDIN)
        self.path = f"{bindir}:{os.environ['PATH']}"
        (tmp / "hosts.ini").write_text(
            f"localhost ansible_connection=local ansible_python_interpreter={ROOT / '.venv-ansible/bin/python'}\n"
        )
        (tmp / "play.yml").write_text("- hosts: all\n  gather_facts: false\n  roles:\n    - role: trtllm_engine\n")

    def run(
        self, extra: dict[str, Any] | None = None, *args: str
    ) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
        self.log.write_text("")
        evars = {
            "trtllm_engine_model_dir": str(self.model),
            "trtllm_engine_dir": str(self.engines),
            "trtllm_engine_model_repository": str(self.repo),
            "trtllm_engine_build_poll": 1,
            **(extra or {}),
        }
        (self.tmp / "vars.json").write_text(json.dumps(evars))
        env = {
            **os.environ,
            "PATH": self.path,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_LOCAL_TEMP": str(self.tmp / ".ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(self.tmp / ".ansible-remote"),
            "ANSIBLE_ASYNC_DIR": str(self.tmp / ".ansible-async"),
            "DOCKER_STANDIN_LOG": str(self.log),
            "DOCKER_STANDIN_BUILD_SECONDS": "1.5",
        }
        proc = subprocess.run(
            [
                str(PLAYBOOK_BIN),
                "-i",
                str(self.tmp / "hosts.ini"),
                str(self.tmp / "play.yml"),
                "-e",
                f"@{self.tmp / 'vars.json'}",
                *args,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        calls = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return proc, calls

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.engines / "trtllm-engine-manifest.json").read_text())


def recap_changed(out: str) -> int:
    m = re.search(r"localhost\s*:\s*ok=\d+\s+changed=(\d+)", out)
    assert m, out[-3000:]
    return int(m.group(1))


def builds(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if "trtllm-build" in c or any(a.endswith("convert_checkpoint.py") for a in c)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(tmp_path_factory.mktemp("trtllm"))
    proc, calls = e.run()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    e.first = (proc, calls)
    return e


def test_first_run_builds_with_the_expected_commands(env: Env) -> None:
    proc, calls = env.first
    convert, build = builds(calls)
    mounts = ["-v", f"{env.model}:/model:ro", "-v", f"{env.engines}:/engines"]
    for call in (convert, build):
        assert call[:4] == ["run", "--rm", "--gpus", "all"]
        assert " ".join(mounts) in " ".join(call)
        assert IMAGE in call
    after = convert[convert.index(IMAGE) + 1 :]
    assert after == [
        "python3",
        "/app/examples/llama/convert_checkpoint.py",
        "--model_dir",
        "/model",
        "--output_dir",
        "/engines/checkpoint",
        "--dtype",
        "float16",
        "--tp_size",
        "1",
    ]
    after = build[build.index(IMAGE) + 1 :]
    assert after == [
        "trtllm-build",
        "--checkpoint_dir",
        "/engines/checkpoint",
        "--output_dir",
        "/engines/engine",
        "--max_batch_size",
        "8",
        "--max_input_len",
        "2048",
        "--max_seq_len",
        "4096",
        "--gemm_plugin",
        "auto",
    ]
    assert (env.engines / "engine" / "rank0.engine").exists()
    m = env.manifest()
    assert m["image"] == IMAGE and m["tensorrt_llm_version"] == "0.17.0"
    assert m["max_batch_size"] == 8 and m["tp_size"] == 1 and m["dtype"] == "float16"
    assert m["model_weights"] == ["model.safetensors:1234"] and len(m["model_config_sha256"]) == 64
    assert "building after" in proc.stdout or "build finished after" in proc.stdout  # progress lines
    # The model repository: templates copied out of the image, then filled.
    cfg = (env.repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert "${" not in cfg, cfg
    assert f"engine_dir: {env.engines}/engine" in cfg
    assert "batching_strategy: inflight_fused_batching" in cfg and "decoupled_mode: true" in cfg
    assert f"tokenizer_dir: {env.model}" in (env.repo / "preprocessing" / "config.pbtxt").read_text()
    fills = [c for c in calls if "/app/tools/fill_template.py" in c]
    assert len(fills) == 5 and all("--gpus" not in c for c in fills)


def test_second_run_builds_nothing(env: Env) -> None:
    proc, calls = env.run()
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert calls == []
    assert recap_changed(proc.stdout) == 0
    proc, calls = env.run(None, "--check")
    assert proc.returncode == 0 and calls == [] and recap_changed(proc.stdout) == 0


def test_check_mode_reports_a_changed_option_and_runs_no_docker(env: Env) -> None:
    proc, calls = env.run({"trtllm_engine_max_batch_size": 16}, "--check")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert calls == []
    assert "would build the engine" in proc.stdout
    assert recap_changed(proc.stdout) >= 1
    assert env.manifest()["max_batch_size"] == 8


def test_changed_option_rebuilds(env: Env) -> None:
    (env.engines / "stale-marker").write_text("x")
    proc, calls = env.run({"trtllm_engine_max_batch_size": 16})
    assert proc.returncode == 0, proc.stdout[-4000:]
    convert, build = builds(calls)
    assert convert[-4:] == ["--dtype", "float16", "--tp_size", "1"]
    assert build[build.index("--max_batch_size") + 1] == "16"
    assert not (env.engines / "stale-marker").exists()
    assert env.manifest()["max_batch_size"] == 16
    assert "triton_max_batch_size: 16" in (env.repo / "ensemble" / "config.pbtxt").read_text()
    proc, calls = env.run({"trtllm_engine_max_batch_size": 16})
    assert calls == [] and recap_changed(proc.stdout) == 0


def test_failed_build_fails_and_writes_no_manifest(tmp_path: Path) -> None:
    e = Env(tmp_path)
    os.environ["DOCKER_STANDIN_FAIL"] = "build"
    try:
        proc, _ = e.run()
    finally:
        del os.environ["DOCKER_STANDIN_FAIL"]
    assert proc.returncode != 0
    assert "the engine build failed" in proc.stdout and "failing as asked" in proc.stdout
    assert not (e.engines / "trtllm-engine-manifest.json").exists()


# Mode none (TensorRT-LLM >= 1.0): no engine; the image's LLM API template + model.yaml.
LLMAPI_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"
LLMAPI_VARS: dict[str, Any] = {"trtllm_engine_version": "1.0.0", "trtllm_engine_triton_release": "25.10"}


def llmapi_run(
    e: Env, extra: dict[str, Any] | None = None, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    return e.run({**LLMAPI_VARS, **(extra or {})}, *args)


def model_yaml(e: Env) -> dict[str, Any]:
    return dict(yaml.safe_load((e.repo / "tensorrt_llm" / "1" / "model.yaml").read_text()))


@pytest.fixture(scope="module")
def llmapi(tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(tmp_path_factory.mktemp("llmapi"))
    proc, calls = llmapi_run(e)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    e.first = (proc, calls)
    return e


def test_tensorrt_llm_1_0_copies_the_llmapi_template_and_builds_no_engine(llmapi: Env) -> None:
    proc, calls = llmapi.first
    assert "build mode none" in " ".join(proc.stdout.split())
    # One docker run: the template copied out of the pinned image, no GPU, no build.
    assert calls == [
        ["run", "--rm", "-v", f"{llmapi.repo}:/repo", LLMAPI_IMAGE, "cp", "-r", "/app/all_models/llmapi/.", "/repo/"]
    ]
    assert not llmapi.engines.exists()
    assert (llmapi.repo / "tensorrt_llm" / "config.pbtxt").exists()
    assert (llmapi.repo / "tensorrt_llm" / "1" / "model.py").exists()
    # model.yaml from the role's variables replaces the template's example.
    assert model_yaml(llmapi) == {
        "model": str(llmapi.model),
        "backend": "pytorch",
        "dtype": "float16",
        "tensor_parallel_size": 1,
        "max_batch_size": 8,
        "max_seq_len": 4096,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.9},
        "triton_config": {"max_batch_size": 0, "decoupled": True},
    }
    m = json.loads((llmapi.repo / ".trtllm-repository.json").read_text())
    assert m["image"] == LLMAPI_IMAGE and m["build_mode"] == "none" and m["tensorrt_llm_version"] == "1.0.0"
    assert m["templates"] == "/app/all_models/llmapi" and m["model_yaml"] == model_yaml(llmapi)
    assert recap_changed(proc.stdout) >= 1


def test_llmapi_second_run_and_check_mode_change_nothing(llmapi: Env) -> None:
    proc, calls = llmapi_run(llmapi)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert calls == [] and recap_changed(proc.stdout) == 0
    assert "matches its manifest: nothing to render" in " ".join(proc.stdout.split())
    proc, calls = llmapi_run(llmapi, None, "--check")
    assert proc.returncode == 0 and calls == [] and recap_changed(proc.stdout) == 0


def test_llmapi_check_mode_reports_a_changed_option_and_runs_no_docker(llmapi: Env) -> None:
    before = (llmapi.repo / "tensorrt_llm" / "1" / "model.yaml").read_text()
    proc, calls = llmapi_run(llmapi, {"trtllm_engine_kv_cache_free_gpu_mem_fraction": 0.75}, "--check")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert calls == []
    assert "would fill" in " ".join(proc.stdout.split()) and recap_changed(proc.stdout) >= 1
    assert (llmapi.repo / "tensorrt_llm" / "1" / "model.yaml").read_text() == before


def test_llmapi_changed_option_re_renders(llmapi: Env) -> None:
    (llmapi.repo / "stale-marker").write_text("x")
    changed = {
        "trtllm_engine_kv_cache_free_gpu_mem_fraction": 0.75,
        "trtllm_engine_tp_size": 2,
        "trtllm_engine_max_num_tokens": 8192,
        "trtllm_engine_serve_model_dir": "/models/tiny",
        "trtllm_engine_llmapi_extra_args": {
            "enable_chunked_prefill": True,
            "kv_cache_config": {"enable_block_reuse": False},
        },
    }
    proc, calls = llmapi_run(llmapi, changed)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert len(calls) == 1 and calls[0][-4:] == ["cp", "-r", "/app/all_models/llmapi/.", "/repo/"]
    assert not (llmapi.repo / "stale-marker").exists()
    y = model_yaml(llmapi)
    assert y["model"] == "/models/tiny" and y["tensor_parallel_size"] == 2 and y["max_num_tokens"] == 8192
    # Extra arguments merge (recursively) into the role's own.
    assert y["kv_cache_config"] == {"free_gpu_memory_fraction": 0.75, "enable_block_reuse": False}
    assert y["enable_chunked_prefill"] is True
    proc, calls = llmapi_run(llmapi, changed)
    assert calls == [] and recap_changed(proc.stdout) == 0
    # One option back: rendered again.
    proc, calls = llmapi_run(llmapi, {**changed, "trtllm_engine_decoupled_mode": False})
    assert proc.returncode == 0 and len(calls) == 1
    assert model_yaml(llmapi)["triton_config"] == {"max_batch_size": 0, "decoupled": False}


def test_llmapi_hand_edited_model_yaml_is_put_back(tmp_path: Path) -> None:
    e = Env(tmp_path)
    assert llmapi_run(e)[0].returncode == 0
    path = e.repo / "tensorrt_llm" / "1" / "model.yaml"
    path.write_text(path.read_text().replace("free_gpu_memory_fraction: 0.9", "free_gpu_memory_fraction: 0.5"))
    proc, calls = llmapi_run(e)
    assert proc.returncode == 0 and len(calls) == 1
    assert model_yaml(e)["kv_cache_config"] == {"free_gpu_memory_fraction": 0.9}


@pytest.mark.parametrize(
    "extra",
    [
        {"trtllm_engine_kv_cache_free_gpu_mem_fraction": 1.5},
        {"trtllm_engine_llmapi_extra_args": {"triton_config": {"max_batch_size": 8}}},
    ],
)
def test_llmapi_bad_settings_fail_before_any_docker(tmp_path: Path, extra: dict[str, Any]) -> None:
    e = Env(tmp_path)
    proc, calls = llmapi_run(e, extra)
    assert proc.returncode != 0 and calls == []
    assert "kv_cache_free_gpu_mem_fraction must be in (0, 1]" in " ".join(proc.stdout.split())
    assert not e.repo.exists()


def test_bad_variable_fails_at_the_argument_spec(tmp_path: Path) -> None:
    e = Env(tmp_path)
    proc, calls = e.run({"trtllm_engine_max_batch_size": "many"})
    assert proc.returncode != 0 and calls == []
    assert "trtllm_engine_max_batch_size" in proc.stdout
    assert "argument spec" in proc.stdout.lower() or "argument_spec" in proc.stdout.lower()


def test_validate_entry_point_runs_the_same_checks(tmp_path: Path) -> None:
    e = Env(tmp_path)
    (tmp_path / "play.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: trtllm_engine\n        tasks_from: validate\n"
    )
    proc, calls = llmapi_run(e)
    assert proc.returncode == 0 and calls == [], proc.stdout[-4000:]
    proc, calls = llmapi_run(e, {"trtllm_engine_llmapi_extra_args": {"model": "other"}})
    assert proc.returncode != 0 and calls == []
    assert "must not set model or triton_config" in " ".join(proc.stdout.split())
