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

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testhost as th
import wheelhouse
from figures import FIGURES, Figure

pytestmark = pytest.mark.provision

REPO = Path(__file__).resolve().parents[2]
# The runs use a snapshot of the checkout taken when the session starts, so that edits made
# to the working tree meanwhile cannot change what a later run (rerun, --check) deploys.
SNAPSHOT_IGNORE = shutil.ignore_patterns(
    ".git", ".venv*", ".cache", "*_cache", "__pycache__", "*.egg-info", "results", "*.pyc"
)
API_KEY = "sk-provision-test-7f3c1e9a5b2d4f60"  # must never show up in any output
TORCH_SPEC = "torch==2.13.0"
WHEELHOUSE_ON_HOST = "/srv/wheelhouse"
GROUPS = ("triton_servers", "gateways")
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


# --------------------------------------------------------------------------- helpers


def _skip_reason() -> str | None:
    if not _tool("ansible-playbook"):
        return "ansible-playbook not found (make test-provision installs it into .venv-ansible)"
    return th.skip_reason()


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _stack_cache() -> Path:
    return Path(os.environ.get("STACK_CACHE", REPO / ".cache"))


@dataclass
class Run:
    name: str
    rc: int
    output: str
    log: Path
    seconds: float
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Task counts summed over hosts."""
        total: dict[str, int] = {}
        for host in self.recap.values():
            for k, v in host.items():
                total[k] = total.get(k, 0) + v
        return total

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def _parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.M):
        recap[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return recap


class Ansible:
    """Runs ansible-playbook with the snapshot's ansible.cfg; logs every run; records figures."""

    def __init__(self, repo: Path, log_dir: Path) -> None:
        self.repo = repo
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.runs: list[Run] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ANSIBLE_CONFIG=str(self.repo / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )
        return env

    def playbook(self, name: str, inventory: Path, *args: str, timeout: float = 1500) -> Run:
        site = self.repo / "playbooks" / "site.yml"
        cmd = [_tool("ansible-playbook") or "ansible-playbook", "-i", str(inventory), str(site), *args]
        log = self.log_dir / f"{name}.log"
        started = time.monotonic()
        with log.open("w") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(
                cmd, cwd=self.repo, env=self.env(), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        seconds = time.monotonic() - started
        output = log.read_text()
        run = Run(name, proc.returncode, output, log, seconds, _parse_recap(output))
        self.runs.append(run)
        FIGURES.append(Figure(name, seconds, run.counts(), f"rc={run.rc}"))
        return run


def write_inventory(directory: Path, host: th.TestHost, group_vars: dict[str, Any]) -> Path:
    """An inventory folder like inventory/local, for the test host, with the key in a vault."""
    (directory / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
    lines = []
    for group in GROUPS:
        lines += [f"[{group}]", host.inventory_line(), ""]
    (directory / "hosts").write_text("\n".join(lines))
    main = {"stack_api_key": "{{ vault_stack_api_key }}", **group_vars}
    (directory / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump(main, sort_keys=False))
    password = directory / ".vault-pass"
    password.write_text("provision-test-vault-password\n")
    password.chmod(0o600)
    vault = directory / "group_vars" / "all" / "vault.yml"
    vault.write_text(f"vault_stack_api_key: {API_KEY}\n")
    subprocess.run(
        [_tool("ansible-vault") or "ansible-vault", "encrypt", "--vault-password-file", str(password), str(vault)],
        check=True,
        capture_output=True,
    )
    assert API_KEY not in vault.read_text()
    return directory


def vault_args(inventory: Path) -> list[str]:
    return ["--vault-password-file", str(inventory / ".vault-pass")]


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


def _stop_note(host: th.TestHost) -> str:
    return f"poweroff {host.timings.get('poweroff', 0):.1f} s, the rest is removing the host's tree"


def run_testinfra(ansible: Ansible, host: th.TestHost, step: str, expect: dict[str, Any]) -> str:
    """tests/infra over SSH against ``host`` with ``expect`` as STACK_INFRA_EXPECT; logged as
    ``<step>.log``, timed, asserted to pass. Returns pytest's output (-rA: skip reasons too)."""
    expect_file = ansible.log_dir / f"{step}.expect.json"
    expect_file.write_text(json.dumps(expect))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ansible.repo / "tests" / "infra"),
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::pytest.PytestConfigWarning",
        "-q",
        "-rA",
        f"--hosts=ssh://{th.SSH_USER}@{host.ip}",
        f"--ssh-config={host.ssh_config}",
        "--sudo",
    ]
    t0 = time.monotonic()
    env = {**os.environ, "STACK_INFRA_EXPECT": str(expect_file)}
    proc = subprocess.run(cmd, cwd=ansible.repo, env=env, capture_output=True, text=True)
    (ansible.log_dir / f"{step}.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["?"])[-1]
    FIGURES.append(Figure(f"{step} (tests/infra over SSH)", time.monotonic() - t0, note=summary.strip("= ")))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary
    return proc.stdout


def model_py_sha256(ansible: Ansible) -> str:
    import hashlib

    return hashlib.sha256((ansible.repo / "model_repository" / "llm" / "1" / "model.py").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    try:
        th.ensure_apt_tools()
    except th.TestHostError as exc:
        pytest.skip(f"cannot install debootstrap/systemd-container: {exc}")
    cache = th.default_cache_dir()
    th.build_rootfs(cache)
    FIGURES.append(Figure("rootfs (build or cache hit)", time.monotonic() - t0))
    return cache


@pytest.fixture(scope="module")
def repo(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the checkout: every run of the session deploys the same code."""
    dest = tmp_path_factory.mktemp("snapshot") / "wsl-triton-llm"
    shutil.copytree(REPO, dest, ignore=SNAPSHOT_IGNORE)
    return dest


@pytest.fixture(scope="module")
def ansible(repo: Path, cache_dir: Path) -> Ansible:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Ansible(repo, cache_dir / "logs" / "provision" / stamp)


@pytest.fixture(scope="module")
def host_python(cache_dir: Path) -> tuple[str, int]:
    """(Python version, glibc minor) of the rootfs testhost boots (Ubuntu, or its Debian fallback)."""
    tarball = th.build_rootfs(cache_dir)
    return ("3.11", 36) if tarball.name.startswith("debian-") else ("3.12", 39)


@pytest.fixture(scope="module")
def wheels(repo: Path, host_python: tuple[str, int]) -> Path:
    t0 = time.monotonic()
    path = wheelhouse.build(
        _stack_cache(), python_version=host_python[0], glibc_minor=host_python[1], torch_spec=TORCH_SPEC, repo=repo
    )
    FIGURES.append(Figure(f"wheelhouse {path.name} (build or cache hit)", time.monotonic() - t0))
    return path


# --------------------------------------------------------------------------- a host without systemd


@pytest.fixture(scope="class")
def nosysd_host(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[th.TestHost]:
    t0 = time.monotonic()
    with th.TestHost("prov-nosysd", cache_dir, index=32, systemd_pid1=False, groups=GROUPS) as host:
        FIGURES.append(Figure("boot prov-nosysd (no systemd)", time.monotonic() - t0))
        host.inventory_dir = write_inventory(  # type: ignore[attr-defined]
            tmp_path_factory.mktemp("inv-nosysd"), host, {"stack_profile": "cpu"}
        )
        host.ssh("sudo touch /root/.provision-marker && sleep 1", check=True)
        yield host
        t1 = time.monotonic()
    FIGURES.append(Figure("stop prov-nosysd", time.monotonic() - t1, note=_stop_note(host)))


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
        inv = host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook(f"validate-{extra.split('=')[0]}", inv, *vault_args(inv), "-e", extra)
        assert run.rc != 0, run.tail()
        assert re.search(message, run.output), run.tail()
        assert "Validate the variables of every role" in run.output
        # It stopped inside the validation play: no later play started.
        assert "PLAY [Prepare the host]" not in run.output, run.tail()
        assert run.counts().get("changed") == 0 and run.counts().get("failed") == 1, run.recap
        assert_untouched(host, wsl_conf=None)
        assert changed_since_marker(host, "/root/.provision-marker") == []

    def test_without_systemd_the_play_stops_before_any_change(self, host: th.TestHost, ansible: Ansible) -> None:
        inv = host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("no-systemd", inv, *vault_args(inv))
        assert run.rc != 0
        assert "systemd is not PID 1 on this host" in run.output, run.tail()
        assert run.counts().get("changed") == 0, run.recap
        assert_untouched(host, wsl_conf=None)
        assert changed_since_marker(host, "/root/.provision-marker") == []

    def test_wsl_without_systemd_writes_wsl_conf_then_stops(self, host: th.TestHost, ansible: Ansible) -> None:
        inv = host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("no-systemd-wsl", inv, *vault_args(inv), "-e", "wsl_force=true")
        assert run.rc != 0
        assert "wsl --shutdown" in run.output, run.tail()
        assert "systemd is not running as PID 1 in this WSL distribution" in run.output
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
        host.inventory_dir = write_inventory(  # type: ignore[attr-defined]
            tmp_path_factory.mktemp("inv-main"),
            host,
            {
                "stack_profile": "cpu",
                "python_env_wheelhouse": WHEELHOUSE_ON_HOST,
                "python_env_torch_spec": TORCH_SPEC,
            },
        )
        yield host
        t1 = time.monotonic()
    FIGURES.append(Figure("stop prov-main", time.monotonic() - t1, note=_stop_note(host)))


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
        inv = host.inventory_dir  # type: ignore[attr-defined]
        try:
            run = ansible.playbook("1-interrupted", inv, *vault_args(inv))
        finally:
            host.ssh("sudo systemctl stop provision-test-blocker", check=True)
        assert run.rc != 0, run.tail()
        assert "Triton did not become ready" in run.output, run.tail()
        assert "llm-triton.service crashed while starting" in run.output, run.tail()
        assert "journalctl -u llm-triton.service" in run.output  # the journal tail is printed
        assert run.counts().get("failed") == 1, run.recap
        # Not WSL: the wsl role changed nothing.
        assert host.ssh("cat /etc/wsl.conf").stdout == SEEDED_WSL_CONF
        assert host.ssh("test -e /etc/profile.d/wsl-lib-path.sh").returncode != 0
        state["interrupted"] = True

    def test_2_plain_rerun_converges(self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]) -> None:
        self._needs(state, "interrupted")
        inv = host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("2-rerun-converges", inv, *vault_args(inv))
        assert run.rc == 0, run.tail()
        assert "smoke: PASS" in run.output, run.tail()
        assert "The capital of France is Paris" in run.output
        assert run.counts().get("changed", 0) > 0
        state["converged"] = True

    def test_3_second_run_changes_nothing(self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]) -> None:
        self._needs(state, "converged")
        inv = host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("3-idempotent", inv, *vault_args(inv))
        assert run.rc == 0, run.tail()
        changed = [line for line in run.output.splitlines() if line.startswith("changed:")]
        assert run.counts().get("changed") == 0, f"{run.recap}\n{changed}"

    def test_4_check_mode_after_converge_changes_nothing(
        self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]
    ) -> None:
        self._needs(state, "converged")
        inv = host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("4-check-diff", inv, *vault_args(inv), "--check", "--diff")
        assert run.rc == 0, run.tail()
        assert run.counts().get("changed") == 0, run.recap

    def test_5_wsl_forced_writes_wsl_conf_and_carries_on(
        self, host: th.TestHost, ansible: Ansible, state: dict[str, Any]
    ) -> None:
        self._needs(state, "converged")
        inv = host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("5-wsl-forced", inv, *vault_args(inv), "-e", "wsl_force=true")
        assert run.rc == 0, run.tail()
        assert "smoke: PASS" in run.output, run.tail()
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
            "ANSIBLE_ARGS='-e stack_profile=cpu -e python_env_wheelhouse=" + WHEELHOUSE_ON_HOST + " "
            "-e python_env_torch_spec=" + TORCH_SPEC + "' 2>&1"
        )
        for name in ("7-make-up", "7-make-up-again"):
            t0 = time.monotonic()
            proc = host.ssh(up, timeout=1200)
            seconds = time.monotonic() - t0
            log = ansible.log_dir / f"{name}.log"
            log.write_text(proc.stdout + proc.stderr)
            recap = _parse_recap(proc.stdout)
            counts = {k: sum(h.get(k, 0) for h in recap.values()) for k in ("ok", "changed", "failed", "skipped")}
            FIGURES.append(Figure(f"{name} (on the host, connection local)", seconds, counts, f"rc={proc.returncode}"))
            assert proc.returncode == 0, proc.stdout[-5000:]
            assert list(recap) == ["localhost"], recap
            assert proc.stdout.count("smoke: PASS") == 2, proc.stdout[-3000:]  # the play's, then make smoke's
            if name == "7-make-up-again":
                assert counts["changed"] == 0, proc.stdout[-5000:]
        assert host.ssh("sudo grep -c '^GATEWAY_API_KEY=\"\"$' /etc/llm-gateway/gateway.env").stdout.strip() == "1"

    def test_8_api_key_never_in_any_output(self, ansible: Ansible, state: dict[str, Any]) -> None:
        self._needs(state, "interrupted")
        logs = sorted(ansible.log_dir.glob("*.log"))
        assert logs
        leaks = [log.name for log in logs if API_KEY in log.read_text()]
        assert leaks == [], f"the API key appears in {leaks}"
