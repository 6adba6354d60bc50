"""The GPU package layer (roles cuda_toolkit, docker, nvidia_container_toolkit), seen from inside
the host: apt sources and pins, package versions, daemon.json, docker, nvcc, PATH, the CDI spec.

Runs only when the expectation file (STACK_INFRA_EXPECT) has a `gpu_profile` object, which
tests/provision/test_gpu_profile.py writes; otherwise every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest


@pytest.fixture(scope="module")
def gpu(expect: dict[str, Any]) -> dict[str, Any]:
    data = expect.get("gpu_profile")
    if not isinstance(data, dict):
        reason = (
            "the GPU profile was not applied to this host (no `gpu_profile` in the STACK_INFRA_EXPECT file; "
            "tests/provision/test_gpu_profile.py writes one)"
        )
        print(f"tests/infra/test_gpu_packages.py: skipped: {reason}")
        pytest.skip(reason)
    return data


def _apt_entries(host: Any, needle: str) -> list[str]:
    """Files of /etc/apt/sources.list(.d) that mention ``needle`` (the URL without its scheme)."""
    include = "--include=sources.list --include='*.list' --include='*.sources'"
    out: str = host.run(f"grep -rlsF {include} -- {shlex.quote(needle)} /etc/apt").stdout
    return out.split()


def _host_path(url: str) -> str:
    return url.split("://", 1)[-1].removesuffix("/$(ARCH)")


# ---- apt sources: one entry per repository, signed-by ----------------------------------------


def test_cuda_repository_has_one_signed_entry_from_cuda_keyring(host: Any, gpu: dict[str, Any]) -> None:
    files = _apt_entries(host, _host_path(gpu["cuda_repo_url"]))
    assert files == ["/etc/apt/sources.list.d/cuda-wsl-ubuntu-x86_64.list"], files
    assert host.run(f"dpkg -S {files[0]}").stdout.startswith("cuda-keyring:"), "the entry is cuda-keyring's own"
    line = host.file(files[0]).content_string.strip()
    assert line.startswith("deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "), line
    assert host.file("/usr/share/keyrings/cuda-archive-keyring.gpg").is_file


def test_toolkit_repository_has_one_deb822_entry_with_signed_by(host: Any, gpu: dict[str, Any]) -> None:
    files = _apt_entries(host, _host_path(gpu["toolkit_repo_url"]))
    assert files == ["/etc/apt/sources.list.d/nvidia-container-toolkit.sources"], files
    fields = dict(
        line.split(": ", 1)
        for line in host.file(files[0]).content_string.splitlines()
        if ": " in line and not line.startswith("#")
    )
    assert fields["URIs"] == gpu["toolkit_repo_url"]
    assert fields["Suites"] == "/"
    keyring = host.file(fields["Signed-By"])
    assert keyring.is_file and keyring.mode == 0o644
    # Dearmored: a binary OpenPGP keyring, not the armored text.
    assert not keyring.content.startswith(b"-----BEGIN"), "the keyring is still armored"


def test_docker_source(host: Any, gpu: dict[str, Any]) -> None:
    docker_sources = host.file("/etc/apt/sources.list.d/docker.sources")
    if gpu["docker_source"] == "distro":
        assert not docker_sources.exists
        assert host.package("docker.io").is_installed
    else:
        assert docker_sources.exists and "Signed-By: " in docker_sources.content_string
        assert host.package("docker-ce").is_installed


# ---- pins and packages ------------------------------------------------------------------------


def test_no_linux_driver_on_wsl(host: Any, gpu: dict[str, Any]) -> None:
    if not gpu["wsl"]:
        pytest.skip("not WSL")
    pin = host.file("/etc/apt/preferences.d/cuda-wsl-no-linux-driver.pref")
    assert pin.exists
    assert "Pin-Priority: -1" in pin.content_string
    for pkg in gpu["decoys"]:
        assert not host.package(pkg).is_installed, pkg
    policy = host.run("apt-cache policy cuda-drivers").stdout
    assert "Candidate: (none)" in policy, policy


@pytest.mark.parametrize("which", ["installed", "policy"])
def test_toolkit_is_held_at_the_pinned_version(host: Any, gpu: dict[str, Any], which: str) -> None:
    want, newer = gpu["toolkit_version"], gpu["toolkit_newer_version"]
    for pkg in gpu["toolkit_packages"]:
        if which == "installed":
            assert host.package(pkg).version == want, pkg
        else:
            policy = host.run(f"apt-cache policy {pkg}").stdout
            # The newer version is offered by the repository, but the candidate stays.
            assert f"Candidate: {want}" in policy and newer in policy, policy
    pref = host.file("/etc/apt/preferences.d/nvidia-container-toolkit.pref").content_string
    assert f"Pin: version {want}" in pref and "Pin-Priority: 1001" in pref, pref


def test_apt_upgrade_would_not_move_the_toolkit(host: Any, gpu: dict[str, Any]) -> None:
    sim = host.run("apt-get -s upgrade").stdout
    for pkg in gpu["toolkit_packages"]:
        assert f"Inst {pkg} " not in sim, sim


def test_nvidia_ctk_version(host: Any, gpu: dict[str, Any]) -> None:
    upstream = gpu["toolkit_version"].rsplit("-", 1)[0]
    assert f"version {upstream}" in host.check_output("nvidia-ctk --version")


# ---- CUDA ---------------------------------------------------------------------------------------


def test_cuda_toolkit_installed(host: Any, gpu: dict[str, Any]) -> None:
    assert host.package(f"cuda-toolkit-{gpu['cuda_version'].replace('.', '-')}").is_installed
    out = host.check_output(f"/usr/local/cuda-{gpu['cuda_version']}/bin/nvcc --version")
    assert f"release {gpu['cuda_version']}" in out, out


def test_cuda_bin_on_the_login_path(host: Any, gpu: dict[str, Any]) -> None:
    # As the SSH user, in a login shell (what a person gets in a WSL terminal).
    path = host.run("sudo -u tester -i sh -c 'echo $PATH'").stdout.strip().split(":")
    assert f"/usr/local/cuda-{gpu['cuda_version']}/bin" in path, path
    out = host.run("sudo -u tester -i sh -c 'nvcc --version'")
    assert out.rc == 0 and f"release {gpu['cuda_version']}" in out.stdout, out.stdout + out.stderr


# ---- Docker -------------------------------------------------------------------------------------


def test_docker_active_and_enabled(host: Any, gpu: dict[str, Any]) -> None:
    svc = host.service("docker")
    assert svc.is_running, host.run("systemctl status docker --no-pager").stdout
    assert svc.is_enabled


def test_docker_users(host: Any, gpu: dict[str, Any]) -> None:
    for user in gpu["docker_users"]:
        assert "docker" in host.user(user).groups, user


def test_daemon_json_merged(host: Any, gpu: dict[str, Any]) -> None:
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    for key, value in gpu["daemon_json"].items():
        assert daemon.get(key) == value, (key, daemon)
    assert daemon["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime", daemon


def test_docker_knows_the_nvidia_runtime(host: Any, gpu: dict[str, Any]) -> None:
    runtimes = host.check_output("docker info --format '{{json .Runtimes}}'")
    assert "nvidia" in json.loads(runtimes), runtimes


# ---- CDI ----------------------------------------------------------------------------------------


def test_cdi_spec(host: Any, gpu: dict[str, Any]) -> None:
    spec = host.file(gpu["cdi_spec"])
    if not gpu["wsl"]:
        pytest.skip("the CDI spec is generated on WSL (or with nvidia_container_toolkit_cdi_native)")
    assert spec.is_file and spec.mode == 0o644
    assert "kind: nvidia.com/gpu" in spec.content_string
    assert "nvidia.com/gpu=all" in host.check_output("nvidia-ctk cdi list").split()
