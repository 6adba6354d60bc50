"""The gpu profile of playbooks/site.yml, forced, on one fresh Ubuntu 24.04 host with WSL forced.

Host ``prov-gpu`` (systemd-nspawn, ``docker_ready=True`` so that runc may create cgroups).
What cannot be reached from here is replaced by STAND-INS, named as such:

* NVIDIA's CUDA and container-toolkit apt repositories: signed flat repositories with
  packages of the same names (tests/standins/apt, ``standin_apt.py``) served on the bridge;
  the roles' real key, repository and install tasks run unchanged, only the URLs differ.
  ``nvidia-container-runtime-hook`` exits 0, so ``docker run --gpus all`` works without a GPU.
* Docker's own repository: unreachable, so the docker role takes Ubuntu's ``docker.io``
  (``docker_source: distro``).
* NGC's Triton image: a stand-in built from the real tritonserver of the nvidia-pytriton
  wheel (``standin_image.py``), loaded with ``docker import``.
* The GPU: none, so the ``llm`` model runs on the CPU inside the container
  (``triton_model_device: cpu``); everything else is the gpu profile as on a user's machine.

Steps:

1. asking for the Linux driver on WSL fails at validation, before any change;
2. a first run whose Triton image does not exist installs the GPU layer and the stack, then
   fails at Triton's readiness with the unit's journal (Docker's pull error);
3. the stand-in image is imported and the rerun converges: the play's smoke check is a chat
   round trip through the gateway to Triton in the container (``--gpus all``), and its GPU
   checks see nvcc and Docker's nvidia runtime;
4. a second run reports changed=0, 5. so does ``--check --diff``;
6. no Linux driver package is installed, and none can be (the apt pin);
7. ``apt-get update`` is clean (no "Conflicting values set for option Signed-By");
8. the whole testinfra suite over SSH (tests/infra: the stack, the GPU packages and sources,
   daemon.json with the pre-seeded key, the container, the GPU checks);
9. a stale second CUDA sources entry stops the play, naming the file.

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

from stack import gpu_checks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provisioning as prov
import standin_apt
import standin_image
import testhost as th
import wheelhouse
from figures import FIGURES, Figure

pytestmark = pytest.mark.provision

IMAGE_ON_HOST = "/var/tmp/tritonserver-standin.tar.zst"
BAD_IMAGE = "localhost/tritonserver-standin:does-not-exist"
CUDA_VERSION = "12.8"
TOOLKIT_PINNED, TOOLKIT_NEWER = standin_apt.TOOLKIT_VERSIONS
TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)
# In the CUDA stand-in repository, never to be installed on WSL.
DECOYS = ("cuda", "cuda-drivers", "nvidia-driver-570")
# daemon.json before the play, as another tool left it: must survive the merges.
SEEDED_DAEMON_JSON = {"log-level": "warn"}
DAEMON_OPTIONS = {"log-driver": "json-file", "log-opts": {"max-size": "10m", "max-file": "3"}}


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
def standin(cache_dir: Path, wheels: Path) -> tuple[Path, str]:
    t0 = time.monotonic()
    tarball, ref = standin_image.build(cache_dir, wheels)
    size = tarball.stat().st_size / 2**20
    FIGURES.append(Figure("gpu: stand-in Triton image (build or hit)", time.monotonic() - t0, note=f"{size:.0f} MiB"))
    return tarball, ref


@pytest.fixture(scope="module")
def gpu_host(
    cache_dir: Path,
    wheels: Path,
    standin: tuple[Path, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[th.TestHost]:
    tarball, ref = standin

    def setup(root: Path) -> None:
        wheelhouse.link_into(wheels, root / prov.WHEELHOUSE_ON_HOST.lstrip("/"))
        dest = root / IMAGE_ON_HOST.lstrip("/")
        try:
            os.link(tarball, dest)
        except OSError:
            shutil.copy2(tarball, dest)
        (root / "etc/docker").mkdir(parents=True, exist_ok=True)
        (root / "etc/docker/daemon.json").write_text(json.dumps(SEEDED_DAEMON_JSON, indent=2) + "\n")

    memlock, why = _memlock_ulimit()
    if why:
        print(f"\n[test_gpu_profile] {why}", file=sys.stderr)
    t0 = time.monotonic()
    with th.TestHost("prov-gpu", cache_dir, index=51, docker_ready=True, extra_setup=setup, groups=prov.GROUPS) as host:
        FIGURES.append(Figure("gpu: boot prov-gpu (docker_ready, + wheelhouse)", time.monotonic() - t0))
        t1 = time.monotonic()
        with standin_apt.serve(cache_dir, host.bridge_ip) as repos:
            FIGURES.append(Figure("gpu: stand-in apt repos (build or cache hit)", time.monotonic() - t1))
            group_vars: dict[str, Any] = {
                "stack_profile": "gpu",
                "stack_triton_runtime": "container",
                "wsl_force": True,
                # No GPU in a test host: the llm model runs on the CPU inside the container.
                "triton_model_device": "cpu",
                "triton_container_image_ref": ref,
                "python_env_wheelhouse": prov.WHEELHOUSE_ON_HOST,
                "python_env_torch_spec": prov.TORCH_SPEC,
                "cuda_toolkit_version": CUDA_VERSION,
                "cuda_toolkit_repo_base_url": repos.cuda_base_url,
                "docker_source": "distro",
                "docker_users": [th.SSH_USER],
                "docker_daemon_options": DAEMON_OPTIONS,
                "nvidia_container_toolkit_version": TOOLKIT_PINNED,
                "nvidia_container_toolkit_repo_url": repos.toolkit_repo_url,
                "nvidia_container_toolkit_key_url": repos.toolkit_key_url,
            }
            if why:
                group_vars["triton_container_ulimits"] = [f"memlock={memlock}", "stack=67108864"]
            host.inventory_dir = prov.write_inventory_dir(  # type: ignore[attr-defined]
                tmp_path_factory.mktemp("inv-gpu"), host, group_vars
            )
            host.image_ref = ref  # type: ignore[attr-defined]
            host.memlock = memlock  # type: ignore[attr-defined]
            host.repos = repos  # type: ignore[attr-defined]
            yield host
        t2 = time.monotonic()
    FIGURES.append(Figure("gpu: stop prov-gpu", time.monotonic() - t2, note=prov.stop_note(host)))


class TestGpuProfile:
    """The gpu profile through site.yml: validation, failed first start, converge, idempotence,
    check mode, no driver on WSL, clean apt, testinfra, a stale sources entry."""

    state: ClassVar[dict[str, bool]] = {}

    def _needs(self, *steps: str) -> None:
        for step in steps:
            if not self.state.get(step):
                pytest.skip(f"an earlier step failed: {step}")

    def _sh(self, host: th.TestHost, cmd: str) -> subprocess.CompletedProcess[str]:
        proc: subprocess.CompletedProcess[str] = host.ssh(cmd, timeout=300)
        return proc

    def test_1_driver_on_wsl_fails_at_validation(self, gpu_host: th.TestHost, ansible: prov.Ansible) -> None:
        run = ansible.site("gpu-1-driver-on-wsl", gpu_host, "-e", "cuda_toolkit_install_driver=true")
        assert run.returncode != 0, run.tail()
        assert "cuda_toolkit_install_driver=true but this host is WSL" in run.stdout, run.tail()
        assert "PLAY [Prepare the host" not in run.stdout, run.tail()
        assert run.counts().get("changed") == 0, run.recap
        apt_files = self._sh(gpu_host, "ls /etc/apt/sources.list.d /etc/apt/preferences.d /etc/apt/keyrings").stdout
        assert "cuda" not in apt_files and "nvidia" not in apt_files, apt_files

    def test_2_bad_image_fails_with_the_journal(self, gpu_host: th.TestHost, ansible: prov.Ansible) -> None:
        bad = f"triton_container_image_ref={BAD_IMAGE}"
        run = ansible.site("gpu-2-bad-image", gpu_host, "-e", bad)
        assert run.returncode != 0, run.tail()
        assert "Triton did not become ready" in run.stdout, run.tail()
        assert "llm-triton.service crashed while starting" in run.stdout, run.tail()
        journal = run.stdout.split("--- journalctl -u llm-triton.service", 1)[1]
        assert BAD_IMAGE in journal and "Error response from daemon" in journal, run.tail()
        assert run.counts().get("failed") == 1, run.recap
        # The GPU layer went in before Triton: the stack is ready but for the image.
        assert self._sh(gpu_host, "systemctl is-active docker").stdout.strip() == "active"
        self.state["installed"] = True

    def test_3_rerun_converges_through_the_container(self, gpu_host: th.TestHost, ansible: prov.Ansible) -> None:
        self._needs("installed")
        t0 = time.monotonic()
        ref = gpu_host.image_ref  # type: ignore[attr-defined]
        gpu_host.ssh(shlex.join(["sudo", *standin_image.import_argv(IMAGE_ON_HOST, ref)]), check=True, timeout=300)
        FIGURES.append(Figure("gpu: docker import of the stand-in image", time.monotonic() - t0))
        run = ansible.site("gpu-3-converge", gpu_host)
        assert run.returncode == 0, run.tail()
        assert "smoke: PASS" in run.stdout, run.tail()
        assert "The capital of France is Paris" in run.stdout
        # make smoke's GPU checks, run by the play on the host (the callback may wrap lines).
        words = " ".join(run.stdout.split())
        assert "[ok] CUDA toolkit (nvcc): Cuda compilation tools, release 12.8" in words, run.tail()
        assert "[skip] nvidia-smi lists a GPU: no GPU on this machine" in words, run.tail()
        # The play's smoke runs as the SSH user, whose new docker group needs a new login: the
        # Docker checks may skip there (testinfra runs them with sudo, strictly).
        assert "[ok] docker: nvidia runtime" in words or gpu_checks.NO_DOCKER_ACCESS in words, run.tail()
        running = gpu_host.ssh("sudo docker ps --format '{{.Names}} {{.Image}}'").stdout.split()
        assert running == ["llm-triton", ref], running
        assert "--gpus all" in gpu_host.ssh("systemctl cat llm-triton").stdout
        self.state["converged"] = True

    def test_4_second_run_changes_nothing(self, gpu_host: th.TestHost, ansible: prov.Ansible) -> None:
        self._needs("converged")
        prov.assert_no_changes(ansible.site("gpu-4-idempotent", gpu_host))

    def test_5_check_mode_changes_nothing(self, gpu_host: th.TestHost, ansible: prov.Ansible) -> None:
        self._needs("converged")
        prov.assert_no_changes(ansible.site("gpu-5-check-diff", gpu_host, "--check", "--diff"))

    def test_6_no_linux_driver_installed_or_installable(self, gpu_host: th.TestHost) -> None:
        self._needs("converged")
        for pkg in DECOYS:
            status = self._sh(gpu_host, f"dpkg-query -W -f='${{db:Status-Status}}' {pkg} 2>/dev/null || echo absent")
            assert status.stdout.strip() in ("absent", "not-installed", ""), f"{pkg}: {status.stdout}"
        # The decoys are in the repository, but the pin leaves no candidate for the driver...
        policy = self._sh(gpu_host, "apt-cache policy cuda-drivers nvidia-driver-570").stdout
        assert policy.count("Candidate: (none)") == 2, policy
        # ... so even a manual `apt install cuda` (which pulls the driver in) cannot go through.
        sim = self._sh(gpu_host, "apt-get install -s -y cuda 2>&1")
        assert sim.returncode != 0 and "cuda-drivers" in sim.stdout, sim.stdout

    def test_7_apt_update_is_clean(self, gpu_host: th.TestHost) -> None:
        self._needs("converged")
        proc = self._sh(gpu_host, "sudo apt-get update 2>&1")
        assert proc.returncode == 0, proc.stdout[-3000:]
        for bad in ("Conflicting values", "configured multiple times", "NO_PUBKEY", "not signed"):
            assert bad not in proc.stdout, proc.stdout[-3000:]
        assert proc.stdout.count(gpu_host.bridge_ip) >= 2, proc.stdout  # both stand-in repos read

    def test_8_testinfra_suite(self, gpu_host: th.TestHost, ansible: prov.Ansible) -> None:
        self._needs("converged")
        repos: standin_apt.Repos = gpu_host.repos  # type: ignore[attr-defined]
        expect = {
            "api_key_required": True,
            "model_device": "cpu",
            "model_py_sha256": prov.model_py_sha256(ansible),
            "triton_runtime": "container",
            "triton_image": gpu_host.image_ref,  # type: ignore[attr-defined]
            "triton_memlock": gpu_host.memlock,  # type: ignore[attr-defined]
            "triton_shm_size": "2g",
            "triton_gpus": "all",
            "gpu_profile": {
                "wsl": True,
                "cuda_version": CUDA_VERSION,
                "cuda_repo_url": repos.cuda_repo_url,
                "toolkit_repo_url": repos.toolkit_repo_url,
                "toolkit_version": TOOLKIT_PINNED,
                "toolkit_newer_version": TOOLKIT_NEWER,
                "toolkit_packages": list(TOOLKIT_PACKAGES),
                "decoys": list(DECOYS),
                "docker_source": "distro",
                "docker_users": [th.SSH_USER],
                "daemon_json": {**SEEDED_DAEMON_JSON, **DAEMON_OPTIONS},
                "cdi_spec": "/etc/cdi/nvidia.yaml",
            },
        }
        output = prov.run_testinfra(ansible, gpu_host, "gpu-8-testinfra", expect)
        # Only what needs a real GPU (or the native runtime) may skip, each with its reason.
        skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
        unexpected = [s for s in skips if "no GPU on this machine" not in s and "native runtime" not in s]
        assert unexpected == [], "\n".join(unexpected)

    def test_9_a_second_cuda_entry_stops_the_play(self, gpu_host: th.TestHost, ansible: prov.Ansible) -> None:
        """An entry left by older instructions (no signed-by) breaks apt; the role names the file."""
        self._needs("converged")
        repos: standin_apt.Repos = gpu_host.repos  # type: ignore[attr-defined]
        stale = "/etc/apt/sources.list.d/cuda.list"
        self._sh(gpu_host, f"echo 'deb {repos.cuda_repo_url}/ /' | sudo tee {stale} >/dev/null")
        try:
            update = self._sh(gpu_host, "sudo apt-get update 2>&1")
            assert "Conflicting values set for option Signed-By" in update.stdout, update.stdout[-2000:]
            run = ansible.site("gpu-9-second-cuda-entry", gpu_host)
            assert run.returncode != 0, run.tail()
            words = " ".join(run.stdout.split())  # the callback may wrap the message
            assert f"{stale} also list {repos.cuda_repo_url}" in words, run.tail()
            assert run.counts().get("changed") == 0, run.recap
        finally:
            self._sh(gpu_host, f"sudo rm -f {stale}")

    def test_10_api_key_never_in_any_output(self, ansible: prov.Ansible) -> None:
        prov.assert_key_in_no_log(ansible.log_dir, "gpu-*.log")
