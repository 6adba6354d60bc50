"""Addresses and ports on this machine."""

from __future__ import annotations

import socket

# Addresses that mean "every interface": a server bound there is reached on loopback.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def probe_host(bind_host: str) -> str:
    """Where a client on this machine reaches a server bound to ``bind_host``."""
    return "127.0.0.1" if bind_host in WILDCARD_HOSTS else bind_host


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((probe_host(host), port)) == 0
