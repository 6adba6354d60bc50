"""Render a Triton model repository that serves model folders through the ``llm`` model."""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from stack.paths import MODEL_REPOSITORY

LLM_TEMPLATE = MODEL_REPOSITORY / "llm"


def render_llm_config(model_path: Path, device: str = "auto") -> str:
    """The ``llm`` config with its parameters filled in for one model folder."""
    text = (LLM_TEMPLATE / "config.pbtxt").read_text()
    for key, value in (("model_path", str(model_path)), ("device", device)):
        pattern = rf'(key: "{key}", value: {{ string_value: )"[^"]*"'
        replacement = f'\\g<1>"{value}"'
        text, count = re.subn(pattern, replacement, text)
        if count != 1:
            raise ValueError(f"llm config template has no single parameter {key!r}")
    return text


def render(dest: Path, models: Mapping[str, Path], device: str = "auto") -> Path:
    """Write ``dest/<name>/{config.pbtxt,1/model.py}`` for each served name → model folder.

    The folder is rebuilt from scratch so models removed from ``models`` disappear too.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model_path in models.items():
        (tmp / name / "1").mkdir(parents=True)
        shutil.copy2(LLM_TEMPLATE / "1" / "model.py", tmp / name / "1" / "model.py")
        (tmp / name / "config.pbtxt").write_text(render_llm_config(model_path, device))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
