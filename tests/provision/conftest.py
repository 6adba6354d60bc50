"""Prints the figures of the provisioning tests (tests/provision/figures.py) at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("provisioning figures")
    for fig in FIGURES:
        terminalreporter.write_line(fig.row())
    terminalreporter.write_line(f"{'total of the steps above':<44} {sum(f.seconds for f in FIGURES):8.1f} s")
