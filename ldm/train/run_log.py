"""What a training run tells its user, and nothing it cannot act on.

- :class:`StepProgressBar`: the bar counts optimizer steps up to the run's last step
  (``max_steps``) instead of the batches of one epoch, resumed runs included, hides Lightning's
  ``v_num`` and is printed complete once.
- :class:`PartsSummary`: the model's parts, their parameters and train/eval mode (Lightning's table
  without its FLOPs column, all zeros here); :func:`frozen_parts_note` says in one line that the
  frozen parts are in eval mode on purpose.
- :class:`RunSummary`: at the end, writes the last step's ``train/*`` values to CSV and TensorBoard
  when Lightning's ``log_every_n_steps`` skipped that step (so a 3-step run has its metrics on disk),
  then logs one line: steps, time, it/s, final and lowest loss, the best save and the samples;
  and one more: the file to use (embedding, LoRA or fine-tuned model) and the ``scripts/stable_txt2img.py``
  command for it.
- :func:`quiet_libraries`: hides Lightning's advert, its warning about the frozen parts' eval mode
  and a deprecation warning from inside Lightning (``main.py --verbose`` leaves them).

Steps are numbered as in :mod:`ldm.train.run_metrics`: step N is the state after N optimizer steps.
"""
from __future__ import annotations

import logging
import re
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities.model_summary import get_human_readable_count

if TYPE_CHECKING:
    from ldm.train.validation.callback import ValidationSampler

logger = logging.getLogger(__name__)


class StepProgressBar(TQDMProgressBar):
    """Training progress as ``step/max_steps``, kept across epochs and resumes; no ``v_num``.

    The bar closes at the last step, or where an exception (Ctrl-C, SIGTERM) stopped the run, so what
    the run logs afterwards (the final saves, validation, the summary) comes below it, shown once.
    """

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._count_steps(trainer)  # a run resumed mid-epoch gets no on_train_epoch_start first

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def _count_steps(self, trainer) -> None:
        total = trainer.estimated_stepping_batches
        bar = self.train_progress_bar
        bar.reset(None if total == float("inf") else int(total))
        bar.initial = bar.n = bar.last_print_n = trainer.global_step  # the rate counts this run's steps only
        bar.set_description("Training step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self._should_update(trainer.global_step, bar.total):
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
        if bar.total is not None and bar.n >= bar.total:
            bar.close()  # Lightning's later refresh and close of a closed bar print nothing

    def on_exception(self, trainer, pl_module, exception):
        try:
            bar = self.train_progress_bar
        except TypeError:  # stopped before training started
            return
        bar.close()  # now, where it stopped: not again when the process exits

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3725`` -> ``1h02m05s``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02}m{secs:02}s" if hours else f"{minutes}m{secs:02}s" if minutes else f"{secs}s"


# what a run trains -> the stable_txt2img.py flag that takes the file it leaves
RESULT_FLAGS = {"embedding": "--embedding_path", "LoRA": "--lora", "model": "--ckpt"}


@dataclass(frozen=True)
class SamplingCommand:
    """What ``scripts/stable_txt2img.py`` needs to sample a run's result.

    ``config`` is the run's merged config (it loads for sampling as it is), ``ckpt`` the weights the
    run started from, ``prompt`` the training prompt (e.g. ``a photo of a * woman``), ``size`` the
    training image size (None: the script's default), ``outdir`` where the samples go and
    ``latent_factor`` the autoencoder's downsampling (named only when it is not SD's 8). ``kind`` is what
    the run trains (a key of :data:`RESULT_FLAGS`: an embedding, LoRA adapters or the model itself), ``final``
    the file it writes at the end, and ``loras`` the ``--lora FILE[:SCALE]`` folded into its base weights.
    """

    config: Path
    ckpt: str
    prompt: str
    size: int | None
    outdir: Path
    latent_factor: int | None = None
    kind: str = "embedding"
    final: Path | None = None
    loras: tuple[str, ...] = ()

    def line(self, result: Path | None) -> str:
        """The shell command line that samples ``result``, a file of :attr:`kind` (None: the base alone). A model
        the run fine-tuned already holds the ``loras`` folded into its base, so it is sampled without them."""
        flag = RESULT_FLAGS[self.kind]
        args = ["python", "scripts/stable_txt2img.py", "--config", str(self.config)]
        if flag == "--ckpt" and result is not None:
            args += ["--ckpt", str(result)]
        else:
            args += ["--ckpt", self.ckpt, *(arg for spec in self.loras for arg in ("--lora", spec))]
            args += [flag, str(result)] if result is not None else []
        args += ["--prompt", self.prompt]
        if self.size is not None:
            args += ["--H", str(self.size), "--W", str(self.size)]
        if self.latent_factor not in (None, 8):
            args += ["--f", str(self.latent_factor)]
        return shlex.join([*args, "--outdir", str(self.outdir)])


class RunSummary(pl.Callback):
    """Flushes the last step's metrics and logs the end-of-run lines (see the module docstring).

    ``validation`` adds the best save and where the samples are; place this callback after it and after
    the callbacks that write the final files, so that its final validation and those files are done. With
    ``sampling``, the second line names the file to use, the best one when validation picked one, else
    the run's final file (when the run wrote it).
    """

    def __init__(self, validation: ValidationSampler | None = None, *, sampling: SamplingCommand | None = None):
        self.validation = validation
        self.sampling = sampling
        self._started = 0.0
        self._first_step = 0
        self._losses: list[tuple[int, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self._started = time.perf_counter()
        self._first_step = trainer.global_step
        self._losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append((trainer.global_step, loss.detach()))  # no host sync inside the loop

    def on_train_end(self, trainer, pl_module):
        self.flush_last_step(trainer)
        if trainer.is_global_zero:
            logger.info("%s", self.summary(trainer))
            if (advice := self.next_step()) is not None:
                logger.info("%s", advice)

    @staticmethod
    def flush_last_step(trainer) -> None:
        """Log the last step's ``train/*`` values when ``log_every_n_steps`` skipped that step."""
        every = trainer.log_every_n_steps
        if not every or trainer.global_step == 0 or trainer.global_step % every == 0 or trainer.should_stop:
            return  # Lightning logged the last step itself
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        if not metrics:
            return
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()

    def summary(self, trainer) -> str:
        elapsed = time.perf_counter() - self._started
        steps = trainer.global_step - self._first_step
        parts = [f"Training done: {steps} steps (to step {trainer.global_step}) in {format_duration(elapsed)} "
                 f"({steps / elapsed if elapsed > 0 else 0.0:.2f} it/s)"]
        if self._losses:
            values = torch.stack([loss.float().cpu() for _, loss in self._losses])
            lowest = int(values.argmin())
            parts.append(f"loss final {float(values[-1]):.4f}, lowest {float(values[lowest]):.4f} "
                         f"(step {self._losses[lowest][0]})")
        if self.validation is not None:
            parts.append(self.validation.describe())
        return "; ".join(parts)

    def next_step(self) -> str | None:
        """Which file to use and the command that samples with it; None when there is nothing to sample."""
        if self.sampling is None:
            return None
        what, final = self.sampling.kind, self.sampling.final
        best = self.validation.best_file() if self.validation is not None else None
        if best is not None:
            path, step = best
            choice = f"the best {what} (step {step}), {path}"
        elif final is not None and final.is_file():
            path, choice = final, f"the final {what}, {final}"
        else:
            return None
        return f"Use {choice}. Sample with it: {self.sampling.line(path)}"


class PartsSummary(pl.Callback):
    """Logs the model's top-level parts once at the start: name, type, parameters, train/eval mode.

    It replaces Lightning's model summary, whose FLOPs column is all zeros here (the model has no
    example input to count them with).
    """

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            logger.info("Model parts:\n%s", parts_table(pl_module))


def parts_table(module: torch.nn.Module) -> str:
    """A text table of ``module``'s children (name, type, parameters, mode) and the trainable count."""
    rows = [("", "Name", "Type", "Params", "Mode")]
    for index, (name, child) in enumerate(module.named_children()):
        rows.append((str(index), name, type(child).__name__, get_human_readable_count(_numel(child)),
                     "train" if child.training else "eval"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    trainable = _numel(module, trainable_only=True)
    lines.append(f"Trainable params: {get_human_readable_count(trainable)} of {get_human_readable_count(_numel(module))}")
    return "\n".join(lines)


def _numel(module: torch.nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def frozen_parts_note(module: torch.nn.Module) -> str | None:
    """One line saying which parts are in eval mode on purpose (None when none is)."""
    frozen = [name for name, child in module.named_children()
              if not any(m.training for m in child.modules())]
    if not frozen:
        return None
    count = sum(1 for m in module.modules() if not m.training)
    return (f"The frozen parts ({', '.join(frozen)}: {count} modules) are in eval mode on purpose: "
            "no dropout, and their weights do not change")


# (warnings module, message start): noise about Lightning's own internals, or about what this project
# does on purpose (frozen parts in eval mode: frozen_parts_note says so instead)
LIBRARY_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),  # Lightning's own call into torch
)
ADVERT_PREFIX = "💡 Tip:"  # Lightning's adverts for its cloud services


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIX)


_NO_ADVERTS = _NoAdverts()


def quiet_libraries() -> None:
    """Hide Lightning's adverts and the warnings of :data:`LIBRARY_WARNINGS`; all others still show."""
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NO_ADVERTS)


def show_everything() -> None:
    """``--verbose``: every warning (deprecations included, once per place) and Lightning's adverts."""
    warnings.simplefilter("default")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").removeFilter(_NO_ADVERTS)
