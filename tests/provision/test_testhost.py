"""The test-host tool itself: boot real hosts with systemd-nspawn and tear them down.

Needs root, systemd-nspawn and debootstrap (installed on demand) and a package
archive for the first rootfs build; skips with the reason where that is impossible.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testhost as th
from host import host_meta
from network import listening
from procs import ProcRef, mounts_under, pids_rooted_at

pytestmark = pytest.mark.provision


@pytest.fixture(scope="module")
def cache_dir() -> Iterator[Path]:
    reason = th.skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        th.ensure_apt_tools()
    except th.TestHostError as exc:
        pytest.skip(f"cannot install debootstrap/systemd-container: {exc}")
    if not shutil.which("systemd-nspawn"):
        pytest.skip("systemd-nspawn is not available")
    probe = "tkprobe0"
    proc = subprocess.run(
        ["ip", "link", "add", probe, "type", "bridge"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot create network bridges: {proc.stderr.strip()}")
    subprocess.run(["ip", "link", "del", probe], check=False)
    cache = th.default_cache_dir()
    try:
        th.build_rootfs(cache)
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(f"no package archive reachable for the rootfs: {exc}")
    yield cache


def _nspawn_ref(host: th.TestHost) -> ProcRef:
    ref = ProcRef.from_json(host_meta(host.state_dir).get("nspawn"))
    assert ref is not None and ref.alive(), "nspawn is not running"
    return ref


def _assert_cleaned_up(host: th.TestHost, nspawn: ProcRef, cache: Path) -> None:
    assert not host.root.exists(), f"{host.root} left behind"
    assert not host.state_dir.exists(), f"{host.state_dir} left behind"
    assert not nspawn.alive(), f"systemd-nspawn (pid {nspawn.pid}) still running"
    assert not mounts_under(host.state_dir)
    if not th.live_hosts(cache):
        assert not Path(f"/sys/class/net/{host.bridge}").exists(), "bridge left behind"
        assert not listening(host.bridge_ip, th.PROXY_PORT), "proxy left behind"


def test_boots_with_systemd_as_pid1(cache_dir: Path) -> None:
    host = th.TestHost("pt-sysd", cache_dir, index=21)
    with host:
        nspawn = _nspawn_ref(host)
        assert host.ssh("ps -p 1 -o comm=", check=True).stdout.strip() == "systemd"
        state = host.ssh("systemctl is-system-running").stdout.strip()
        assert state in ("running", "degraded")
        assert host.ssh("sudo -n true").returncode == 0
        upd = host.ssh("sudo apt-get update", timeout=600)
        assert upd.returncode == 0, upd.stdout[-3000:] + upd.stderr[-3000:]
        assert "Err:" not in upd.stdout, upd.stdout[-3000:]
        # the client files work on their own
        plain = subprocess.run(
            ["ssh", "-F", str(host.ssh_config), host.name, "hostname"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert plain.stdout.strip() == host.name, plain.stderr
        assert host.key.stat().st_mode & 0o777 == 0o600
        inv = host.inventory.read_text()
        for item in (
            f"ansible_host={host.ip}",
            "ansible_user=tester",
            f"ansible_ssh_private_key_file={host.key}",
            "ansible_ssh_common_args=",
            "ansible_python_interpreter=/usr/bin/python3",
        ):
            assert item in inv
    _assert_cleaned_up(host, nspawn, cache_dir)
    print(f"timings: {host.timings}")


def test_without_systemd_as_pid1(cache_dir: Path) -> None:
    host = th.TestHost("pt-nosysd", cache_dir, index=22, systemd_pid1=False)
    with host:
        nspawn = _nspawn_ref(host)
        pid1 = host.ssh("ps -p 1 -o comm=", check=True).stdout.strip()
        assert pid1 and pid1 != "systemd"
        assert host.ssh("sudo -n true").returncode == 0
    _assert_cleaned_up(host, nspawn, cache_dir)
    print(f"timings: {host.timings}")


def test_failed_boot_is_cleaned_up(cache_dir: Path) -> None:
    def no_sshd(root: Path) -> None:
        (root / "etc/ssh/sshd_not_to_be_run").write_text("")

    host = th.TestHost("pt-fail", cache_dir, index=23, extra_setup=no_sshd, boot_timeout=15)
    with pytest.raises(th.TestHostError, match="nspawn console") as err, host:
        pass
    assert "ssh not ready" in str(err.value)
    assert not host.root.exists()
    assert not host.state_dir.exists()
    assert not pids_rooted_at(host.root)
