"""Stand-in apt repositories for NVIDIA's CUDA and container-toolkit repos (tests only).

No machine here reaches NVIDIA's repositories, so the provisioning tests serve two small
signed flat apt repositories of stand-in packages with the real names (built with
``equivs-build`` from ``tests/standins/apt/``, see its README) over HTTP on a test host's
bridge. The roles' real key, repository and install tasks run against them unchanged; only
the URLs differ, through role variables.

    with standin_apt.serve(cache_dir, bind_ip) as repos:
        repos.cuda_base_url            # cuda_toolkit_repo_base_url
        repos.toolkit_repo_url         # nvidia_container_toolkit_repo_url
        repos.toolkit_key_url          # nvidia_container_toolkit_key_url

Built once and cached as ``<cache>/standin-apt/<key>/`` where the key hashes the control
files, the scripts they ship, the served URL and ``SCRIPT_VERSION``. Each build makes its own
throwaway GPG keys (``GNUPGHOME`` inside that folder). Box tools: equivs, dpkg-dev,
apt-utils, gnupg (``testhost.ensure_apt_tools`` installs them).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bump when the build below changes what ends up in the repositories.
SCRIPT_VERSION = "1"
STANDINS = Path(__file__).resolve().parents[1] / "standins" / "apt"
DEFAULT_PORT = int(os.environ.get("STANDIN_APT_PORT", "3180"))

# The CUDA stand-in imitates NVIDIA's WSL repository (…/repos/wsl-ubuntu/x86_64/).
CUDA_DISTRO = "wsl-ubuntu"
CUDA_ARCH = "x86_64"
# Two releases of the container toolkit, so that a version pin is really tested: the roles'
# tests pin the older one while the newer one is the repository's candidate.
TOOLKIT_VERSIONS = ("1.17.8-1", "1.18.0-1")
TOOLKIT_ARCH = "amd64"


def _log(msg: str) -> None:
    print(f"[standin-apt] {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


@dataclass(frozen=True)
class Repos:
    """URLs of the served stand-ins (what the role variables point at)."""

    base_url: str
    requests: list[str] = field(default_factory=list, compare=False)

    @property
    def cuda_base_url(self) -> str:
        """Like https://developer.download.nvidia.com/compute/cuda/repos."""
        return f"{self.base_url}/cuda/repos"

    @property
    def cuda_repo_url(self) -> str:
        return f"{self.cuda_base_url}/{CUDA_DISTRO}/{CUDA_ARCH}"

    @property
    def toolkit_repo_url(self) -> str:
        """Like https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) (apt expands $(ARCH))."""
        return f"{self.base_url}/libnvidia-container/stable/deb/$(ARCH)"

    @property
    def toolkit_key_url(self) -> str:
        return f"{self.base_url}/libnvidia-container/gpgkey"


# --------------------------------------------------------------------------- build


def _sources() -> list[Path]:
    return sorted(p for p in STANDINS.rglob("*") if p.is_file() and p.name != "README.md")


def cache_key(base_url: str) -> str:
    h = hashlib.sha256()
    h.update(f"{SCRIPT_VERSION}\n{base_url}\n{TOOLKIT_VERSIONS}\n".encode())
    for path in _sources():
        h.update(str(path.relative_to(STANDINS)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _render(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace(f"@{k}@", v)
    return text


def _gen_key(gnupg: Path, name: str) -> str:
    """A throwaway signing key; returns its fingerprint."""
    env = dict(os.environ, GNUPGHOME=str(gnupg))
    uid = f"{name} STAND-IN signing key (wsl-triton-llm tests) <standin@invalid>"
    _run(
        [
            "gpg",
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            uid,
            "ed25519",
            "sign",
            "never",
        ],
        env=env,
    )
    out = _run(["gpg", "--batch", "--with-colons", "--list-secret-keys", uid], env=env)
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def _kill_agent(env: dict[str, str]) -> None:
    """gpg started an agent for this GNUPGHOME: stop that one (by its home), nothing else."""
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True, check=False)


def _equivs_template(work: Path) -> Path:
    """equivs' own template, plus one override: CUDA installs under /usr/local (as NVIDIA's
    packages do, outside Debian policy), which debhelper's dh_usrlocal refuses."""
    tpl = work / "equivs-template"
    shutil.copytree("/usr/share/equivs/template", tpl)
    with (tpl / "debian" / "rules").open("a") as fh:
        fh.write("\noverride_dh_usrlocal:\n")
    return tpl


def _build_debs(src: Path, out: Path, values: dict[str, str], template: Path, extra: dict[str, bytes]) -> list[Path]:
    """equivs-build every *.ctl of ``src`` (text files rendered with ``values``) into ``out``."""
    work = Path(tempfile.mkdtemp(prefix="pkg-", dir=template.parent))
    for path in src.iterdir():
        dest = work / path.name
        dest.write_text(_render(path.read_text(), values))
        dest.chmod(path.stat().st_mode & 0o777)
    for name, data in extra.items():
        (work / name).write_bytes(data)
    debs = []
    for ctl in sorted(work.glob("*.ctl")):
        _run(["equivs-build", f"--templates={template}", ctl.name], cwd=work)
    for deb in work.glob("*.deb"):
        debs.append(Path(shutil.move(str(deb), out / deb.name)))
    shutil.rmtree(work)
    return debs


def _index_and_sign(repo: Path, gnupg: Path, fingerprint: str, label: str) -> None:
    """Flat repository metadata: Packages(.gz), Release, InRelease (clearsigned), Release.gpg."""
    packages = _run(["dpkg-scanpackages", "--multiversion", "."], cwd=repo)
    (repo / "Packages").write_text(packages)
    _run(["gzip", "-9kn", "Packages"], cwd=repo)
    release = _run(
        [
            "apt-ftparchive",
            "-o",
            f"APT::FTPArchive::Release::Origin={label} STAND-IN",
            "-o",
            f"APT::FTPArchive::Release::Label={label}",
            "release",
            ".",
        ],
        cwd=repo,
    )
    (repo / "Release").write_text(release)
    env = dict(os.environ, GNUPGHOME=str(gnupg))
    sign = ["gpg", "--batch", "--yes", "--local-user", fingerprint, "--digest-algo", "SHA512"]
    _run([*sign, "--clearsign", "--output", "InRelease", "Release"], cwd=repo, env=env)
    _run([*sign, "--armor", "--detach-sign", "--output", "Release.gpg", "Release"], cwd=repo, env=env)


def build(cache_dir: Path, base_url: str) -> Path:
    """Build (or find) the repositories for ``base_url``; returns the folder to serve."""
    root = Path(cache_dir) / "standin-apt"
    key = cache_key(base_url)
    final = root / key
    if (final / "ok").exists():
        return final / "www"
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    gnupg = tmp / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(gnupg))
    try:
        www = tmp / "www"
        cuda = www / "cuda" / "repos" / CUDA_DISTRO / CUDA_ARCH
        toolkit = www / "libnvidia-container" / "stable" / "deb" / TOOLKIT_ARCH
        for d in (cuda, toolkit):
            d.mkdir(parents=True)
        cuda_fpr = _gen_key(gnupg, "CUDA repository")
        toolkit_fpr = _gen_key(gnupg, "libnvidia-container repository")
        # The CUDA key goes into cuda-keyring (binary keyring, like the real package); the
        # toolkit key is served armored at …/gpgkey, like nvidia.github.io does.
        cuda_keyring = subprocess.run(
            ["gpg", "--batch", "--export", cuda_fpr], env=env, capture_output=True, check=True
        ).stdout
        (www / "libnvidia-container" / "gpgkey").write_text(
            _run(["gpg", "--batch", "--armor", "--export", toolkit_fpr], env=env)
        )
        template = _equivs_template(tmp)
        repo_url = f"{base_url}/cuda/repos/{CUDA_DISTRO}/{CUDA_ARCH}"
        jobs: list[tuple[Path, Path, dict[str, str], dict[str, bytes]]] = [
            (STANDINS / "cuda", cuda, {"REPO_URL": repo_url}, {"cuda-archive-keyring.gpg": cuda_keyring})
        ]
        for version in TOOLKIT_VERSIONS:
            jobs.append(
                (
                    STANDINS / "nvidia-container-toolkit",
                    toolkit,
                    {"VERSION": version, "UPSTREAM": version.rsplit("-", 1)[0]},
                    {},
                )
            )
        # equivs-build is mostly waiting on dpkg-buildpackage: two at a time on two cores.
        with ThreadPoolExecutor(max_workers=2) as pool:
            built = list(pool.map(lambda j: _build_debs(j[0], j[1], j[2], template, j[3]), jobs))
        _log(f"built {sum(len(b) for b in built)} stand-in packages")
        _index_and_sign(cuda, gnupg, cuda_fpr, "NVIDIA CUDA")
        _index_and_sign(toolkit, gnupg, toolkit_fpr, "libnvidia-container")
        _kill_agent(env)
        shutil.rmtree(template)
        (tmp / "ok").write_text(f"{base_url}\n")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            _kill_agent(env)
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"stand-in repositories built in {time.monotonic() - t0:.1f}s: {final}")
    return final / "www"


# --------------------------------------------------------------------------- serve


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        # Keep a record (tests may look at what apt fetched) instead of logging to stderr.
        self.requests.append(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}".strip())


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def serve(cache_dir: Path, bind_ip: str, port: int = DEFAULT_PORT) -> Iterator[Repos]:
    """Build (or reuse) the stand-ins and serve them on ``bind_ip:port`` until the block ends."""
    base_url = f"http://{bind_ip}:{port}"
    www = build(cache_dir, base_url)
    requests: list[str] = []
    handler = functools.partial(type("Handler", (_Handler,), {"requests": requests}), directory=str(www))
    server = _Server((bind_ip, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="standin-apt", daemon=True)
    thread.start()
    _log(f"serving {www} at {base_url}")
    try:
        yield Repos(base_url, requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build and serve the stand-in apt repositories")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TESTHOST_CACHE", ".cache")))
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    if args.build_only:
        print(build(args.cache_dir, f"http://{args.bind}:{args.port}"))
        return 0
    with serve(args.cache_dir, args.bind, args.port) as repos:
        print(f"CUDA base URL: {repos.cuda_base_url}\ntoolkit: {repos.toolkit_repo_url}\nkey: {repos.toolkit_key_url}")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
