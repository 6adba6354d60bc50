#!/usr/bin/env python3
"""Fresh Ubuntu 24.04 test hosts for provisioning tests.

A test host is a debootstrapped rootfs booted by ``systemd-nspawn -b`` (systemd as
PID 1) on a private bridge, reached over SSH like a new machine. apt inside the host
goes through an HTTP proxy (proxy.py) listening on the bridge address; the host has
no other route out.

Library use::

    from testhost import TestHost

    with TestHost("node1", cache_dir) as host:
        host.ssh("sudo -n true", check=True)
        run_ansible(inventory=host.inventory)

CLI::

    python tests/provision/testhost.py build
    python tests/provision/testhost.py up NAME [--index N] [--no-systemd] [--docker-ready]
    python tests/provision/testhost.py down NAME
    python tests/provision/testhost.py clean [--rootfs]

Everything is kept under ``cache_dir`` (default ``<repo>/.cache`` or
``$TESTHOST_CACHE``)::

    rootfs/<distro>-<suite>-<key>.tar[.zst|.gz]   cached rootfs tarballs
    hosts/<name>/{root,id_ed25519,ssh_config,inventory.ini,console.log,host.json}
    net/{proxy.json,proxy.log}                     the shared HTTP proxy
    logs/<name>.console.log                        last console log of each host
    testhost.lock                                  serialises shared-state changes

Stdlib only; needs root, ``systemd-nspawn`` and ``debootstrap`` on the box
(``ensure_apt_tools()`` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import ipaddress
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_SUBNET",
    "TestHost",
    "TestHostError",
    "build_rootfs",
    "clean_all",
    "default_cache_dir",
    "down",
    "ensure_apt_tools",
    "live_hosts",
    "write_inventory",
]

# Bump when anything below changes what ends up inside the rootfs tarball.
SCRIPT_VERSION = "1"

# Overridable so that separate checkouts (each with its own TESTHOST_CACHE) can run test hosts
# at the same time on one machine without sharing a bridge or proxy.
DEFAULT_BRIDGE = os.environ.get("TESTHOST_BRIDGE", "tkbr0")
DEFAULT_SUBNET = os.environ.get("TESTHOST_SUBNET", "10.213.7.0/24")
PROXY_PORT = 3128
SSH_USER = "tester"

APT_TOOLS = (
    "debootstrap",
    "systemd-container",
    "equivs",
    "apt-utils",
    "dpkg-dev",
    "gnupg",
    "openssh-client",
)

ROOTFS_PACKAGES = (
    "python3",
    "python3-apt",
    "openssh-server",
    "sudo",
    "iproute2",
    "ca-certificates",
    "systemd",
    "systemd-sysv",
    "dbus",
    "curl",
    "procps",
    "gnupg",
    "less",
)

UBUNTU_SUITE = "noble"
DEBIAN_SUITE = "bookworm"


def _env_mirror(name: str, default: str) -> str:
    return os.environ.get(name, default).rstrip("/")


UBUNTU_MIRROR = _env_mirror("TESTHOST_UBUNTU_MIRROR", "http://archive.ubuntu.com/ubuntu")
UBUNTU_SECURITY_MIRROR = _env_mirror("TESTHOST_UBUNTU_SECURITY_MIRROR", "http://security.ubuntu.com/ubuntu")
UBUNTU_PORTS_MIRROR = _env_mirror("TESTHOST_UBUNTU_PORTS_MIRROR", "http://ports.ubuntu.com/ubuntu-ports")

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")


class TestHostError(RuntimeError):
    """A test host (or its rootfs/network) could not be set up."""

    __test__ = False  # not a pytest test class


# --------------------------------------------------------------------------- utils


def _log(msg: str) -> None:
    print(f"[testhost] {msg}", file=sys.stderr, flush=True)


def _run(
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
            args,
            text=True,
            capture_output=capture,
            timeout=timeout,
            env=env,
            input=input,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TestHostError(f"timed out after {timeout}s: {shlex.join(args)}") from exc
    if check and proc.returncode != 0:
        out = ((proc.stdout or "") + (proc.stderr or "")).strip()
        raise TestHostError(f"command failed (rc={proc.returncode}): {shlex.join(args)}\n{out[-4000:]}")
    return proc


def _tail(path: Path, lines: int = 40) -> str:
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
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------- process helpers


def _proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie pid, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode("utf-8", "replace") for p in raw.split(b"\0") if p]


@dataclass(frozen=True)
class _ProcRef:
    """A pid plus its start time, so a reused pid is never mistaken for ours."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> _ProcRef | None:
        start = _proc_start_time(pid)
        return None if start is None else cls(pid, start)

    @classmethod
    def from_json(cls, data: Any) -> _ProcRef | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(int(data["pid"]), int(data["start"]))
        except (KeyError, TypeError, ValueError):
            return None

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    def alive(self) -> bool:
        return _proc_start_time(self.pid) == self.start


def _wait_gone(ref: _ProcRef, timeout: float, popen: subprocess.Popen[Any] | None) -> bool:
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


def _signal(ref: _ProcRef, sig: int) -> None:
    if ref.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(ref.pid, sig)


def _fs_location(path: Path) -> tuple[str, str]:
    """(device major:minor, path inside that filesystem) of an existing ``path``."""
    best: tuple[str, str, str] = ("", "", "")
    path_s = str(path)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            f = line.split()
            mnt = _unescape_mount(f[4])
            inside = path_s == mnt or path_s.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[2]):
                best = (f[2], _unescape_mount(f[3]), mnt)
    dev, fs_root, mnt = best
    rest = path_s[len(mnt) :].lstrip("/")
    return dev, (fs_root.rstrip("/") + "/" + rest).rstrip("/") or "/"


def _pids_rooted_at(root: Path) -> list[int]:
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
            link = os.readlink(f"/proc/{entry}/root")
            if link == root_s or link.startswith(root_s + "/"):
                pids.append(int(entry))
                continue
            if os.readlink(f"/proc/{entry}/ns/mnt") == own_ns:
                continue
            with open(f"/proc/{entry}/mountinfo") as fh:
                for line in fh:
                    f = line.split()
                    if f[4] != "/":
                        continue
                    mroot = _unescape_mount(f[3])
                    if f[2] == dev and (mroot == rel or mroot.startswith(rel + "/")):
                        pids.append(int(entry))
                    break
        except OSError:
            continue
    return pids


def _kill_rooted_at(root: Path) -> None:
    for _ in range(20):
        pids = _pids_rooted_at(root)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    raise TestHostError(f"processes still running in {root}: {_pids_rooted_at(root)}")


# -------------------------------------------------------------------- mount helpers


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mounts_under(path: Path) -> list[str]:
    base = str(path)
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mnt = _unescape_mount(line.split()[4])
            if mnt == base or mnt.startswith(base + "/"):
                out.append(mnt)
    return out


def _unmount_under(path: Path) -> None:
    for _ in range(10):
        mounts = _mounts_under(path)
        if not mounts:
            return
        for mnt in sorted(set(mounts), key=len, reverse=True):
            if _run(["umount", mnt], check=False).returncode != 0:
                _run(["umount", "-l", mnt], check=False)
    left = _mounts_under(path)
    if left:
        raise TestHostError(f"could not unmount {left}")


def _remove_tree(path: Path) -> None:
    """Unmount anything below ``path`` and delete it, never crossing filesystems."""
    if not path.exists() and not path.is_symlink():
        return
    _unmount_under(path)
    _run(["rm", "-rf", "--one-file-system", str(path)])


# ---------------------------------------------------------------------- apt tools

_apt_updated = False


def _dpkg_installed(pkg: str) -> bool:
    proc = _run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False)
    return proc.returncode == 0 and proc.stdout.strip().endswith(" installed")


def _apt_install(packages: Sequence[str]) -> None:
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        t0 = time.monotonic()
        _log("apt-get update on the box ...")
        _run(["apt-get", "update", "-q"], env=env, timeout=600)
        _apt_updated = True
        _log(f"apt-get update done in {time.monotonic() - t0:.1f}s")
    t0 = time.monotonic()
    _log(f"installing on the box: {' '.join(packages)}")
    _run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        env=env,
        timeout=900,
    )
    _log(f"installed in {time.monotonic() - t0:.1f}s")


def ensure_apt_tools() -> None:
    """Install the box-side tools (debootstrap, systemd-nspawn, ...) if missing."""
    missing = [p for p in APT_TOOLS if not _dpkg_installed(p)]
    if missing:
        _apt_install(missing)


# ------------------------------------------------------------------------- rootfs


@dataclass(frozen=True)
class _Distro:
    name: str  # "ubuntu" | "debian"
    suite: str
    mirror: str
    sources: str  # deb822 sources written into the rootfs

    def key(self) -> str:
        blob = json.dumps(
            {
                "distro": self.name,
                "suite": self.suite,
                "packages": sorted(ROOTFS_PACKAGES),
                "script_version": SCRIPT_VERSION,
                "setup": _ROOTFS_SETUP,
                "sources": self.sources,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def stem(self) -> str:
        return f"{self.name}-{self.suite}-{self.key()}"


def _box_arch() -> str:
    return _run(["dpkg", "--print-architecture"]).stdout.strip()


def _ubuntu_distro() -> _Distro:
    arch = _box_arch()
    mirror = UBUNTU_MIRROR if arch in ("amd64", "i386") else UBUNTU_PORTS_MIRROR
    security = UBUNTU_SECURITY_MIRROR if arch in ("amd64", "i386") else mirror
    kr = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
    comps = "main restricted universe multiverse"
    s = UBUNTU_SUITE
    sources = (
        f"Types: deb\nURIs: {mirror}\nSuites: {s} {s}-updates {s}-backports\n"
        f"Components: {comps}\nSigned-By: {kr}\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {s}-security\n"
        f"Components: {comps}\nSigned-By: {kr}\n"
    )
    return _Distro("ubuntu", s, mirror, sources)


def _box_debian_mirror() -> str:
    env = os.environ.get("TESTHOST_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    for path in [
        Path("/etc/apt/sources.list"),
        *Path("/etc/apt/sources.list.d").glob("*"),
    ]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"(https?://\S+/debian)/?\s", text + "\n"):
            if "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def _debian_distro() -> _Distro:
    mirror = _box_debian_mirror()
    security = mirror.replace("/debian", "/debian-security")
    kr = "/usr/share/keyrings/debian-archive-keyring.gpg"
    s = DEBIAN_SUITE
    sources = (
        f"Types: deb\nURIs: {mirror}\nSuites: {s} {s}-updates\n"
        f"Components: main\nSigned-By: {kr}\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {s}-security\n"
        f"Components: main\nSigned-By: {kr}\n"
    )
    return _Distro("debian", s, mirror, sources)


# Runs inside the freshly debootstrapped tree (chroot), at build time.
_ROOTFS_SETUP = r"""
set -eu
rm -f /etc/apt/sources.list
printf '%s' "$TH_SOURCES" > /etc/apt/sources.list.d/$TH_DISTRO.sources
id -u tester >/dev/null 2>&1 || useradd -m -s /bin/bash -G sudo tester
usermod -p '*' tester
printf 'tester ALL=(ALL) NOPASSWD:ALL\n' > /etc/sudoers.d/90-tester
chmod 0440 /etc/sudoers.d/90-tester
install -d -m 0700 -o tester -g tester /home/tester/.ssh
rm -f /etc/ssh/ssh_host_*
systemctl enable systemd-networkd ssh
# no background apt runs holding the dpkg lock during tests
for t in apt-daily.timer apt-daily-upgrade.timer motd-news.timer; do
  systemctl disable "$t" 2>/dev/null || true
done
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
ln -sf /etc/machine-id /var/lib/dbus/machine-id
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/*.log /var/cache/debconf/*-old
"""


def _fetch(url: str, timeout: float = 30) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "testhost/1"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data: bytes = resp.read()
        return data


def _parse_stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                fields[key] = val.strip()
        if fields:
            yield fields


def _ubuntu_keyring(distro: _Distro, workdir: Path) -> Path:
    """Fetch ubuntu-keyring from the archive, check it, return the archive keyring.

    The .deb's SHA256 is checked against the suite's Packages index; the keyring is
    then used to verify InRelease with gpgv, and the Packages index's SHA256 is
    checked against InRelease, so the chain is consistent end to end.
    Raises urllib.error.URLError / OSError when the archive is unreachable.
    """
    arch = _box_arch()
    base = f"{distro.mirror}/dists/{distro.suite}"
    rel_path = f"main/binary-{arch}/Packages.xz"
    inrelease = _fetch(f"{base}/InRelease")
    packages_xz = _fetch(f"{base}/{rel_path}", timeout=120)
    packages = lzma.decompress(packages_xz).decode("utf-8", "replace")
    entry = next(
        (s for s in _parse_stanzas(packages) if s.get("Package") == "ubuntu-keyring"),
        None,
    )
    if entry is None:
        raise TestHostError("ubuntu-keyring not found in the noble Packages index")
    deb = _fetch(f"{distro.mirror}/{entry['Filename']}")
    got = hashlib.sha256(deb).hexdigest()
    if got != entry["SHA256"]:
        raise TestHostError(f"ubuntu-keyring sha256 mismatch: {got} != {entry['SHA256']}")
    deb_path = workdir / "ubuntu-keyring.deb"
    deb_path.write_bytes(deb)
    extract = workdir / "ubuntu-keyring"
    _run(["dpkg-deb", "-x", deb_path, extract])
    keyring = extract / "usr/share/keyrings/ubuntu-archive-keyring.gpg"
    if not keyring.is_file():
        raise TestHostError(f"no ubuntu-archive-keyring.gpg in {entry['Filename']}")
    # InRelease must be signed by that keyring and must list the Packages.xz we used.
    (workdir / "InRelease").write_bytes(inrelease)
    _run(["gpgv", "--keyring", keyring, workdir / "InRelease"])
    want = hashlib.sha256(packages_xz).hexdigest()
    if not re.search(
        rf"^\s*{want}\s+\d+\s+{re.escape(rel_path)}\s*$",
        inrelease.decode("utf-8", "replace"),
        re.MULTILINE,
    ):
        raise TestHostError("Packages.xz sha256 not listed in the signed InRelease")
    _log(f"ubuntu-keyring {entry.get('Version', '?')} verified (sha256 {got[:16]}...)")
    return keyring


def _ubuntu_reachable(distro: _Distro) -> bool:
    try:
        _fetch(f"{distro.mirror}/dists/{distro.suite}/Release", timeout=15)
    except (urllib.error.URLError, OSError) as exc:
        _log(f"Ubuntu archive {distro.mirror} unreachable: {exc}")
        return False
    return True


def _compressor() -> tuple[str, list[str]]:
    """(extension, tar flags) for the best compressor available on the box."""
    if shutil.which("zstd"):
        return ".tar.zst", ["-I", "zstd -T0 -3"]
    if shutil.which("gzip"):
        return ".tar.gz", ["-z"]
    return ".tar", []


def _find_cached(rootfs_dir: Path, stem: str) -> Path | None:
    for ext in (".tar.zst", ".tar.gz", ".tar"):
        p = rootfs_dir / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _clean_stale_builds(rootfs_dir: Path) -> None:
    for p in rootfs_dir.glob(".build-*"):
        m = re.search(r"-(\d+)$", p.name)
        if m and _proc_start_time(int(m.group(1))) is not None and int(m.group(1)) != os.getpid():
            continue  # another live builder
        _log(f"removing stale build dir {p}")
        _remove_tree(p)


def _build(distro: _Distro, rootfs_dir: Path) -> Path:
    ext, tar_flags = _compressor()
    final = rootfs_dir / f"{distro.stem()}{ext}"
    build_dir = rootfs_dir / f".build-{distro.stem()}-{os.getpid()}"
    _remove_tree(build_dir)
    build_dir.mkdir(parents=True)
    root = build_dir / "root"
    log_path = rootfs_dir / f"{distro.stem()}.build.log"
    t_all = time.monotonic()
    try:
        argv: list[str] = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(ROOTFS_PACKAGES)}",
        ]
        if distro.name == "ubuntu":
            keyring = _ubuntu_keyring(distro, build_dir)
            argv += [f"--keyring={keyring}", distro.suite, str(root), distro.mirror]
            argv.append("/usr/share/debootstrap/scripts/gutsy")
        else:
            argv += [distro.suite, str(root), distro.mirror]
        _log(f"debootstrap {distro.name} {distro.suite} from {distro.mirror} (log: {log_path}) ...")
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            rc = subprocess.run(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            ).returncode
        if rc != 0:
            raise TestHostError(f"debootstrap failed (rc={rc}):\n{_tail(log_path)}")
        _log(f"debootstrap done in {time.monotonic() - t0:.1f}s")
        _unmount_under(root)  # debootstrap may leave proc/sys mounted on failure paths

        if distro.name == "ubuntu":
            dst = root / "usr/share/keyrings/ubuntu-archive-keyring.gpg"
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(keyring, dst)
        t0 = time.monotonic()
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C",
            "DEBIAN_FRONTEND": "noninteractive",
            "TH_SOURCES": distro.sources,
            "TH_DISTRO": distro.name,
        }
        _run(["chroot", root, "/bin/sh", "-c", _ROOTFS_SETUP], env=env, timeout=300)
        _unmount_under(root)
        (root / "etc/testhost-release").write_text(
            f"DISTRO={distro.name}\nSUITE={distro.suite}\nKEY={distro.key()}\nSCRIPT_VERSION={SCRIPT_VERSION}\n"
        )
        _log(f"rootfs configured in {time.monotonic() - t0:.1f}s")

        t0 = time.monotonic()
        tmp_tar = build_dir / f"rootfs{ext}"
        _run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                *tar_flags,
                "-C",
                root,
                "-cf",
                tmp_tar,
                ".",
            ],
            timeout=900,
        )
        os.chmod(tmp_tar, 0o644)
        os.replace(tmp_tar, final)  # atomic: same filesystem
        size = final.stat().st_size / 2**20
        _log(f"tarball {final.name} ({size:.0f} MiB) written in {time.monotonic() - t0:.1f}s")
    finally:
        _remove_tree(build_dir)
    _log(f"rootfs {distro.name} {distro.suite} built in {time.monotonic() - t_all:.1f}s")
    return final


def build_rootfs(cache_dir: Path, *, distro: str | None = None) -> Path:
    """Return a cached rootfs tarball, building it first if it is missing.

    Builds Ubuntu 24.04 (noble); falls back to Debian 12 (bookworm) from the box's
    Debian mirror when Ubuntu's archive is unreachable. ``distro`` ("ubuntu" or
    "debian", default ``$TESTHOST_DISTRO`` or automatic) forces one.
    """
    cache_dir = Path(cache_dir).resolve()
    rootfs_dir = cache_dir / "rootfs"
    rootfs_dir.mkdir(parents=True, exist_ok=True)
    distro = distro or os.environ.get("TESTHOST_DISTRO") or None
    if distro not in (None, "ubuntu", "debian"):
        raise ValueError(f"unknown distro {distro!r}")
    with _flock(rootfs_dir / ".build.lock"):
        candidates = []
        if distro in (None, "ubuntu"):
            candidates.append(_ubuntu_distro())
        if distro in (None, "debian"):
            candidates.append(_debian_distro())
        for cand in candidates:
            cached = _find_cached(rootfs_dir, cand.stem())
            if cached and (cand.name == "ubuntu" or distro == "debian"):
                _log(f"using cached rootfs {cached.name}")
                return cached
        ensure_apt_tools()
        _clean_stale_builds(rootfs_dir)
        for cand in candidates:
            if cand.name == "ubuntu" and not _ubuntu_reachable(cand):
                if distro == "ubuntu":
                    raise TestHostError("Ubuntu's archive is unreachable")
                _log("falling back to Debian 12 (bookworm)")
                continue
            cached = _find_cached(rootfs_dir, cand.stem())
            if cached:
                _log(f"using cached rootfs {cached.name}")
                return cached
            _log(f"building {cand.name} {cand.suite} rootfs")
            built = _build(cand, rootfs_dir)
            for old in rootfs_dir.glob(f"{cand.name}-{cand.suite}-*"):
                if not old.name.startswith(cand.stem()):
                    _log(f"removing outdated {old.name}")
                    old.unlink(missing_ok=True)
            return built
    raise TestHostError("no rootfs could be built")


# ------------------------------------------------------------------------ network


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _ensure_bridge(bridge: str, net: ipaddress.IPv4Network) -> None:
    addr = f"{net.network_address + 1}/{net.prefixlen}"
    # The subnet must belong to nothing but our bridge.
    routes = json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
    for r in routes:
        dst, dev = str(r.get("dst", "")), str(r.get("dev", ""))
        if dev == bridge or dst in ("", "default"):
            continue
        try:
            other = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if other.prefixlen > 0 and other.overlaps(net):
            raise TestHostError(f"subnet {net} overlaps route {dst} on {dev}")
    if _link_exists(bridge):
        if not Path(f"/sys/class/net/{bridge}/bridge").exists():
            raise TestHostError(f"{bridge} exists but is not a bridge")
    else:
        _log(f"creating bridge {bridge} {addr}")
        _run(["ip", "link", "add", bridge, "type", "bridge"])
    info = json.loads(_run(["ip", "-j", "addr", "show", "dev", bridge]).stdout)[0]
    have = {f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", []) if a.get("family") == "inet"}
    for stale in have - {addr}:
        _run(["ip", "addr", "del", stale, "dev", bridge], check=False)
    if addr not in have:
        _run(["ip", "addr", "add", addr, "dev", bridge])
    with contextlib.suppress(OSError):  # IPv4 only: no IPv6 chatter on the bridge
        Path(f"/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6").write_text("1\n")
    _run(["ip", "link", "set", bridge, "up"])


def _delete_bridge(bridge: str) -> None:
    if _link_exists(bridge):
        _log(f"deleting bridge {bridge}")
        _run(["ip", "link", "del", bridge], check=False)


def _port_open(host: str, port: int, device: str, timeout: float = 1.0) -> bool:
    """TCP connect to host:port, only ever through ``device`` (never the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            sock.settimeout(timeout)
            sock.connect((host, port))
        except OSError:
            return False
    return True


def _listening(ip: str, port: int) -> bool:
    """Whether a local TCP socket listens on ip:port (reads /proc, sends nothing)."""
    want = f"{int.from_bytes(socket.inet_aton(ip), 'little'):08X}:{port:04X}"
    any_ = f"00000000:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(f[1] in (want, any_) and f[3] == "0A" for f in (ln.split() for ln in lines))


def _ensure_proxy_installed() -> None:
    try:
        importlib.metadata.version("proxy.py")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    t0 = time.monotonic()
    _log(f"installing proxy.py into {sys.prefix} ...")
    _run([sys.executable, "-m", "pip", "install", "-q", "proxy.py"], timeout=300)
    _log(f"proxy.py installed in {time.monotonic() - t0:.1f}s")


def _proxy_state(cache_dir: Path) -> Path:
    return cache_dir / "net" / "proxy.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _ensure_proxy(cache_dir: Path, ip: str, port: int, bridge: str) -> None:
    state_path = _proxy_state(cache_dir)
    state = _read_json(state_path)
    ref = _ProcRef.from_json(state.get("proc"))
    if ref and ref.alive():
        if state.get("listen") == f"{ip}:{port}" and _port_open(ip, port, bridge):
            return
        _log("proxy from an earlier run is not serving; restarting it")
        _stop_proxy(cache_dir)
    elif _listening(ip, port):
        _log(f"something already listens on {ip}:{port}; using it as the proxy")
        return
    _ensure_proxy_installed()
    log_path = state_path.with_name("proxy.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "--hostname",
                ip,
                "--port",
                str(port),
                "--num-workers",
                "2",
                "--num-acceptors",
                "1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(state_path.parent),
        )
    new = _ProcRef.of(proc.pid)
    if new is None:
        raise TestHostError(f"proxy exited at once:\n{_tail(log_path)}")
    _write_json(state_path, {"proc": new.to_json(), "listen": f"{ip}:{port}"})
    deadline = time.monotonic() + 30
    while not _port_open(ip, port, bridge):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_proxy(cache_dir)
            raise TestHostError(f"proxy did not start on {ip}:{port}:\n{_tail(log_path)}")
        time.sleep(0.2)
    _log(f"proxy.py listening on {ip}:{port} (pid {proc.pid}, {time.monotonic() - t0:.1f}s)")


def _stop_proxy(cache_dir: Path) -> None:
    state_path = _proxy_state(cache_dir)
    ref = _ProcRef.from_json(_read_json(state_path).get("proc"))
    if ref and ref.alive():
        _log(f"stopping proxy (pid {ref.pid})")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ref.pid, signal.SIGTERM)
        if not _wait_gone(ref, 10, None):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(ref.pid, signal.SIGKILL)
            _wait_gone(ref, 5, None)
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()


# -------------------------------------------------------------------- host state


def _hosts_dir(cache_dir: Path) -> Path:
    return cache_dir / "hosts"


def _host_meta(host_dir: Path) -> dict[str, Any]:
    return _read_json(host_dir / "host.json")


def _controller_alive(meta: dict[str, Any]) -> bool:
    ref = _ProcRef.from_json(meta.get("controller"))
    return bool(ref and ref.alive())


def live_hosts(cache_dir: Path, *, exclude: str | None = None) -> list[str]:
    """Names of hosts whose controlling process is still alive."""
    hosts = _hosts_dir(Path(cache_dir).resolve())
    if not hosts.is_dir():
        return []
    out = []
    for d in sorted(hosts.iterdir()):
        if d.name.startswith(".") or d.name == exclude or not d.is_dir():
            continue
        if _controller_alive(_host_meta(d)):
            out.append(d.name)
    return out


def _force_stop_dir(
    host_dir: Path,
    popen: subprocess.Popen[Any] | None = None,
    stop_timeout: float = 20.0,
) -> float:
    """Stop the container of ``host_dir`` (if any) and delete the directory.

    Returns the seconds the container took to stop.
    """
    meta = _host_meta(host_dir)
    root = host_dir / "root"
    name = meta.get("name", host_dir.name)
    t0 = time.monotonic()
    ref = _ProcRef.from_json(meta.get("nspawn"))
    if ref and ref.alive():
        _signal(ref, signal.SIGTERM)  # nspawn -b: clean poweroff of the container
        if not _wait_gone(ref, stop_timeout, popen):
            _log(f"{name}: no clean poweroff within {stop_timeout:.0f}s; killing")
            _signal(ref, signal.SIGKILL)
            _kill_rooted_at(root)
            _wait_gone(ref, 5, popen)
    elif popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=0.1)
    _kill_rooted_at(root)
    stopped = time.monotonic() - t0
    console = host_dir / "console.log"
    if console.is_file():  # keep the last console log of each host for debugging
        logs = host_dir.parent.parent / "logs"
        logs.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(console, logs / f"{name}.console.log")
    veth = f"vb-{name}"
    if len(veth) <= 15 and _link_exists(veth):
        _run(["ip", "link", "del", veth], check=False)
    # nspawn's leftovers on the box (its rm of them is refused when /run is no tmpfs)
    with contextlib.suppress(OSError):
        st = root.stat()
        lock = Path(f"/run/systemd/nspawn/locks/inode-{st.st_dev}:{st.st_ino}")
        lock.unlink(missing_ok=True)
    propagate = Path("/run/systemd/nspawn/propagate") / name
    if propagate.is_dir():
        _remove_tree(propagate)
    # Move it aside first (atomic), so nobody sees a half-deleted host dir.
    trash = host_dir.with_name(f".trash-{host_dir.name}-{os.getpid()}")
    try:
        host_dir.rename(trash)
    except FileNotFoundError:
        return stopped
    except OSError:
        trash = host_dir
    _remove_tree(trash)
    return stopped


def _reap_stale(cache_dir: Path) -> None:
    """Clean hosts left over by crashed runs (their controller is gone)."""
    hosts = _hosts_dir(cache_dir)
    if not hosts.is_dir():
        return
    for d in sorted(hosts.iterdir()):
        if d.name.startswith(".trash-"):
            m = re.search(r"-(\d+)$", d.name)
            if m and int(m.group(1)) != os.getpid() and _proc_start_time(int(m.group(1))):
                continue
            _log(f"removing leftover {d}")
            _remove_tree(d)
            continue
        if not d.is_dir() or _controller_alive(_host_meta(d)):
            continue
        _log(f"cleaning up stale host {d.name} from a crashed run")
        _force_stop_dir(d, stop_timeout=5)


def _release_shared(cache_dir: Path, bridge: str, exclude: str | None) -> None:
    """Stop the proxy and delete the bridge when no other host uses them."""
    with _flock(cache_dir / "testhost.lock"):
        others = live_hosts(cache_dir, exclude=exclude)
        if others:
            return
        _stop_proxy(cache_dir)
        _delete_bridge(bridge)


def write_inventory(path: Path, hosts: Sequence[TestHost], groups: Sequence[str] = ("testhosts",)) -> Path:
    """Write one Ansible INI inventory for several hosts (all in ``groups``)."""
    lines = []
    for g in groups:
        lines.append(f"[{g}]")
        lines += [h.inventory_line() for h in hosts]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------- TestHost

# docker_ready=True: make the read-only cgroup v1 controllers read-write before containerd
# and docker start. Only the mount's own ro flag needs flipping (`remount,bind,rw`); a plain
# `remount,rw` touches the shared superblock and fails at random with "mount point is busy".
# Fallback: unmount and mount the hierarchy afresh.
_CGROUP_RW_SCRIPT = r"""#!/bin/sh
# Written by tests/provision/testhost.py (docker_ready=True): test hosts only.
set -eu
awk '$3 == "cgroup" { print $2, $4 }' /proc/self/mounts | while read -r dir opts; do
  case ",$opts," in *,ro,*) ;; *) continue ;; esac
  case ",$opts," in *,name=*) continue ;; esac  # systemd's own hierarchy: leave it
  if ! mount -o remount,bind,rw "$dir" 2>/dev/null; then
    ctrls=$(basename "$dir")
    umount "$dir"
    mount -t cgroup -o "rw,nosuid,nodev,noexec,relatime,$ctrls" cgroup "$dir"
  fi
  echo "testhost-cgroup-rw: $dir read-write"
done
"""

_CGROUP_RW_UNIT = """\
# Written by tests/provision/testhost.py (docker_ready=True): test hosts only.
[Unit]
Description=Test host: cgroup v1 controllers read-write for Docker (nspawn mounts them read-only)
DefaultDependencies=no
After=local-fs.target
Before=containerd.service docker.service sysinit.target
ConditionPathIsDirectory=/sys/fs/cgroup

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/testhost-cgroup-rw

[Install]
WantedBy=multi-user.target
"""


class TestHost:
    """A fresh machine booted with systemd-nspawn, reachable over SSH.

    Use as a context manager; ``stop()`` (also run by ``__exit__`` and when
    ``__enter__`` fails) powers it off and removes everything it made. The bridge
    and proxy go away with the last host that uses them.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        name: str,
        cache_dir: Path,
        bridge: str = DEFAULT_BRIDGE,
        subnet: str = DEFAULT_SUBNET,
        index: int = 1,
        *,
        systemd_pid1: bool = True,
        extra_setup: Callable[[Path], None] | None = None,
        docker_ready: bool = False,
        distro: str | None = None,
        groups: Sequence[str] = ("testhosts",),
        boot_timeout: float = 180.0,
        stop_timeout: float = 20.0,
        proxy_port: int = PROXY_PORT,
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"bad host name {name!r}: use [a-z0-9-], max 32 chars")
        if len(bridge) > 15:
            raise ValueError(f"bridge name too long: {bridge!r}")
        self.name = name
        self.cache_dir = Path(cache_dir).resolve()
        self.bridge = bridge
        self.net = ipaddress.IPv4Network(subnet)
        if not self.net.is_private:
            raise ValueError(f"subnet must be a private IPv4 network: {subnet}")
        if not 0 <= index <= self.net.num_addresses - 12:
            raise ValueError(f"index {index} out of range for {subnet}")
        self.index = index
        self.bridge_ip = str(self.net.network_address + 1)
        self.ip = str(self.net.network_address + 10 + index)
        self.systemd_pid1 = systemd_pid1
        self.extra_setup = extra_setup
        self.docker_ready = docker_ready
        self.distro = distro
        self.groups = tuple(groups)
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.proxy_port = proxy_port

        self.state_dir = _hosts_dir(self.cache_dir) / name
        self.root = self.state_dir / "root"
        self.key = self.state_dir / "id_ed25519"
        self.ssh_config = self.state_dir / "ssh_config"
        self.inventory = self.state_dir / "inventory.ini"
        self.console_log = self.state_dir / "console.log"
        self.proxy_url = f"http://{self.bridge_ip}:{proxy_port}"
        self.timings: dict[str, float] = {}
        self.os_release: dict[str, str] = {}
        self._popen: subprocess.Popen[bytes] | None = None
        self._registered = False

    # -- context manager ---------------------------------------------------------

    def __enter__(self) -> TestHost:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- public ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        ref = _ProcRef.from_json(_host_meta(self.state_dir).get("nspawn"))
        return bool(ref and ref.alive())

    def ssh(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = False,
        timeout: float | None = 600,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (a shell string, or argv that gets quoted) as ``tester``."""
        remote = cmd if isinstance(cmd, str) else shlex.join(cmd)
        argv = ["ssh", "-F", str(self.ssh_config), self.name, remote]
        proc = subprocess.run(
            argv,
            text=True,
            capture_output=True,
            timeout=timeout,
            input=input if input is not None else "",
            check=False,
        )
        if check and proc.returncode != 0:
            raise TestHostError(
                f"{self.name}: ssh {remote!r} failed (rc={proc.returncode}):\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return proc

    def inventory_line(self) -> str:
        common = (
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            f"-o IdentitiesOnly=yes -o LogLevel=ERROR -o BindInterface={self.bridge}"
        )
        return (
            f"{self.name} ansible_host={self.ip} ansible_user={SSH_USER} "
            f"ansible_ssh_private_key_file={self.key} "
            f"ansible_ssh_common_args='{common}' "
            f"ansible_python_interpreter=/usr/bin/python3"
        )

    def start(self) -> None:
        t_all = time.monotonic()
        if os.geteuid() != 0:
            raise TestHostError("TestHost needs root (debootstrap, nspawn, bridges)")
        ensure_apt_tools()
        tarball = build_rootfs(self.cache_dir, distro=self.distro)
        lock = self.cache_dir / "testhost.lock"
        with _flock(lock):
            _reap_stale(self.cache_dir)
            meta = _host_meta(self.state_dir)
            if self.state_dir.exists() and _controller_alive(meta):
                raise TestHostError(
                    f"host {self.name} is already up (controller pid "
                    f"{meta['controller']['pid']}); run `testhost.py down {self.name}`"
                )
            for other in live_hosts(self.cache_dir, exclude=self.name):
                if _host_meta(_hosts_dir(self.cache_dir) / other).get("ip") == self.ip:
                    raise TestHostError(f"{other} already uses {self.ip}; pick another index")
            if self.state_dir.exists():
                _force_stop_dir(self.state_dir, stop_timeout=5)
            self.state_dir.mkdir(parents=True)
            me = _ProcRef.of(os.getpid())
            assert me is not None
            self._save_meta(controller=me.to_json())
            self._registered = True
            _ensure_bridge(self.bridge, self.net)
            _ensure_proxy(self.cache_dir, self.bridge_ip, self.proxy_port, self.bridge)

        t0 = time.monotonic()
        self.root.mkdir()
        dec = {".zst": ["-I", "zstd -d -T0"], ".gz": ["-z"]}.get(tarball.suffix, [])
        _run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                *dec,
                "-C",
                self.root,
                "-xpf",
                tarball,
            ],
            timeout=600,
        )
        self.timings["unpack"] = time.monotonic() - t0
        self._configure_root()
        if self.docker_ready:
            self._prepare_for_docker()
        if self.extra_setup is not None:
            self.extra_setup(self.root)
        self.timings["configure"] = time.monotonic() - t0 - self.timings["unpack"]
        _log(f"{self.name}: unpacked in {self.timings['unpack']:.1f}s, configured in {self.timings['configure']:.1f}s")

        self._boot()
        self._write_client_files()
        self._wait_ready()
        self.timings["total_up"] = time.monotonic() - t_all
        _log(
            f"{self.name}: up at {self.ip} in {self.timings['total_up']:.1f}s "
            f"({self.os_release.get('PRETTY_NAME', '?')}, "
            f"systemd_pid1={self.systemd_pid1})"
        )

    def stop(self) -> None:
        """Power off, remove the root dir; drop bridge+proxy if no host is left."""
        if not self._registered and not self.state_dir.exists():
            return
        t0 = time.monotonic()
        meta = _host_meta(self.state_dir)
        mine = _ProcRef.of(os.getpid())
        ours = mine is not None and meta.get("controller") == mine.to_json()
        if self.state_dir.exists() and (ours or self._registered):
            self.timings["poweroff"] = _force_stop_dir(self.state_dir, self._popen, self.stop_timeout)
        self._popen = None
        if self._registered:
            self._registered = False
            _release_shared(self.cache_dir, self.bridge, exclude=self.name)
            self.timings["stop"] = time.monotonic() - t0
            _log(
                f"{self.name}: stopped in {self.timings['stop']:.1f}s (poweroff {self.timings.get('poweroff', 0):.1f}s)"
            )

    # -- internals ---------------------------------------------------------------

    def _save_meta(self, **extra: Any) -> None:
        meta = _host_meta(self.state_dir)
        meta.update(
            name=self.name,
            ip=self.ip,
            bridge=self.bridge,
            root=str(self.root),
            systemd_pid1=self.systemd_pid1,
            **extra,
        )
        _write_json(self.state_dir / "host.json", meta)

    def _configure_root(self) -> None:
        r = self.root
        for line in (r / "etc/os-release").read_text().splitlines():
            k, _, v = line.partition("=")
            if k:
                self.os_release[k] = v.strip('"')
        self._write("etc/hostname", self.name + "\n")
        self._write(
            "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {self.name}\n::1 localhost ip6-localhost ip6-loopback\n"
        )
        self._write("etc/machine-id", uuid.uuid4().hex + "\n")
        # fresh host keys (box's ssh-keygen writes into the tree)
        for old in (r / "etc/ssh").glob("ssh_host_*"):
            old.unlink()
        _run(["ssh-keygen", "-A", "-f", r])
        # the user's key, kept in the state dir
        _run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"{SSH_USER}@{self.name}",
                "-f",
                self.key,
            ]
        )
        os.chmod(self.key, 0o600)
        uid, gid = self._passwd_ids(SSH_USER)
        ssh_dir = r / "home" / SSH_USER / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        auth = self._write(f"home/{SSH_USER}/.ssh/authorized_keys", Path(f"{self.key}.pub").read_text())
        os.chmod(auth, 0o600)
        os.chmod(ssh_dir, 0o700)
        os.chown(ssh_dir, uid, gid)
        os.chown(auth, uid, gid)
        self._write(
            "etc/systemd/network/10-host0.network",
            "[Match]\nName=host0\n\n[Network]\n"
            f"Address={self.ip}/{self.net.prefixlen}\nGateway={self.bridge_ip}\n"
            "LinkLocalAddressing=no\nIPv6AcceptRA=no\n",
        )
        self._write(
            "etc/apt/apt.conf.d/01testhost-proxy",
            f'Acquire::http::Proxy "{self.proxy_url}";\n'
            f'Acquire::https::Proxy "{self.proxy_url}";\n'
            f'Acquire::http::Proxy::{self.bridge_ip} "DIRECT";\n'
            f'Acquire::https::Proxy::{self.bridge_ip} "DIRECT";\n',
        )

    def _prepare_for_docker(self) -> None:
        """Test-only: a oneshot unit that makes the cgroup v1 controllers writable for Docker.

        nspawn mounts the controllers read-only, and runc then fails with
        `mkdir /sys/fs/cgroup/cpuset/docker: read-only file system`. A real machine needs
        none of this, so it lives here and never in a role.
        """
        script = self._write("usr/local/sbin/testhost-cgroup-rw", _CGROUP_RW_SCRIPT)
        os.chmod(script, 0o755)
        self._write("etc/systemd/system/testhost-cgroup-rw.service", _CGROUP_RW_UNIT)
        wants = self.root / "etc/systemd/system/multi-user.target.wants/testhost-cgroup-rw.service"
        wants.parent.mkdir(parents=True, exist_ok=True)
        if wants.is_symlink() or wants.exists():
            wants.unlink()
        wants.symlink_to("/etc/systemd/system/testhost-cgroup-rw.service")

    def _write(self, rel: str, text: str) -> Path:
        """Write a file inside the tree without following symlinks out of it."""
        path = self.root / rel
        root = self.root.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        parent = path.parent.resolve()
        if parent != root and root not in parent.parents:
            raise TestHostError(f"{rel}: parent directory leads out of {root}")
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
        return path

    def _passwd_ids(self, user: str) -> tuple[int, int]:
        for line in (self.root / "etc/passwd").read_text().splitlines():
            f = line.split(":")
            if f[0] == user:
                return int(f[2]), int(f[3])
        raise TestHostError(f"user {user} missing in the rootfs")

    def _boot(self) -> None:
        argv = [
            "systemd-nspawn",
            "-q",
            "-D",
            str(self.root),
            "-M",
            self.name,
            "--register=no",
            "--keep-unit",
            f"--network-bridge={self.bridge}",
            "--capability=all",
            "--console=read-only",
        ]
        if self.systemd_pid1:
            argv.append("-b")
        else:
            prefix = self.net.prefixlen
            script = (
                "set -e; ip link set lo up; ip link set host0 up; "
                f"ip addr add {self.ip}/{prefix} dev host0; "
                f"ip route add default via {self.bridge_ip}; "
                "mkdir -p -m 0755 /run/sshd; exec /usr/sbin/sshd -D -e"
            )
            argv += ["--as-pid2", "/bin/sh", "-c", script]
        env = dict(os.environ, SYSTEMD_SECCOMP="0")
        self._boot_t0 = time.monotonic()
        with open(self.console_log, "wb") as log:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        ref = _ProcRef.of(self._popen.pid)
        self._save_meta(nspawn=ref.to_json() if ref else None)
        _log(f"{self.name}: systemd-nspawn started (pid {self._popen.pid}, console: {self.console_log})")

    def _fail(self, what: str) -> TestHostError:
        return TestHostError(
            f"{self.name}: {what}\n--- nspawn console ({self.console_log}) ---\n{_tail(self.console_log)}"
        )

    def _wait_ready(self) -> None:
        assert self._popen is not None
        deadline = self._boot_t0 + self.boot_timeout
        last = ""
        while True:
            if self._popen.poll() is not None:
                raise self._fail(f"systemd-nspawn exited with rc={self._popen.returncode}")
            if time.monotonic() > deadline:
                raise self._fail(f"ssh not ready after {self.boot_timeout:.0f}s ({last})")
            if _port_open(self.ip, 22, self.bridge, timeout=1):
                proc = self.ssh("true", timeout=20)
                if proc.returncode == 0:
                    break
                last = proc.stderr.strip()
            time.sleep(0.3)
        self.timings["ssh_ready"] = time.monotonic() - self._boot_t0
        _log(f"{self.name}: ssh ready {self.timings['ssh_ready']:.1f}s after boot start")
        if not self.systemd_pid1:
            return
        left = max(10.0, deadline - time.monotonic())
        proc = self.ssh("systemctl is-system-running --wait", timeout=left + 10)
        state = proc.stdout.strip()
        self.timings["system_running"] = time.monotonic() - self._boot_t0
        if state not in ("running", "degraded"):
            failed = self.ssh("systemctl --failed --no-legend --plain", timeout=30)
            raise self._fail(f"system state {state!r} {proc.stderr.strip()}; failed units:\n{failed.stdout}")
        if state == "degraded":
            failed = self.ssh("systemctl --failed --no-legend --plain", timeout=30)
            _log(f"{self.name}: system degraded; failed units:\n{failed.stdout.strip()}")
        _log(f"{self.name}: system {state} {self.timings['system_running']:.1f}s after boot start")

    def _write_client_files(self) -> None:
        self.ssh_config.write_text(
            f"Host {self.name} {self.ip}\n"
            f"    HostName {self.ip}\n"
            f"    User {SSH_USER}\n"
            f"    Port 22\n"
            f"    IdentityFile {self.key}\n"
            f"    IdentitiesOnly yes\n"
            f"    StrictHostKeyChecking no\n"
            f"    UserKnownHostsFile /dev/null\n"
            f"    LogLevel ERROR\n"
            f"    BindInterface {self.bridge}\n"
            f"    BatchMode yes\n"
            f"    ConnectTimeout 10\n"
            f"    ServerAliveInterval 15\n"
        )
        write_inventory(self.inventory, [self], self.groups)


# ------------------------------------------------------------------------- admin


def down(name: str, cache_dir: Path, bridge: str = DEFAULT_BRIDGE) -> bool:
    """Stop host ``name`` (e.g. one started by ``up`` in another shell)."""
    cache_dir = Path(cache_dir).resolve()
    host_dir = _hosts_dir(cache_dir) / name
    if not host_dir.exists():
        _log(f"no host {name}")
        _release_shared(cache_dir, bridge, exclude=None)
        return False
    meta = _host_meta(host_dir)
    ctl = _ProcRef.from_json(meta.get("controller"))
    if ctl and ctl.alive() and ctl.pid != os.getpid():
        cmd = _proc_cmdline(ctl.pid)
        if any("testhost" in c for c in cmd) and "up" in cmd:
            _log(f"asking the `up` process (pid {ctl.pid}) to stop {name}")
            os.kill(ctl.pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while host_dir.exists() and time.monotonic() < deadline:
                time.sleep(0.3)
    if host_dir.exists():
        _force_stop_dir(host_dir)
    _release_shared(cache_dir, meta.get("bridge", bridge), exclude=None)
    _log(f"{name} is down")
    return True


def clean_all(cache_dir: Path, bridge: str = DEFAULT_BRIDGE, rootfs: bool = False) -> None:
    """Remove every host, the proxy and the bridge (and the rootfs cache if asked)."""
    cache_dir = Path(cache_dir).resolve()
    hosts = _hosts_dir(cache_dir)
    bridges = {bridge}
    if hosts.is_dir():
        for d in sorted(hosts.iterdir()):
            if d.name.startswith("."):
                _remove_tree(d)
            elif d.is_dir():
                bridges.add(_host_meta(d).get("bridge", bridge))
                down(d.name, cache_dir, bridge)
        _remove_tree(hosts)
    _remove_tree(cache_dir / "logs")
    with _flock(cache_dir / "testhost.lock"):
        _stop_proxy(cache_dir)
        for b in bridges:
            _delete_bridge(b)
        _remove_tree(cache_dir / "net")
    rootfs_dir = cache_dir / "rootfs"
    if rootfs_dir.is_dir():
        if rootfs:
            _remove_tree(rootfs_dir)
        else:
            _clean_stale_builds(rootfs_dir)
    _log("clean")


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the cached rootfs tarball")
    b.add_argument("--distro", choices=["ubuntu", "debian"])
    up = sub.add_parser("up", help="boot a host and keep it up until Ctrl-C")
    up.add_argument("name")
    up.add_argument("--index", type=int, default=1)
    up.add_argument("--no-systemd", action="store_true", help="sshd as the only process")
    up.add_argument("--docker-ready", action="store_true", help="cgroup v1 controllers writable for Docker")
    up.add_argument("--distro", choices=["ubuntu", "debian"])
    dn = sub.add_parser("down", help="stop a host")
    dn.add_argument("name")
    cl = sub.add_parser("clean", help="remove all hosts, the proxy and the bridge")
    cl.add_argument("--rootfs", action="store_true", help="also drop the rootfs cache")
    args = ap.parse_args(argv)
    cache_dir: Path = args.cache_dir

    if args.cmd == "build":
        ensure_apt_tools()
        print(build_rootfs(cache_dir, distro=args.distro))
    elif args.cmd == "up":
        stop = False

        def _on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        host = TestHost(
            args.name,
            cache_dir,
            index=args.index,
            systemd_pid1=not args.no_systemd,
            docker_ready=args.docker_ready,
            distro=args.distro,
        )
        with host:
            print(f"ip:         {host.ip}")
            print(f"ssh config: {host.ssh_config}   (ssh -F {host.ssh_config} {host.name})")
            print(f"inventory:  {host.inventory}")
            print("up; Ctrl-C (or `testhost.py down NAME`) to stop", flush=True)
            while not stop and host.running:
                time.sleep(0.5)
            if not host.running:
                _log(f"{host.name}: container exited\n{_tail(host.console_log)}")
    elif args.cmd == "down":
        down(args.name, cache_dir)
    elif args.cmd == "clean":
        clean_all(cache_dir, rootfs=args.rootfs)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
