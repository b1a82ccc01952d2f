"""One pass from the command line to the settled config of a run, and the checks of the settled config.

Precedence (README, "Settings"): a value given on the command line (a flag or a ``key=value``) wins
over the config files, and the config wins over what a loaded file stores (e.g. an embedding file's
gamma). What nothing sets is the default of the part that reads it (its signature, or a constant of
``ldm.momentum``). A conflict the run cannot honour is a one-line ``ValueError``.

:func:`configure` writes the flags (:func:`ldm.train.flags.apply_flags`), then runs the owners of the
features that write several sections, in this order:

1. :func:`settle_placeholder`: the subject's word (DreamBooth's identifier, else the embedding's first
   placeholder) into each dataset's ``placeholder_token``, where the captions and the validation read it;
2. :func:`settle_facial_loss`: with ``facial_loss_config``, face crops in each dataset and identity
   scores in the validation;
3. :func:`ldm.train.dreambooth.derive_dreambooth`: prior preservation and the text encoder.

An owner fills in only what the config leaves out: it never overwrites a key a config file or the
command line sets. :func:`check_config` then refuses, before anything is built, a key no part takes,
a section without ``target``, and an embedding or fine-tuning config without pretrained weights.
"""
from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterator, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.train.dreambooth import SECTION as DREAMBOOTH, derive_dreambooth, identifier_of
from ldm.train.flags import DATASET_SPLITS, FACIAL_LOSS, FLAGS, PERSONALIZATION, apply_flags
from ldm.momentum import DEFAULT_PLACEHOLDER

logger = logging.getLogger(__name__)

PLACEHOLDER_KEY = "params.placeholder_token"  # below each dataset
# Keys of the sections no class takes as arguments (the others are checked by the class they build).
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("target", "params", "base_learning_rate"),
    "data": ("target", "params"),
    "lightning": ("trainer", "validation", "modelcheckpoint", "callbacks", "nonfinite_check_every_n_steps"),
    "lightning.modelcheckpoint": ("params",),
    "lightning.modelcheckpoint.params": ("every_n_train_steps",),
}
NO_WEIGHTS = ("trains {what} of a pretrained model, but no weights are given: pass --actual_resume "
              "<SD or DreamBooth .ckpt/.safetensors> (or set model.params.ckpt_path)")
UNEXPECTED_KEYWORD = re.compile(r"(\w+)(?:\.__init__)?(?:\(\))? got an unexpected keyword argument '(\w+)'")


def configure(config: DictConfig, opt: argparse.Namespace, overrides: Sequence[str] = ()) -> None:
    """The flags into the merged config, then each feature's owner in order (one-line ValueErrors).

    ``overrides`` are the command line's ``key=value`` arguments (already merged into ``config``).
    """
    apply_flags(config, opt, OmegaConf.from_dotlist(list(overrides)))
    settle_placeholder(config)
    settle_facial_loss(config)
    derive_dreambooth(config)


def dataset_paths(config: DictConfig) -> list[str]:
    """``data.params.<split>`` of each dataset the config has."""
    paths = [f"data.params.{split}" for split in DATASET_SPLITS]
    return [path for path in paths if OmegaConf.select(config, path) is not None]


def run_placeholder(config: DictConfig) -> str | None:
    """The word that names the subject: DreamBooth's identifier, else the embedding's first placeholder."""
    if config.get(DREAMBOOTH) is not None:
        return identifier_of(config)
    if OmegaConf.select(config, PERSONALIZATION) is None:
        return None
    placeholders = OmegaConf.select(config, f"{PERSONALIZATION}.params.placeholder_strings")
    return str(placeholders[0]) if placeholders else DEFAULT_PLACEHOLDER


def settle_placeholder(config: DictConfig) -> None:
    """Each dataset captions with :func:`run_placeholder`; a dataset set to another word is a ValueError."""
    word = run_placeholder(config)
    if word is None:
        return
    flag = "--identifier" if config.get(DREAMBOOTH) is not None else "--placeholder_string"
    for path in dataset_paths(config):
        key = f"{path}.{PLACEHOLDER_KEY}"
        current = OmegaConf.select(config, key)
        if current is not None and str(current) != word:
            raise ValueError(f"{key}={current} disagrees with the run's placeholder '{word}': set it with {flag}")
        OmegaConf.update(config, key, word, force_add=True)


def settle_facial_loss(config: DictConfig) -> None:
    """With ``facial_loss_config``: face crops in each dataset, identity scores in the validation.

    The face crops' settings (e.g. ``face_crops.detector``) and ``lightning.validation.identity`` that
    the config sets are kept.
    """
    if OmegaConf.select(config, FACIAL_LOSS) is None:
        return
    for path in dataset_paths(config):
        if OmegaConf.select(config, f"{path}.params.face_crops") is None:
            OmegaConf.update(config, f"{path}.params.face_crops", {}, force_add=True)
    if OmegaConf.select(config, "lightning.validation.identity") is None:
        OmegaConf.update(config, "lightning.validation.identity", True, force_add=True)


# ---------------------------------------------------------------------------------- checks
def check_config(config: DictConfig) -> None:
    """ValueError (one line, naming the key) for what the run cannot honour, before anything is built."""
    check_section_keys(config)
    for path, node in sections(config):
        if "target" not in node:
            raise ValueError(f"{path} has no target (it holds {sorted(node)}): {_target_hint(path)}")
    check_pretrained_weights(config)


def check_section_keys(config: DictConfig) -> None:
    """The top level and the sections of :data:`SECTION_KEYS` hold only keys this project reads."""
    known = {"": ("model", "data", "lightning", *top_level_flag_keys()), **SECTION_KEYS}
    for path, keys in known.items():
        node = OmegaConf.select(config, path) if path else config
        if not isinstance(node, Mapping):
            continue
        for key in node:
            if key not in keys:
                where = f"{path}.{key}" if path else key
                raise ValueError(f"{where} is not a setting of this project (known{' under ' + path if path else ''}: "
                                 f"{', '.join(keys)}); remove it or fix its spelling")


def top_level_flag_keys() -> tuple[str, ...]:
    """The top-level sections flags write besides model, data and lightning (e.g. ``dreambooth``)."""
    keys = (key if isinstance(key, str) else key[0] for flag in FLAGS for key in flag.keys)
    return tuple(dict.fromkeys(key.split(".")[0] for key in keys if not key.startswith("{")))


def sections(config: DictConfig) -> Iterator[tuple[str, Mapping]]:
    """``(path, node)`` of every section the run builds with ``instantiate_from_config``."""
    yield from _config_sections(config.get("model"), "model")
    data = config.get("data")
    if data is not None:
        yield "data", data
        for path in dataset_paths(config):
            yield path, OmegaConf.select(config, path)
    for name, node in (OmegaConf.select(config, "lightning.callbacks") or {}).items():
        yield f"lightning.callbacks.{name}", node


def _config_sections(node, path: str) -> Iterator[tuple[str, Mapping]]:
    """``node`` and, below its ``params``, every section named ``*_config`` or ``lossconfig``, recursively.

    A section holds ``target`` or ``params`` (``text_config`` and ``ddconfig`` are plain settings).
    """
    if not isinstance(node, Mapping):
        return
    yield path, node
    for key, child in (node.get("params") or {}).items():
        if isinstance(child, Mapping) and (key.endswith("_config") or key == "lossconfig") \
                and {"target", "params"} & set(child):
            yield from _config_sections(child, f"{path}.params.{key}")


def _target_hint(path: str) -> str:
    """What gives the section at ``path`` its target: the flag that writes it, else the key itself."""
    for flag in FLAGS:
        if any(not isinstance(key, str) and key[0] == f"{path}.target" for key in flag.keys):
            return f"pass --{flag.name} (or remove the section's keys)"
    return f"set {path}.target or remove the section"


def check_pretrained_weights(config: DictConfig) -> None:
    """An embedding or DreamBooth config without ``model.params.ckpt_path`` (--actual_resume) is refused."""
    if OmegaConf.select(config, "model.params.ckpt_path"):
        return
    if OmegaConf.select(config, PERSONALIZATION) is not None:
        raise ValueError(NO_WEIGHTS.format(what="an embedding"))
    if config.get(DREAMBOOTH) is not None:
        raise ValueError(NO_WEIGHTS.format(what="DreamBooth fine-tuning"))


def error_line(err: Exception, config: DictConfig) -> str:
    """``err`` as one line; a part refusing a keyword argument names the config key that gave it."""
    found = UNEXPECTED_KEYWORD.search(str(err))
    if found is None:
        return str(err).splitlines()[0]
    owner, key = found.groups()
    paths = list(_keys_named(config, key, ""))
    where = " or ".join(paths) if paths else key
    return f"{where} is not a setting of {owner}; remove it or fix its spelling"


def _keys_named(node, key: str, path: str) -> Iterator[str]:
    """Every dotted path in ``node`` whose last part is ``key``."""
    if not isinstance(node, Mapping):
        return
    for name, child in node.items():
        here = f"{path}.{name}" if path else str(name)
        if name == key:
            yield here
        yield from _keys_named(child, key, here)
