"""Runs ``ansible-playbook`` for the test suites and reads its PLAY RECAP.

One runner for every suite that drives Ansible (tests/engine, tests/provision), so that
finding the binary, the environment and the recap parsing are written once::

    run = run_playbook(play, inventory, "-e", "x=1")
    assert run.returncode == 0, run.tail()
    assert run.counts()["changed"] == 0, run.recap
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PlaybookRun", "ansible_tool", "parse_recap", "run_playbook"]

REPO = Path(__file__).resolve().parents[1]
_RECAP_LINE = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.M)


def ansible_tool(name: str = "ansible-playbook") -> str | None:
    """Path of an Ansible command: the repo's .venv-ansible (what `make` installs), then the
    running interpreter's venv, then PATH; None when there is none."""
    for cand in (REPO / ".venv-ansible" / "bin" / name, Path(sys.executable).parent / name):
        if cand.exists():
            return str(cand)
    return shutil.which(name)


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """``{host: {"ok": n, "changed": n, ...}}`` from the PLAY RECAP lines of ``output``."""
    return {
        m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))} for m in _RECAP_LINE.finditer(output)
    }


@dataclass
class PlaybookRun:
    """One finished ansible-playbook run (or anything that prints a PLAY RECAP)."""

    argv: list[str]
    returncode: int
    stdout: str  # stdout and stderr together, in the order they came
    seconds: float
    log: Path | None = None

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        return parse_recap(self.stdout)

    def counts(self) -> dict[str, int]:
        """Task counts summed over the hosts of the recap."""
        total: dict[str, int] = {}
        for host in self.recap.values():
            for k, v in host.items():
                total[k] = total.get(k, 0) + v
        return total

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.stdout.splitlines()[-lines:])


def run_playbook(
    playbook: Path | str,
    inventory: Path | str,
    *args: str,
    cwd: Path = REPO,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    timeout: float | None = None,
) -> PlaybookRun:
    """Run ``ansible-playbook -i INVENTORY PLAYBOOK ARGS...`` in ``cwd`` with its ansible.cfg.

    ``env`` is laid over os.environ and the defaults. With ``log``, the command line and the
    output go to that file as they come (readable while the run goes on) and stay there.
    """
    argv = [ansible_tool() or "ansible-playbook", "-i", str(inventory), str(playbook), *args]
    full_env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(cwd / "ansible.cfg"),
        # No colour codes: the recap and the tests' searches read plain text.
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        **(env or {}),
    }
    started = time.monotonic()
    if log is None:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        return PlaybookRun(argv, proc.returncode, proc.stdout, time.monotonic() - started)
    header = f"$ {' '.join(argv)}\n"
    with log.open("w") as fh:
        fh.write(header)
        fh.flush()
        returncode = subprocess.run(
            argv, cwd=cwd, env=full_env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False
        ).returncode
    seconds = time.monotonic() - started
    return PlaybookRun(argv, returncode, log.read_text()[len(header) :], seconds, log)
