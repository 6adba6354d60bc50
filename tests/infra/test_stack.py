"""The provisioned stack, seen from inside the host: services, sockets, files, a chat round trip."""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

import pytest
import yaml

# ---- services ---------------------------------------------------------------------------------


def _native_only(expect: dict[str, Any], what: str) -> None:
    """Skip a check of Triton's own service user and hardening under the container runtime."""
    if "triton" in what and expect.get("triton_runtime") == "container":
        pytest.skip(
            "native runtime only: with the container runtime the unit runs `docker run` and Triton runs "
            "in the image (tests/infra/test_triton_container.py checks that)"
        )


@pytest.mark.parametrize("key", ["triton_service", "gateway_service"])
def test_service_active_and_enabled(host: Any, expect: dict[str, Any], key: str) -> None:
    svc = host.service(expect[key])
    assert svc.is_running, host.run(f"systemctl status {expect[key]} --no-pager").stdout
    assert svc.is_enabled


@pytest.mark.parametrize(("service", "user"), [("triton_service", "triton_user"), ("gateway_service", "gateway_user")])
def test_service_runs_as_its_own_user(host: Any, expect: dict[str, Any], service: str, user: str) -> None:
    _native_only(expect, service)
    pid = host.check_output(f"systemctl show -P MainPID {expect[service]}")
    assert pid != "0"
    assert int(host.check_output(f"ps -o uid= -p {pid}")) == host.user(expect[user]).uid


@pytest.mark.parametrize("key", ["triton_user", "gateway_user"])
def test_service_user_is_a_system_user_without_login(host: Any, expect: dict[str, Any], key: str) -> None:
    _native_only(expect, key)
    user = host.user(expect[key])
    assert user.exists
    assert user.uid < 1000
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


@pytest.mark.parametrize("key", ["triton_service", "gateway_service"])
def test_unit_restarts_on_failure_and_is_hardened(host: Any, expect: dict[str, Any], key: str) -> None:
    _native_only(expect, key)
    props = dict(
        line.split("=", 1)
        for line in host.check_output(
            f"systemctl show {expect[key]} -p Restart -p NoNewPrivileges -p ProtectSystem -p ProtectHome "
            "-p PrivateTmp -p ProtectKernelTunables -p ProtectControlGroups -p RestrictSUIDSGID"
        ).splitlines()
    )
    assert props == {
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
    }


# ---- network ----------------------------------------------------------------------------------


def _listeners(host: Any, port: int) -> list[str]:
    out = host.check_output(f"ss -Hltn 'sport = :{port}'")
    return [line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("which", ["gateway", "triton-http", "triton-grpc", "triton-metrics"])
def test_listens_on_loopback_only(host: Any, expect: dict[str, Any], which: str) -> None:
    port = {
        "gateway": expect["gateway_port"],
        "triton-http": expect["triton_ports"][0],
        "triton-grpc": expect["triton_ports"][1],
        "triton-metrics": expect["triton_ports"][2],
    }[which]
    addrs = _listeners(host, port)
    assert addrs, f"nothing listens on port {port}"
    assert set(addrs) <= {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}, f"port {port} listens on {addrs}"


# ---- files ------------------------------------------------------------------------------------


def test_env_file_holds_the_key_readable_by_the_service_user_only(host: Any, expect: dict[str, Any]) -> None:
    env = host.file(f"{expect['gateway_config_dir']}/gateway.env")
    assert env.exists and env.is_file
    assert env.mode == 0o600
    assert env.user == expect["gateway_user"]
    assert env.group == expect["gateway_user"]
    assert env.contains("^GATEWAY_API_KEY=")


def test_config_dir_and_file(host: Any, expect: dict[str, Any]) -> None:
    d = host.file(expect["gateway_config_dir"])
    assert (d.mode, d.user, d.group) == (0o750, "root", expect["gateway_user"])
    cfg = host.file(f"{expect['gateway_config_dir']}/gateway.yaml")
    assert (cfg.mode, cfg.user, cfg.group) == (0o640, "root", expect["gateway_user"])


def test_config_contents(host: Any, expect: dict[str, Any]) -> None:
    cfg = yaml.safe_load(host.file(f"{expect['gateway_config_dir']}/gateway.yaml").content_string)
    assert cfg["host"] == "127.0.0.1"
    assert cfg["port"] == expect["gateway_port"]
    assert "api_key" not in cfg, "the API key belongs in the env file, not in the config"
    assert cfg["triton"]["urls"] == [f"http://127.0.0.1:{expect['triton_ports'][0]}"]
    assert sorted(cfg["models"]) == sorted(expect["models"])
    for name, model in cfg["models"].items():
        assert model["triton_model"] == name
        assert model["tokenizer"] == f"{expect['models_dir']}/{name}"
        assert host.file(f"{model['tokenizer']}/tokenizer.json").exists


def test_model_repository(host: Any, expect: dict[str, Any]) -> None:
    repo = f"{expect['install_dir']}/model_repository"
    assert sorted(host.check_output(f"ls {repo}").split()) == sorted(expect["models"])
    for name in expect["models"]:
        config = host.file(f"{repo}/{name}/config.pbtxt").content_string
        assert f'key: "model_path", value: {{ string_value: "{expect["models_dir"]}/{name}" }}' in config
        assert f'key: "device", value: {{ string_value: "{expect["model_device"]}" }}' in config
        model_py = host.file(f"{repo}/{name}/1/model.py")
        assert (model_py.mode, model_py.user) == (0o644, "root")
        if expect["model_py_sha256"]:
            assert hashlib.sha256(model_py.content).hexdigest() == expect["model_py_sha256"]


def test_model_weights_readable_by_triton(host: Any, expect: dict[str, Any]) -> None:
    _native_only(expect, "triton_user")
    for name in expect["models"]:
        path = f"{expect['models_dir']}/{name}/config.json"
        assert host.run(f"runuser -u {expect['triton_user']} -- test -r {shlex.quote(path)}").rc == 0


def test_venv_is_read_only_for_services(host: Any, expect: dict[str, Any]) -> None:
    venv = host.file(expect["venv"])
    assert (venv.user, venv.mode & 0o022) == ("root", 0)
    assert host.file(f"{expect['venv']}/llm-stack-manifest.txt").contains("^requirements: ")


# ---- the API, from inside the host ------------------------------------------------------------

_CHAT = """
import json, sys, urllib.request, urllib.error
key = ""
for line in open(sys.argv[1]):
    if line.startswith("GATEWAY_API_KEY="):
        key = line.split("=", 1)[1].strip().strip('"')
body = json.dumps({"model": sys.argv[3], "max_tokens": 16, "temperature": 0,
                   "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
def post(auth):
    req = urllib.request.Request(sys.argv[2] + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json", **auth})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
print(json.dumps({"with_key": post({"Authorization": "Bearer " + key} if key else {}),
                  "without_key": post({}), "key_set": bool(key)}))
"""


def test_health(host: Any, expect: dict[str, Any]) -> None:
    out = host.check_output(
        f"curl -sS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{expect['gateway_port']}/health"
    )
    assert out == "200"


def test_chat_completion_round_trip(host: Any, expect: dict[str, Any]) -> None:
    """A chat completion against 127.0.0.1 on the host, with the key from the env file."""
    script = host.run("mktemp").stdout.strip()
    host.run(f"cat > {script} <<'PYEOF'\n{_CHAT}\nPYEOF")
    res = host.run(
        f"{expect['venv']}/bin/python {script} {expect['gateway_config_dir']}/gateway.env "
        f"http://127.0.0.1:{expect['gateway_port']} {expect['models'][0]}"
    )
    host.run(f"rm -f {script}")
    assert res.rc == 0, res.stderr
    out = json.loads(res.stdout)
    status, reply = out["with_key"]
    assert status == 200, reply
    assert reply["object"] == "chat.completion"
    assert reply["model"] == expect["models"][0]
    text = reply["choices"][0]["message"]["content"]
    assert text.strip(), reply
    assert reply["usage"]["completion_tokens"] > 0
    if expect["models"][0] == "smollm2-135m-instruct":
        assert "Paris" in text
    assert out["key_set"] == expect["api_key_required"]
    if expect["api_key_required"]:
        status, reply = out["without_key"]
        assert status == 401
        assert reply["error"]["code"] == "invalid_api_key"


def test_triton_can_reach_gpu_devices(host: Any, expect: dict[str, Any]) -> None:
    """No device allow-list on Triton's unit: /dev/nvidia* and /dev/dxg stay usable (gpu profile)."""
    out = host.check_output(
        f"systemctl show {expect['triton_service']} -p DevicePolicy -p DeviceAllow -p PrivateDevices"
    )
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert props.get("DevicePolicy") == "auto", out
    assert props.get("DeviceAllow", "") == "", out
    assert props.get("PrivateDevices", "no") == "no", out
