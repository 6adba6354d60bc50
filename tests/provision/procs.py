"""Processes and mounts of this machine, read from /proc: pid references that survive pid
reuse, the processes running inside a container's tree, and removing such a tree. Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from box import TestHostError, run


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie pid, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode("utf-8", "replace") for p in raw.split(b"\0") if p]


@dataclass(frozen=True)
class ProcRef:
    """A pid plus its start time, so a reused pid is never mistaken for ours."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcRef | None:
        start = proc_start_time(pid)
        return None if start is None else cls(pid, start)

    @classmethod
    def from_json(cls, data: Any) -> ProcRef | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(int(data["pid"]), int(data["start"]))
        except (KeyError, TypeError, ValueError):
            return None

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start


def wait_gone(ref: ProcRef, timeout: float, popen: subprocess.Popen[Any] | None) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=0.2)
        if not ref.alive():
            return True
        if time.monotonic() >= deadline:
            return False
        if popen is None:
            time.sleep(0.2)


def send_signal(ref: ProcRef, sig: int) -> None:
    if ref.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(ref.pid, sig)


# -------------------------------------------------------------------- mounts


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _within(path: str, base: str) -> bool:
    """Whether ``path`` is ``base`` or lies below it."""
    return path == base or path.startswith(base.rstrip("/") + "/")


def _mountinfo(pid: int | str = "self") -> Iterator[tuple[str, str, str]]:
    """(device major:minor, root inside that filesystem, mount point) of each mount ``pid`` sees."""
    with open(f"/proc/{pid}/mountinfo") as fh:
        for line in fh:
            f = line.split()
            yield f[2], _unescape_mount(f[3]), _unescape_mount(f[4])


def _fs_location(path: Path) -> tuple[str, str]:
    """(device major:minor, path inside that filesystem) of an existing ``path``."""
    best: tuple[str, str, str] = ("", "", "")
    path_s = str(path)
    for dev, fs_root, mnt in _mountinfo():
        if _within(path_s, mnt) and len(mnt) >= len(best[2]):
            best = (dev, fs_root, mnt)
    dev, fs_root, mnt = best
    rest = path_s[len(mnt) :].lstrip("/")
    return dev, (fs_root.rstrip("/") + "/" + rest).rstrip("/") or "/"


def pids_rooted_at(root: Path) -> list[int]:
    """Pids whose root directory is ``root`` or below it (processes of a container).

    nspawn pivots into ``root`` inside its own mount namespace, so there
    /proc/PID/root reads "/"; for those, the "/" line of /proc/PID/mountinfo tells
    which directory of which filesystem is their root.
    """
    root_s = str(root)
    try:
        dev, rel = _fs_location(root)
        own_ns = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if _within(os.readlink(f"/proc/{entry}/root"), root_s):
                pids.append(int(entry))
                continue
            if os.readlink(f"/proc/{entry}/ns/mnt") == own_ns:
                continue
            for mdev, mroot, mnt in _mountinfo(entry):
                if mnt != "/":
                    continue
                if mdev == dev and _within(mroot, rel):
                    pids.append(int(entry))
                break
        except OSError:
            continue
    return pids


def kill_rooted_at(root: Path) -> None:
    for _ in range(20):
        pids = pids_rooted_at(root)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    raise TestHostError(f"processes still running in {root}: {pids_rooted_at(root)}")


def mounts_under(path: Path) -> list[str]:
    base = str(path)
    return [mnt for _, _, mnt in _mountinfo() if _within(mnt, base)]


def unmount_under(path: Path) -> None:
    for _ in range(10):
        mounts = mounts_under(path)
        if not mounts:
            return
        for mnt in sorted(set(mounts), key=len, reverse=True):
            if run(["umount", mnt], check=False).returncode != 0:
                run(["umount", "-l", mnt], check=False)
    left = mounts_under(path)
    if left:
        raise TestHostError(f"could not unmount {left}")


def remove_tree(path: Path) -> None:
    """Unmount anything below ``path`` and delete it, never crossing filesystems."""
    if not path.exists() and not path.is_symlink():
        return
    unmount_under(path)
    run(["rm", "-rf", "--one-file-system", str(path)])
