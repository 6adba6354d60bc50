"""The gateway's YAML config: the one code that writes it.

``make serve``, ``make gpu-check``, the benchmark, the tests (through ``stack.gateway_process``)
and the Ansible role ``gateway`` all write it here. What a caller leaves out is not written,
so the gateway's own defaults (``gateway/config.py``) apply; the config is checked with the
gateway's settings model before it is written, so a bad value fails here and not at the
service's start.

CLI (the Ansible role)::

    python -m stack.gateway_config --out FILE [--check] < spec.json

``spec.json`` is shaped like the YAML file (``gateway/config.example.yaml``). Prints one JSON
line ``{"changed": bool, "path": FILE}``; exits 2 with a message on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config import GatewaySettings

HEADER = "# Written by `python -m stack.gateway_config`; edits are overwritten. Keys: gateway/config.example.yaml\n"
NEW_FILE_MODE = 0o640  # the config names folders and URLs: not for every local user


def gateway_config(
    triton_urls: str | Sequence[str],
    models: Mapping[str, tuple[str, Path | str]],
    model_settings: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """A config mapping: ``models`` maps a served name to (Triton model, tokenizer folder).

    ``model_settings`` are further keys of every model (``{"limits": {"max_in_flight": 4}}``).

    ``triton_urls``: one URL or several (requests rotate over them).
    ``settings`` are further top-level keys (``host``, ``port``, ``log_requests``) or
    ``triton_<key>`` for keys of the ``triton`` section (``triton_read_timeout_s=60``).
    """
    triton: dict[str, Any] = {"urls": [triton_urls] if isinstance(triton_urls, str) else list(triton_urls)}
    top: dict[str, Any] = {}
    for key, value in settings.items():
        if key.startswith("triton_"):
            triton[key.removeprefix("triton_")] = value
        else:
            top[key] = value
    return {
        **top,
        "triton": triton,
        "models": {
            name: {"triton_model": tm, "tokenizer": str(tok), **(model_settings or {})}
            for name, (tm, tok) in models.items()
        },
    }


class ConfigSpecError(ValueError):
    """The config would not load in the gateway; the message names the key."""


def render(config: Mapping[str, Any]) -> str:
    """The file's text, after checking that the gateway accepts it."""
    if "api_key" in config:
        raise ConfigSpecError("api_key does not go into the config file: use GATEWAY_API_KEY(_FILE)")
    try:
        GatewaySettings.model_validate(dict(config))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigSpecError(f"gateway config: {problems}") from exc
    return HEADER + yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False)


def write(path: Path, config: Mapping[str, Any], check: bool = False) -> bool:
    """Write ``config`` to ``path`` when its text differs; return whether it did (would)."""
    text = render(config)
    try:
        changed = path.read_text() != text
    except FileNotFoundError:
        changed = True
    if changed and not check:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if path.exists() else NEW_FILE_MODE
        # Atomic: the gateway (or a restart) never reads half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, mode)
            if path.exists():
                st = path.stat()
                os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.gateway_config", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the YAML file to write")
    parser.add_argument("--check", action="store_true", help="only say whether the file would change")
    args = parser.parse_args(argv)
    try:
        spec = json.load(sys.stdin)
        if not isinstance(spec, dict):
            raise ConfigSpecError("expected a JSON object on stdin")
        changed = write(args.out, spec, check=args.check)
    except (json.JSONDecodeError, ConfigSpecError) as exc:
        print(f"stack.gateway_config: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"changed": changed, "path": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
