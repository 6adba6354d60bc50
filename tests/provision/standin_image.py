"""A STAND-IN for NVIDIA's Triton container image, built from the real tritonserver binary.

NGC (nvcr.io) is unreachable here, so the container runtime of roles/triton is tested
against an image built on this machine: the test hosts' Ubuntu 24.04 rootfs
(testhost.build_rootfs) plus the real ``tritonserver`` 2.51 from the ``nvidia-pytriton``
wheel of the cached wheelhouse, laid out where NGC's ``tritonserver:<yy.mm>-py3`` has it:

    /opt/tritonserver/bin/tritonserver
    /opt/tritonserver/lib/                    the wheel's nvidia_pytriton.libs (tritonserver's
                                              RPATH is $ORIGIN/../lib; ldconfig knows it too)
    /opt/tritonserver/backends/python/        libtriton_python.so, triton_python_backend_utils.py
                                              and the stub of the image's Python (3.12)
    /opt/tritonserver/caches/local/
    /opt/tritonserver/STANDIN                 says what this is

plus ``libpython3.12t64`` (the stub links libpython3.12.so.1.0; installed with apt in a
chroot, which needs Ubuntu's archive once per cache key). The result is a zstd tarball for
``docker import`` (see ``import_argv``), cached as
``$STACK_CACHE/images/tritonserver-standin-<key>.tar.zst``, where the key hashes the rootfs
tarball's name (itself a content key), the wheel's SHA-256, the Python version and this
module's build recipe. Its image reference carries the key, so a changed image is a new
reference. A cache hit costs a hash of the wheel (well under a second).

Not in the image: CUDA, the TensorRT-LLM/vLLM backends, NVIDIA's entrypoint. Models that
need Python packages get them from the stack's venv, mounted by the role (as on NGC's image).

CLI: ``python tests/provision/standin_image.py [--wheelhouse DIR]`` prints the tarball path
and the image reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# As a script: this folder (the test-host modules) and the repo (stack.models) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import testhost as th
from box import run
from procs import remove_tree, unmount_under
from rootfs import UBUNTU_MIRROR

from stack.models import file_digest

# Bump when the recipe below changes what ends up in the image.
RECIPE_VERSION = "1"
PYTHON_VERSION = "3.12"
IMAGE_NAME = "localhost/tritonserver-standin"
# What NGC's image sets that the role relies on: tritonserver on PATH.
IMAGE_ENV = {"PATH": "/opt/tritonserver/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
APT_PACKAGES = (f"libpython{PYTHON_VERSION}t64",)
# Only what apt needs for those packages (the rootfs lists backports and universe too).
_APT_SOURCES = (
    "Types: deb\nURIs: {mirror}\nSuites: noble noble-updates noble-security\nComponents: main\n"
    "Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg\n"
)
_SLIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt", "var/lib/apt/lists")


def _log(msg: str) -> None:
    print(f"[standin-image] {msg}", file=sys.stderr, flush=True)


def find_wheel(wheelhouse: Path) -> Path:
    wheels = sorted(wheelhouse.glob("nvidia_pytriton-*.whl"))
    if not wheels:
        raise th.TestHostError(f"no nvidia_pytriton wheel in {wheelhouse}")
    return wheels[-1]


def image_key(rootfs: Path, wheel: Path) -> str:
    recipe = Path(__file__).read_text()
    spec = {
        "v": RECIPE_VERSION,
        "rootfs": rootfs.name,
        "wheel": file_digest(wheel),
        "python": PYTHON_VERSION,
        "apt": APT_PACKAGES,
        "recipe": hashlib.sha256(recipe.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def image_ref(key: str) -> str:
    return f"{IMAGE_NAME}:25.01-py3-{key}"


def import_argv(tarball: Path | str, ref: str) -> list[str]:
    """``docker import`` with the image settings NGC's image has (tritonserver on PATH)."""
    changes = [arg for k, v in IMAGE_ENV.items() for arg in ("--change", f"ENV {k}={v}")]
    return ["docker", "import", *changes, "--message", "tritonserver stand-in (tests/provision)", str(tarball), ref]


def _layout(root: Path, wheel: Path) -> None:
    """Put the wheel's Triton where NGC's image has it."""
    dest = root / "opt/tritonserver"
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))]
            zf.extractall(tmp, members)
        src = Path(tmp) / "pytriton/tritonserver"
        stub = src / "python_backend_stubs" / PYTHON_VERSION / "triton_python_backend_stub"
        if not stub.is_file():
            raise th.TestHostError(f"{wheel.name} has no Python backend stub for {PYTHON_VERSION}")
        (dest / "bin").mkdir(parents=True)
        shutil.copy2(src / "bin/tritonserver", dest / "bin/tritonserver")
        shutil.copytree(src / "backends/python", dest / "backends/python")
        shutil.copy2(stub, dest / "backends/python/triton_python_backend_stub")
        shutil.copytree(src / "caches", dest / "caches")
        shutil.copytree(Path(tmp) / "nvidia_pytriton.libs", dest / "lib")
    for path in (dest / "bin/tritonserver", dest / "backends/python/triton_python_backend_stub"):
        path.chmod(0o755)
    (root / "etc/ld.so.conf.d/tritonserver.conf").write_text("/opt/tritonserver/lib\n")
    (dest / "STANDIN").write_text(
        "STAND-IN for nvcr.io/nvidia/tritonserver (tests/provision/standin_image.py): the real\n"
        f"tritonserver from {wheel.name}, no CUDA, Python backend only (Python {PYTHON_VERSION}).\n"
    )


def _apt_install(root: Path, mirror: str) -> None:
    """apt-get install APT_PACKAGES inside the tree (chroot; the box reaches Ubuntu's archive)."""
    sources = root / "tmp/standin.sources"
    sources.write_text(_APT_SOURCES.format(mirror=mirror))
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["-o", "Dir::Etc::SourceList=/tmp/standin.sources", "-o", "Dir::Etc::SourceParts=-", "-q"]
    run(["mount", "-t", "proc", "proc", root / "proc"])
    try:
        run(["chroot", root, "apt-get", *apt, "update"], env=env, timeout=600)
        run(
            ["chroot", root, "apt-get", *apt, "install", "-y", "--no-install-recommends", *APT_PACKAGES],
            env=env,
            timeout=600,
        )
        run(["chroot", root, "ldconfig"], env=env)
        # The image must be able to start tritonserver: all its libraries resolve.
        ldd = run(["chroot", root, "ldd", "/opt/tritonserver/backends/python/triton_python_backend_stub"], env=env)
        if "not found" in ldd.stdout:
            raise th.TestHostError(f"the stub's libraries do not resolve in the image:\n{ldd.stdout}")
    finally:
        unmount_under(root / "proc")
        sources.unlink(missing_ok=True)
        (root / "etc/resolv.conf").unlink(missing_ok=True)


def build(cache_dir: Path, wheelhouse: Path) -> tuple[Path, str]:
    """(tarball, image reference) of the stand-in image, built first when not cached."""
    t0 = time.monotonic()
    cache_dir = Path(cache_dir).resolve()
    rootfs = th.build_rootfs(cache_dir, distro="ubuntu")
    wheel = find_wheel(wheelhouse)
    key = image_key(rootfs, wheel)
    images = cache_dir / "images"
    final = images / f"tritonserver-standin-{key}.tar.zst"
    if final.is_file():
        _log(f"cached: {final.name} ({time.monotonic() - t0:.1f} s)")
        return final, image_ref(key)
    images.mkdir(parents=True, exist_ok=True)
    work = images / f".build-{key}-{os.getpid()}"
    remove_tree(work)
    root = work / "root"
    root.mkdir(parents=True)
    try:
        run(["tar", "--numeric-owner", "-I", "zstd -d -T0", "-C", root, "-xpf", rootfs], timeout=600)
        _layout(root, wheel)
        _apt_install(root, UBUNTU_MIRROR)
        for rel in _SLIM:
            shutil.rmtree(root / rel, ignore_errors=True)
        tmp = work / "image.tar.zst"
        run(["tar", "--numeric-owner", "-I", "zstd -T0 -3", "-C", root, "-cf", tmp, "."], timeout=600)
        tmp.chmod(0o644)
        os.replace(tmp, final)
    finally:
        remove_tree(work)
    for old in images.glob("tritonserver-standin-*.tar.zst"):
        if old != final:
            old.unlink(missing_ok=True)
    size = final.stat().st_size / 2**20
    _log(f"built {final.name} ({size:.0f} MiB) in {time.monotonic() - t0:.1f} s")
    return final, image_ref(key)


def _main() -> int:
    import wheelhouse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=th.default_cache_dir())
    ap.add_argument("--wheelhouse", type=Path, help="default: the wheelhouse test_provision uses")
    args = ap.parse_args()
    wheels = args.wheelhouse or wheelhouse.build(
        Path(os.environ.get("STACK_CACHE", args.cache_dir)), torch_spec="torch==2.13.0"
    )
    tarball, ref = build(args.cache_dir, wheels)
    print(tarball)
    print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
