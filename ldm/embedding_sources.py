"""Embedding files read against the model they were trained on: what the embedding scripts share.

``convert_embedding.py``, ``merge_embeddings.py`` and ``inspect_embedding.py`` take the same four
flags (``--ckpt``, ``--config``, ``--gamma``, ``--trust_pickle``) and read their inputs the same way:
any supported format, gamma from the file or ``--gamma``, vector width checked against the token table
of ``--ckpt``, and (where the script needs the effective vectors) e_p filled from that table.
"""
from __future__ import annotations

import argparse

import torch

from ldm.checkpoint import EmbeddingFile, interop
from ldm.checkpoint.embeddings import check_dim
from ldm.modules.embedding_manager import load_embeddings


def add_base_model_flags(parser: argparse.ArgumentParser, *, ckpt_help: str, gamma_help: str) -> None:
    """The four flags naming the model an embedding was trained on and the gamma of seed files."""
    parser.add_argument("--ckpt", default=None, help=ckpt_help)
    parser.add_argument("--config", default=None, help="its LDM config (for a text encoder with its own tokenizer)")
    parser.add_argument("--gamma", type=float, default=None, help=gamma_help)
    parser.add_argument("--trust_pickle", action="store_true", help="fully unpickle --ckpt (only for trusted files)")


def base_token_table(args: argparse.Namespace) -> torch.Tensor | None:
    """The token-embedding table of ``--ckpt`` (None without it)."""
    return interop.token_table(args.ckpt, trust_pickle=args.trust_pickle) if args.ckpt else None


def load_against_base(path: str, args: argparse.Namespace, table: torch.Tensor | None, *,
                      fill_base: bool) -> EmbeddingFile:
    """``path`` loaded (``--gamma`` for files that store none), checked against ``table``.

    With ``fill_base``, a file that stores no e_p (the original code's) gets it from ``table``.
    """
    emb = load_embeddings(path, default_gamma=args.gamma)
    if table is not None:
        check_dim(emb, table.shape[1], path, f"the text encoder of {args.ckpt}")
        if fill_base and emb.base is None:
            emb = interop.with_base_from_table(emb, table, path)
    return emb
