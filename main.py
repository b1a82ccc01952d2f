"""Training entrypoint: momentum textual inversion (and LDM training) with PyTorch Lightning.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t \\
        --actual_resume models/ldm/dreambooth/<name>.ckpt -n <name> --gpus 0, \\
        --data_root inputs/<person>/ --gamma 0.1 --descriptive_p 0.1 --use_random_prompt --class_word woman

Any extra ``key.path=value`` argument overrides the merged config (OmegaConf dotlist).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys

from ldm.cli import LOG_FORMAT, setup_logging
from ldm.models.diffusion.compiled_unet import COMPILE_MODES
from ldm.trainer_args import PRECISIONS

logger = logging.getLogger("main")



def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{value}'")


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--actual_resume", default=None, help="SD / DreamBooth checkpoint to start from")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow checkpoints that need arbitrary code to unpickle (only for files you trust)")
    p.add_argument("--data_root", default=None, help="folder with the photos of the person")
    p.add_argument("--embedding_manager_ckpt", default=None, help="embedding file to start from")
    p.add_argument("--placeholder_string", default=None, help="placeholder token (default '*')")
    p.add_argument("--init_word", default=None, help="word the vectors start from (e.g. woman)")
    p.add_argument("--gamma", type=float, default=None, help="momentum ratio in [0, 1] (seed: 0.1; 1 = plain TI)")
    p.add_argument("--descriptive_p", type=float, default=None, help="probability of each descriptive word")
    p.add_argument("--use_random_prompt", action="store_true", help="random TI object templates")
    p.add_argument("--num_vectors_per_token", type=int, default=None,
                   help="vectors the placeholder stands for (default 1; more: more capacity, longer prompts)")
    p.add_argument("--progressive_words", action="store_true",
                   help="with several vectors per token, train them one at a time (a new one every 2000 steps)")
    p.add_argument("--class_word", default=None, help="train on '* <class_word>' (e.g. woman)")
    p.add_argument("--use_facial_loss", action="store_true", help="add the dlib face-crop loss term")
    p.add_argument("--facial_loss_weight", type=float, default=1.0, help="lambda of the face term")
    p.add_argument("--face_detector", choices=("cnn", "hog"), default="cnn", help="dlib face detector")
    p.add_argument("--reg_data_root", default=None,
                   help="DreamBooth: class images for prior preservation (scripts/make_class_images.py makes them)")
    p.add_argument("--prior_loss_weight", type=float, default=None, help="DreamBooth: prior-loss weight (default 1.0)")
    p.add_argument("--identifier", default=None, help="DreamBooth: the subject's rare token (default sks)")
    p.add_argument("--train_text_encoder", action="store_true", help="DreamBooth: train the text encoder too")
    p.add_argument("--export_format", choices=("ckpt", "safetensors"), default=None,
                   help="DreamBooth: format of checkpoints/model_pruned.* written at the end (default ckpt)")
    p.add_argument("--export_half", action="store_true", help="DreamBooth: write the pruned model in fp16")
    p.add_argument("--gpus", default=None, help="GPU ids as in the seed, e.g. '0,' or '0,1'")
    p.add_argument("--accelerator", default=None, help="cpu, gpu or auto (default: gpu when --gpus)")
    p.add_argument("--devices", default=None, help="number of devices (e.g. 2 CPU processes for DDP)")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--max_epochs", type=int, default=None, help="stop after this many epochs")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="training precision (default: lightning.trainer.precision, else 32)")
    p.add_argument("--compile_unet", nargs="?", const="auto", default=None, choices=COMPILE_MODES,
                   help="torch.compile the UNet (auto: CUDA graphs on a GPU; config key model.params.compile_unet)")
    p.add_argument("--accumulate_grad_batches", type=int, default=None,
                   help="micro-batches per optimizer step (default: lightning.trainer.accumulate_grad_batches, else 1)")
    p.add_argument("--num_nodes", type=int, default=None,
                   help="machines in a multi-node DDP run (each sets MASTER_ADDR, MASTER_PORT, NODE_RANK; see README)")
    p.add_argument("--validation_prompts", default=None, metavar="FILE",
                   help="validation prompts, one per line ('*' is the placeholder; default: the training prompt "
                        "and 3 edits)")
    p.add_argument("--validation_ddim_steps", type=int, default=None,
                   help="DDIM steps of the validation samples (default 10)")
    p.add_argument("--validation_identity", action="store_true",
                   help="score validation samples against the photos (dlib) and keep checkpoints/embeddings_best.pt "
                        "(on with --use_facial_loss)")
    p.add_argument("--no_validation", action="store_true",
                   help="no validation sampling at saves (config key lightning.validation.enabled=false)")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging(fmt=f"%(asctime)s {LOG_FORMAT}")
    parser = build_parser()
    opt, unknown = parser.parse_known_args(argv)
    from ldm.training import TrainingError, run_training

    bad = [u for u in unknown if "=" not in u]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like model.params.key=value)")
    try:
        return run_training(opt, unknown, now=datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S"))
    except TrainingError as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
