"""Which save is the best: the rule, and ``checkpoints/embeddings_best.*`` (``lora_best.safetensors`` in LoRA
DreamBooth) with ``best.json``.

Rule: among the saves whose validation samples show a face in at least half of the images
(``MIN_DETECTION_RATE``), the best has the highest fraction of faces under dlib's same-person
distance (0.6) to the training photos; ties go to the lower mean distance, then to the earlier
save. A save without such faces never becomes the best, so a run whose samples show no faces
writes no best at all.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ldm.util import atomic_write

logger = logging.getLogger(__name__)

MIN_DETECTION_RATE = 0.5
EMBEDDING_FILES = ("embeddings_best.pt", "embeddings_best.safetensors")
BEST_JSON = "best.json"
RULE = (f"highest identity_match among saves with face_detect_rate >= {MIN_DETECTION_RATE}; "
        "ties: lower identity_distance, then the earlier step")


@dataclass(frozen=True)
class IdentityScore:
    """The identity metrics of one save's validation samples."""

    step: int
    face_detect_rate: float | None
    identity_distance: float | None
    identity_match: float | None

    @classmethod
    def from_metrics(cls, step: int, metrics: dict[str, Any]) -> IdentityScore:
        """From :func:`ldm.evaluation.identity_metrics`' keys."""
        return cls(step, metrics["detection_rate"], metrics["mean_distance"], metrics["fraction_under_threshold"])

    @property
    def eligible(self) -> bool:
        return (self.face_detect_rate is not None and self.face_detect_rate >= MIN_DETECTION_RATE
                and self.identity_match is not None)

    def beats(self, other: IdentityScore | None) -> bool:
        """Whether this eligible score is better than ``other`` under the rule (strictly; ties keep ``other``)."""
        if not self.eligible:
            return False
        if other is None:
            return True
        return (self.identity_match, -self.identity_distance) > (other.identity_match, -other.identity_distance)


Writer = Callable[[Path, int, bool], object]  # (file, step, ema): writes the trained weights of step to file


class BestSave:
    """Keeps the best save in ``ckptdir`` as ``names`` (each written by ``write``); a resumed run continues from
    the ``best.json`` it finds. ``what`` names the weights in the log (``embedding``, ``LoRA``)."""

    def __init__(self, ckptdir: str | Path, write: Writer, *, names: Sequence[str] = EMBEDDING_FILES,
                 what: str = "embedding"):
        self.ckptdir = Path(ckptdir)
        self.write = write
        self.names = tuple(names)
        self.what = what
        self.best: IdentityScore | None = self._read()

    @classmethod
    def of_embedding(cls, ckptdir: str | Path, manager) -> BestSave:
        """``embeddings_best.pt`` and its ``.safetensors`` twin, written by the embedding ``manager``."""
        return cls(ckptdir, lambda path, step, ema: manager.save(path, step=step, ema=ema))

    @property
    def json_path(self) -> Path:
        return self.ckptdir / BEST_JSON

    @property
    def path(self) -> Path:
        return self.ckptdir / self.names[0]

    def _read(self) -> IdentityScore | None:
        if not self.json_path.is_file():
            return None
        record = json.loads(self.json_path.read_text())
        return IdentityScore(**{key: record[key] for key in IdentityScore.__dataclass_fields__})

    def offer(self, score: IdentityScore, ema: bool = False) -> bool:
        """Write the weights (with ``ema``: the embedding's moving average, which the file then says) as the
        best when ``score`` beats the best so far; True if written."""
        if not score.beats(self.best):
            return False
        for name in self.names:
            self.write(self.ckptdir / name, score.step, ema)
        record = {**asdict(score), "ema": ema, "file": self.path.name, "rule": RULE}
        atomic_write(self.json_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
        self.best = score
        logger.info("Best %s so far: step %d (identity match %.2f, distance %.3f) -> %s", self.what, score.step,
                    score.identity_match, score.identity_distance, self.path)
        return True
