"""What the provisioning suites (test_provision.py, test_gpu_profile.py) share besides their
fixtures (those are in conftest.py): site.yml runs that are logged and timed, an inventory
folder with the API key in a vault, and the testinfra suite over SSH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from stack.models import file_digest
from tests.playbook import PlaybookRun, ansible_tool, run_playbook

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testhost as th
from figures import FIGURES, Figure

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


def skip_reason() -> str | None:
    if not ansible_tool("ansible-playbook"):
        return "ansible-playbook not found (make test-provision installs it into .venv-ansible)"
    return th.skip_reason()


def stack_cache() -> Path:
    return Path(os.environ.get("STACK_CACHE", REPO / ".cache"))


class Ansible:
    """Runs the snapshot's playbooks/site.yml against test hosts; logs every run as
    ``<log_dir>/<name>.log`` and records its figures."""

    def __init__(self, repo: Path, log_dir: Path) -> None:
        self.repo = repo
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.runs: list[PlaybookRun] = []

    def playbook(self, name: str, inventory: Path, *args: str, timeout: float = 1500) -> PlaybookRun:
        env = {
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
            # The play's own ansible-* commands come from the same venv as ansible-playbook.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
        site = self.repo / "playbooks" / "site.yml"
        log = self.log_dir / f"{name}.log"
        run = run_playbook(site, inventory, *args, cwd=self.repo, env=env, log=log, timeout=timeout)
        self.runs.append(run)
        FIGURES.append(Figure(name, run.seconds, run.counts(), f"rc={run.returncode}"))
        return run

    def site(self, name: str, host: th.TestHost, *args: str) -> PlaybookRun:
        """site.yml on ``host`` with its inventory folder (``write_inventory_dir``) and vault."""
        inventory: Path = host.inventory_dir  # type: ignore[attr-defined]
        return self.playbook(name, inventory, *vault_args(inventory), *args)


def write_inventory_dir(directory: Path, host: th.TestHost, group_vars: dict[str, Any]) -> Path:
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
        [
            ansible_tool("ansible-vault") or "ansible-vault",
            "encrypt",
            "--vault-password-file",
            str(password),
            str(vault),
        ],
        check=True,
        capture_output=True,
    )
    assert API_KEY not in vault.read_text()
    return directory


def vault_args(inventory: Path) -> list[str]:
    return ["--vault-password-file", str(inventory / ".vault-pass")]


def assert_no_changes(run: PlaybookRun) -> None:
    """A rerun (or --check) on a converged host: rc 0 and changed=0, naming what changed."""
    assert run.returncode == 0, run.tail()
    changed = [line for line in run.stdout.splitlines() if line.startswith("changed:")]
    assert run.counts().get("changed") == 0, f"{run.recap}\n{changed}"


def assert_key_in_no_log(log_dir: Path, pattern: str = "*.log") -> None:
    logs = sorted(log_dir.glob(pattern))
    assert logs
    leaks = [log.name for log in logs if API_KEY in log.read_text()]
    assert leaks == [], f"the API key appears in {leaks}"


def stop_note(host: th.TestHost) -> str:
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
    return file_digest(ansible.repo / "model_repository" / "llm" / "1" / "model.py")
