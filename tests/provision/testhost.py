#!/usr/bin/env python3
"""Fresh Ubuntu 24.04 test hosts for provisioning tests.

A test host is a debootstrapped rootfs booted by ``systemd-nspawn -b`` (systemd as
PID 1) on a private bridge, reached over SSH like a new machine. apt inside the host
goes through an HTTP proxy (proxy.py) listening on the bridge address; the host has
no other route out.

This module is the CLI and the public API; the work is done beside it, one job a module:
``rootfs.py`` (debootstrap, keyring, tarball cache), ``network.py`` (bridge, proxy),
``host.py`` (TestHost, boot, reaping of stale hosts), ``ssh.py`` (keys, ssh config,
inventory), ``procs.py`` (processes and mounts from /proc), ``box.py`` (commands, logs,
locks, state files, the box's apt tools).

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
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from box import TestHostError, default_cache_dir, ensure_apt_tools, log, skip_reason, tail
from host import TestHost, clean_all, down, live_hosts
from network import DEFAULT_BRIDGE, DEFAULT_SUBNET, PROXY_PORT
from rootfs import build_rootfs
from ssh import SSH_USER, write_inventory

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_SUBNET",
    "PROXY_PORT",
    "SSH_USER",
    "TestHost",
    "TestHostError",
    "build_rootfs",
    "clean_all",
    "default_cache_dir",
    "down",
    "ensure_apt_tools",
    "live_hosts",
    "skip_reason",
    "write_inventory",
]


def _up(args: argparse.Namespace) -> None:
    """Boot a host and keep it up until SIGINT/SIGTERM (``down`` sends the latter)."""
    stop = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    host = TestHost(
        args.name,
        args.cache_dir,
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
            log(f"{host.name}: container exited\n{tail(host.console_log)}")


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
        _up(args)
    elif args.cmd == "down":
        down(args.name, cache_dir)
    elif args.cmd == "clean":
        clean_all(cache_dir, rootfs=args.rootfs)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
