"""This machine (the box) as the test hosts see it: errors, logging, commands, locks,
JSON state files and the box-side apt tools. Stdlib only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

APT_TOOLS = (
    "debootstrap",
    "systemd-container",
    "equivs",
    "apt-utils",
    "dpkg-dev",
    "gnupg",
    "openssh-client",
)


class TestHostError(RuntimeError):
    """A test host (or its rootfs/network) could not be set up."""

    __test__ = False  # not a pytest test class


def log(msg: str) -> None:
    print(f"[testhost] {msg}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise TestHostError with its output."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args, text=True, capture_output=capture, timeout=timeout, env=env, input=input, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise TestHostError(f"timed out after {timeout}s: {shlex.join(args)}") from exc
    if check and proc.returncode != 0:
        out = ((proc.stdout or "") + (proc.stderr or "")).strip()
        raise TestHostError(f"command failed (rc={proc.returncode}): {shlex.join(args)}\n{out[-4000:]}")
    return proc


def tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()[-20000:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    # strip terminal escape sequences from the console log
    data = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", data)
    return "\n".join(data.splitlines()[-lines:])


def skip_reason() -> str | None:
    """Why test hosts cannot run on this machine, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "test hosts need Linux (systemd-nspawn)"
    if os.geteuid() != 0:
        return "test hosts need root (debootstrap, systemd-nspawn, network bridges)"
    if not shutil.which("systemd-nspawn") and not shutil.which("apt-get"):
        return "no systemd-nspawn and no apt-get to install it"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup filesystem: systemd-nspawn cannot run here"
    return None


def default_cache_dir() -> Path:
    env = os.environ.get("TESTHOST_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache"


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- apt tools

_apt_updated = False


def _dpkg_installed(pkg: str) -> bool:
    proc = run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False)
    return proc.returncode == 0 and proc.stdout.strip().endswith(" installed")


def _apt_install(packages: Sequence[str]) -> None:
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        t0 = time.monotonic()
        log("apt-get update on the box ...")
        run(["apt-get", "update", "-q"], env=env, timeout=600)
        _apt_updated = True
        log(f"apt-get update done in {time.monotonic() - t0:.1f}s")
    t0 = time.monotonic()
    log(f"installing on the box: {' '.join(packages)}")
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        env=env,
        timeout=900,
    )
    log(f"installed in {time.monotonic() - t0:.1f}s")


def ensure_apt_tools() -> None:
    """Install the box-side tools (debootstrap, systemd-nspawn, ...) if missing."""
    missing = [p for p in APT_TOOLS if not _dpkg_installed(p)]
    if missing:
        _apt_install(missing)
