"""Every role documents and validates what it reads: each default has an argument spec and a
row in the role README's variable table, and each spec has a default or is required."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROLES = sorted(
    p.parent.parent for p in (Path(__file__).resolve().parents[2] / "roles").glob("*/meta/argument_specs.yml")
)


def _specs(role: Path) -> dict[str, dict[str, object]]:
    data = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    return data["argument_specs"]["main"].get("options") or {}


def _defaults(role: Path) -> dict[str, object]:
    path = role / "defaults" / "main.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def test_every_role_has_argument_specs() -> None:
    roles = {p.name for p in (Path(__file__).resolve().parents[2] / "roles").iterdir() if p.is_dir()}
    assert roles == {r.name for r in ROLES}


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name)
def test_defaults_have_specs_and_readme_rows(role: Path) -> None:
    specs = _specs(role)
    readme = (role / "README.md").read_text()
    missing_spec = [k for k in _defaults(role) if k not in specs]
    missing_row = [k for k in specs if f"| `{k}` |" not in readme]
    assert missing_spec == [], f"{role.name}: defaults without an argument spec"
    assert missing_row == [], f"{role.name}: argument specs without a README table row"


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name)
def test_specs_have_a_default_or_are_required(role: Path) -> None:
    defaults = _defaults(role)
    # The stack_settings role's settings are read by the roles that depend on it: theirs may come from it.
    shared = _defaults(role.parent / "stack_settings")
    loose = [
        k
        for k, spec in _specs(role).items()
        if k not in defaults and k not in shared and not spec.get("required") and "default" not in spec
    ]
    assert loose == [], f"{role.name}: specs with neither a default nor required: true"


@pytest.mark.parametrize("role", [r for r in ROLES if r.name != "stack_settings"], ids=lambda r: r.name)
def test_roles_reading_shared_settings_depend_on_stack_settings(role: Path) -> None:
    """A role that reads a stack_* setting or fact declares where it comes from."""
    files = [p for d in ("tasks", "defaults", "templates", "handlers") for p in (role / d).glob("*")]
    texts = [p.read_text() for p in files if p.is_file()]
    reads = sorted({m for t in texts for m in re.findall(r"\bstack_[a-z0-9_]+", t)} - {"stack_service"})
    deps = (yaml.safe_load((role / "meta" / "main.yml").read_text()) or {}).get("dependencies") or []
    names = {d["role"] if isinstance(d, dict) else d for d in deps}
    assert not reads or "stack_settings" in names, f"{role.name} reads {reads} without depending on stack_settings"
