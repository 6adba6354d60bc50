"""The Triton model repository of the Python-backend engines: the one code that renders it.

Two templates speak the same tensors: ``model_repository/llm`` (transformers, any device)
and ``model_repository/vllm`` (vLLM's engine; its venv comes from ``stack.engines``).
Each served name gets ``<dest>/<name>/config.pbtxt`` (the template's with ``model_path``,
``device``, ``default_max_tokens`` and any ``--param`` filled in) and ``<dest>/<name>/1/model.py``.
``make serve``, ``make gpu-check``, the tests and the Ansible role ``triton`` call it.

CLI (the Ansible role)::

    python -m stack.repository --dest DIR --model NAME=FOLDER [--model ...] [--device auto|cpu|cuda]
                               [--template DIR] [--param KEY=VALUE ...] [--check]

Prints one JSON line ``{"changed": bool, "dest": DIR, "models": [...]}``; exits 2 on bad input.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway.config import DEFAULT_MAX_TOKENS
from stack.paths import MODEL_REPOSITORY

LLM_TEMPLATE = MODEL_REPOSITORY / "llm"
VLLM_TEMPLATE = MODEL_REPOSITORY / "vllm"
# Engine name -> template folder (`make serve`'s LLM_ENGINE, the inventory's stack_llm_engine).
ENGINE_TEMPLATES = {"llm": LLM_TEMPLATE, "vllm": VLLM_TEMPLATE}
DEVICES = ("auto", "cpu", "cuda")
# Triton model names: what Triton accepts as a folder name and the gateway as "model".
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RepositoryError(ValueError):
    """The template or the request is wrong; the message says which."""


def render_llm_config(
    model_path: Path,
    device: str = "auto",
    template: Path = LLM_TEMPLATE,
    params: Mapping[str, str] | None = None,
) -> str:
    """The template's config with its parameters filled in for one model folder.

    ``params`` sets further parameters the template declares (e.g. ``max_num_seqs``); a key
    the template lacks is an error, not silently ignored.
    """
    if device not in DEVICES:
        raise RepositoryError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    text = (template / "config.pbtxt").read_text()
    values = {
        **{k: str(v) for k, v in (params or {}).items()},
        "model_path": str(model_path),
        "device": device,
        "default_max_tokens": str(DEFAULT_MAX_TOKENS),
    }
    for key, value in values.items():
        if '"' in value or "\\" in value:
            raise RepositoryError(f"parameter {key}: quotes and backslashes are not allowed, got {value!r}")
        pattern = rf'(key: "{key}", value: {{ string_value: )"[^"]*"'
        # A function, not a replacement string: a path must not be read as backreferences.
        text, count = re.subn(pattern, lambda m: f'{m.group(1)}"{value}"', text)  # noqa: B023 - used at once
        if count != 1:
            raise RepositoryError(f"{template / 'config.pbtxt'} has no single parameter {key!r}")
    return text


def _same_tree(a: Path, b: Path) -> bool:
    if not b.is_dir():
        return False
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def render(
    dest: Path,
    models: Mapping[str, Path],
    device: str = "auto",
    template: Path = LLM_TEMPLATE,
    check: bool = False,
    devices: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> bool:
    """Make ``dest`` hold exactly ``models`` (served name → model folder); return whether it changed.

    ``devices`` overrides ``device`` for some names (``make gpu-check`` runs one copy on each);
    ``params`` fills further config.pbtxt parameters of the template, the same for every model.

    Rendered beside ``dest`` and swapped in only when it differs, so an unchanged repository
    keeps its files (and Triton no restart) and a half-written one is never seen.
    """
    for name in models:
        if not _NAME.match(name):
            raise RepositoryError(f"{name!r} is not a valid Triton model name (letters, digits, . _ -)")
    if not (template / "1" / "model.py").is_file():
        raise RepositoryError(f"{template} is not a model template (no 1/model.py)")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, model_path in models.items():
            (tmp / name / "1").mkdir(parents=True)
            shutil.copyfile(template / "1" / "model.py", tmp / name / "1" / "model.py")
            (tmp / name / "config.pbtxt").write_text(
                render_llm_config(model_path, (devices or {}).get(name, device), template, params)
            )
        changed = not _same_tree(tmp, dest)
        if changed and not check:
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if dest.exists():
                dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return changed


def _model_arg(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name, Path(folder)


def _param_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.repository", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True, help="the model repository folder")
    parser.add_argument("--model", type=_model_arg, action="append", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument(
        "--template", type=Path, default=LLM_TEMPLATE, help="the template folder (model_repository/llm or vllm)"
    )
    parser.add_argument(
        "--param", type=_param_arg, action="append", default=[], metavar="KEY=VALUE", help="a config.pbtxt parameter"
    )
    parser.add_argument("--check", action="store_true", help="only say whether the folder would change")
    args = parser.parse_args(argv)
    models = dict(args.model)
    if len(models) != len(args.model):
        parser.error("a model name is given twice")
    try:
        changed = render(args.dest, models, args.device, args.template, check=args.check, params=dict(args.param))
    except (OSError, RepositoryError) as exc:
        print(f"stack.repository: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"changed": changed, "dest": str(args.dest), "models": sorted(models)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
