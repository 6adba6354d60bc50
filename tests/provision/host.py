"""The test host itself: a tree unpacked from the cached rootfs, configured (hostname,
machine-id, keys, network, apt proxy), booted with systemd-nspawn and reached over SSH;
its state under ``<cache>/hosts/<name>/``, and the reaping of hosts whose controlling
process died. Stdlib only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import ssh
from box import TestHostError, ensure_apt_tools, flock, log, read_json, run, tail, write_json
from network import (
    DEFAULT_BRIDGE,
    DEFAULT_SUBNET,
    PROXY_PORT,
    delete_bridge,
    ensure_bridge,
    ensure_proxy,
    link_exists,
    port_open,
    stop_proxy,
)
from procs import ProcRef, kill_rooted_at, proc_cmdline, proc_start_time, remove_tree, send_signal, wait_gone
from rootfs import build_rootfs, clean_stale_builds, unpack
from ssh import SSH_USER

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")


def hosts_dir(cache_dir: Path) -> Path:
    return cache_dir / "hosts"


def host_meta(host_dir: Path) -> dict[str, Any]:
    return read_json(host_dir / "host.json")


def _controller_alive(meta: dict[str, Any]) -> bool:
    ref = ProcRef.from_json(meta.get("controller"))
    return bool(ref and ref.alive())


def live_hosts(cache_dir: Path, *, exclude: str | None = None) -> list[str]:
    """Names of hosts whose controlling process is still alive."""
    hosts = hosts_dir(Path(cache_dir).resolve())
    if not hosts.is_dir():
        return []
    out = []
    for d in sorted(hosts.iterdir()):
        if d.name.startswith(".") or d.name == exclude or not d.is_dir():
            continue
        if _controller_alive(host_meta(d)):
            out.append(d.name)
    return out


def _other_machine(name: str, root: Path) -> str | None:
    """The root dir of a live systemd-nspawn that runs machine ``name`` from another tree."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = proc_cmdline(int(entry))
        if not argv or Path(argv[0]).name != "systemd-nspawn":
            continue
        opts = dict(itertools.pairwise(argv))
        if opts.get("-M") == name and opts.get("-D") != str(root):
            return opts.get("-D", "?")
    return None


def force_stop_dir(
    host_dir: Path,
    popen: subprocess.Popen[Any] | None = None,
    stop_timeout: float = 20.0,
) -> float:
    """Stop the container of ``host_dir`` (if any) and delete the directory.

    Returns the seconds the container took to stop.
    """
    meta = host_meta(host_dir)
    root = host_dir / "root"
    name = meta.get("name", host_dir.name)
    t0 = time.monotonic()
    ref = ProcRef.from_json(meta.get("nspawn"))
    if ref and ref.alive():
        send_signal(ref, signal.SIGTERM)  # nspawn -b: clean poweroff of the container
        if not wait_gone(ref, stop_timeout, popen):
            log(f"{name}: no clean poweroff within {stop_timeout:.0f}s; killing")
            send_signal(ref, signal.SIGKILL)
            kill_rooted_at(root)
            wait_gone(ref, 5, popen)
    elif popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=0.1)
    kill_rooted_at(root)
    stopped = time.monotonic() - t0
    console = host_dir / "console.log"
    if console.is_file():  # keep the last console log of each host for debugging
        logs = host_dir.parent.parent / "logs"
        logs.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(console, logs / f"{name}.console.log")
    # The veth and the propagate dir are named after the machine, box-wide: while another
    # checkout runs a host of the same name, they are its own and must stay.
    other = _other_machine(name, root)
    if other is not None:
        log(f"{name}: a machine of that name runs from {other}: leaving its veth and propagate dir")
    veth = f"vb-{name}"
    if other is None and len(veth) <= 15 and link_exists(veth):
        run(["ip", "link", "del", veth], check=False)
    # nspawn's leftovers on the box (its rm of them is refused when /run is no tmpfs)
    with contextlib.suppress(OSError):
        st = root.stat()
        lock = Path(f"/run/systemd/nspawn/locks/inode-{st.st_dev}:{st.st_ino}")
        lock.unlink(missing_ok=True)
    propagate = Path("/run/systemd/nspawn/propagate") / name
    if other is None and propagate.is_dir():
        remove_tree(propagate)
    # Move it aside first (atomic), so nobody sees a half-deleted host dir.
    trash = host_dir.with_name(f".trash-{host_dir.name}-{os.getpid()}")
    try:
        host_dir.rename(trash)
    except FileNotFoundError:
        return stopped
    except OSError:
        trash = host_dir
    remove_tree(trash)
    return stopped


def reap_stale(cache_dir: Path) -> None:
    """Clean hosts left over by crashed runs (their controller is gone)."""
    hosts = hosts_dir(cache_dir)
    if not hosts.is_dir():
        return
    for d in sorted(hosts.iterdir()):
        if d.name.startswith(".trash-"):
            m = re.search(r"-(\d+)$", d.name)
            if m and int(m.group(1)) != os.getpid() and proc_start_time(int(m.group(1))):
                continue
            log(f"removing leftover {d}")
            remove_tree(d)
            continue
        if not d.is_dir() or _controller_alive(host_meta(d)):
            continue
        log(f"cleaning up stale host {d.name} from a crashed run")
        force_stop_dir(d, stop_timeout=5)


def release_shared(cache_dir: Path, bridge: str, exclude: str | None) -> None:
    """Stop the proxy and delete the bridge when no other host uses them."""
    with flock(cache_dir / "testhost.lock"):
        others = live_hosts(cache_dir, exclude=exclude)
        if others:
            return
        stop_proxy(cache_dir)
        delete_bridge(bridge)


# ---------------------------------------------------------------------- TestHost

# docker_ready=True: make the read-only cgroup v1 controllers read-write before containerd
# and docker start. Only the mount's own ro flag needs flipping (`remount,bind,rw`); a plain
# `remount,rw` touches the shared superblock and fails at random with "mount point is busy".
# Fallback: unmount and mount the hierarchy afresh.
_CGROUP_RW_SCRIPT = r"""#!/bin/sh
# Written by tests/provision/host.py (docker_ready=True): test hosts only.
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
# Written by tests/provision/host.py (docker_ready=True): test hosts only.
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

        self.state_dir = hosts_dir(self.cache_dir) / name
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
        ref = ProcRef.from_json(host_meta(self.state_dir).get("nspawn"))
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
        return ssh.ssh(self.ssh_config, self.name, cmd, check=check, timeout=timeout, input=input)

    def inventory_line(self) -> str:
        return ssh.inventory_line(self.name, self.ip, self.key, self.bridge)

    def start(self) -> None:
        t_all = time.monotonic()
        if os.geteuid() != 0:
            raise TestHostError("TestHost needs root (debootstrap, nspawn, bridges)")
        ensure_apt_tools()
        tarball = build_rootfs(self.cache_dir, distro=self.distro)
        lock = self.cache_dir / "testhost.lock"
        with flock(lock):
            reap_stale(self.cache_dir)
            meta = host_meta(self.state_dir)
            if self.state_dir.exists() and _controller_alive(meta):
                raise TestHostError(
                    f"host {self.name} is already up (controller pid "
                    f"{meta['controller']['pid']}); run `testhost.py down {self.name}`"
                )
            elsewhere = _other_machine(self.name, self.root)
            if elsewhere is not None:
                raise TestHostError(
                    f"a machine named {self.name} already runs from {elsewhere} (another checkout?): "
                    "the veth name is box-wide, so wait for it or use other host names"
                )
            for other in live_hosts(self.cache_dir, exclude=self.name):
                if host_meta(hosts_dir(self.cache_dir) / other).get("ip") == self.ip:
                    raise TestHostError(f"{other} already uses {self.ip}; pick another index")
            if self.state_dir.exists():
                force_stop_dir(self.state_dir, stop_timeout=5)
            self.state_dir.mkdir(parents=True)
            me = ProcRef.of(os.getpid())
            assert me is not None
            self._save_meta(controller=me.to_json())
            self._registered = True
            ensure_bridge(self.bridge, self.net)
            ensure_proxy(self.cache_dir, self.bridge_ip, self.proxy_port, self.bridge)

        t0 = time.monotonic()
        self.root.mkdir()
        unpack(tarball, self.root)
        self.timings["unpack"] = time.monotonic() - t0
        self._configure_root()
        if self.docker_ready:
            self._prepare_for_docker()
        if self.extra_setup is not None:
            self.extra_setup(self.root)
        self.timings["configure"] = time.monotonic() - t0 - self.timings["unpack"]
        log(f"{self.name}: unpacked in {self.timings['unpack']:.1f}s, configured in {self.timings['configure']:.1f}s")

        self._boot()
        self._write_client_files()
        self._wait_ready()
        self.timings["total_up"] = time.monotonic() - t_all
        log(
            f"{self.name}: up at {self.ip} in {self.timings['total_up']:.1f}s "
            f"({self.os_release.get('PRETTY_NAME', '?')}, "
            f"systemd_pid1={self.systemd_pid1})"
        )

    def stop(self) -> None:
        """Power off, remove the root dir; drop bridge+proxy if no host is left."""
        if not self._registered and not self.state_dir.exists():
            return
        t0 = time.monotonic()
        meta = host_meta(self.state_dir)
        mine = ProcRef.of(os.getpid())
        ours = mine is not None and meta.get("controller") == mine.to_json()
        if self.state_dir.exists() and (ours or self._registered):
            self.timings["poweroff"] = force_stop_dir(self.state_dir, self._popen, self.stop_timeout)
        self._popen = None
        if self._registered:
            self._registered = False
            release_shared(self.cache_dir, self.bridge, exclude=self.name)
            self.timings["stop"] = time.monotonic() - t0
            log(
                f"{self.name}: stopped in {self.timings['stop']:.1f}s (poweroff {self.timings.get('poweroff', 0):.1f}s)"
            )

    # -- internals ---------------------------------------------------------------

    def _save_meta(self, **extra: Any) -> None:
        meta = host_meta(self.state_dir)
        meta.update(
            name=self.name,
            ip=self.ip,
            bridge=self.bridge,
            root=str(self.root),
            systemd_pid1=self.systemd_pid1,
            **extra,
        )
        write_json(self.state_dir / "host.json", meta)

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
        ssh.new_host_keys(r)
        ssh.new_user_key(self.key, f"{SSH_USER}@{self.name}")  # kept in the state dir
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
        with open(self.console_log, "wb") as console:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        ref = ProcRef.of(self._popen.pid)
        self._save_meta(nspawn=ref.to_json() if ref else None)
        log(f"{self.name}: systemd-nspawn started (pid {self._popen.pid}, console: {self.console_log})")

    def _fail(self, what: str) -> TestHostError:
        return TestHostError(
            f"{self.name}: {what}\n--- nspawn console ({self.console_log}) ---\n{tail(self.console_log)}"
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
            if port_open(self.ip, 22, self.bridge, timeout=1):
                proc = self.ssh("true", timeout=20)
                if proc.returncode == 0:
                    break
                last = proc.stderr.strip()
            time.sleep(0.3)
        self.timings["ssh_ready"] = time.monotonic() - self._boot_t0
        log(f"{self.name}: ssh ready {self.timings['ssh_ready']:.1f}s after boot start")
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
            log(f"{self.name}: system degraded; failed units:\n{failed.stdout.strip()}")
        log(f"{self.name}: system {state} {self.timings['system_running']:.1f}s after boot start")

    def _write_client_files(self) -> None:
        ssh.write_ssh_config(self.ssh_config, self.name, self.ip, self.key, self.bridge)
        ssh.write_inventory(self.inventory, [self], self.groups)


# ------------------------------------------------------------------------- admin


def down(name: str, cache_dir: Path, bridge: str = DEFAULT_BRIDGE) -> bool:
    """Stop host ``name`` (e.g. one started by ``up`` in another shell)."""
    cache_dir = Path(cache_dir).resolve()
    host_dir = hosts_dir(cache_dir) / name
    if not host_dir.exists():
        log(f"no host {name}")
        release_shared(cache_dir, bridge, exclude=None)
        return False
    meta = host_meta(host_dir)
    ctl = ProcRef.from_json(meta.get("controller"))
    if ctl and ctl.alive() and ctl.pid != os.getpid():
        cmd = proc_cmdline(ctl.pid)
        if any("testhost" in c for c in cmd) and "up" in cmd:
            log(f"asking the `up` process (pid {ctl.pid}) to stop {name}")
            os.kill(ctl.pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while host_dir.exists() and time.monotonic() < deadline:
                time.sleep(0.3)
    if host_dir.exists():
        force_stop_dir(host_dir)
    release_shared(cache_dir, meta.get("bridge", bridge), exclude=None)
    log(f"{name} is down")
    return True


def clean_all(cache_dir: Path, bridge: str = DEFAULT_BRIDGE, rootfs: bool = False) -> None:
    """Remove every host, the proxy and the bridge (and the rootfs cache if asked)."""
    cache_dir = Path(cache_dir).resolve()
    hosts = hosts_dir(cache_dir)
    bridges = {bridge}
    if hosts.is_dir():
        for d in sorted(hosts.iterdir()):
            if d.name.startswith("."):
                remove_tree(d)
            elif d.is_dir():
                bridges.add(host_meta(d).get("bridge", bridge))
                down(d.name, cache_dir, bridge)
        remove_tree(hosts)
    remove_tree(cache_dir / "logs")
    with flock(cache_dir / "testhost.lock"):
        stop_proxy(cache_dir)
        for b in bridges:
            delete_bridge(b)
        remove_tree(cache_dir / "net")
    rootfs_dir = cache_dir / "rootfs"
    if rootfs_dir.is_dir():
        if rootfs:
            remove_tree(rootfs_dir)
        else:
            clean_stale_builds(rootfs_dir)
    log("clean")
