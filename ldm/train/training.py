"""What ``main.py`` runs: merge configs and flags, build data, model and trainer, then fit."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError, read_checkpoint_meta
from ldm.cli import one_line
from ldm.data.images import DataRootError
from ldm.train.dreambooth import dreambooth_callbacks, export_file, prepare_dreambooth_model
from ldm.train.flags import DATASET_SPLITS
from ldm.lora import FILES_KEY, FINAL_FILE, lora_callbacks, prepare_lora_model
from ldm.models.diffusion.ddpm import NOTHING_TO_TRAIN
from ldm.precision import half_dtype
from ldm.train.run_config import check_config, configure, error_line
from ldm.train.trainer_args import device_kwargs, trainer_kwargs
from ldm.util import instantiate_from_config
from ldm.train.validation.setup import build_validation

if TYPE_CHECKING:
    from ldm.train.run_log import RunSummary, SamplingCommand

logger = logging.getLogger(__name__)

# DDP relaunches this script once per extra device: they inherit the run's time, so share one log dir.
RUN_TIME_ENV = "LDM_RUN_TIMESTAMP"


class TrainingError(RuntimeError):
    """A problem with the user's input found before training: reported in one line, exit code 2."""


@dataclass
class RunPaths:
    logdir: Path
    ckptdir: Path
    cfgdir: Path
    resume_ckpt: Path | None


def resolve_paths(opt: argparse.Namespace, now: str) -> tuple[RunPaths, list[str]]:
    """The log dir of this run (new, or the one being resumed) and the configs to merge."""
    bases = list(opt.base)
    if opt.resume:
        target = Path(opt.resume)
        if not target.exists():
            raise TrainingError(f"cannot resume: {target} does not exist (pass a log dir or its last.ckpt)")
        if target.is_file():
            logdir, ckpt = target.parent.parent, target
        else:
            logdir, ckpt = target, target / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise TrainingError(f"cannot resume: {ckpt} not found (was the run saved at least once?)")
        bases = sorted(str(p) for p in (logdir / "configs").glob("*-project.yaml")) + bases
        return RunPaths(logdir, logdir / "checkpoints", logdir / "configs", ckpt), bases
    if not bases:
        raise TrainingError("no config given: pass --base configs/stable-diffusion/v1-finetune.yaml")
    logdir = Path(opt.logdir) / f"{log_dir_prefix(opt)}_{now}{opt.postfix}"
    return RunPaths(logdir, logdir / "checkpoints", logdir / "configs", None), bases


def log_dir_prefix(opt: argparse.Namespace) -> str:
    """A new run's log dir name before its start time: the data folder's name and ``-n`` (or the config's)."""
    parts = []
    if opt.datadir_in_name and opt.data_root:
        parts.append(Path(opt.data_root).resolve().name)
    if opt.name:
        parts.append(opt.name)
    elif not parts:
        parts.append(Path(opt.base[0]).stem)
    return "_".join(parts)


def load_config(bases: list[str], dotlist: list[str]) -> DictConfig:
    missing = [b for b in bases if not Path(b).is_file()]
    if missing:
        raise TrainingError(f"config file not found: {missing[0]}")
    try:
        return OmegaConf.merge(*[OmegaConf.load(b) for b in bases], OmegaConf.from_dotlist(dotlist))
    except Exception as err:
        raise TrainingError(f"could not read the configs {bases}: {err}") from err


def add_run_settings(config: DictConfig, opt: argparse.Namespace, paths: RunPaths, trainer_args: dict,
                     device_args: dict) -> None:
    """What this run gives the model and the data through the config: seeds, learning rate, face-crop folder.

    A resumed run restores its embedding from the checkpoint, so the starting file is not read again.

    ``model.params.learning_rate`` = ``model.base_learning_rate`` x batch x devices x accumulation x
    nodes with ``--scale_lr`` (the original rule), else the base rate.
    """
    model = config.model.params
    model.training_seed = opt.seed
    if paths.resume_ckpt is not None and model.pop("embedding_manager_ckpt", None):
        logger.info("Resuming: the embedding comes from %s, not from --embedding_manager_ckpt", paths.resume_ckpt)
    for split in DATASET_SPLITS:
        part = OmegaConf.select(config, f"data.params.{split}")
        if part is None:
            continue
        if part.get("params") is None:
            part.params = {}
        if str(part.get("target", "")).endswith("PersonalizedBase") and part.params.get("seed") is None:
            part.params.seed = opt.seed  # flips and captions reproducible with --seed
        if part.params.get("face_crops") is not None and part.params.face_crops.get("crops_dir") is None:
            part.params.face_crops.crops_dir = str(paths.logdir / "faces")
    batch = int(config.data.params.batch_size)
    devices = device_args["devices"]
    factor = (batch * (len(devices) if isinstance(devices, list) else devices)
              * trainer_args["accumulate_grad_batches"] * trainer_args["num_nodes"])
    base_lr = float(config.model.base_learning_rate)
    model.learning_rate = base_lr * factor if opt.scale_lr else base_lr
    logger.info("learning rate %.2e (%s)", model.learning_rate,
                f"{factor} x base {base_lr:.2e}" if opt.scale_lr else "base, --scale_lr off")


def hold_frozen_weights_in_half(model, config: DictConfig, precision: str) -> None:
    """Under 16-mixed / bf16-mixed, frozen weights in half precision (see :mod:`ldm.precision`).

    DreamBooth keeps its frozen VAE and text encoder in float32: they go into the exported checkpoint,
    which must hold the base model's exact weights (the latent cache runs the VAE once per image anyway).
    LoRA DreamBooth exports its adapters only, so its frozen base is held in half precision as for TI.
    """
    dtype = half_dtype(precision)
    if dtype is None or not hasattr(model, "hold_frozen_weights_in_half"):
        return
    if config.get("dreambooth") is not None and config.get("lora") is None:
        logger.info("%s: DreamBooth trains float32 master weights; the frozen parts stay float32 for the export",
                    precision)
        return
    model.hold_frozen_weights_in_half(dtype)


def save_every_n_steps(config: DictConfig) -> int:
    """Steps between embedding saves (``lightning.modelcheckpoint.params.every_n_train_steps``, default 500)."""
    lightning = config.get("lightning", OmegaConf.create())
    return int(lightning.get("modelcheckpoint", {}).get("params", {}).get("every_n_train_steps", 500))


def build_trainer(config: DictConfig, paths: RunPaths, trainer_args: dict, validation=None, *,
                  resume_step: int | None = None, summary: RunSummary | None = None, verbose: bool = False):
    """Lightning's Trainer with the run's callbacks and loggers; ``trainer_args`` include the devices.

    ``resume_step``: the step of the checkpoint ``-r`` resumes (TensorBoard hides what was logged
    after it). ``summary``: the end-of-run callback (a plain one by default). ``verbose`` keeps
    Lightning's own model summary (with its FLOPs column) instead of :class:`ldm.train.run_log.PartsSummary`.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from ldm.train.callbacks import EmbeddingCheckpoint
    from ldm.nonfinite import DEFAULT_EVERY_N_STEPS, NonFiniteLossStop
    from ldm.train.run_log import PartsSummary, RunSummary, StepProgressBar
    from ldm.train.run_metrics import StepNumbering, tensorboard_resume_kwargs

    lightning = config.get("lightning", OmegaConf.create())
    every = save_every_n_steps(config)
    if trainer_args["precision"] == "16-mixed" and trainer_args["accelerator"] == "cpu":
        raise TrainingError("--precision 16-mixed needs a GPU; use 32 or bf16-mixed on the CPU")
    nonfinite_every = int(lightning.get("nonfinite_check_every_n_steps", DEFAULT_EVERY_N_STEPS))
    callbacks = [
        # the bar first: it is complete (last step) or closed (stopped) before what the other callbacks log
        *([StepProgressBar()] if trainer_args.get("enable_progress_bar", True) else []),
        NonFiniteLossStop(nonfinite_every, save_every_n_train_steps=every),  # before any save: it decides
        EmbeddingCheckpoint(paths.ckptdir, every_n_train_steps=every),  # the only writer of last.ckpt
        StepNumbering(),
        *dreambooth_callbacks(config, paths.ckptdir),
        *lora_callbacks(config, paths.ckptdir, every),
    ]
    try:
        callbacks += [instantiate_from_config(cfg) for cfg in lightning.get("callbacks", {}).values()]
    except TypeError as err:  # a lightning.callbacks key its target does not take
        raise TrainingError(error_line(err, config)) from err
    quiet_summary = trainer_args.get("enable_model_summary", True) and not verbose
    callbacks += [*([validation] if validation is not None else []), summary or RunSummary(validation),
                  *([PartsSummary()] if quiet_summary else [])]
    loggers = [CSVLogger(paths.logdir, name="", version="csv"),
               TensorBoardLogger(paths.logdir, name="", version="tensorboard", **tensorboard_resume_kwargs(resume_step))]
    # enable_checkpointing off: Lightning's default ModelCheckpoint would write its own files (last.ckpt is ours)
    kwargs = {"log_every_n_steps": min(10, every), "enable_checkpointing": False, **trainer_args,
              **({"enable_model_summary": False} if quiet_summary else {})}
    try:
        return pl.Trainer(default_root_dir=paths.logdir, callbacks=callbacks, logger=loggers, **kwargs)
    except (TypeError, ValueError, MisconfigurationException) as err:  # a lightning.trainer value Lightning refuses
        raise TrainingError(f"Lightning's Trainer refused the arguments: {str(err).strip().splitlines()[0]}") from err


def saved_step(resume_ckpt: Path) -> int:
    """The step ``resume_ckpt`` (a ``last.ckpt``) was saved at."""
    try:
        return int(read_checkpoint_meta(resume_ckpt).get("global_step", 0))
    except CheckpointError as err:
        raise TrainingError(f"cannot resume: {one_line(err)}") from err


def trained_result(config: DictConfig, ckptdir: Path) -> tuple[str, Path] | None:
    """What the run trains (a key of :data:`ldm.train.run_log.RESULT_FLAGS`) and the file it writes at the end;
    None for runs without personalization (pretraining)."""
    from ldm.train.callbacks import FINAL_EMBEDDING

    if config.get("lora") is not None:
        return "LoRA", ckptdir / FINAL_FILE
    if config.get("dreambooth") is not None:
        return "model", export_file(config, ckptdir)
    if OmegaConf.select(config, "model.params.personalization_config") is not None:
        return "embedding", ckptdir / FINAL_EMBEDDING
    return None


def sampling_command(config: DictConfig, config_file: Path, data, model, *, ckptdir: Path,
                     outdir: Path) -> SamplingCommand | None:
    """How to sample this run's embedding, LoRA or fine-tuned model with ``stable_txt2img.py`` (on the run's
    base with its ``--lora`` files); None for runs that personalize nothing or start from no checkpoint."""
    from ldm.data.prompts import DEFAULT_TEMPLATE
    from ldm.inference import latent_downsampling
    from ldm.train.run_log import SamplingCommand

    ckpt = OmegaConf.select(config, "model.params.ckpt_path")
    train = getattr(data, "datasets", {}).get("train")
    prompts = getattr(train, "prompts", None)
    result = trained_result(config, ckptdir)
    if not (ckpt and prompts is not None and result is not None):
        return None
    kind, final = result
    return SamplingCommand(config=config_file, ckpt=str(ckpt), prompt=DEFAULT_TEMPLATE.format(prompts.subject),
                           size=getattr(train, "size", None), outdir=outdir,
                           latent_factor=latent_downsampling(model), kind=kind, final=final,
                           loras=tuple(str(spec) for spec in config.get(FILES_KEY) or ()))


def before_fit(trainer, model, resume_step: int | None) -> None:
    """Say that the frozen parts are in eval mode on purpose; on ``-r``, keep the earlier runs' metrics."""
    from pytorch_lightning.loggers import CSVLogger

    from ldm.train.run_log import frozen_parts_note
    from ldm.train.run_metrics import continue_csv_metrics

    if trainer.is_global_zero and (note := frozen_parts_note(model)):
        logger.info("%s", note)
    if resume_step is not None:
        for csv_logger in (lg for lg in trainer.loggers if isinstance(lg, CSVLogger)):
            continue_csv_metrics(csv_logger, resume_step)


def run_training(opt: argparse.Namespace, dotlist: list[str], now: str) -> int:
    """Set up and run one training (or resumed) run; returns the process exit code."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ldm.train.run_log import RunSummary, quiet_libraries, show_everything

    if opt.verbose:
        show_everything()
    else:
        quiet_libraries()
    now = os.environ.get(RUN_TIME_ENV, now)
    paths, bases = resolve_paths(opt, now)
    resume_step = saved_step(paths.resume_ckpt) if paths.resume_ckpt else None
    config = load_config(bases, dotlist)
    try:
        configure(config, opt, dotlist)
        check_config(config)
        device_args = device_kwargs(opt)
        trainer_config = OmegaConf.select(config, "lightning.trainer", default=None) or OmegaConf.create()
        trainer_args = trainer_kwargs(OmegaConf.to_container(trainer_config, resolve=True))
    except ValueError as err:  # FlagError, TrainerArgumentError, the config's and the DreamBooth section's checks
        raise TrainingError(str(err)) from None
    add_run_settings(config, opt, paths, trainer_args, device_args)
    pl.seed_everything(opt.seed, workers=True)
    try:
        data = instantiate_from_config(config.data)
        data.setup("fit")  # fails fast on an empty or unreadable data root
        model = instantiate_from_config(config.model)
        prepare_lora_model(model, config)  # first: DreamBooth then counts what trains
        prepare_dreambooth_model(model, config)
        validation = build_validation(config, data, model, images_dir=paths.logdir / "images",
                                      ckptdir=paths.ckptdir, every_n_train_steps=save_every_n_steps(config))
    except (DataRootError, CheckpointError, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        raise TrainingError(error_line(err, config)) from err  # TypeError: a config key its target does not take
    if not any(group["params"] for group in model.trainable_parameters()):
        raise TrainingError(NOTHING_TO_TRAIN)
    summary = RunSummary(validation, sampling=sampling_command(config, paths.cfgdir / f"{now}-project.yaml", data,
                                                               model, ckptdir=paths.ckptdir,
                                                               outdir=Path("outputs") / paths.logdir.name))
    if "validation" not in getattr(data, "datasets", {"validation": None}):  # no split: no loop, no Lightning warning
        trainer_args = {"limit_val_batches": 0, **trainer_args}
    trainer = build_trainer(config, paths, {**trainer_args, **device_args}, validation, resume_step=resume_step,
                            summary=summary, verbose=opt.verbose)
    hold_frozen_weights_in_half(model, config, trainer_args["precision"])
    if not opt.train:  # a check writes nothing, not even the log dir
        logger.info("Nothing to do without -t/--train (the config and model were checked)")
        return 0
    if trainer.is_global_zero:
        paths.cfgdir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, paths.cfgdir / f"{now}-project.yaml")
    logger.info("Logging to %s", paths.logdir)
    before_fit(trainer, model, resume_step)
    os.environ[RUN_TIME_ENV] = now
    try:
        trainer.fit(model, data, ckpt_path=str(paths.resume_ckpt) if paths.resume_ckpt else None)
    except SIGTERMException:
        logger.error("Stopped by SIGTERM; the embedding and last.ckpt were saved (resume with -r %s)", paths.logdir)
        return 1
    finally:
        os.environ.pop(RUN_TIME_ENV, None)
    if getattr(model, "stopped_on_nonfinite_loss", False):
        logger.error("Training stopped on a NaN/Inf loss; the last good embedding and checkpoint are kept")
        return 1
    return 1 if trainer.interrupted else 0
