"""A wheelhouse for a test host's Python, filled once from PyPI on this machine and cached.

The test host (Ubuntu 24.04, Python 3.12) has no route to PyPI, and this machine's Python
may be another version, so the wheels are fetched with
``pip download --python-version X.Y --only-binary=:all: --platform manylinux_2_N_x86_64 ...``
and handed to the play (``python_env_wheelhouse``), which installs with
``--no-index --find-links``, as an air-gapped machine would.

What goes in is derived from the sources of truth: the project's pyproject.toml (its
dependencies, the extras the python_env role installs, the build backend, and Ansible from
the `provision` group for `make up` on the host) and the python_env role's defaults (extra
and no-deps packages). The folder is keyed by a hash of
that list, the Python version and the platforms:
``$STACK_CACHE/wheelhouse/py3.12-<key>/``. Packages that publish no wheel are built here
with ``pip wheel`` (only pure-Python results are accepted).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
KEY_VERSION = 1


def _log(msg: str) -> None:
    print(f"[wheelhouse] {msg}", file=sys.stderr, flush=True)


def platforms(glibc_minor: int) -> list[str]:
    """pip does not widen --platform to older manylinux tags: list them all."""
    tags = [f"manylinux_2_{m}_x86_64" for m in range(17, glibc_minor + 1)]
    return [*tags, "manylinux2014_x86_64"]


def requirements(torch_spec: str, repo: Path = REPO) -> tuple[list[str], list[str]]:
    """(requirements, no-deps requirements) of the venv the python_env role installs."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    defaults = yaml.safe_load((repo / "roles/python_env/defaults/main.yml").read_text())
    project = pyproject["project"]
    reqs: list[str] = [torch_spec, *project["dependencies"]]
    for extra in defaults["python_env_extras"]:
        reqs += project["optional-dependencies"][extra]
    reqs += defaults["python_env_extra_packages"]
    # The host builds the project from its sources: the build backend must be there too.
    reqs += [*pyproject["build-system"]["requires"], "wheel"]
    # `make up` on the host itself installs Ansible (pyproject's `ansible` dependency group).
    reqs += pyproject["dependency-groups"]["ansible"]
    return sorted(set(reqs)), sorted(set(defaults["python_env_nodeps_packages"]))


def _pip(args: list[str], log: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    return proc


def build(
    cache_dir: Path,
    *,
    python_version: str = "3.12",
    glibc_minor: int = 39,
    torch_spec: str = "torch==2.13.0",
    repo: Path = REPO,
) -> Path:
    """Return the cached wheelhouse folder for these inputs, filling it first if needed."""
    reqs, nodeps = requirements(torch_spec, repo)
    plats = platforms(glibc_minor)
    spec = {"v": KEY_VERSION, "python": python_version, "platforms": plats, "reqs": reqs, "nodeps": nodeps}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) / "wheelhouse"
    dest = root / f"py{python_version}-{key}"
    if (dest / ".complete").exists():
        _log(f"cached: {dest}")
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dest.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log = root / f"{dest.name}.log"
    log.write_text(json.dumps(spec, indent=1) + "\n")
    started = time.monotonic()
    target = ["--python-version", python_version, "--only-binary=:all:", "--no-cache-dir"]
    for plat in plats:
        target += ["--platform", plat]
    built = tmp / ".built"
    built.mkdir()
    for attempt in range(20):
        proc = _pip(["download", *target, "--find-links", str(built), "-d", str(tmp), *reqs], log)
        if proc.returncode == 0:
            break
        missing = re.findall(r"No matching distribution found for (\S+)", proc.stdout + proc.stderr)
        if not missing or attempt == 19:
            raise RuntimeError(f"pip download failed (see {log}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        # No wheel for this platform: build it here; only a pure-Python wheel fits the host.
        name = missing[0]
        _log(f"{name} has no wheel: building it with pip wheel")
        before = set(built.iterdir())
        if _pip(["wheel", "--no-deps", "--no-cache-dir", "-w", str(built), name], log).returncode != 0:
            raise RuntimeError(f"cannot build a wheel of {name} (see {log})")
        for whl in set(built.iterdir()) - before:
            if not whl.name.endswith("-none-any.whl"):
                raise RuntimeError(f"{name} built into {whl.name}, which is not pure Python: no wheel for the host")
    proc = _pip(["download", *target, "--no-deps", "-d", str(tmp), *nodeps], log)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download --no-deps failed (see {log}):\n{proc.stderr[-3000:]}")
    for whl in built.iterdir():
        shutil.move(str(whl), tmp / whl.name)
    built.rmdir()
    size = sum(f.stat().st_size for f in tmp.iterdir())
    (tmp / ".complete").write_text(json.dumps(spec, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    took = time.monotonic() - started
    _log(f"filled {dest}: {len(list(dest.glob('*.whl')))} wheels, {size / 2**30:.2f} GiB in {took:.0f} s")
    return dest


def link_into(wheelhouse: Path, dest: Path) -> None:
    """Put the wheels at ``dest`` (inside a host's tree): hard links when possible, else copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for whl in wheelhouse.glob("*.whl"):
        target = dest / whl.name
        try:
            os.link(whl, target)
        except OSError:
            shutil.copy2(whl, target)


if __name__ == "__main__":
    cache = Path(os.environ.get("STACK_CACHE", REPO / ".cache"))
    print(build(cache))
