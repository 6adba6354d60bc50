"""The stack's two renderers as the Ansible roles call them: python -m stack.repository and
python -m stack.gateway_config (changed only when the content differs, --check writes nothing,
bad input exits 2 naming the problem)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from gateway.config import DEFAULT_MAX_TOKENS, DEFAULT_PORT, load_settings
from stack import repository
from stack.paths import REPO_ROOT


def _cli(module: str, *args: str, stdin: str = "") -> tuple[int, dict[str, object], str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True, cwd=REPO_ROOT
    )
    out = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return proc.returncode, out, proc.stderr


def _params(config: Path) -> dict[str, str]:
    text = config.read_text()
    return {
        key: text.split(f'key: "{key}", value: {{ string_value: "', 1)[1].split('"', 1)[0]
        for key in ("model_path", "device", "default_max_tokens")
    }


def test_repository_renders_once_then_reports_no_change(tmp_path: Path) -> None:
    dest = tmp_path / "repo"
    args = ("--dest", str(dest), "--model", "a=/models/a", "--model", "b=/models/b")
    rc, out, _ = _cli("stack.repository", *args)
    assert (rc, out["changed"], out["models"]) == (0, True, ["a", "b"])
    assert _params(dest / "a" / "config.pbtxt") == {
        "model_path": "/models/a",
        "device": "auto",
        "default_max_tokens": str(DEFAULT_MAX_TOKENS),
    }
    assert (dest / "b" / "1" / "model.py").read_bytes() == (repository.LLM_TEMPLATE / "1" / "model.py").read_bytes()
    before = (dest / "a" / "config.pbtxt").stat().st_mtime_ns
    rc, out, _ = _cli("stack.repository", *args)
    assert (rc, out["changed"]) == (0, False)
    assert (dest / "a" / "config.pbtxt").stat().st_mtime_ns == before


def test_repository_check_writes_nothing_and_drops_unserved_models(tmp_path: Path) -> None:
    dest = tmp_path / "repo"
    assert repository.render(dest, {"a": Path("/m/a"), "b": Path("/m/b")})
    assert repository.render(dest, {"a": Path("/m/a")}, device="cpu", check=True)
    assert sorted(p.name for p in dest.iterdir()) == ["a", "b"]
    assert repository.render(dest, {"a": Path("/m/a")}, device="cpu")
    assert sorted(p.name for p in dest.iterdir()) == ["a"]
    assert _params(dest / "a" / "config.pbtxt")["device"] == "cpu"
    assert not list(tmp_path.glob(".repo.*")), "no temporary folder is left behind"


def test_repository_rejects_bad_input(tmp_path: Path) -> None:
    rc, _, err = _cli("stack.repository", "--dest", str(tmp_path / "r"), "--model", "bad name=/m")
    assert rc == 2 and "'bad name' is not a valid Triton model name" in err
    rc, _, err = _cli("stack.repository", "--dest", str(tmp_path / "r"), "--model", "a=/m", "--template", "/nope")
    assert rc == 2 and "/nope is not a model template" in err
    assert not (tmp_path / "r").exists()


def _spec(**extra: object) -> str:
    models = {"m": {"triton_model": "m", "tokenizer": "/t"}}
    return json.dumps({"triton": {"urls": ["http://127.0.0.1:8000"]}, "models": models, **extra})


def test_gateway_config_leaves_defaults_to_the_gateway(tmp_path: Path) -> None:
    out_file = tmp_path / "etc" / "gateway.yaml"
    rc, out, _ = _cli("stack.gateway_config", "--out", str(out_file), stdin=_spec())
    assert (rc, out["changed"]) == (0, True)
    assert out_file.stat().st_mode & 0o777 == 0o640
    written = yaml.safe_load(out_file.read_text())
    assert "port" not in written and "defaults" not in written["models"]["m"]
    settings = load_settings(out_file, env={})
    assert settings.port == DEFAULT_PORT
    assert settings.models["m"].defaults.max_tokens == DEFAULT_MAX_TOKENS
    rc, out, _ = _cli("stack.gateway_config", "--out", str(out_file), stdin=_spec())
    assert (rc, out["changed"]) == (0, False)


def test_gateway_config_check_and_bad_values(tmp_path: Path) -> None:
    out_file = tmp_path / "gateway.yaml"
    rc, out, _ = _cli("stack.gateway_config", "--out", str(out_file), "--check", stdin=_spec(port=9100))
    assert (rc, out["changed"]) == (0, True) and not out_file.exists()
    rc, _, err = _cli("stack.gateway_config", "--out", str(out_file), stdin=_spec(port=70000))
    assert rc == 2 and "port:" in err and not out_file.exists()
    rc, _, err = _cli("stack.gateway_config", "--out", str(out_file), stdin=_spec(api_key="secret"))
    assert rc == 2 and "api_key does not go into the config file" in err and "secret" not in err


def test_ansible_defaults_match_the_gateway_defaults() -> None:
    """The Ansible side keeps its own default of the port (inventories read it); it must agree."""
    ansible = {}
    for defaults in REPO_ROOT.glob("roles/*/defaults/main.yml"):
        ansible.update(yaml.safe_load(defaults.read_text()) or {})
    assert ansible["stack_gateway_port"] == DEFAULT_PORT
