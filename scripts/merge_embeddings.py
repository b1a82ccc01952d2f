"""Merge several embedding files into one file of this project's format (one placeholder each, or more).

    python scripts/merge_embeddings.py --inputs alice.pt bob.pt --output both.pt --rename "2:*=sks"

Inputs may be in any supported format. Two inputs with the same placeholder clash: rename one with
--rename [N:]OLD=NEW (N is the 1-based input number; needed when OLD is in several inputs). NEW must
be a single CLIP token. When the inputs share one gamma (and all or none store e_p) the merged file
keeps v, e_p and gamma; otherwise it stores each input's effective vectors with gamma 1. Seed files
(no e_p) need --ckpt unless gamma is 1.
"""
import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ldm.checkpoint import (
    EmbeddingFile,
    interop,
    save_embeddings,
)
from ldm.checkpoint.embeddings import check_dim, no_gamma_error
from ldm.cli import run_script
from ldm.embedding_sources import add_base_model_flags, base_token_table, load_against_base
from ldm.modules.encoders.tokenizer import tokenizer_from_config

logger = logging.getLogger("merge_embeddings")


@dataclass(frozen=True)
class Rename:
    """``--rename [N:]OLD=NEW``; ``index`` is 0-based, None when not given."""

    index: int | None
    old: str
    new: str


def parse_rename(text: str, count: int) -> Rename:
    """Parse one ``--rename`` value (``*=sks`` or ``2:*=sks``)."""
    head, sep, new = text.rpartition("=")
    index_text, colon, old = head.partition(":")
    if not colon or not index_text.isdigit():  # no input number: the colon may belong to the placeholder
        index_text, old = "", head
    if not sep or not old or not new:
        raise ValueError(f"--rename {text!r}: expected OLD=NEW or N:OLD=NEW (e.g. '2:*=sks')")
    index = int(index_text) - 1 if index_text else None
    if index is not None and not 0 <= index < count:
        raise ValueError(f"--rename {text!r}: input number {index + 1} is not between 1 and {count}")
    return Rename(index, old, new)


def apply_renames(files: list[tuple[str, EmbeddingFile]], renames: list[Rename], tokenizer):
    """Rename placeholders in the inputs the renames name (or the single input holding OLD)."""
    files = list(files)
    for rename in renames:
        holders = [i for i, (_, emb) in enumerate(files) if rename.old in emb.params]
        if rename.index is not None:
            targets = [rename.index]
        elif len(holders) == 1:
            targets = holders
        elif not holders:
            raise ValueError(f"--rename {rename.old}={rename.new}: no input has placeholder '{rename.old}'")
        else:
            raise ValueError(f"--rename {rename.old}={rename.new}: '{rename.old}' is in inputs "
                             f"{[i + 1 for i in holders]}; say which, e.g. --rename '{holders[-1] + 1}:"
                             f"{rename.old}={rename.new}'")
        for i in targets:
            path, emb = files[i]
            files[i] = (path, interop.rename_placeholder(emb, rename.old, rename.new, tokenizer, path))
    return files


def check_compatible(files: list[tuple[str, EmbeddingFile]]) -> None:
    """Same vector width everywhere; no placeholder (or token id) in two inputs."""
    first_path, first = files[0]
    dim = next(iter(first.params.values())).shape[1]
    for path, emb in files[1:]:
        check_dim(emb, dim, path, f"{first_path} (the first input)")
    owner: dict[str, int] = {}
    for i, (path, emb) in enumerate(files):
        for placeholder in emb.params:
            if placeholder in owner:
                j = owner[placeholder]
                raise ValueError(
                    f"placeholder '{placeholder}' is in both {files[j][0]} (input {j + 1}) and {path} (input {i + 1}); "
                    f"rename one with --rename '{i + 1}:{placeholder}=NEW' (NEW a single CLIP token, e.g. 'ohwx')")
            owner[placeholder] = i


def merge(files: list[tuple[str, EmbeddingFile]]) -> EmbeddingFile:
    """One EmbeddingFile with every input's placeholders."""
    embs = [emb for _, emb in files]
    gammas = {emb.gamma for emb in embs}
    with_base = {emb.base is not None for emb in embs}
    for path, emb in files:  # the merged file stores effective vectors, which need e_p
        if emb.gamma != 1.0 and emb.base is None:
            raise interop.needs_base_error(path, emb)
    if len(gammas) != 1 or len(with_base) != 1:
        logger.info("inputs differ in gamma %s or in storing e_p: the merged file holds effective vectors (gamma 1)",
                    sorted(gammas))
        embs = [emb.as_plain_ti() for emb in embs]
    fingerprints = {emb.fingerprint for emb in embs}
    steps = {emb.step for emb in embs}
    if len(fingerprints) > 1:
        logger.warning("inputs come from different text encoders (fingerprints %s)", sorted(map(str, fingerprints)))
    keep_base = embs[0].base is not None
    return EmbeddingFile(
        string_to_token={p: i for emb in embs for p, i in emb.string_to_token.items()},
        params={p: v for emb in embs for p, v in emb.params.items()},
        base={p: e for emb in embs for p, e in emb.base.items()} if keep_base else None,
        gamma=embs[0].gamma,
        step=steps.pop() if len(steps) == 1 else None,
        fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None,
    )


def load_inputs(args: argparse.Namespace) -> list[tuple[str, EmbeddingFile]]:
    """Every input loaded, with gamma known and e_p filled from --ckpt where missing."""
    table = base_token_table(args)
    files = []
    for path in args.inputs:
        emb = load_against_base(path, args, table, fill_base=True)
        if emb.gamma is None:
            raise no_gamma_error(path)
        files.append((path, emb))
    return files


def run(args: argparse.Namespace) -> None:
    interop.check_export_suffix(args.output, "ours")
    if len(args.inputs) < 2:
        raise ValueError("--inputs needs at least two embedding files to merge")
    renames = [parse_rename(text, len(args.inputs)) for text in args.rename]
    files = load_inputs(args)
    if renames:
        files = apply_renames(files, renames, tokenizer_from_config(args.config))
    check_compatible(files)
    save_embeddings(args.output, merge(files))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="embedding files (any supported format)")
    p.add_argument("--output", required=True, help="merged file (.pt or .safetensors, this project's format)")
    p.add_argument("--rename", action="append", default=[], metavar="[N:]OLD=NEW",
                   help="rename placeholder OLD (of input N) to NEW, a single CLIP token; repeatable")
    add_base_model_flags(p, ckpt_help="checkpoint the inputs were trained on (e_p for seed files)",
                         gamma_help="gamma of inputs that store none (seed files)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the merge; returns the exit code (0 ok, 2 bad flags or input files)."""
    return run_script(build_parser(), run, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
