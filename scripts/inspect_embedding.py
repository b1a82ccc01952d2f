"""Inspect textual-inversion embedding files: gamma, step, norms, cosines and nearest vocabulary tokens.

    python scripts/inspect_embedding.py run/checkpoints/embeddings.pt --ckpt model.ckpt --init_word woman
    python scripts/inspect_embedding.py run/checkpoints/embeddings_gs-*.pt        # drift over a run

For each file: gamma and step; per placeholder the norms of v and of the effective vectors
e = e_p + gamma * (v - e_p); the cosine of v and e to e_p and to the init word; the top-k nearest
vocabulary tokens of e (cosine against the token table of --ckpt). Without --ckpt, what needs the
token table is reported as unavailable. With several files (sorted by step) it shows the drift of v:
its norm and its cosine to the first and to the previous file.
"""
import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.checkpoint import EmbeddingFile
from ldm.cli import run_script, setup_logging
from ldm.embedding_sources import add_base_model_flags, base_token_table, load_against_base
from ldm.modules.encoders.tokenizer import tokenizer_from_config
from ldm.momentum import mix_vectors, single_token_id
from ldm.util import atomic_write

logger = logging.getLogger("inspect_embedding")
STEP_IN_NAME = re.compile(r"(?:gs|step)-(\d+)")


def _cos(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosine of [n, D] against [n, D]."""
    return [round(float(c), 6) for c in F.cosine_similarity(a.float(), b.float(), dim=-1)]


def _norms(vectors: torch.Tensor) -> list[float]:
    return [round(float(n), 6) for n in vectors.float().norm(dim=-1)]


def nearest_tokens(vectors: torch.Tensor, table: torch.Tensor, tokenizer, k: int) -> list[list[dict[str, Any]]]:
    """Per vector, the k vocabulary tokens of highest cosine: [{"token", "id", "cosine"}]."""
    sims = F.normalize(vectors.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T  # [n, vocab]
    values, ids = sims.topk(min(k, table.shape[0]), dim=-1)
    return [[{"token": tokenizer.decode([int(i)]), "id": int(i), "cosine": round(float(c), 6)}
             for c, i in zip(row_values, row_ids)] for row_values, row_ids in zip(values, ids)]


def describe_placeholder(emb: EmbeddingFile, placeholder: str, table: torch.Tensor | None, tokenizer,
                         init_id: int | None, top_k: int) -> dict[str, Any]:
    """Norms, cosines and nearest tokens of one placeholder; ``unavailable`` lists what could not be computed."""
    v = emb.params[placeholder]
    token_id = emb.string_to_token[placeholder]
    e_p = emb.base[placeholder] if emb.base is not None else None
    if e_p is None and table is not None:
        e_p = table[token_id].expand_as(v)
    effective = v if emb.gamma == 1.0 else None
    if emb.gamma is not None and e_p is not None:
        effective = mix_vectors(e_p, v, emb.gamma)
    info: dict[str, Any] = {"token_id": token_id, "vectors": v.shape[0], "dim": v.shape[1], "norm_v": _norms(v),
                            "norm_effective": None, "cos_v_e_p": None, "cos_effective_e_p": None,
                            "cos_v_init": None, "cos_effective_init": None, "nearest": None, "unavailable": []}
    missing = info["unavailable"]
    if effective is not None:
        info["norm_effective"] = _norms(effective)
    else:
        missing.append("effective vectors (no gamma: pass --gamma)" if emb.gamma is None
                       else "effective vectors (no e_p in the file: pass --ckpt)")
    if e_p is not None:
        info["cos_v_e_p"] = _cos(v, e_p)
        info["cos_effective_e_p"] = _cos(effective, e_p) if effective is not None else None
    else:
        missing.append("cosine to e_p (pass --ckpt)")
    if init_id is not None and table is not None:
        init = table[init_id].expand_as(v)
        info["cos_v_init"] = _cos(v, init)
        info["cos_effective_init"] = _cos(effective, init) if effective is not None else None
    elif init_id is not None:
        missing.append("cosine to the init word (pass --ckpt)")
    if table is not None:
        info["nearest"] = nearest_tokens(effective if effective is not None else v, table, tokenizer, top_k)
    else:
        missing.append("nearest vocabulary tokens (pass --ckpt)")
    return info


def step_of(path: str, emb: EmbeddingFile) -> int | None:
    """The stored step, else the number in an ``embeddings_gs-N`` style file name."""
    if emb.step is not None:
        return emb.step
    match = STEP_IN_NAME.search(Path(path).name)
    return int(match.group(1)) if match else None


def drift(files: list[tuple[str, EmbeddingFile]]) -> dict[str, list[dict[str, Any]]]:
    """Per placeholder in every file: norm of v and its cosine to the first and previous file, by step."""
    ordered = sorted(files, key=lambda item: (step_of(*item) is None, step_of(*item) or 0, item[0]))
    shared = set.intersection(*(set(emb.params) for _, emb in ordered))
    table: dict[str, list[dict[str, Any]]] = {}
    for placeholder in sorted(shared):
        rows, first, previous = [], None, None
        for path, emb in ordered:
            v = emb.params[placeholder].flatten().float()  # [n * D]
            if first is not None and v.shape != first.shape:
                raise ValueError(f"{path}: '{placeholder}' has shape {tuple(emb.params[placeholder].shape)}, "
                                 "unlike the earlier files; drift needs files of one run")
            rows.append({"file": path, "step": step_of(path, emb), "norm_v": round(float(v.norm()), 6),
                         "cos_first": None if first is None else _cos(v[None], first[None])[0],
                         "cos_previous": None if previous is None else _cos(v[None], previous[None])[0]})
            first = v if first is None else first
            previous = v
        table[placeholder] = rows
    return table


def _fmt(values: Any) -> str:
    if values is None:
        return "n/a"
    if isinstance(values, list):
        return ", ".join(_fmt(v) for v in values)
    return f"{values:.4f}" if isinstance(values, float) and math.isfinite(values) else str(values)


def log_report(report: dict[str, Any]) -> None:
    for entry in report["files"]:
        logger.info("%s: format %s, gamma %s, step %s", entry["file"], entry["format"], _fmt(entry["gamma"]),
                    _fmt(entry["step"]))
        for placeholder, info in entry["placeholders"].items():
            logger.info("  '%s' (token %d, %d x %d): |v| %s; |e| %s", placeholder, info["token_id"], info["vectors"],
                        info["dim"], _fmt(info["norm_v"]), _fmt(info["norm_effective"]))
            logger.info("    cos(v, e_p) %s; cos(e, e_p) %s; cos(v, init) %s; cos(e, init) %s",
                        _fmt(info["cos_v_e_p"]), _fmt(info["cos_effective_e_p"]), _fmt(info["cos_v_init"]),
                        _fmt(info["cos_effective_init"]))
            for i, row in enumerate(info["nearest"] or []):
                logger.info("    nearest tokens of e[%d]: %s", i,
                            ", ".join(f"{t['token']!r} {t['cosine']:.3f}" for t in row))
            if info["unavailable"]:
                logger.info("    not computed: %s", "; ".join(info["unavailable"]))
    for placeholder, rows in (report.get("drift") or {}).items():
        logger.info("drift of '%s' over %d files:  step | |v| | cos to first | cos to previous", placeholder, len(rows))
        for row in rows:
            logger.info("  %s  %s | %s | %s | %s", Path(row["file"]).name, _fmt(row["step"]), _fmt(row["norm_v"]),
                        _fmt(row["cos_first"]), _fmt(row["cos_previous"]))


def inspect(args: argparse.Namespace) -> dict[str, Any]:
    """The report: one entry per file and, with several files, the drift per placeholder."""
    tokenizer = tokenizer_from_config(args.config)
    table = base_token_table(args)
    init_id = single_token_id(tokenizer, args.init_word, "init word") if args.init_word else None
    files = [(path, load_against_base(path, args, table, fill_base=False)) for path in args.embeddings]
    entries = [{"file": path, "format": emb.source_format, "name": emb.name, "gamma": emb.gamma,
                "step": step_of(path, emb),
                "placeholders": {p: describe_placeholder(emb, p, table, tokenizer, init_id, args.top_k)
                                 for p in emb.params}} for path, emb in files]
    return {"files": entries, "drift": drift(files) if len(files) > 1 else None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", nargs="+", help="embedding files (any supported format)")
    add_base_model_flags(p, ckpt_help="checkpoint whose token table gives e_p, the init word, neighbours",
                         gamma_help="gamma of files that store none (seed files)")
    p.add_argument("--init_word", default=None, help="the init word of training (one CLIP token), e.g. woman")
    p.add_argument("--top_k", type=int, default=10, help="how many nearest vocabulary tokens to list")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    return p


def report(args: argparse.Namespace) -> None:
    """Build the report, write it as JSON if asked, then log it."""
    if args.top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {args.top_k}")
    result = inspect(args)
    if args.json:
        text = json.dumps(result, indent=2)
        atomic_write(args.json, lambda tmp: tmp.write_text(text))
    log_report(result)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; returns the exit code (0 ok, 2 bad flags or input files)."""
    setup_logging(fmt="%(message)s", stream=sys.stdout)
    return run_script(build_parser(), report, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
