"""Configuration file + environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings

CONFIG = """
triton:
  urls: [http://127.0.0.1:8000/]
models:
  m1:
    triton_model: llm
    tokenizer: tok
    defaults: {temperature: 0.2, max_tokens: 64}
"""


def write(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_load_with_relative_tokenizer(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path), env={})
    assert s.triton.urls == ["http://127.0.0.1:8000"]
    assert s.models["m1"].tokenizer == tmp_path / "tok"
    assert s.models["m1"].defaults.max_tokens == 64
    assert (s.host, s.port, s.api_key) == ("127.0.0.1", 9000, None)


def test_environment_overrides(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {
        "GATEWAY_PORT": "9100",
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_TRITON_URL": "http://a:1, http://b:2",
        "GATEWAY_API_KEY_FILE": str(key_file),
    }
    s = load_settings(write(tmp_path), env=env)
    assert (s.host, s.port) == ("0.0.0.0", 9100)
    assert s.triton.urls == ["http://a:1", "http://b:2"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "from-file"
    assert "from-file" not in repr(s)  # secrets stay out of logs and tracebacks
    s = load_settings(write(tmp_path), env={**env, "GATEWAY_API_KEY": "env"})
    assert s.api_key is not None and s.api_key.get_secret_value() == "env"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("models: {}", "models"),
        (CONFIG.replace("http://127.0.0.1:8000/", "127.0.0.1:8000"), "http://"),
        (CONFIG + "portt: 1\n", "portt"),
        (CONFIG.replace("max_tokens: 64", "max_tokens: 0"), "max_tokens"),
        ("[unclosed", "not valid YAML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(write(tmp_path, text), env={})


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_CONFIG"):
        load_settings(None, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml", env={})


def test_example_config_is_valid() -> None:
    from stack.paths import REPO_ROOT

    s = load_settings(REPO_ROOT / "gateway" / "config.example.yaml", env={})
    assert list(s.models) == ["smollm2-135m-instruct"]
