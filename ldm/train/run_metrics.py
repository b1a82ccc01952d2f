"""A run's metrics on disk: numbered as its files are, and kept across ``-r``.

One step numbering everywhere: step N is the state after N optimizer steps. ``embeddings_gs-N.pt``,
``last.ckpt`` at N, ``images/validation/step-N.png``, the progress bar's N / max_steps, the end-of-run
summary, and the ``step`` of ``csv/metrics.csv`` and TensorBoard all say N; the loss and learning
rate of the N-th step are logged at step N. (Lightning alone would log them at its 0-based batch
count, N - 1: :class:`StepNumbering` logs ``step``, which Lightning then takes as the x-axis.)

Across resumes (``-r``, from ``last.ckpt`` at step S): ``metrics.csv`` and the TensorBoard events keep
what the earlier runs logged up to S and drop what they logged after S (the resumed run trains
those steps again and logs them anew), so each logged step appears once.
"""
from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"


class StepNumbering(pl.Callback):
    """Logs ``step`` = the number of the step a batch trains (1 for the first) and each learning rate.

    Both are logged before the batch, as device tensors (no host-to-device copy in the step); Lightning
    writes them with the step's other values. They replace Lightning's ``LearningRateMonitor``, whose
    rows carry Lightning's 0-based count.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        values = {"step": trainer.global_step + 1, **learning_rates(trainer)}
        for name, value in values.items():  # float64: Lightning keeps it, so 8e-4 is written as 0.0008
            pl_module.log(name, torch.full((), float(value), dtype=torch.float64, device=pl_module.device),
                          on_step=True, on_epoch=False, prog_bar=False, logger=True)


def learning_rates(trainer) -> dict[str, float]:
    """``lr-<Optimizer>`` (``/pgK`` for the K-th of several parameter groups) -> the learning rate now."""
    rates = {}
    optimizers = trainer.optimizers
    for index, optimizer in enumerate(optimizers):
        name = f"lr-{type(optimizer).__name__}" + (f"-{index}" if len(optimizers) > 1 else "")
        groups = optimizer.param_groups
        for number, group in enumerate(groups, start=1):
            rates[name + (f"/pg{number}" if len(groups) > 1 else "")] = float(group["lr"])
    return rates


def tensorboard_resume_kwargs(resume_step: int | None) -> dict[str, int]:
    """TensorBoardLogger arguments that hide the events an interrupted run logged after ``resume_step``."""
    return {} if resume_step is None else {"purge_step": resume_step + 1}


def continue_csv_metrics(csv_logger: CSVLogger, resume_step: int) -> None:
    """Start ``csv_logger``'s ``metrics.csv`` with the earlier rows up to ``resume_step``.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts: the rows are read first,
    then written back through the logger (the file is whole again before training starts).
    """
    path = Path(csv_logger.log_dir) / METRICS_FILE
    rows = read_rows(path, up_to_step=resume_step) if path.is_file() else []
    with warnings.catch_warnings():  # "Previous log files ... will be deleted": not these, they are kept
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        csv_logger.experiment  # noqa: B018 -- creates Lightning's writer, which deletes the old file
    for step, values in rows:
        csv_logger.log_metrics(values, step=step)
    csv_logger.save()
    if rows:
        logger.info("%s continues: %d rows up to step %d kept", path, len(rows), resume_step)


def read_rows(path: Path, *, up_to_step: int) -> list[tuple[int, dict[str, float]]]:
    """``(step, {column: value})`` of the rows of a ``metrics.csv`` with ``step <= up_to_step`` (empty cells left out)."""
    kept = []
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            step = int(float(row.pop("step")))
            if step <= up_to_step:
                kept.append((step, {key: _number(text) for key, text in row.items() if text not in ("", None)}))
    return kept


def _number(text: str) -> int | float:
    """A CSV cell as it was logged: ``'0'`` -> 0 (an epoch), ``'1.25'`` -> 1.25."""
    try:
        return int(text)
    except ValueError:
        return float(text)
