"""main.py's flags that set the config: each one's help and the config key(s) it writes, in one table.

:data:`FLAGS` is the only place a flag meets the config: :func:`add_flags` puts the table on the
argument parser and :func:`apply_flags` writes the given flags into the merged config, which is then
all that the model, the data, the trainer and the validation read. Flags have no defaults: a flag
left out leaves the config as it is, and what the config leaves out is the default of the part that
reads it (its signature, or a constant such as ``ldm.momentum.DEFAULT_GAMMA``). A given flag wins over
the config files (logged when they differ); a flag and a ``key=value`` that set one key to different
values are an error. A given flag that writes nothing (its part is missing, or the switch it refines
is off) is ignored with one log line.

Key patterns:

- ``{dataset}`` stands for each of ``data.params.train`` and ``data.params.validation`` the config has;
- a key below ``<part>.params`` is written only when the config has ``<part>``: a flag for a part the
  config lacks (e.g. ``--gamma`` without ``personalization_config``) is ignored, as in the original code.

Run options that are not config keys (``--base``, ``--resume``, ``--seed``, ``--gpus``, ...) stay in
``main.py``; what a run adds to the config itself (log paths, seeds, learning rate) is in ``ldm.train.training``.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from ldm.export import EXPORT_FORMATS
from ldm.lora import check_lora_specs
from ldm.models.diffusion.compiled_unet import COMPILE_MODES
from ldm.modules.lora import unet_targets
from ldm.momentum import (ANCHORS, DEFAULT_GAMMA, DEFAULT_IDENTIFIER, DEFAULT_PLACEHOLDER, check_anchor_weight,
                          check_ema_decay, check_gamma)
from ldm.train.trainer_args import PRECISIONS

logger = logging.getLogger(__name__)

PERSONALIZATION = "model.params.personalization_config"
FACIAL_LOSS = "model.params.facial_loss_config"
FACIAL_LOSS_TARGET = "ldm.models.diffusion.face_loss.FacialLoss"
DATASET = "{dataset}.params"
DATASET_SPLITS = ("train", "validation")
UNFROZEN_CONFIG = "configs/stable-diffusion/v1-finetune_unfrozen.yaml"
DREAMBOOTH_ONLY = ("dreambooth", f"is a DreamBooth option: train with --base {UNFROZEN_CONFIG}")
LORA_ONLY = ("lora", "is a LoRA DreamBooth option: train with --base configs/stable-diffusion/v1-finetune_lora.yaml")


class FlagError(ValueError):
    """A flag whose value or combination with the config cannot be used (one line, names the flag)."""


def existing_file(path: str) -> None:
    if not Path(path).is_file():
        raise ValueError("does not exist: pass an SD/DreamBooth .ckpt or .safetensors file")


@dataclass(frozen=True)
class Flag:
    """One command-line flag and where its value goes.

    ``keys`` are dotted config keys, or ``(key, value)`` pairs that write a fixed value (on/off
    switches). ``requires``/``refuses`` name a config section the flag needs or cannot be used with,
    and the message that says so. ``only_with`` names the switch this flag refines. ``default`` is
    only shown in the help (the consumer's default); the flag itself has none, so a flag left out is
    never taken as given.
    """

    name: str
    help: str
    keys: tuple[str | tuple[str, Any], ...] = ()
    type: Callable[[str], Any] | None = None  # None: an on/off switch
    default: Any = None
    choices: tuple[str, ...] | None = None
    bare_value: Any = None  # with nargs='?': the value of the flag given without one
    metavar: str | None = None
    minimum: int | None = None
    check: Callable[[Any], None] | None = None  # raises ValueError saying what is wrong
    convert: Callable[[Any], Any] | None = None  # the checked value -> what the keys get (e.g. a preset -> a list)
    as_list: bool = False
    requires: tuple[str, str] | None = None
    refuses: tuple[str, str] | None = None
    only_with: str | None = None
    repeat: bool = False  # may be given several times: the value is the list of them

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """This flag on ``parser``; its help ends with the config keys it sets."""
        keys = ", ".join(key if isinstance(key, str) else key[0] for key in self.keys)
        shown = f" (default {self.default})" if self.default is not None else ""
        text = f"{self.help}{shown} [config: {keys.replace('{dataset}', 'data.params.<split>')}]"
        if self.type is None:
            parser.add_argument(f"--{self.name}", action="store_true", help=text)
            return
        extra = {"nargs": "?", "const": self.bare_value} if self.bare_value is not None else {}
        if self.repeat:
            extra["action"] = "append"
        parser.add_argument(f"--{self.name}", type=self.type, choices=self.choices, metavar=self.metavar, help=text,
                            **extra)

    def given(self, opt: argparse.Namespace) -> bool:
        """Whether the command line gave this flag (an empty string does not count, a weight of 0.0 does)."""
        value = getattr(opt, self.name)
        return value is not None and value is not False and value != ""


FLAGS: tuple[Flag, ...] = (
    # ---- the model
    Flag("actual_resume", "SD / DreamBooth checkpoint to start from", ("model.params.ckpt_path",), type=str,
         check=existing_file),
    Flag("trust_pickle", "allow checkpoints that need arbitrary code to unpickle (only for files you trust)",
         (("model.params.trust_pickle", True),)),
    Flag("embedding_manager_ckpt", "embedding file to start from", ("model.params.embedding_manager_ckpt",),
         type=str, requires=(PERSONALIZATION, "needs a config with personalization_config")),
    Flag("compile_unet", "torch.compile the UNet (auto: CUDA graphs on a GPU)", ("model.params.compile_unet",),
         type=str, choices=COMPILE_MODES, bare_value="auto"),
    # ---- the embedding (personalization_config)
    Flag("placeholder_string", f"placeholder token (default '{DEFAULT_PLACEHOLDER}')",
         (f"{PERSONALIZATION}.params.placeholder_strings",), type=str, as_list=True,
         refuses=("dreambooth", "cannot be used with DreamBooth, which names the subject with --identifier "
                                f"(default {DEFAULT_IDENTIFIER})")),
    Flag("init_word", "word the vectors start from (e.g. woman)", (f"{PERSONALIZATION}.params.initializer_words",),
         type=str, as_list=True),
    Flag("gamma", f"momentum ratio in [0, 1] (default {DEFAULT_GAMMA}, the original code's; 1 = plain TI)",
         (f"{PERSONALIZATION}.params.gamma",), type=float, check=check_gamma),
    Flag("num_vectors_per_token", "vectors the placeholder stands for (default 1; more: more capacity, longer "
         "prompts)", (f"{PERSONALIZATION}.params.num_vectors_per_token",), type=int, minimum=1),
    Flag("progressive_words", "with several vectors per token, train them one at a time (a new one every 2000 "
         "steps)", ((f"{PERSONALIZATION}.params.progressive_words", True),)),
    # ---- anchoring the embedding (docs/method.md, "Anchoring")
    Flag("anchor_weight", "add w * ||e - anchor||_2 per vector to the loss (default 0: off; acts on e, unlike "
         "embedding_reg_weight)", (f"{PERSONALIZATION}.params.anchor_weight",), type=float,
         check=check_anchor_weight),
    Flag("anchor", "what --anchor_weight and --norm_bound refer to: init (the start) or e_p (the placeholder's own "
         "row) (default init)", (f"{PERSONALIZATION}.params.anchor",), type=str, choices=ANCHORS),
    Flag("norm_bound", "after each step, scale every vector of e back to its anchor's norm",
         ((f"{PERSONALIZATION}.params.norm_bound", True),)),
    Flag("init_words", "start v from the mean embedding of these words: a file with one word a line, or a "
         "comma-separated list (e.g. inputs/init_words/given_names.txt)", (f"{PERSONALIZATION}.params.init_words",),
         type=str, metavar="FILE_OR_LIST"),
    Flag("init_from_encoder", "Cross Initialization: start v from the text encoder's output for the init word's row "
         "(or the --init_words mean) standing at the placeholder, computed once at setup",
         ((f"{PERSONALIZATION}.params.init_from_encoder", True),)),
    Flag("ema_decay", "keep a moving average of e with this decay in [0, 1) (e.g. 0.99), saved as "
         "embeddings_ema*.pt (default 0: off)", (f"{PERSONALIZATION}.params.ema_decay",), type=float,
         check=check_ema_decay),
    Flag("ema_bias_correction", "weigh the moving average's updates by (1 - d) / (1 - d^t), as Adam corrects its "
         "moments, so that the start drops out of it at the first update (needs --ema_decay)",
         ((f"{PERSONALIZATION}.params.ema_bias_correction", True),)),
    # ---- the photos and their captions
    Flag("data_root", "folder with the photos of the person", (f"{DATASET}.data_root",), type=str),
    Flag("class_word", "train on '* <class_word>' (e.g. woman)", (f"{DATASET}.class_word",), type=str),
    Flag("descriptive_p", "probability of each descriptive word", (f"{DATASET}.descriptive_p",), type=float),
    Flag("use_random_prompt", "random TI object templates", ((f"{DATASET}.use_random_prompt", True),)),
    # ---- the face term
    Flag("use_facial_loss", "add the dlib face-crop loss term (with face crops of the photos; validation samples' "
         "identity is scored)", ((f"{FACIAL_LOSS}.target", FACIAL_LOSS_TARGET),)),
    Flag("facial_loss_weight", "lambda of the face term (default 1)", (f"{FACIAL_LOSS}.params.weight",), type=float),
    Flag("face_detector", "dlib face detector of the face crops (default cnn)", (f"{DATASET}.face_crops.detector",),
         type=str, choices=("cnn", "hog"), only_with="use_facial_loss"),
    # ---- DreamBooth (configs with a dreambooth section)
    Flag("reg_data_root", "DreamBooth: class images for prior preservation (scripts/make_class_images.py makes "
         "them)", (f"{DATASET}.reg_data_root",), type=str, requires=DREAMBOOTH_ONLY),
    Flag("prior_loss_weight", "DreamBooth: prior-loss weight (default 1.0)", ("dreambooth.prior_loss_weight",),
         type=float, requires=DREAMBOOTH_ONLY),
    Flag("identifier", f"DreamBooth: the subject's rare token (default {DEFAULT_IDENTIFIER})",
         ("dreambooth.identifier",), type=str,
         requires=DREAMBOOTH_ONLY),
    Flag("train_text_encoder", "DreamBooth: train the text encoder too", (("dreambooth.train_text_encoder", True),),
         requires=DREAMBOOTH_ONLY),
    Flag("export_format", "DreamBooth: format of checkpoints/model_pruned.* written at the end (default ckpt)",
         ("dreambooth.export_format",), type=str, choices=EXPORT_FORMATS, requires=DREAMBOOTH_ONLY),
    Flag("export_half", "DreamBooth: write the pruned model in fp16", (("dreambooth.export_half", True),),
         requires=DREAMBOOTH_ONLY),
    # ---- LoRA (see ldm.lora)
    Flag("lora", "fold a trained LoRA (kohya/A1111 .safetensors) into the base weights before training; SCALE in "
         "[-4, 4] (default 1); repeat for several", ("lora_files",), type=str, metavar="FILE[:SCALE]",
         check=check_lora_specs, repeat=True),
    Flag("lora_rank", "LoRA DreamBooth: rank of the adapters (default 4; kohya users often take 16-32)",
         ("lora.rank",), type=int, minimum=1, requires=LORA_ONLY),
    Flag("lora_alpha", "LoRA DreamBooth: alpha of the adapters, which scale by alpha / rank (default: the rank)",
         ("lora.alpha",), type=float, requires=LORA_ONLY),
    Flag("lora_targets", "LoRA DreamBooth: the UNet layers that take adapters: 'attention' (to_q, to_k, to_v, to_out.0; "
         "the default), 'transformer' (also the feed-forward and proj_in/proj_out, as kohya's sd-scripts), "
         "'locon' (also the ResBlocks' and resamplers' convolutions, as kohya's conv_dim / LyCORIS LoCon) or "
         "comma-separated layer-path endings", ("lora.unet_targets",), type=str, metavar="PRESET|LIST",
         check=unet_targets, convert=unet_targets, requires=LORA_ONLY),
    # ---- Lightning's Trainer (see ldm.train.trainer_args)
    Flag("max_steps", "stop after this many steps", ("lightning.trainer.max_steps",), type=int, minimum=-1),
    Flag("max_epochs", "stop after this many epochs", ("lightning.trainer.max_epochs",), type=int, minimum=-1),
    Flag("precision", "training precision (default 32)",
         ("lightning.trainer.precision",), type=str, choices=PRECISIONS),
    Flag("accumulate_grad_batches", "micro-batches per optimizer step (default 1)",
         ("lightning.trainer.accumulate_grad_batches",),
         type=int, minimum=1),
    Flag("num_nodes", "machines in a multi-node DDP run (each sets MASTER_ADDR, MASTER_PORT, NODE_RANK; see "
         "README)", ("lightning.trainer.num_nodes",), type=int, minimum=1),
    # ---- validation samples at saves (see ldm.train.validation.settings)
    Flag("validation_prompts", "validation prompts, one per line ('*' is the placeholder; default: the training "
         "prompt and 3 edits)", ("lightning.validation.prompts_file",), type=str, metavar="FILE"),
    Flag("validation_ddim_steps", "DDIM steps of the validation samples (default 10)",
         ("lightning.validation.ddim_steps",), type=int, minimum=1),
    Flag("validation_identity", "score validation samples against the photos (dlib) and keep "
         "checkpoints/embeddings_best.pt (LoRA DreamBooth: lora_best.safetensors; on with --use_facial_loss)",
         (("lightning.validation.identity", True),)),
    Flag("no_validation", "no validation sampling at saves", (("lightning.validation.enabled", False),)),
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Put every flag of :data:`FLAGS` on ``parser``, with its help and the config key it sets."""
    for flag in FLAGS:
        flag.add_to(parser)


def apply_flags(config: DictConfig, opt: argparse.Namespace, overrides: DictConfig | None = None) -> None:
    """Check the given flags and write them into ``config``; raises :class:`FlagError` naming the flag.

    ``overrides`` are the command line's ``key=value`` arguments: a flag may not contradict one.
    """
    for flag in FLAGS:
        if not flag.given(opt):
            continue
        if flag.only_with is not None and not getattr(opt, flag.only_with):
            logger.info("--%s is ignored without --%s", flag.name, flag.only_with)
            continue
        value = getattr(opt, flag.name)
        _check_sections(flag, config)
        writes = [(path, written) for key, written in _keys_and_values(flag, value) for path in _expand(config, key)]
        if not writes:  # a flag for parts the config lacks is ignored, its value unchecked (as in the original code)
            logger.info("--%s is ignored: the config has no %s", flag.name, _part(flag))
            continue
        _check_value(flag, value)
        for path, written in writes:
            written = written if flag.convert is None else flag.convert(written)
            _check_agreement(flag, value, path, written, overrides)
            _write(config, path, written, flag.name)


def _keys_and_values(flag: Flag, value: Any) -> list[tuple[str, Any]]:
    """``(key, value written)`` of each of ``flag.keys``."""
    return [(key, [value] if flag.as_list else value) if isinstance(key, str) else key for key in flag.keys]


def _part(flag: Flag) -> str:
    """The config section the first key of ``flag`` goes into (as the help names it)."""
    key = flag.keys[0] if isinstance(flag.keys[0], str) else flag.keys[0][0]
    return key.rsplit(".params.", 1)[0].replace("{dataset}", "data.params.<split>")


def _check_agreement(flag: Flag, value: Any, path: str, written: Any, overrides: DictConfig | None) -> None:
    """FlagError when a ``key=value`` of the command line sets ``path`` to another value than the flag."""
    given = OmegaConf.select(overrides, path) if overrides is not None else None
    if given is not None and str(given) != str(written):
        raise FlagError(f"--{flag.name} {value} and {path}={given} on the command line disagree: give one of them")


def _check_sections(flag: Flag, config: DictConfig) -> None:
    if flag.requires is not None and OmegaConf.select(config, flag.requires[0]) is None:
        raise FlagError(f"--{flag.name} {flag.requires[1]}")
    if flag.refuses is not None and OmegaConf.select(config, flag.refuses[0]) is not None:
        raise FlagError(f"--{flag.name} {flag.refuses[1]}")


def _check_value(flag: Flag, value: Any) -> None:
    if flag.minimum is not None and value < flag.minimum:
        raise FlagError(f"--{flag.name} must be at least {flag.minimum}, got {value}")
    if flag.check is not None:
        try:
            flag.check(value)
        except ValueError as err:  # messages either name the setting ("gamma must be ...") or not ("does not exist")
            text = str(err)
            raise FlagError(f"--{text}" if text.startswith(flag.name) else f"--{flag.name} {value} {text}") from None


def _expand(config: DictConfig, key: str) -> list[str]:
    """``key`` for each dataset the config has, and only where the part below ``.params.`` exists."""
    keys = [key.format(dataset=f"data.params.{split}") for split in DATASET_SPLITS] if "{dataset}" in key else [key]
    return [k for k in keys if ".params." not in k or OmegaConf.select(config, k.rsplit(".params.", 1)[0]) is not None]


def _write(config: DictConfig, key: str, value: Any, flag: str) -> None:
    old = OmegaConf.select(config, key)
    if old is not None and str(old) != str(value):
        logger.info("--%s %s overrides %s=%s", flag, value, key, old)
    OmegaConf.update(config, key, value, force_add=True)
