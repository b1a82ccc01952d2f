"""Result rows of the benchmark and their plain-text and markdown tables."""
from __future__ import annotations

import math
from dataclasses import dataclass

from scripts.bench.measure import Measurement

MIB = 2 ** 20


@dataclass
class Row:
    """One benchmark line: our measurement against a baseline on the same weights."""

    name: str
    baseline: str  # what the ratio compares against, e.g. "diffusers"
    ours: Measurement | None  # None: the row was skipped (see note)
    reference: Measurement | None
    note: str = ""

    @property
    def time_ratio(self) -> float | None:
        if self.ours is None or self.reference is None:
            return None
        return self.ours.median_s / self.reference.median_s

    @property
    def memory_ratio(self) -> float | None:
        if self.ours is None or self.reference is None or self.ours.peak_bytes is None or not self.reference.peak_bytes:
            return None
        return self.ours.peak_bytes / self.reference.peak_bytes


HEADERS = ("row", "baseline", "ours ms", "base ms", "time ratio", "ours MiB", "base MiB", "mem ratio", "note")


def _ms(m: Measurement | None) -> str:
    return "-" if m is None else f"{1000 * m.median_s:.1f}"


def _mib(m: Measurement | None) -> str:
    return "-" if m is None or m.peak_bytes is None else f"{m.peak_bytes / MIB:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def cells(row: Row) -> list[str]:
    return [row.name, row.baseline, _ms(row.ours), _ms(row.reference), _ratio(row.time_ratio),
            _mib(row.ours), _mib(row.reference), _ratio(row.memory_ratio), row.note]


def plain_table(rows: list[Row]) -> str:
    lines = [list(HEADERS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)
