"""Where the stack keeps things on this machine."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


def cache_dir() -> Path:
    """Cache for converted models, backend folders and logs (``STACK_CACHE`` overrides)."""
    path = Path(os.environ.get("STACK_CACHE", REPO_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path
