"""The trtllm_engine role against a STAND-IN `docker` (tests/engine/docker_standin.py).

No Docker engine, GPU or image here: the stand-in records every docker command line and
fakes the files the real commands leave behind. Proves the command lines, the manifest
logic (unchanged -> no build; one option changed -> rebuild), honest check mode, the
version switch (TensorRT-LLM >= 1.0 builds nothing) and the argument spec.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.playbook import PlaybookRun, ansible_tool, run_playbook

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK_BIN = ansible_tool()
STANDIN = Path(__file__).with_name("docker_standin.py")
IMAGE = "nvcr.io/nvidia/tritonserver:25.01-trtllm-python-py3"

if PLAYBOOK_BIN is None:
    print("skipping tests/engine: no ansible-playbook (run `make up` or create .venv-ansible)")
    pytest.skip("ansible-playbook is missing", allow_module_level=True)
# The play runs on localhost with the interpreter of Ansible's own venv.
ANSIBLE_PYTHON = Path(PLAYBOOK_BIN).parent / "python"

Result = tuple[PlaybookRun, list[list[str]]]


class Env:
    first: Result

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
            f"localhost ansible_connection=local ansible_python_interpreter={ANSIBLE_PYTHON}\n"
        )
        (tmp / "play.yml").write_text("- hosts: all\n  gather_facts: false\n  roles:\n    - role: trtllm_engine\n")

    def run(self, extra: dict[str, Any] | None = None, *args: str) -> Result:
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
            "PATH": self.path,
            "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
            "ANSIBLE_LOCAL_TEMP": str(self.tmp / ".ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(self.tmp / ".ansible-remote"),
            "ANSIBLE_ASYNC_DIR": str(self.tmp / ".ansible-async"),
            "DOCKER_STANDIN_LOG": str(self.log),
            "DOCKER_STANDIN_BUILD_SECONDS": "1.5",
        }
        play = self.tmp / "play.yml"
        run = run_playbook(
            play, self.tmp / "hosts.ini", "-e", f"@{self.tmp / 'vars.json'}", *args, env=env, timeout=120
        )
        calls = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return run, calls

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.engines / "trtllm-engine-manifest.json").read_text())


def recap_changed(run: PlaybookRun) -> int:
    """changed= of localhost's recap line (which must be there)."""
    assert "localhost" in run.recap, run.tail()
    return run.recap["localhost"]["changed"]


def builds(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if "trtllm-build" in c or any(a.endswith("convert_checkpoint.py") for a in c)]


def command_in_image(call: list[str]) -> str:
    """The command line a ``docker run`` call runs inside IMAGE."""
    return " ".join(call[call.index(IMAGE) + 1 :])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(tmp_path_factory.mktemp("trtllm"))
    run, calls = e.run()
    assert run.returncode == 0, run.tail()
    e.first = (run, calls)
    return e


def test_first_run_builds_with_the_expected_commands(env: Env) -> None:
    run, calls = env.first
    convert, build = builds(calls)
    mounts = ["-v", f"{env.model}:/model:ro", "-v", f"{env.engines}:/engines"]
    for call in (convert, build):
        assert call[:4] == ["run", "--rm", "--gpus", "all"]
        assert " ".join(mounts) in " ".join(call)
        assert IMAGE in call
    # What runs in the image (no argument here holds a space, so the joined line is exact).
    assert command_in_image(convert) == (
        "python3 /app/examples/llama/convert_checkpoint.py --model_dir /model --output_dir /engines/checkpoint"
        " --dtype float16 --tp_size 1"
    )
    assert command_in_image(build) == (
        "trtllm-build --checkpoint_dir /engines/checkpoint --output_dir /engines/engine --max_batch_size 8"
        " --max_input_len 2048 --max_seq_len 4096 --gemm_plugin auto"
    )
    assert (env.engines / "engine" / "rank0.engine").exists()
    m = env.manifest()
    assert m["image"] == IMAGE and m["tensorrt_llm_version"] == "0.17.0"
    assert m["max_batch_size"] == 8 and m["tp_size"] == 1 and m["dtype"] == "float16"
    assert m["model_weights"] == ["model.safetensors:1234"] and len(m["model_config_sha256"]) == 64
    assert "building after" in run.stdout or "build finished after" in run.stdout  # progress lines
    # The model repository: templates copied out of the image, then filled.
    cfg = (env.repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert "${" not in cfg, cfg
    assert f"engine_dir: {env.engines}/engine" in cfg
    assert "batching_strategy: inflight_fused_batching" in cfg and "decoupled_mode: true" in cfg
    assert f"tokenizer_dir: {env.model}" in (env.repo / "preprocessing" / "config.pbtxt").read_text()
    fills = [c for c in calls if "/app/tools/fill_template.py" in c]
    assert len(fills) == 5 and all("--gpus" not in c for c in fills)


def test_second_run_builds_nothing(env: Env) -> None:
    run, calls = env.run()
    assert run.returncode == 0, run.tail()
    assert calls == []
    assert recap_changed(run) == 0
    run, calls = env.run(None, "--check")
    assert run.returncode == 0 and calls == [] and recap_changed(run) == 0


def test_check_mode_reports_a_changed_option_and_runs_no_docker(env: Env) -> None:
    run, calls = env.run({"trtllm_engine_max_batch_size": 16}, "--check")
    assert run.returncode == 0, run.tail()
    assert calls == []
    assert "would build the engine" in run.stdout
    assert recap_changed(run) >= 1
    assert env.manifest()["max_batch_size"] == 8


def test_changed_option_rebuilds(env: Env) -> None:
    (env.engines / "stale-marker").write_text("x")
    run, calls = env.run({"trtllm_engine_max_batch_size": 16})
    assert run.returncode == 0, run.tail()
    convert, build = builds(calls)
    assert convert[-4:] == ["--dtype", "float16", "--tp_size", "1"]
    assert build[build.index("--max_batch_size") + 1] == "16"
    assert not (env.engines / "stale-marker").exists()
    assert env.manifest()["max_batch_size"] == 16
    assert "triton_max_batch_size: 16" in (env.repo / "ensemble" / "config.pbtxt").read_text()
    run, calls = env.run({"trtllm_engine_max_batch_size": 16})
    assert calls == [] and recap_changed(run) == 0


def test_failed_build_fails_and_writes_no_manifest(tmp_path: Path) -> None:
    e = Env(tmp_path)
    os.environ["DOCKER_STANDIN_FAIL"] = "build"
    try:
        run, _ = e.run()
    finally:
        del os.environ["DOCKER_STANDIN_FAIL"]
    assert run.returncode != 0
    assert "the engine build failed" in run.stdout and "failing as asked" in run.stdout
    assert not (e.engines / "trtllm-engine-manifest.json").exists()


# Mode none (TensorRT-LLM >= 1.0): no engine; the image's LLM API template + model.yaml.
LLMAPI_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"
LLMAPI_VARS: dict[str, Any] = {"trtllm_engine_version": "1.0.0", "trtllm_engine_triton_release": "25.10"}


def llmapi_run(e: Env, extra: dict[str, Any] | None = None, *args: str) -> Result:
    return e.run({**LLMAPI_VARS, **(extra or {})}, *args)


def model_yaml(e: Env) -> dict[str, Any]:
    return dict(yaml.safe_load((e.repo / "tensorrt_llm" / "1" / "model.yaml").read_text()))


@pytest.fixture(scope="module")
def llmapi(tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(tmp_path_factory.mktemp("llmapi"))
    run, calls = llmapi_run(e)
    assert run.returncode == 0, run.tail()
    e.first = (run, calls)
    return e


def test_tensorrt_llm_1_0_copies_the_llmapi_template_and_builds_no_engine(llmapi: Env) -> None:
    run, calls = llmapi.first
    assert "build mode none" in " ".join(run.stdout.split())
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
    assert recap_changed(run) >= 1


def test_llmapi_second_run_and_check_mode_change_nothing(llmapi: Env) -> None:
    run, calls = llmapi_run(llmapi)
    assert run.returncode == 0, run.tail()
    assert calls == [] and recap_changed(run) == 0
    assert "matches its manifest: nothing to render" in " ".join(run.stdout.split())
    run, calls = llmapi_run(llmapi, None, "--check")
    assert run.returncode == 0 and calls == [] and recap_changed(run) == 0


def test_llmapi_check_mode_reports_a_changed_option_and_runs_no_docker(llmapi: Env) -> None:
    before = (llmapi.repo / "tensorrt_llm" / "1" / "model.yaml").read_text()
    run, calls = llmapi_run(llmapi, {"trtllm_engine_kv_cache_free_gpu_mem_fraction": 0.75}, "--check")
    assert run.returncode == 0, run.tail()
    assert calls == []
    assert "would fill" in " ".join(run.stdout.split()) and recap_changed(run) >= 1
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
    run, calls = llmapi_run(llmapi, changed)
    assert run.returncode == 0, run.tail()
    assert len(calls) == 1 and calls[0][-4:] == ["cp", "-r", "/app/all_models/llmapi/.", "/repo/"]
    assert not (llmapi.repo / "stale-marker").exists()
    y = model_yaml(llmapi)
    assert y["model"] == "/models/tiny" and y["tensor_parallel_size"] == 2 and y["max_num_tokens"] == 8192
    # Extra arguments merge (recursively) into the role's own.
    assert y["kv_cache_config"] == {"free_gpu_memory_fraction": 0.75, "enable_block_reuse": False}
    assert y["enable_chunked_prefill"] is True
    run, calls = llmapi_run(llmapi, changed)
    assert calls == [] and recap_changed(run) == 0
    # One option back: rendered again.
    run, calls = llmapi_run(llmapi, {**changed, "trtllm_engine_decoupled_mode": False})
    assert run.returncode == 0 and len(calls) == 1
    assert model_yaml(llmapi)["triton_config"] == {"max_batch_size": 0, "decoupled": False}


def test_llmapi_hand_edited_model_yaml_is_put_back(tmp_path: Path) -> None:
    e = Env(tmp_path)
    assert llmapi_run(e)[0].returncode == 0
    path = e.repo / "tensorrt_llm" / "1" / "model.yaml"
    path.write_text(path.read_text().replace("free_gpu_memory_fraction: 0.9", "free_gpu_memory_fraction: 0.5"))
    run, calls = llmapi_run(e)
    assert run.returncode == 0 and len(calls) == 1
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
    run, calls = llmapi_run(e, extra)
    assert run.returncode != 0 and calls == []
    assert "kv_cache_free_gpu_mem_fraction must be in (0, 1]" in " ".join(run.stdout.split())
    assert not e.repo.exists()


def test_bad_variable_fails_at_the_argument_spec(tmp_path: Path) -> None:
    e = Env(tmp_path)
    run, calls = e.run({"trtllm_engine_max_batch_size": "many"})
    assert run.returncode != 0 and calls == []
    assert "trtllm_engine_max_batch_size" in run.stdout
    assert "argument spec" in run.stdout.lower() or "argument_spec" in run.stdout.lower()


def test_validate_entry_point_runs_the_same_checks(tmp_path: Path) -> None:
    e = Env(tmp_path)
    (tmp_path / "play.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: trtllm_engine\n        tasks_from: validate\n"
    )
    run, calls = llmapi_run(e)
    assert run.returncode == 0 and calls == [], run.tail()
    run, calls = llmapi_run(e, {"trtllm_engine_llmapi_extra_args": {"model": "other"}})
    assert run.returncode != 0 and calls == []
    assert "must not set model or triton_config" in " ".join(run.stdout.split())
