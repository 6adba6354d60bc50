"""Process faults on the provisioned host: Triton SIGKILLed comes back without leftovers, and
the gateway's unit gives its drain time to finish.

The kill test leaves the stack as it found it (Triton and the gateway healthy) before the
next file's tests run; it waits at most TRITON_BACK_S for that.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import yaml

TRITON_BACK_S = 240  # the llm engine on SmolLM2 in a test host: well under a minute
GATEWAY_BACK_S = 60
STUB = "triton_python_backend_stub"
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}


def _seconds(span: str) -> float:
    """systemd's time span ("1min 30s", "30s", "infinity") in seconds."""
    if span.strip() == "infinity":
        return float("inf")
    parts = re.findall(r"([\d.]+)\s*(us|ms|min|s|h)", span)
    assert parts, f"not a systemd time span: {span!r}"
    return sum(float(n) * _UNITS[unit] for n, unit in parts)


def _prop(host: Any, unit: str, name: str) -> str:
    return str(host.check_output(f"systemctl show -P {name} {unit}")).strip()


def _stubs(host: Any) -> dict[int, int]:
    """pid → parent pid of every Python-backend stub on the host."""
    out = host.check_output("ps -eo pid=,ppid=,args=")
    stubs = {}
    for line in out.splitlines():
        pid, ppid, args = line.split(None, 2)
        if STUB in args.split()[0]:
            stubs[int(pid)] = int(ppid)
    return stubs


def _http_code(host: Any, url: str) -> str:
    return str(host.run(f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' {url}").stdout).strip()


def _wait(what: str, check: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)
    return time.monotonic() - t0


def test_triton_killed_comes_back_and_leaves_no_stub(host: Any, expect: dict[str, Any]) -> None:
    if expect.get("triton_runtime") == "container":
        pytest.skip("native runtime only: with the container runtime Triton runs in the image")
    unit = expect["triton_service"]
    ready_url = f"http://127.0.0.1:{expect['triton_ports'][0]}/v2/health/ready"
    assert _http_code(host, ready_url) == "200"
    pid = int(_prop(host, unit, "MainPID"))
    restarts = int(_prop(host, unit, "NRestarts"))
    assert pid > 0
    # python -m stack.triton_native execs tritonserver: the unit's main process is Triton itself.
    assert "tritonserver" in host.check_output(f"cat /proc/{pid}/comm")
    before = {stub for stub, parent in _stubs(host).items() if parent == pid}
    assert before, f"no {STUB} under tritonserver {pid}: {_stubs(host)}"

    host.check_output(f"kill -9 {pid}")

    def back() -> bool:
        new = _prop(host, unit, "MainPID")
        return new not in ("0", str(pid)) and _http_code(host, ready_url) == "200"

    took = _wait(f"{unit} restarted and ready", back, TRITON_BACK_S)
    assert int(_prop(host, unit, "NRestarts")) == restarts + 1, host.run(f"systemctl status {unit} --no-pager").stdout
    assert _prop(host, unit, "ActiveState") == "active"
    new_pid = int(_prop(host, unit, "MainPID"))
    stubs = _stubs(host)
    assert not before & set(stubs), f"stubs of the killed tritonserver survived: {before & set(stubs)}"
    assert all(parent == new_pid for parent in stubs.values()), f"stubs without their tritonserver: {stubs}"
    # The gateway reconnects by itself: healthy again without a restart of its own.
    health = f"http://127.0.0.1:{expect['gateway_port']}/health"
    gw = _wait("the gateway's /health 200 again", lambda: _http_code(host, health) == "200", GATEWAY_BACK_S)
    print(f"{unit}: back and ready {took:.1f} s after SIGKILL; gateway healthy {gw:.1f} s later")


def test_gateway_unit_outlasts_the_drain_and_restarts(host: Any, expect: dict[str, Any]) -> None:
    unit = expect["gateway_service"]
    config = yaml.safe_load(host.check_output(f"cat {expect['gateway_config_dir']}/gateway.yaml"))
    grace = float(config.get("shutdown_grace_s", 10.0))
    stop_timeout = _seconds(_prop(host, unit, "TimeoutStopUSec"))
    assert stop_timeout > grace, f"TimeoutStopSec {stop_timeout} s must exceed shutdown_grace_s {grace} s"
    assert _prop(host, unit, "Restart") == "on-failure"
