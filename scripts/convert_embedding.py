"""Convert a textual-inversion embedding between this project, original TI, diffusers and AUTOMATIC1111.

    python scripts/convert_embedding.py --input run/checkpoints/embeddings.pt \\
        --output learned_embeds.safetensors --to diffusers --token "<me>"

The input format is detected from the file. Exports write the effective vectors the model sees,
e = e_p + gamma * (v - e_p); --gamma re-mixes before exporting. Files that store no e_p (the original code's
.pt files) need --ckpt, the checkpoint they were trained on, for any gamma other than 1.
Targets: ours (.pt/.safetensors, keeps v, e_p and gamma), ti (.pt, original TI layout),
diffusers (.safetensors/.bin, {token: e}), a1111 (.pt with name/step, or .safetensors {"emb_params": e}).
"""
import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ldm.checkpoint import (
    EmbeddingFile,
    interop,
)
from ldm.checkpoint.embeddings import no_gamma_error
from ldm.cli import run_script
from ldm.embedding_sources import add_base_model_flags, base_token_table, load_against_base
from ldm.modules.encoders.tokenizer import default_tokenizer, tokenizer_from_config
from ldm.momentum import check_gamma

logger = logging.getLogger("convert_embedding")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="embedding file in any supported format")
    p.add_argument("--output", required=True, help="file to write (its suffix picks .pt/.bin/.safetensors)")
    p.add_argument("--to", required=True, choices=sorted(interop.EXPORT_SUFFIXES), help="target format")
    add_base_model_flags(p, ckpt_help="SD/DreamBooth checkpoint the embedding was trained on (for e_p)",
                         gamma_help="momentum ratio to mix with (default: the stored one; required for seed files)")
    p.add_argument("--token", default=None,
                   help="diffusers token / A1111 name to write; for ours/ti the new placeholder (one CLIP token)")
    p.add_argument("--placeholder", default=None, help="export only this placeholder of a multi-placeholder file")
    return p


def prepare(args: argparse.Namespace) -> EmbeddingFile:
    """The embedding to export: loaded, re-mixed, e_p filled from --ckpt, renamed."""
    source = args.input
    emb = load_against_base(source, args, base_token_table(args), fill_base=True)
    if args.gamma is not None:
        emb = replace(emb, gamma=check_gamma(args.gamma))
    if emb.gamma is None:
        raise no_gamma_error(source)
    if args.placeholder is not None:
        emb = interop.select_placeholder(emb, args.placeholder, source)
    if emb.gamma != 1.0 and emb.base is None:
        raise interop.needs_base_error(source, emb)
    if args.token is not None and args.to in ("ours", "ti"):
        if len(emb.params) != 1:
            raise ValueError(f"--token renames one placeholder but {source} has {sorted(emb.params)}; "
                             "add --placeholder")
        tokenizer = tokenizer_from_config(args.config)
        emb = interop.rename_placeholder(emb, next(iter(emb.params)), args.token, tokenizer, source)
    return emb


def convert(args: argparse.Namespace) -> None:
    interop.check_export_suffix(args.output, args.to)
    emb = prepare(args)
    checkpoint_name = Path(args.ckpt).name if args.ckpt else None
    interop.export_embedding(args.output, emb, args.to, tokenizer=default_tokenizer(), token=args.token,
                             checkpoint_name=checkpoint_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; returns the exit code (0 ok, 2 bad flags or input files)."""
    return run_script(build_parser(), convert, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
