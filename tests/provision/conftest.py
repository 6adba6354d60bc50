"""Fixtures of the provisioning suites (rootfs, checkout snapshot, Ansible runner, wheelhouse)
and the figures (tests/provision/figures.py) printed at the end of the session."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testhost as th
import wheelhouse
from figures import FIGURES, Figure
from provisioning import REPO, SNAPSHOT_IGNORE, TORCH_SPEC, Ansible, skip_reason, stack_cache


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("provisioning figures")
    for fig in FIGURES:
        terminalreporter.write_line(fig.row())
    terminalreporter.write_line(f"{'total of the steps above':<44} {sum(f.seconds for f in FIGURES):8.1f} s")


# Module-scoped, as when each suite had its own: each module gets its own snapshot and log folder.


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    try:
        th.ensure_apt_tools()
    except th.TestHostError as exc:
        pytest.skip(f"cannot install debootstrap/systemd-container: {exc}")
    cache = th.default_cache_dir()
    th.build_rootfs(cache)
    FIGURES.append(Figure("rootfs (build or cache hit)", time.monotonic() - t0))
    return cache


@pytest.fixture(scope="module")
def repo(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the checkout: every run of the module deploys the same code."""
    dest = tmp_path_factory.mktemp("snapshot") / "wsl-triton-llm"
    shutil.copytree(REPO, dest, ignore=SNAPSHOT_IGNORE)
    return dest


@pytest.fixture(scope="module")
def ansible(repo: Path, cache_dir: Path) -> Ansible:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Ansible(repo, cache_dir / "logs" / "provision" / stamp)


@pytest.fixture(scope="module")
def host_python(cache_dir: Path) -> tuple[str, int]:
    """(Python version, glibc minor) of the rootfs testhost boots (Ubuntu, or its Debian fallback)."""
    tarball = th.build_rootfs(cache_dir)
    return ("3.11", 36) if tarball.name.startswith("debian-") else ("3.12", 39)


@pytest.fixture(scope="module")
def wheels(repo: Path, host_python: tuple[str, int]) -> Path:
    t0 = time.monotonic()
    path = wheelhouse.build(
        stack_cache(), python_version=host_python[0], glibc_minor=host_python[1], torch_spec=TORCH_SPEC, repo=repo
    )
    FIGURES.append(Figure(f"wheelhouse {path.name} (build or cache hit)", time.monotonic() - t0))
    return path
