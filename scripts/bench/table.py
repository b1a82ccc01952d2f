"""Result rows of the benchmark and their plain-text and markdown tables."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .measure import Measurement

MIB = 2 ** 20


@dataclass
class Row:
    """One benchmark line: our measurement against a baseline on the same weights."""

    name: str
    baseline: str  # what the ratio compares against, e.g. "diffusers"
    ours: Measurement | None  # None: the row was skipped (see note)
    reference: Measurement | None
    note: str = ""
    ours_flops: int | None = None  # FLOPs of one call (scripts/bench/flops.py)
    reference_flops: int | None = None

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


HEADERS = ("row", "baseline", "ours ms", "base ms", "time ratio", "ours MiB", "base MiB", "mem ratio",
           "ours TFLOP/s", "base TFLOP/s", "ours % peak", "note")


def _ms(m: Measurement | None) -> str:
    return "-" if m is None else f"{1000 * m.median_s:.1f}"


def _mib(m: Measurement | None) -> str:
    return "-" if m is None or m.peak_bytes is None else f"{m.peak_bytes / MIB:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def tflops(flops: int | None, m: Measurement | None) -> float | None:
    """Achieved TFLOP/s of a measured call."""
    if flops is None or m is None or m.median_s <= 0:
        return None
    return flops / m.median_s / 1e12


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _percent_of_peak(row: Row, peak_tflops: float | None) -> str:
    rate = tflops(row.ours_flops, row.ours)
    return "-" if rate is None or not peak_tflops else f"{100 * rate / peak_tflops:.1f}"


def cells(row: Row, peak_tflops: float | None = None) -> list[str]:
    return [row.name, row.baseline, _ms(row.ours), _ms(row.reference), _ratio(row.time_ratio),
            _mib(row.ours), _mib(row.reference), _ratio(row.memory_ratio),
            _rate(tflops(row.ours_flops, row.ours)), _rate(tflops(row.reference_flops, row.reference)),
            _percent_of_peak(row, peak_tflops), row.note]


def plain_table(rows: list[Row], peak_tflops: float | None = None) -> str:
    lines = [list(HEADERS)] + [cells(r, peak_tflops) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def markdown_table(rows: list[Row], peak_tflops: float | None = None) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(cells(r, peak_tflops)) + " |" for r in rows]
    return "\n".join(lines)
