"""The test hosts' private network: a bridge on the box and an HTTP proxy (proxy.py) on the
bridge address, the hosts' only way out. Both are shared by every host of one cache dir;
``host.release_shared`` removes them with the last host. Stdlib only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from box import TestHostError, log, read_json, run, tail, write_json
from procs import ProcRef, wait_gone

# Overridable so that separate checkouts (each with its own TESTHOST_CACHE) can run test hosts
# at the same time on one machine without sharing a bridge or proxy.
DEFAULT_BRIDGE = os.environ.get("TESTHOST_BRIDGE", "tkbr0")
DEFAULT_SUBNET = os.environ.get("TESTHOST_SUBNET", "10.213.7.0/24")
PROXY_PORT = 3128


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def ensure_bridge(bridge: str, net: ipaddress.IPv4Network) -> None:
    addr = f"{net.network_address + 1}/{net.prefixlen}"
    # The subnet must belong to nothing but our bridge.
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
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
    if link_exists(bridge):
        if not Path(f"/sys/class/net/{bridge}/bridge").exists():
            raise TestHostError(f"{bridge} exists but is not a bridge")
    else:
        log(f"creating bridge {bridge} {addr}")
        run(["ip", "link", "add", bridge, "type", "bridge"])
    info = json.loads(run(["ip", "-j", "addr", "show", "dev", bridge]).stdout)[0]
    have = {f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", []) if a.get("family") == "inet"}
    for stale in have - {addr}:
        run(["ip", "addr", "del", stale, "dev", bridge], check=False)
    if addr not in have:
        run(["ip", "addr", "add", addr, "dev", bridge])
    with contextlib.suppress(OSError):  # IPv4 only: no IPv6 chatter on the bridge
        Path(f"/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6").write_text("1\n")
    run(["ip", "link", "set", bridge, "up"])


def delete_bridge(bridge: str) -> None:
    if link_exists(bridge):
        log(f"deleting bridge {bridge}")
        run(["ip", "link", "del", bridge], check=False)


def port_open(host: str, port: int, device: str, timeout: float = 1.0) -> bool:
    """TCP connect to host:port, only ever through ``device`` (never the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            sock.settimeout(timeout)
            sock.connect((host, port))
        except OSError:
            return False
    return True


def listening(ip: str, port: int) -> bool:
    """Whether a local TCP socket listens on ip:port (reads /proc, sends nothing)."""
    want = f"{int.from_bytes(socket.inet_aton(ip), 'little'):08X}:{port:04X}"
    any_ = f"00000000:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(f[1] in (want, any_) and f[3] == "0A" for f in (ln.split() for ln in lines))


# ---------------------------------------------------------------------- the proxy


def _ensure_proxy_installed() -> None:
    try:
        importlib.metadata.version("proxy.py")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    t0 = time.monotonic()
    log(f"installing proxy.py into {sys.prefix} ...")
    run([sys.executable, "-m", "pip", "install", "-q", "proxy.py"], timeout=300)
    log(f"proxy.py installed in {time.monotonic() - t0:.1f}s")


def _proxy_state(cache_dir: Path) -> Path:
    return cache_dir / "net" / "proxy.json"


def ensure_proxy(cache_dir: Path, ip: str, port: int, bridge: str) -> None:
    state_path = _proxy_state(cache_dir)
    state = read_json(state_path)
    ref = ProcRef.from_json(state.get("proc"))
    if ref and ref.alive():
        if state.get("listen") == f"{ip}:{port}" and port_open(ip, port, bridge):
            return
        log("proxy from an earlier run is not serving; restarting it")
        stop_proxy(cache_dir)
    elif listening(ip, port):
        log(f"something already listens on {ip}:{port}; using it as the proxy")
        return
    _ensure_proxy_installed()
    log_path = state_path.with_name("proxy.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "ab") as out:
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
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(state_path.parent),
        )
    new = ProcRef.of(proc.pid)
    if new is None:
        raise TestHostError(f"proxy exited at once:\n{tail(log_path)}")
    write_json(state_path, {"proc": new.to_json(), "listen": f"{ip}:{port}"})
    deadline = time.monotonic() + 30
    while not port_open(ip, port, bridge):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_proxy(cache_dir)
            raise TestHostError(f"proxy did not start on {ip}:{port}:\n{tail(log_path)}")
        time.sleep(0.2)
    log(f"proxy.py listening on {ip}:{port} (pid {proc.pid}, {time.monotonic() - t0:.1f}s)")


def stop_proxy(cache_dir: Path) -> None:
    state_path = _proxy_state(cache_dir)
    ref = ProcRef.from_json(read_json(state_path).get("proc"))
    if ref and ref.alive():
        log(f"stopping proxy (pid {ref.pid})")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ref.pid, signal.SIGTERM)
        if not wait_gone(ref, 10, None):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(ref.pid, signal.SIGKILL)
            wait_gone(ref, 5, None)
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()
