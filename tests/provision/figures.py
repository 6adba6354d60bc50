"""Figures of the provisioning tests (seconds per step, task counts), printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Figure:
    step: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def row(self) -> str:
        c = self.counts
        tasks = (
            f"ok={c.get('ok', 0):<4} changed={c.get('changed', 0):<3} failed={c.get('failed', 0):<2} "
            f"skipped={c.get('skipped', 0):<3}"
            if c
            else ""
        )
        return f"{self.step:<44} {self.seconds:8.1f} s  {tasks:<44} {self.note}"


FIGURES: list[Figure] = []
