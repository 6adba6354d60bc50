"""playbooks/site.yml against fresh Ubuntu 24.04 hosts booted by testhost.py (systemd-nspawn).

Two hosts:

* ``prov-nosysd`` (PID 1 is not systemd): bad variables fail at validation before any
  change; without systemd the play stops before any change; with WSL forced it writes
  /etc/wsl.conf (systemd=true) and stops with the `wsl --shutdown` message.
* ``prov-main`` (systemd as PID 1), the CPU profile, packages from a wheelhouse: a first run
  interrupted by Triton failing to start (its port is taken), a plain rerun that converges,
  a rerun with changed=0, --check --diff with changed=0, WSL forced on (wsl.conf merged, the
  play carries on), then the testinfra suite (tests/infra) over SSH.

The figures (seconds per step, task counts per run) are printed at the end of the session.
Needs root, systemd-nspawn and debootstrap (installed on demand), PyPI (once, for the
wheelhouse) and Ubuntu's archive (once, for the rootfs; apt inside the host goes through
testhost's proxy).
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.playbook import PlaybookRun

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testhost as th
import wheelhouse
from figures import FIGURES, Figure
from provisioning import (
    GROUPS,
    SNAPSHOT_IGNORE,
    TORCH_SPEC,
    WHEELHOUSE_ON_HOST,
    Ansible,
    assert_key_in_no_log,
    assert_no_changes,
    model_py_sha256,
    run_testinfra,
    stop_note,
    write_inventory_dir,
)

pytestmark = pytest.mark.provision

# Paths a failed validation or an early stop must leave untouched.
STACK_PATHS = (
    "/opt/llm-stack",
    "/var/lib/llm-stack",
    "/etc/llm-gateway",
    "/etc/systemd/system/llm-triton.service",
    "/etc/systemd/system/llm-gateway.service",
    "/etc/profile.d/wsl-lib-path.sh",
)
SEEDED_WSL_CONF = '[automount]\noptions = "metadata"\n\n[boot]\ncommand = echo booted\n'


def assert_untouched(host: th.TestHost, *, wsl_conf: str | None) -> None:
    """Nothing of the stack exists; /etc/wsl.conf is as given (None: absent)."""
    present = host.ssh(
        "for p in " + " ".join(STACK_PATHS) + "; do test -e $p && echo $p; done; getent passwd triton llm-gateway; true"
    ).stdout.split()
    assert present == [], f"changed by a run that should have changed nothing: {present}"
    conf = host.ssh("cat /etc/wsl.conf 2>/dev/null || echo ABSENT").stdout
    assert conf.strip() == (wsl_conf if wsl_conf is not None else "ABSENT\n").strip()


def changed_since_marker(host: th.TestHost, marker: str) -> list[str]:
    """Files under /etc /opt /usr/local /srv /var/lib newer than ``marker`` (on the host)."""
    out = host.ssh(
        f"sudo find /etc /opt /usr/local /srv /var/lib -xdev -type f -newer {marker} "
        "! -path '/var/lib/sudo/*' ! -path '/var/lib/systemd/*' -print 2>/dev/null; true"
    ).stdout
    return sorted(out.split())


# --------------------------------------------------------------------------- a host without systemd


@pytest.fixture(scope="class")
def nosysd_host(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[th.TestHost]:
    t0 = time.monotonic()
    with th.TestHost("prov-nosysd", cache_dir, index=32, systemd_pid1=False, groups=GROUPS) as host:
        FIGURES.append(Figure("boot prov-nosysd (no systemd)", time.monotonic() - t0))
        host.inventory_dir = write_inventory_dir(  # type: ignore[attr-defined]
            tmp_path_factory.mktemp("inv-nosysd"),
            host,
            # stack_llm_engine llm: as on prov-main (no vLLM install on an offline test host).
            {"stack_profile": "cpu", "stack_llm_engine": "llm"},
        )
        host.ssh("sudo touch /root/.provision-marker && sleep 1", check=True)
        yield host
        t1 = time.monotonic()
    FIGURES.append(Figure("stop prov-nosysd", time.monotonic() - t1, note=stop_note(host)))


class TestStopsBeforeAnyChange:
    """A fresh host whose PID 1 is not systemd: every run here must stop before changes."""

    @pytest.fixture()
    def host(self, nosysd_host: th.TestHost) -> th.TestHost:
        return nosysd_host

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (
                "stack_gateway_port=abc",
                "argument 'stack_gateway_port' is of type .*str.* and we were unable to convert to int",
            ),
            ("stack_profile=quantum", "value of stack_profile must be one of: auto, cpu, gpu, got: quantum"),
            ("gateway_log_requests=maybe", "argument 'gateway_log_requests' is of type .*str.* to bool"),
            ("triton_ready_timeout=soon", "argument 'triton_ready_timeout' is of type .*str.* to int"),
            ("stack_triton_grpc_port=70000", "stack_triton_grpc_port must be a port number from 1 to 65535, got 70000"),
            ("stack_backend=vllm", "stack_backend=vllm runs in NVIDIA's Triton image: set stack_triton_runtime=con"),
        ],
        ids=["port-abc", "profile-unknown", "gateway-bool", "triton-int", "port-range", "backend-needs-container"],
    )
    def test_bad_variable_fails_at_validation(
        self, host: th.TestHost, ansible: Ansible, extra: str, message: str
    ) -> None:
        run = ansible.site(f"validate-{extra.split('=')[0]}", host, "-e", extra)
        assert run.returncode != 0, run.tail()
        assert re.search(message, run.stdout), run.tail()
        assert "Validate the variables of every role" in run.stdout
        # It stopped inside the validation play: no later play started.
        assert "PLAY [Prepare the host]" not in run.stdout, run.tail()
        assert run.counts().get("changed") == 0 and run.counts().get("failed") == 1, run.recap
        assert_untouched(host, wsl_conf=None)
        assert changed_since_marker(host, "/root/.provision-marker") == []

    def test_without_systemd_the_play_stops_before_any_change(self, host: th.TestHost, ansible: Ansible) -> None:
        run = ansible.site("no-systemd", host)
        assert run.returncode != 0
        assert "systemd is not PID 1 on this host" in run.stdout, run.tail()
        assert run.counts().get("changed") == 0, run.recap
        assert_untouched(host, wsl_conf=None)
        assert changed_since_marker(host, "/root/.provision-marker") == []

    def test_wsl_without_systemd_writes_wsl_conf_then_stops(self, host: th.TestHost, ansible: Ansible) -> None:
        run = ansible.site("no-systemd-wsl", host, "-e", "wsl_force=true")
        assert run.returncode != 0
        assert "wsl --shutdown" in run.stdout, run.tail()
        assert "systemd is not running as PID 1 in this WSL distribution" in run.stdout
        # The one change: /etc/wsl.conf. Nothing else.
        assert run.counts().get("changed") == 1, run.recap
        assert_untouched(host, wsl_conf="[boot]\nsystemd=true\n")
        assert changed_since_marker(host, "/root/.provision-marker") == ["/etc/wsl.conf"]


# --------------------------------------------------------------------------- the main host


@pytest.fixture(scope="class")
def main_host(cache_dir: Path, wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[th.TestHost]:
    def setup(root: Path) -> None:
        wheelhouse.link_into(wheels, root / WHEELHOUSE_ON_HOST.lstrip("/"))
        # A WSL settings file with other content: the wsl role must merge, not clobber.
        (root / "etc/wsl.conf").write_text(SEEDED_WSL_CONF)

    t0 = time.monotonic()
    with th.TestHost("prov-main", cache_dir, index=31, extra_setup=setup, groups=GROUPS) as host:
        FIGURES.append(Figure("boot prov-main (+ wheelhouse linked in)", time.monotonic() - t0))
        host.inventory_dir = write_inventory_dir(  # type: ignore[attr-defined]
            tmp_path_factory.mktemp("inv-main"),
            host,
            {
                "stack_profile": "cpu",
                # auto would pick vLLM's CPU engine here, which the triton role installs from
                # PyPI (about 1.5 GB): an offline host with a wheelhouse cannot. vLLM's engine
                # and template are exercised by the integration tests; these hosts serve llm.
                "stack_llm_engine": "llm",
                "python_env_wheelhouse": WHEELHOUSE_ON_HOST,
                "python_env_torch_spec": TORCH_SPEC,
            },
        )
        yield host
        t1 = time.monotonic()
    FIGURES.append(Figure("stop prov-main", time.monotonic() - t1, note=stop_note(host)))


@pytest.fixture(scope="class")
def main_state() -> dict[str, Any]:
    return {}


class TestConverge:
    """One fresh host with systemd: interrupted run, converge, idempotence, check mode, testinfra."""

    @pytest.fixture()
    def host(self, main_host: th.TestHost) -> th.TestHost:
        return main_host

    @pytest.fixture()
    def state(self, main_state: dict[str, Any]) -> dict[str, Any]:
        return main_state

    def _needs(self, state: dict[str, Any], *steps: str) -> None:
        for step in steps:
            if not state.get(step):
                pytest.skip(f"an earlier step failed: {step}")

    def test_1_interrupted_run_fails_at_triton_with_its_journal(
        self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]
    ) -> None:
        # Something else holds Triton's HTTP port: Triton's start fails (3 tries), the play stops.
        host.ssh(
            "sudo systemd-run --unit=provision-test-blocker --property=RuntimeMaxSec=900 "
            "/usr/bin/python3 -m http.server 8000 --bind 127.0.0.1",
            check=True,
        )
        host.ssh(
            "for i in $(seq 50); do ss -Hltn 'sport = :8000' | grep -q . && exit 0; sleep 0.2; done; exit 1", check=True
        )
        try:
            run = ansible.site("1-interrupted", host)
        finally:
            host.ssh("sudo systemctl stop provision-test-blocker", check=True)
        assert run.returncode != 0, run.tail()
        assert "Triton did not become ready" in run.stdout, run.tail()
        assert "llm-triton.service crashed while starting" in run.stdout, run.tail()
        assert "journalctl -u llm-triton.service" in run.stdout  # the journal tail is printed
        assert run.counts().get("failed") == 1, run.recap
        # Not WSL: the wsl role changed nothing.
        assert host.ssh("cat /etc/wsl.conf").stdout == SEEDED_WSL_CONF
        assert host.ssh("test -e /etc/profile.d/wsl-lib-path.sh").returncode != 0
        state["interrupted"] = True

    def test_2_plain_rerun_converges(self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]) -> None:
        self._needs(state, "interrupted")
        run = ansible.site("2-rerun-converges", host)
        assert run.returncode == 0, run.tail()
        assert "smoke: PASS" in run.stdout, run.tail()
        assert "The capital of France is Paris" in run.stdout
        assert run.counts().get("changed", 0) > 0
        state["converged"] = True

    def test_3_second_run_changes_nothing(self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]) -> None:
        self._needs(state, "converged")
        assert_no_changes(ansible.site("3-idempotent", host))

    def test_4_check_mode_after_converge_changes_nothing(
        self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]
    ) -> None:
        self._needs(state, "converged")
        assert_no_changes(ansible.site("4-check-diff", host, "--check", "--diff"))

    def test_5_wsl_forced_writes_wsl_conf_and_carries_on(
        self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]
    ) -> None:
        self._needs(state, "converged")
        run = ansible.site("5-wsl-forced", host, "-e", "wsl_force=true")
        assert run.returncode == 0, run.tail()
        assert "smoke: PASS" in run.stdout, run.tail()
        # wsl.conf (merged) and the PATH script: the only changes.
        assert run.counts().get("changed") == 2, run.recap
        conf = host.ssh("cat /etc/wsl.conf").stdout
        assert conf.startswith(SEEDED_WSL_CONF.rstrip("\n")), conf
        assert "systemd=true" in conf.split("[boot]", 1)[1]
        assert 'options = "metadata"' in conf and "command = echo booted" in conf
        login_path = host.ssh("bash -lc 'echo $PATH'").stdout
        assert "/usr/lib/wsl/lib" in login_path.split(":")[-1]

    def test_6_testinfra_suite(self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]) -> None:
        self._needs(state, "converged")
        expect = {"api_key_required": True, "model_device": "cpu", "model_py_sha256": model_py_sha256(ansible)}
        run_testinfra(ansible, host, "6-testinfra", expect)

    def test_7_make_up_on_the_host_itself(self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]) -> None:
        """`make up` from a checkout on the host: .venv-ansible, site.yml on inventory/local
        (ansible_connection=local), then make smoke. The local inventory has no vault, so the
        key goes away (a changed env file, the gateway restarts); a second `make up` changes nothing."""
        self._needs(state, "converged")
        checkout = host.root / "home" / th.SSH_USER / "wsl-triton-llm"
        shutil.copytree(ansible.repo, checkout, ignore=SNAPSHOT_IGNORE)
        host.ssh(f"sudo chown -R {th.SSH_USER}: ~/wsl-triton-llm", check=True)
        host.ssh("sudo apt-get install -y -q make >/dev/null", check=True)
        up = (
            "cd ~/wsl-triton-llm && PIP_NO_INDEX=1 PIP_FIND_LINKS=" + WHEELHOUSE_ON_HOST + " make up "
            "ANSIBLE_ARGS='-e stack_profile=cpu -e stack_llm_engine=llm "
            "-e python_env_wheelhouse=" + WHEELHOUSE_ON_HOST + " "
            "-e python_env_torch_spec=" + TORCH_SPEC + "' 2>&1"
        )
        for name in ("7-make-up", "7-make-up-again"):
            t0 = time.monotonic()
            proc = host.ssh(up, timeout=1200)
            log = ansible.log_dir / f"{name}.log"
            log.write_text(proc.stdout + proc.stderr)
            # `make up` prints the play's recap: read it as the runs from here are read.
            run = PlaybookRun(["make", "up"], proc.returncode, proc.stdout, time.monotonic() - t0, log)
            FIGURES.append(
                Figure(f"{name} (on the host, connection local)", run.seconds, run.counts(), f"rc={run.returncode}")
            )
            assert run.returncode == 0, run.tail(100)
            assert list(run.recap) == ["localhost"], run.recap
            assert run.stdout.count("smoke: PASS") == 2, run.tail()  # the play's, then make smoke's
            if name == "7-make-up-again":
                assert run.counts().get("changed") == 0, run.tail(100)
        assert host.ssh("sudo grep -c '^GATEWAY_API_KEY=\"\"$' /etc/llm-gateway/gateway.env").stdout.strip() == "1"

    def test_8_api_key_never_in_any_output(self, ansible: Ansible, state: dict[str, Any]) -> None:
        self._needs(state, "interrupted")
        assert_key_in_no_log(ansible.log_dir)
