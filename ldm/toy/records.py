"""Stored results of the toy benchmark: one JSON file per run and per probe, named by its protocol's digest.

A restarted benchmark reuses a stored result only when its fingerprint (the protocol it was made with)
matches and it is whole (:func:`load_record`); files are written atomically, so a stopped benchmark leaves
no partial file.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from ldm.util import atomic_write

logger = logging.getLogger(__name__)


def record_path(workdir: Path, cell: str, subject_seed: int, seed: int, fingerprint: dict) -> Path:
    """Where the result of one run (cell, subject, training seed) is kept for a resumed benchmark.

    The name ends in a short hash of the run's ``fingerprint``, so that a run of another protocol (``--quick``,
    other ``--samples``) in the same workdir is kept beside it instead of replacing it.
    """
    return workdir / "runs" / cell / f"subject-{subject_seed}-seed-{seed}-{short_digest(fingerprint)}.json"


def short_digest(fingerprint: dict) -> str:
    """The first 10 hex digits of the sha256 of ``fingerprint`` as sorted JSON: names a stored result."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]


def stored_probe(workdir: Path, name: str, fingerprint: dict,
                 compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """A probe's figures kept as ``WORKDIR/probes/<name>-<digest>.json``: computed once per ``fingerprint``.

    A rerun of the benchmark that reuses every run then costs no sampling at all. A missing, unreadable or
    other-fingerprint file is recomputed and written atomically.
    """
    path = workdir / "probes" / f"{name}-{short_digest(fingerprint)}.json"
    try:
        stored = json.loads(path.read_text())
        if stored["fingerprint"] == fingerprint and isinstance(stored["figures"], dict):
            return stored["figures"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("%s is unreadable (%s): the probe is run again", path, err)
    figures = compute()
    text = json.dumps({"fingerprint": fingerprint, "figures": figures}, indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return figures


def save_record(path: Path, record: dict) -> None:
    """Write a run's result atomically: a benchmark stopped mid-write leaves no partial file."""
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_record(path: Path, fingerprint: dict) -> dict | None:
    """A stored run result that can be reused, else None (missing, unreadable, partial or another protocol).

    Reusable means: valid JSON with this ``fingerprint``, one point per setting in order, every figure
    a number in [0, 1], and the run's result files (needed by cells trained on top of it) still there.
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        settings = [[p["steps"], p["strength"]] for p in record["points"]]
        figures = [p[k] for p in record["points"] for k in ("fidelity", "editability", "features", "attribute")]
        valid = (record["fingerprint"] == fingerprint and settings == fingerprint["settings"]
                 and all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in figures)
                 and all(Path(record[k]).is_file() for k in ("result", "unet") if k in record))
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("%s is unreadable (%s): the run is redone", path, err)
        return None
    if not valid:
        logger.warning("%s is partial, of another protocol or lost its result file: the run is redone", path)
        return None
    return record
