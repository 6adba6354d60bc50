"""The `container` runtime of roles/triton on a fresh Ubuntu 24.04 host with Docker inside.

One host, ``ctr-main`` (systemd-nspawn, ``docker_ready=True``: cgroup v1 controllers made
writable for runc). Setup steps stand in for what other roles or NGC would provide:

* Docker: ``apt-get install docker.io`` from Ubuntu's archive (a stand-in for the docker
  role; Docker's own repository is unreachable here).
* Triton's image: NGC is unreachable, so a STAND-IN image built from the real tritonserver
  of the nvidia-pytriton wheel (``standin_image.py``), loaded with ``docker import``.

Then ``playbooks/site.yml`` with the cpu profile (no GPU here), ``stack_triton_runtime=container``
and the stand-in image; ``triton_container_gpus`` is set to "" explicitly (it is already
empty on the cpu profile) because this machine has no NVIDIA runtime for ``--gpus``:

1. a first run with an image reference that does not exist fails at Triton's readiness
   wait, naming the unit's crash and printing its journal (docker's pull error);
2. the plain rerun converges: the play's smoke check is a chat round trip through the
   gateway to Triton in the container serving the llm model (SmolLM2 answers Paris);
3. a second run reports changed=0, 4. so does ``--check --diff``;
5. the testinfra module tests/infra/test_triton_container.py (unit, container, image,
   read-only mounts, loopback-only ports, ulimits, shm, Triton's ready endpoint).

This machine's own processes lack CAP_SYS_RESOURCE (as CI's do): nobody on it may raise
RLIMIT_MEMLOCK, so ``--ulimit memlock=-1`` cannot work in a test host; the test then sets
memlock to the hard limit there is and says so. Elsewhere the role's default is kept.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import standin_image
import testhost as th
import wheelhouse
from figures import FIGURES, Figure

# The session fixtures and helpers of the main provisioning suite (same snapshot, logs, wheels).
from test_provision import (  # noqa: F401 (fixtures are found by name)
    GROUPS,
    TORCH_SPEC,
    WHEELHOUSE_ON_HOST,
    Ansible,
    _stop_note,
    ansible,
    cache_dir,
    host_python,
    repo,
    vault_args,
    wheels,
    write_inventory,
)

pytestmark = pytest.mark.provision

IMAGE_ON_HOST = "/var/tmp/tritonserver-standin.tar.zst"
BAD_IMAGE = "localhost/tritonserver-standin:does-not-exist"


def _memlock_ulimit() -> tuple[str, str | None]:
    """(--ulimit memlock value, why it differs from the role's default or None)."""
    caps = next(
        (line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapBnd:")),
        "0",
    )
    if int(caps, 16) & (1 << 24):  # CAP_SYS_RESOURCE: memlock may be raised
        return "-1", None
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    return str(hard), (
        f"this machine lacks CAP_SYS_RESOURCE: memlock cannot exceed its hard limit {hard} here, "
        f"so the test runs with --ulimit memlock={hard} instead of the role's memlock=-1"
    )


@pytest.fixture(scope="module")
def standin(cache_dir: Path, wheels: Path) -> tuple[Path, str]:  # noqa: F811
    t0 = time.monotonic()
    tarball, ref = standin_image.build(cache_dir, wheels)
    size = tarball.stat().st_size / 2**20
    FIGURES.append(Figure("stand-in Triton image (build or cache hit)", time.monotonic() - t0, note=f"{size:.0f} MiB"))
    return tarball, ref


@pytest.fixture(scope="module")
def ctr_host(
    cache_dir: Path,  # noqa: F811
    wheels: Path,  # noqa: F811
    standin: tuple[Path, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[th.TestHost]:
    tarball, ref = standin

    def setup(root: Path) -> None:
        wheelhouse.link_into(wheels, root / WHEELHOUSE_ON_HOST.lstrip("/"))
        dest = root / IMAGE_ON_HOST.lstrip("/")
        try:
            os.link(tarball, dest)
        except OSError:
            shutil.copy2(tarball, dest)

    memlock, why = _memlock_ulimit()
    if why:
        print(f"\n[test_triton_container] {why}", file=sys.stderr)
    t0 = time.monotonic()
    with th.TestHost("ctr-main", cache_dir, index=51, docker_ready=True, extra_setup=setup, groups=GROUPS) as host:
        FIGURES.append(Figure("boot ctr-main (docker_ready, + wheelhouse)", time.monotonic() - t0))
        t1 = time.monotonic()
        host.ssh(
            "sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y -q --no-install-recommends docker.io >/dev/null",
            check=True,
            timeout=900,
        )
        FIGURES.append(Figure("apt install docker.io (docker role stand-in)", time.monotonic() - t1))
        t1 = time.monotonic()
        host.ssh(shlex.join(["sudo", *standin_image.import_argv(IMAGE_ON_HOST, ref)]), check=True, timeout=300)
        FIGURES.append(Figure("docker import of the stand-in image", time.monotonic() - t1))
        group_vars: dict[str, Any] = {
            "stack_profile": "cpu",
            "stack_triton_runtime": "container",
            "triton_container_image_ref": ref,
            # No NVIDIA runtime here (and no GPU): no --gpus.
            "triton_container_gpus": "",
            "python_env_wheelhouse": WHEELHOUSE_ON_HOST,
            "python_env_torch_spec": TORCH_SPEC,
        }
        if why:
            group_vars["triton_container_ulimits"] = [f"memlock={memlock}", "stack=67108864"]
        host.inventory_dir = write_inventory(  # type: ignore[attr-defined]
            tmp_path_factory.mktemp("inv-ctr"), host, group_vars
        )
        host.image_ref = ref  # type: ignore[attr-defined]
        host.memlock = memlock  # type: ignore[attr-defined]
        yield host
        t2 = time.monotonic()
    FIGURES.append(Figure("stop ctr-main", time.monotonic() - t2, note=_stop_note(host)))


class TestContainerRuntime:
    """Triton in a container: failed first start, converge, idempotence, check mode, testinfra."""

    state: ClassVar[dict[str, bool]] = {}

    def _needs(self, *steps: str) -> None:
        for step in steps:
            if not self.state.get(step):
                pytest.skip(f"an earlier step failed: {step}")

    def test_1_bad_image_fails_with_the_journal(self, ctr_host: th.TestHost, ansible: Ansible) -> None:  # noqa: F811
        inv = ctr_host.inventory_dir  # type: ignore[attr-defined]
        bad = f"triton_container_image_ref={BAD_IMAGE}"
        run = ansible.playbook("ctr-1-bad-image", inv, *vault_args(inv), "-e", bad)
        assert run.rc != 0, run.tail()
        assert "Triton did not become ready" in run.output, run.tail()
        assert "llm-triton.service crashed while starting" in run.output, run.tail()
        assert "journalctl -u llm-triton.service" in run.output
        # The journal tail names the image and Docker's pull error.
        journal = run.output.split("--- journalctl -u llm-triton.service", 1)[1]
        assert BAD_IMAGE in journal and "Error response from daemon" in journal, run.tail()
        assert run.counts().get("failed") == 1, run.recap
        self.state["bad-image"] = True

    def test_2_rerun_converges_through_the_container(self, ctr_host: th.TestHost, ansible: Ansible) -> None:  # noqa: F811
        inv = ctr_host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("ctr-2-converge", inv, *vault_args(inv))
        assert run.rc == 0, run.tail()
        assert "smoke: PASS" in run.output, run.tail()
        assert "The capital of France is Paris" in run.output
        assert run.counts().get("changed", 0) > 0
        running = ctr_host.ssh("sudo docker ps --format '{{.Names}} {{.Image}}'").stdout.split()
        assert running == ["llm-triton", ctr_host.image_ref], running  # type: ignore[attr-defined]
        self.state["converged"] = True

    def test_3_second_run_changes_nothing(self, ctr_host: th.TestHost, ansible: Ansible) -> None:  # noqa: F811
        self._needs("converged")
        inv = ctr_host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("ctr-3-idempotent", inv, *vault_args(inv))
        assert run.rc == 0, run.tail()
        changed = [line for line in run.output.splitlines() if line.startswith("changed:")]
        assert run.counts().get("changed") == 0, f"{run.recap}\n{changed}"

    def test_4_check_mode_changes_nothing(self, ctr_host: th.TestHost, ansible: Ansible) -> None:  # noqa: F811
        self._needs("converged")
        inv = ctr_host.inventory_dir  # type: ignore[attr-defined]
        run = ansible.playbook("ctr-4-check-diff", inv, *vault_args(inv), "--check", "--diff")
        assert run.rc == 0, run.tail()
        assert run.counts().get("changed") == 0, run.recap

    def test_5_testinfra(self, ctr_host: th.TestHost, ansible: Ansible, tmp_path: Path) -> None:  # noqa: F811
        self._needs("converged")
        expect = tmp_path / "expect.json"
        expect.write_text(
            json.dumps(
                {
                    "triton_runtime": "container",
                    "triton_image": ctr_host.image_ref,  # type: ignore[attr-defined]
                    "triton_memlock": ctr_host.memlock,  # type: ignore[attr-defined]
                    "triton_shm_size": "2g",
                    "api_key_required": True,
                }
            )
        )
        log = ansible.log_dir / "ctr-5-testinfra.log"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(ansible.repo / "tests" / "infra" / "test_triton_container.py"),
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::pytest.PytestConfigWarning",
            "-q",
            "-rA",
            f"--hosts=ssh://{th.SSH_USER}@{ctr_host.ip}",
            f"--ssh-config={ctr_host.ssh_config}",
            "--sudo",
        ]
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd, cwd=ansible.repo, env={**os.environ, "STACK_INFRA_EXPECT": str(expect)}, capture_output=True, text=True
        )
        log.write_text(proc.stdout + proc.stderr)
        summary = (proc.stdout.strip().splitlines() or ["?"])[-1]
        FIGURES.append(Figure("ctr-5-testinfra (container checks)", time.monotonic() - t0, note=summary.strip("= ")))
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        assert " passed" in summary and "failed" not in summary and "skipped" not in summary
