"""Print a dependency group of pyproject.toml as a requirements file (``--group`` for any pip).

    python mk/dependency_group.py NAME > requirements.txt

pip reads dependency groups itself only from 25.1 on; an offline `make up` keeps the venv's
own pip (Ubuntu 22.04's is 22.0). This reads the TOML with a real parser: tomllib (Python
3.11+) or the tomli that every pip since 21.2 carries.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10 (Ubuntu 22.04)
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(groups: dict[str, list[Any]], name: str, seen: tuple[str, ...] = ()) -> list[str]:
    """The group's requirements, with `{include-group = ...}` entries expanded (PEP 735)."""
    if name in seen:
        raise SystemExit(f"dependency group {name!r} includes itself")
    if name not in groups:
        raise SystemExit(f"pyproject.toml has no dependency group {name!r} (has: {', '.join(groups)})")
    out: list[str] = []
    for entry in groups[name]:
        out += requirements(groups, entry["include-group"], (*seen, name)) if isinstance(entry, dict) else [entry]
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    groups = tomllib.loads(PYPROJECT.read_text()).get("dependency-groups", {})
    print("\n".join(requirements(groups, argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
