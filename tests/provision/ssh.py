"""SSH to the test hosts: fresh keys in a host's tree, the client files (ssh config, Ansible
inventory) and running a command as the test user. Stdlib only.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from box import TestHostError, run

SSH_USER = "tester"


def _client_options(bridge: str) -> dict[str, str]:
    """What every client (ssh, Ansible) sets: throwaway host keys, only our key, and the
    bridge as the one way to the host (never the box's default route)."""
    return {
        "StrictHostKeyChecking": "no",
        "UserKnownHostsFile": "/dev/null",
        "IdentitiesOnly": "yes",
        "LogLevel": "ERROR",
        "BindInterface": bridge,
    }


def new_host_keys(root: Path) -> None:
    """Fresh SSH host keys inside the tree (the box's ssh-keygen writes them)."""
    for old in (root / "etc/ssh").glob("ssh_host_*"):
        old.unlink()
    run(["ssh-keygen", "-A", "-f", root])


def new_user_key(key: Path, comment: str) -> None:
    """A fresh ed25519 key for the test user, mode 0600 (ssh refuses looser ones)."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key])
    os.chmod(key, 0o600)


def write_ssh_config(path: Path, name: str, ip: str, key: Path, bridge: str) -> None:
    options = "".join(f"    {k} {v}\n" for k, v in _client_options(bridge).items())
    path.write_text(
        f"Host {name} {ip}\n"
        f"    HostName {ip}\n"
        f"    User {SSH_USER}\n"
        f"    Port 22\n"
        f"    IdentityFile {key}\n"
        f"{options}"
        f"    BatchMode yes\n"
        f"    ConnectTimeout 10\n"
        f"    ServerAliveInterval 15\n"
    )


def inventory_line(name: str, ip: str, key: Path, bridge: str) -> str:
    common = " ".join(f"-o {k}={v}" for k, v in _client_options(bridge).items())
    return (
        f"{name} ansible_host={ip} ansible_user={SSH_USER} "
        f"ansible_ssh_private_key_file={key} "
        f"ansible_ssh_common_args='{common}' "
        f"ansible_python_interpreter=/usr/bin/python3"
    )


class _InInventory(Protocol):
    def inventory_line(self) -> str: ...


def write_inventory(path: Path, hosts: Sequence[_InInventory], groups: Sequence[str] = ("testhosts",)) -> Path:
    """Write one Ansible INI inventory for several hosts (all in ``groups``)."""
    lines = []
    for g in groups:
        lines.append(f"[{g}]")
        lines += [h.inventory_line() for h in hosts]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def ssh(
    ssh_config: Path,
    name: str,
    cmd: str | Sequence[str],
    *,
    check: bool = False,
    timeout: float | None = 600,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (a shell string, or argv that gets quoted) as the test user on host ``name``."""
    remote = cmd if isinstance(cmd, str) else shlex.join(cmd)
    proc = subprocess.run(
        ["ssh", "-F", str(ssh_config), name, remote],
        text=True,
        capture_output=True,
        timeout=timeout,
        input=input if input is not None else "",
        check=False,
    )
    if check and proc.returncode != 0:
        raise TestHostError(
            f"{name}: ssh {remote!r} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc
