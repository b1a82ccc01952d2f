"""Rescore stored toy-benchmark runs with bfloat16 sampling and compare with their fp32 points.

    python scripts/toy_bf16_check.py ti:0 momentum_0.1_lr8e-3:1 ti:2 --workdir logs/bench-v3

Each RUN is CELL:SUBJECT (training seed 0, or CELL:SUBJECT:SEED) of an embedding cell whose fp32 result
is stored in WORKDIR (``scripts/toy_benchmark.py``, default protocol: steps, strengths; ``--samples`` and
``--ddim-steps`` as that benchmark used). The run's saves are scored again, with the same noise, under
``--bf16`` and each point is compared with the stored one; the scoring CPU time of both is logged.
Nothing is written. docs/toy_benchmark.md ("Time") has the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from ldm.cli import run_script
from ldm.png_metadata import model_hash
from ldm.toy.benchmark import (
    SAMPLER, TOY_JUDGE, TOY_MODEL, Protocol, load_toy_model, native_bf16, require_toy_models, score_run, step_saves,
)
from ldm.toy.cells import method
from ldm.toy.judge import load_judge
from ldm.toy.records import load_record, record_path
from ldm.toy.world import held_out_pool

logger = logging.getLogger("toy_bf16_check")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="CELL:SUBJECT[:SEED]", help="stored embedding runs to rescore")
    p.add_argument("--workdir", type=Path, required=True, help="the toy benchmark's --workdir")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt the runs were scored with (default 4)")
    p.add_argument("--ddim-steps", type=int, default=10, help="DDIM steps the runs were scored with (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p


def parse_run(spec: str) -> tuple[str, int, int]:
    """``CELL:SUBJECT[:SEED]`` as (cell, subject seed, training seed); an embedding cell only."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"run {spec!r} is not CELL:SUBJECT[:SEED] (e.g. ti:0)")
    if not method(parts[0]).embedding or method(parts[0]).on is not None:
        raise ValueError(f"run {spec!r}: only embedding cells trained on the toy model itself can be rescored")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 0


def compare(stored: list[dict], rescored: list[dict]) -> dict[str, float]:
    """How far the rescored points are from the stored ones: identical points, largest and mean changes."""
    changes = [(new["fidelity"] - old["fidelity"], new["editability"] - old["editability"])
               for old, new in zip(stored, rescored)]
    return {"identical": sum(change == (0.0, 0.0) for change in changes), "points": len(changes),
            "max_fidelity_change": max(abs(f) for f, _ in changes),
            "max_editability_change": max(abs(e) for _, e in changes),
            "mean_fidelity_change": sum(f for f, _ in changes) / len(changes),
            "mean_editability_change": sum(e for _, e in changes) / len(changes)}


def stored_runs(args: argparse.Namespace, protocol: Protocol) -> list[tuple[str, int, int, dict]]:
    """(cell, subject seed, training seed, stored fp32 record) of each asked run; an error names a missing one."""
    found = []
    for cell, subject_seed, seed in (parse_run(spec) for spec in args.runs):
        fingerprint = {**protocol.fingerprint(method(cell)), "base": str(TOY_MODEL)}
        record = load_record(record_path(args.workdir, cell, subject_seed, seed, fingerprint), fingerprint)
        if record is None:
            raise ValueError(f"{args.workdir} holds no whole fp32 result of {cell} subject {subject_seed} seed {seed} "
                             f"at {args.samples} samples and {args.ddim_steps} DDIM steps (sampler {SAMPLER}): "
                             "run scripts/toy_benchmark.py first")
        found.append((cell, subject_seed, seed, record))
    return found


def body(args: argparse.Namespace) -> int:
    require_toy_models()
    fp32 = Protocol(samples=args.samples, ddim_steps=args.ddim_steps, base_model=model_hash(TOY_MODEL))
    bf16 = replace(fp32, bf16=True)
    runs = stored_runs(args, fp32)
    if not native_bf16():
        logger.warning("this CPU has no native bfloat16 (avx512_bf16 or AMX): the verdicts compare as anywhere, but "
                       "the bf16 CPU times are those of emulation, not what --bf16 saves where the benchmark allows it")
    torch.set_num_threads(args.threads)
    base, judge_model = load_toy_model(), load_judge(TOY_JUDGE)
    for cell, subject_seed, seed, record in runs:
        m = method(cell)
        start = time.process_time()
        points = score_run(base, judge_model, m, held_out_pool()[subject_seed],
                           step_saves(Path(record["result"]), m, bf16.steps), bf16, seed=1000 + seed)
        seconds = time.process_time() - start
        logger.info("%s subject %d seed %d: scoring %.0f CPU s in bf16, %.0f in fp32 (stored); %s", cell,
                    subject_seed, seed, seconds, record["times"].get("score_cpu_s", float("nan")),
                    json.dumps({k: round(v, 3) for k, v in compare(record["points"], points).items()}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code (0 ok, 2 bad runs or no stored result)."""
    return run_script(build_parser(), body, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
