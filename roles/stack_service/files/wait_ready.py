"""Wait until every URL answers 200 while a systemd unit runs (run by roles/stack_service/tasks/wait_ready.yml).

Fails at once when the unit crashes while it starts (systemd restarts it, or it has failed):
a service that cannot start cleanly is reported now, with its journal, not after all its
restarts. Else fails after the timeout.
Stdlib only: it runs under the host's own python3 through ansible.builtin.script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.error
import urllib.request


def unit_state(unit: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", unit, "--property=ActiveState,SubState,NRestarts,Result"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def not_ready(urls: list[str]) -> str | None:
    """None when every URL answers 200, else why not."""
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status != 200:
                    return f"{url} -> {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"{url} -> {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            return f"{url}: {getattr(exc, 'reason', exc)}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unit", required=True)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("urls", nargs="+")
    args = ap.parse_args()
    started = time.monotonic()
    deadline = started + args.timeout
    restarts_seen = None
    why = "not checked yet"
    while True:
        state = unit_state(args.unit)
        restarts = state.get("NRestarts", "0")
        if restarts_seen is None:
            restarts_seen = restarts
        crashed = restarts != restarts_seen or state.get("SubState") == "auto-restart"
        if crashed or state.get("ActiveState") == "failed":
            print(
                f"{args.unit} crashed while starting (state {state.get('ActiveState')}/{state.get('SubState')}, "
                f"result {state.get('Result')}, NRestarts {restarts}) after {time.monotonic() - started:.0f} s; "
                f"last check: {why}"
            )
            return 1
        why = not_ready(args.urls) or ""
        if not why and state.get("ActiveState") == "active":
            print(f"{args.unit} ready after {time.monotonic() - started:.1f} s")
            return 0
        if time.monotonic() > deadline:
            print(
                f"{args.unit} not ready after {args.timeout:.0f} s "
                f"(state {state.get('ActiveState')}/{state.get('SubState')}); last check: {why}"
            )
            return 1
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
