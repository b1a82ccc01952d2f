"""Training entrypoint: momentum textual inversion (and LDM training) with PyTorch Lightning.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t \\
        --actual_resume models/ldm/dreambooth/<name>.ckpt -n <name> --gpus 0, \\
        --data_root inputs/<person>/ --gamma 0.1 --descriptive_p 0.1 --use_random_prompt --class_word woman

Any extra ``key.path=value`` argument overrides the merged config (OmegaConf dotlist), wherever it
stands (``-t key=value`` included).
"""
# This docstring is the --help text of ``python main.py`` (main.py is a shim that calls main() here).
from __future__ import annotations

import argparse
import datetime
import logging

from ldm.cli import LOG_FORMAT, setup_logging
from ldm.train.flags import add_flags

logger = logging.getLogger("main")  # the name its log lines have always shown


class Override(str):
    """A ``key=value`` that argparse gave a yes/no flag as its value (``-t key=value``): a config override."""


def str2bool(value: str | bool) -> bool | Override:
    """argparse type of the original code's yes/no flags (``-t``, ``--scale_lr False``).

    A ``key=value`` is not a yes/no: it comes back as an :class:`Override` (see :func:`take_overrides`).
    """
    if isinstance(value, bool):
        return value
    if "=" in value:
        return Override(value)
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{value}'")


def build_parser() -> argparse.ArgumentParser:
    """The run options of the original main.py, then every flag of :data:`ldm.train.flags.FLAGS`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--name", default="", help="postfix of the log dir name")
    p.add_argument("-r", "--resume", default="", help="resume from a log dir or a checkpoint in one")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="base_config.yaml",
                   help="configs merged left to right; later ones and key=value arguments win")
    p.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False, help="train")
    p.add_argument("--no-test", type=str2bool, nargs="?", const=True, default=False, help="kept for compatibility")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    p.add_argument("-f", "--postfix", default="", help="postfix for the log dir name")
    p.add_argument("-l", "--logdir", default="logs", help="directory for logs and checkpoints")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="lr = base_learning_rate * batch * devices * accumulation")
    p.add_argument("--datadir_in_name", type=str2bool, nargs="?", const=True, default=True,
                   help="prefix the log dir name with the data folder's name")
    p.add_argument("--gpus", default=None, help="GPU ids as in the original code, e.g. '0,' or '0,1'")
    p.add_argument("--accelerator", default=None, help="cpu, gpu or auto (default: gpu when --gpus)")
    p.add_argument("--devices", default=None, help="number of devices (e.g. 2 CPU processes for DDP)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show what is hidden by default: Lightning's adverts, model table and eval-mode warning, "
                        "deprecation warnings")
    add_flags(p)
    return p


def take_overrides(opt: argparse.Namespace) -> list[str]:
    """The ``key=value`` arguments yes/no flags took as their value; each such flag is on, as if given bare."""
    taken = []
    for name, value in vars(opt).items():
        if isinstance(value, Override):
            setattr(opt, name, True)
            taken.append(str(value))
    return taken


def main(argv: list[str] | None = None) -> int:
    setup_logging(fmt=f"%(asctime)s {LOG_FORMAT}")
    parser = build_parser()
    opt, unknown = parser.parse_known_args(argv)
    unknown = take_overrides(opt) + unknown
    from ldm.train.training import TrainingError, run_training

    bad = [u for u in unknown if "=" not in u]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like model.params.key=value)")
    try:
        return run_training(opt, unknown, now=datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S"))
    except TrainingError as err:
        logger.error("%s", err)
        return 2
