"""Rootfs tarballs of the test hosts: debootstrap of Ubuntu 24.04 (noble) with a verified
``ubuntu-keyring``, Debian 12 (bookworm) as the fallback, cached as
``<cache>/rootfs/<distro>-<suite>-<key>.tar[.zst|.gz]``. Stdlib only.

The key hashes the suite, the package list, the setup script, the apt sources and
``SCRIPT_VERSION``: whatever changes one of them forces a slow rebuild (CI keeps the cache),
so touch them only to change what is inside the tarball.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from box import TestHostError, ensure_apt_tools, flock, log, run, tail
from procs import proc_start_time, remove_tree, unmount_under

# Bump when anything below changes what ends up inside the rootfs tarball.
SCRIPT_VERSION = "1"

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

# Packing and unpacking: owners by number (the box's names differ) and xattrs (file capabilities).
_TAR = ("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*")

UBUNTU_SUITE = "noble"
DEBIAN_SUITE = "bookworm"


def _env_mirror(name: str, default: str) -> str:
    return os.environ.get(name, default).rstrip("/")


UBUNTU_MIRROR = _env_mirror("TESTHOST_UBUNTU_MIRROR", "http://archive.ubuntu.com/ubuntu")
UBUNTU_SECURITY_MIRROR = _env_mirror("TESTHOST_UBUNTU_SECURITY_MIRROR", "http://security.ubuntu.com/ubuntu")
UBUNTU_PORTS_MIRROR = _env_mirror("TESTHOST_UBUNTU_PORTS_MIRROR", "http://ports.ubuntu.com/ubuntu-ports")


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
    return run(["dpkg", "--print-architecture"]).stdout.strip()


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
    run(["dpkg-deb", "-x", deb_path, extract])
    keyring = extract / "usr/share/keyrings/ubuntu-archive-keyring.gpg"
    if not keyring.is_file():
        raise TestHostError(f"no ubuntu-archive-keyring.gpg in {entry['Filename']}")
    # InRelease must be signed by that keyring and must list the Packages.xz we used.
    (workdir / "InRelease").write_bytes(inrelease)
    run(["gpgv", "--keyring", keyring, workdir / "InRelease"])
    want = hashlib.sha256(packages_xz).hexdigest()
    if not re.search(
        rf"^\s*{want}\s+\d+\s+{re.escape(rel_path)}\s*$",
        inrelease.decode("utf-8", "replace"),
        re.MULTILINE,
    ):
        raise TestHostError("Packages.xz sha256 not listed in the signed InRelease")
    log(f"ubuntu-keyring {entry.get('Version', '?')} verified (sha256 {got[:16]}...)")
    return keyring


def _ubuntu_reachable(distro: _Distro) -> bool:
    try:
        _fetch(f"{distro.mirror}/dists/{distro.suite}/Release", timeout=15)
    except (urllib.error.URLError, OSError) as exc:
        log(f"Ubuntu archive {distro.mirror} unreachable: {exc}")
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


def clean_stale_builds(rootfs_dir: Path) -> None:
    for p in rootfs_dir.glob(".build-*"):
        m = re.search(r"-(\d+)$", p.name)
        if m and proc_start_time(int(m.group(1))) is not None and int(m.group(1)) != os.getpid():
            continue  # another live builder
        log(f"removing stale build dir {p}")
        remove_tree(p)


def _build(distro: _Distro, rootfs_dir: Path) -> Path:
    ext, tar_flags = _compressor()
    final = rootfs_dir / f"{distro.stem()}{ext}"
    build_dir = rootfs_dir / f".build-{distro.stem()}-{os.getpid()}"
    remove_tree(build_dir)
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
        log(f"debootstrap {distro.name} {distro.suite} from {distro.mirror} (log: {log_path}) ...")
        t0 = time.monotonic()
        with open(log_path, "w") as out:
            rc = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            ).returncode
        if rc != 0:
            raise TestHostError(f"debootstrap failed (rc={rc}):\n{tail(log_path)}")
        log(f"debootstrap done in {time.monotonic() - t0:.1f}s")
        unmount_under(root)  # debootstrap may leave proc/sys mounted on failure paths

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
        run(["chroot", root, "/bin/sh", "-c", _ROOTFS_SETUP], env=env, timeout=300)
        unmount_under(root)
        (root / "etc/testhost-release").write_text(
            f"DISTRO={distro.name}\nSUITE={distro.suite}\nKEY={distro.key()}\nSCRIPT_VERSION={SCRIPT_VERSION}\n"
        )
        log(f"rootfs configured in {time.monotonic() - t0:.1f}s")

        t0 = time.monotonic()
        tmp_tar = build_dir / f"rootfs{ext}"
        run([*_TAR, *tar_flags, "-C", root, "-cf", tmp_tar, "."], timeout=900)
        os.chmod(tmp_tar, 0o644)
        os.replace(tmp_tar, final)  # atomic: same filesystem
        size = final.stat().st_size / 2**20
        log(f"tarball {final.name} ({size:.0f} MiB) written in {time.monotonic() - t0:.1f}s")
    finally:
        remove_tree(build_dir)
    log(f"rootfs {distro.name} {distro.suite} built in {time.monotonic() - t_all:.1f}s")
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
    with flock(rootfs_dir / ".build.lock"):
        candidates = []
        if distro in (None, "ubuntu"):
            candidates.append(_ubuntu_distro())
        if distro in (None, "debian"):
            candidates.append(_debian_distro())
        for cand in candidates:
            cached = _find_cached(rootfs_dir, cand.stem())
            if cached and (cand.name == "ubuntu" or distro == "debian"):
                log(f"using cached rootfs {cached.name}")
                return cached
        ensure_apt_tools()
        clean_stale_builds(rootfs_dir)
        for cand in candidates:
            if cand.name == "ubuntu" and not _ubuntu_reachable(cand):
                if distro == "ubuntu":
                    raise TestHostError("Ubuntu's archive is unreachable")
                log("falling back to Debian 12 (bookworm)")
                continue
            cached = _find_cached(rootfs_dir, cand.stem())
            if cached:
                log(f"using cached rootfs {cached.name}")
                return cached
            log(f"building {cand.name} {cand.suite} rootfs")
            built = _build(cand, rootfs_dir)
            for old in rootfs_dir.glob(f"{cand.name}-{cand.suite}-*"):
                if not old.name.startswith(cand.stem()):
                    log(f"removing outdated {old.name}")
                    old.unlink(missing_ok=True)
            return built
    raise TestHostError("no rootfs could be built")


def unpack(tarball: Path, dest: Path) -> None:
    """Unpack a rootfs tarball (any of the cached compressions) into the existing ``dest``."""
    dec = {".zst": ["-I", "zstd -d -T0"], ".gz": ["-z"]}.get(tarball.suffix, [])
    run([*_TAR, *dec, "-C", dest, "-xpf", tarball], timeout=600)
