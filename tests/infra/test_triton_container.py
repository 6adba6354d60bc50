"""Triton's `container` runtime, seen from inside the host: unit, container, mounts, ports, limits.

Runs only when the expectation file (STACK_INFRA_EXPECT) says ``"triton_runtime": "container"``
(tests/provision/test_gpu_profile.py writes one); other hosts run the native runtime
and every test here is skipped with that reason. Expected keys besides tests/infra/conftest.py's
defaults: ``triton_image`` (the reference the container must run), ``triton_memlock`` ("-1" or
bytes), ``triton_shm_size`` (e.g. "2g").
"""

from __future__ import annotations

import json
from typing import Any

import pytest

_SIZES = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


@pytest.fixture(autouse=True)
def _container_runtime_only(expect: dict[str, Any]) -> None:
    if expect.get("triton_runtime") != "container":
        reason = "the host runs Triton natively (STACK_INFRA_EXPECT has no triton_runtime=container)"
        print(f"skipping tests/infra/test_triton_container.py: {reason}")
        pytest.skip(reason)


@pytest.fixture()
def container(host: Any, expect: dict[str, Any]) -> dict[str, Any]:
    out = host.check_output(f"docker inspect {expect['triton_service']}")
    data: dict[str, Any] = json.loads(out)[0]
    return data


def test_unit_runs_docker_in_the_foreground_and_restarts(host: Any, expect: dict[str, Any]) -> None:
    svc = host.service(expect["triton_service"])
    assert svc.is_running and svc.is_enabled
    props = dict(
        line.split("=", 1)
        for line in host.check_output(
            f"systemctl show {expect['triton_service']} -p Restart -p Requires -p ExecStart -p ExecStop"
        ).splitlines()
    )
    assert props["Restart"] == "on-failure"
    assert "docker.service" in props["Requires"]
    assert "docker run --rm --name" in props["ExecStart"]
    assert "docker stop" in props["ExecStop"]
    # The unit's main process is the docker client; Triton runs in the container.
    pid = host.check_output(f"systemctl show -P MainPID {expect['triton_service']}")
    assert "docker" in host.check_output(f"ps -o comm= -p {pid}")


def test_container_runs_the_expected_image(container: dict[str, Any], expect: dict[str, Any]) -> None:
    assert container["State"]["Running"] is True
    assert container["Config"]["Image"] == expect["triton_image"]
    assert container["HostConfig"]["Privileged"] is False
    assert container["HostConfig"]["AutoRemove"] is True
    assert container["Path"] == "/opt/tritonserver/bin/tritonserver"
    assert f"--model-repository={expect['install_dir']}/model_repository" in container["Args"]


def test_mounts_are_read_only_and_at_the_same_paths(container: dict[str, Any], expect: dict[str, Any]) -> None:
    mounts = {m["Destination"]: m for m in container["Mounts"]}
    for path in (f"{expect['install_dir']}/model_repository", expect["venv"], "/var/lib/llm-stack"):
        assert path in mounts, f"{path} is not mounted: {sorted(mounts)}"
    for dest, m in mounts.items():
        assert m["Type"] == "bind" and m["Source"] == dest and m["RW"] is False, m


def test_ports_bound_to_loopback_only(host: Any, container: dict[str, Any], expect: dict[str, Any]) -> None:
    bindings = container["HostConfig"]["PortBindings"]
    published = {int(b["HostPort"]): b["HostIp"] for v in bindings.values() for b in v}
    assert published == {port: "127.0.0.1" for port in expect["triton_ports"]}, bindings
    for port in expect["triton_ports"]:
        out = host.check_output(f"ss -Hltn 'sport = :{port}'")
        addrs = [line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()]
        assert addrs and set(addrs) <= {"127.0.0.1"}, f"port {port} listens on {addrs}"


def test_memlock_and_stack_ulimits(host: Any, container: dict[str, Any], expect: dict[str, Any]) -> None:
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in container["HostConfig"]["Ulimits"] or []}
    memlock = int(expect.get("triton_memlock", "-1"))
    assert ulimits.get("memlock") == (memlock, memlock), ulimits
    assert ulimits.get("stack") == (67108864, 67108864), ulimits
    # As Triton sees it (its PID 1 in the container).
    limits = host.check_output(f"docker exec {expect['triton_service']} cat /proc/1/limits")
    line = next(row for row in limits.splitlines() if row.startswith("Max locked memory"))
    assert line.split()[3] == ("unlimited" if memlock == -1 else str(memlock)), line


def test_shm_size(host: Any, container: dict[str, Any], expect: dict[str, Any]) -> None:
    size = expect.get("triton_shm_size", "2g").lower()
    want = int(size.rstrip("bkmg")) * _SIZES[size[-1] if size[-1] in "bkmg" else ""]
    assert container["HostConfig"]["ShmSize"] == want
    shm = host.check_output(f"docker exec {expect['triton_service']} df -B1 --output=size /dev/shm").split()[-1]
    assert int(shm) == want


def test_triton_ready_endpoints(host: Any, expect: dict[str, Any]) -> None:
    base = f"http://127.0.0.1:{expect['triton_ports'][0]}"
    for path in ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in expect["models"])]:
        code = host.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' {base}{path}")
        assert code == "200", f"{path} -> {code}"


def test_gpus_requested_as_configured(container: dict[str, Any], expect: dict[str, Any]) -> None:
    """`--gpus all` becomes a device request for every GPU (count -1) with the gpu capability."""
    requests = container["HostConfig"].get("DeviceRequests") or []
    if expect.get("triton_gpus", "") == "all":
        assert [(r["Count"], r["Capabilities"]) for r in requests] == [(-1, [["gpu"]])], requests
    else:
        assert requests == [], requests
