"""What ``main.py`` runs: merge configs and flags, build data, model and trainer, then fit."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.data.images import DataRootError
from ldm.dreambooth import apply_dreambooth, dreambooth_callbacks, prepare_dreambooth_model
from ldm.models.diffusion.ddpm import NOTHING_TO_TRAIN
from ldm.precision import half_dtype
from ldm.trainer_args import TrainerArgumentError, device_kwargs, trainer_kwargs
from ldm.util import instantiate_from_config
from ldm.validation.setup import build_validation

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
    parts = []
    if opt.datadir_in_name and opt.data_root:
        parts.append(Path(opt.data_root).resolve().name)
    if opt.name:
        parts.append(opt.name)
    elif not parts:
        parts.append(Path(bases[0]).stem)
    parts.append(now + opt.postfix)
    logdir = Path(opt.logdir) / "_".join(parts)
    return RunPaths(logdir, logdir / "checkpoints", logdir / "configs", None), bases


def load_config(bases: list[str], dotlist: list[str]) -> DictConfig:
    missing = [b for b in bases if not Path(b).is_file()]
    if missing:
        raise TrainingError(f"config file not found: {missing[0]}")
    try:
        return OmegaConf.merge(*[OmegaConf.load(b) for b in bases], OmegaConf.from_dotlist(dotlist))
    except Exception as err:
        raise TrainingError(f"could not read the configs {bases}: {err}") from err


def params_of(node: DictConfig) -> DictConfig:
    """The ``params`` node of a ``{target, params}`` config, created when missing."""
    if node.get("params") is None:
        node.params = {}
    return node.params


def apply_flags(config: DictConfig, opt: argparse.Namespace, paths: RunPaths) -> None:
    """Write the seed's command-line flags into the merged config, where the parts read them."""
    model = config.model.params
    if opt.actual_resume:
        if not Path(opt.actual_resume).is_file():
            raise TrainingError(f"--actual_resume {opt.actual_resume} does not exist: pass an SD/DreamBooth .ckpt "
                                "or .safetensors file")
        model.ckpt_path = str(opt.actual_resume)
    personalization = model.get("personalization_config")
    if personalization is not None:
        params = params_of(personalization)
        if opt.placeholder_string:
            params.placeholder_strings = [opt.placeholder_string]
        if opt.init_word:
            params.initializer_words = [opt.init_word]
        if opt.gamma is not None:
            if not 0.0 <= opt.gamma <= 1.0:
                raise TrainingError(f"--gamma must be in [0, 1] (1 = plain textual inversion), got {opt.gamma}")
            params.gamma = opt.gamma
        if opt.num_vectors_per_token is not None:
            if opt.num_vectors_per_token < 1:
                raise TrainingError(f"--num_vectors_per_token must be at least 1, got {opt.num_vectors_per_token}")
            params.num_vectors_per_token = opt.num_vectors_per_token
        if opt.progressive_words:
            params.progressive_words = True
    if opt.compile_unet:
        model.compile_unet = opt.compile_unet
    if opt.use_facial_loss:
        model.facial_loss_config = {"target": "ldm.modules.face_loss.FacialLoss",
                                    "params": {"weight": opt.facial_loss_weight}}
    apply_validation_flags(config, opt)
    data = config.get("data")
    if data is None:
        return
    placeholder = opt.placeholder_string or (
        personalization.params.placeholder_strings[0] if personalization is not None else None)
    for split in ("train", "validation"):
        part = data.params.get(split)
        if part is None:
            continue
        params = params_of(part)
        if opt.data_root:
            params.data_root = opt.data_root
        if str(part.get("target", "")).endswith("PersonalizedBase") and params.get("seed") is None:
            params.seed = opt.seed  # flips and captions reproducible with --seed
        if placeholder:
            params.placeholder_token = placeholder
        if opt.class_word:
            params.class_word = opt.class_word
        if opt.descriptive_p is not None:
            params.descriptive_p = opt.descriptive_p
        if opt.use_random_prompt:
            params.use_random_prompt = True
        if opt.use_facial_loss:
            # keys set in the config (cache_dir, min_face_size, ...) are kept
            face_crops = OmegaConf.to_container(params.get("face_crops") or OmegaConf.create())
            params.face_crops = {**face_crops, "detector": opt.face_detector, "crops_dir": str(paths.logdir / "faces")}


def apply_validation_flags(config: DictConfig, opt: argparse.Namespace) -> None:
    """The validation flags into ``lightning.validation`` (see :mod:`ldm.validation.settings`)."""
    if opt.validation_ddim_steps is not None and opt.validation_ddim_steps < 1:
        raise TrainingError(f"--validation_ddim_steps must be at least 1, got {opt.validation_ddim_steps}")
    flags = {"enabled": False if opt.no_validation else None, "prompts_file": opt.validation_prompts,
             "ddim_steps": opt.validation_ddim_steps,
             "identity": True if opt.validation_identity or opt.use_facial_loss else None}
    flags = {key: value for key, value in flags.items() if value is not None}
    if flags:
        if config.get("lightning") is None:
            config.lightning = {}
        if config.lightning.get("validation") is None:
            config.lightning.validation = {}
        config.lightning.validation.merge_with(flags)


def hold_frozen_weights_in_half(model, config: DictConfig, precision: str) -> None:
    """Under 16-mixed / bf16-mixed, frozen weights in half precision (see :mod:`ldm.precision`).

    DreamBooth keeps its frozen VAE and text encoder in float32: they go into the exported checkpoint,
    which must hold the base model's exact weights (the latent cache runs the VAE once per image anyway).
    """
    dtype = half_dtype(precision)
    if dtype is None or not hasattr(model, "hold_frozen_weights_in_half"):
        return
    if config.get("dreambooth") is not None:
        logger.info("%s: DreamBooth trains float32 master weights; the frozen parts stay float32 for the export",
                    precision)
        return
    model.hold_frozen_weights_in_half(dtype)


def save_every_n_steps(config: DictConfig) -> int:
    """Steps between embedding saves (``lightning.modelcheckpoint.params.every_n_train_steps``, default 500)."""
    lightning = config.get("lightning", OmegaConf.create())
    return int(lightning.get("modelcheckpoint", {}).get("params", {}).get("every_n_train_steps", 500))


def build_trainer(config: DictConfig, paths: RunPaths, trainer_args: dict, device_args: dict,
                  validation=None):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from ldm.callbacks import EmbeddingCheckpoint
    from ldm.nonfinite import DEFAULT_EVERY_N_STEPS, NonFiniteLossStop
    from ldm.run_log import RunSummary, StepProgressBar

    lightning = config.get("lightning", OmegaConf.create())
    every = save_every_n_steps(config)
    if trainer_args["precision"] == "16-mixed" and device_args["accelerator"] == "cpu":
        raise TrainingError("--precision 16-mixed needs a GPU; use 32 or bf16-mixed on the CPU")
    nonfinite_every = int(lightning.get("nonfinite_check_every_n_steps", DEFAULT_EVERY_N_STEPS))
    callbacks = [
        NonFiniteLossStop(nonfinite_every, save_every_n_train_steps=every),  # first: it decides before any save
        ModelCheckpoint(dirpath=paths.ckptdir, save_last=True, save_top_k=0, every_n_train_steps=every),
        EmbeddingCheckpoint(paths.ckptdir, every_n_train_steps=every),
        LearningRateMonitor(logging_interval="step"),
        *dreambooth_callbacks(config, paths.ckptdir),
        *([StepProgressBar()] if trainer_args.get("enable_progress_bar", True) else []),
    ]
    for name, cfg in lightning.get("callbacks", {}).items():
        params = params_of(cfg)
        if cfg.get("target") == "main.ImageLogger":
            params.save_dir = str(paths.logdir / "images")
            params.checkpoint_path = OmegaConf.select(config, "model.params.ckpt_path")  # its hash goes in the PNGs
        callbacks.append(instantiate_from_config(cfg))
    callbacks += [validation, RunSummary(validation)] if validation is not None else [RunSummary()]
    loggers = [CSVLogger(paths.logdir, name="", version="csv"),
               TensorBoardLogger(paths.logdir, name="", version="tensorboard")]
    kwargs = {"log_every_n_steps": min(10, every), **trainer_args, **device_args}
    try:
        return pl.Trainer(default_root_dir=paths.logdir, callbacks=callbacks, logger=loggers, **kwargs)
    except (TypeError, ValueError, MisconfigurationException) as err:  # a lightning.trainer value Lightning refuses
        raise TrainingError(f"Lightning's Trainer refused the arguments: {str(err).strip().splitlines()[0]}") from err


def run_training(opt: argparse.Namespace, dotlist: list[str], now: str) -> int:
    """Set up and run one training (or resumed) run; returns the process exit code."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    now = os.environ.get(RUN_TIME_ENV, now)
    paths, bases = resolve_paths(opt, now)
    config = load_config(bases, dotlist)
    apply_flags(config, opt, paths)
    try:
        device_args = device_kwargs(opt)
        trainer_config = OmegaConf.select(config, "lightning.trainer", default=None) or OmegaConf.create()
        trainer_args = trainer_kwargs(OmegaConf.to_container(trainer_config, resolve=True), opt)
    except TrainerArgumentError as err:
        raise TrainingError(str(err)) from None
    pl.seed_everything(opt.seed, workers=True)
    try:
        apply_dreambooth(config, opt)
        data = instantiate_from_config(config.data)
        data.setup("fit")  # fails fast on an empty or unreadable data root
        model = instantiate_from_config(config.model)
        prepare_dreambooth_model(model, config)
        if opt.embedding_manager_ckpt:
            if getattr(model, "embedding_manager", None) is None:
                raise TrainingError("--embedding_manager_ckpt needs a config with personalization_config")
            model.embedding_manager.load(opt.embedding_manager_ckpt)
        validation = build_validation(config, data, model, images_dir=paths.logdir / "images",
                                      ckptdir=paths.ckptdir, every_n_train_steps=save_every_n_steps(config))
    except (DataRootError, CheckpointError, ValueError, FileNotFoundError, ImportError) as err:
        raise TrainingError(str(err).splitlines()[0]) from err
    batch = int(config.data.params.batch_size)
    device_count = len(device_args["devices"]) if isinstance(device_args["devices"], list) else device_args["devices"]
    base_lr = float(config.model.base_learning_rate)
    factor = batch * device_count * trainer_args["accumulate_grad_batches"] * trainer_args["num_nodes"]
    model.learning_rate = base_lr * factor if opt.scale_lr else base_lr
    if not any(group["params"] for group in model.trainable_parameters()):
        raise TrainingError(NOTHING_TO_TRAIN)
    model.training_seed = opt.seed
    logger.info("learning rate %.2e (%s)", model.learning_rate,
                f"{factor} x base {base_lr:.2e}" if opt.scale_lr else "base, --scale_lr off")
    trainer = build_trainer(config, paths, trainer_args, device_args, validation)
    hold_frozen_weights_in_half(model, config, trainer_args["precision"])
    if trainer.is_global_zero:
        paths.cfgdir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, paths.cfgdir / f"{now}-project.yaml")
    logger.info("Logging to %s", paths.logdir)
    if not opt.train:
        logger.info("Nothing to do without -t/--train (the config and model were checked)")
        return 0
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
