"""TI, momentum TI and DreamBooth on held-out toy subjects: fidelity and editability, judged.

    python scripts/toy_benchmark.py --json toy.json --markdown docs/toy_benchmark.md
    python scripts/toy_benchmark.py --subject-seed 17 --seeds 1      # another held-out subject
    python scripts/toy_benchmark.py --quick                          # reduced run for CI (< 10 min)

For every subject (the first ``--subjects`` of the held-out pool, or ``--subject-seed N``) and every
training seed, each method trains with main.py on the subject's photo folder, then samples the
prompt suite (the plain prompt and 4 edits); the judge scores every sample. Needs the pretrained
toy models (``python scripts/toy_pretrain.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ldm.cli import run_script
from ldm.data.toy import write_photo_folder
from ldm.data.toy_world import CLASS_WORD, HELD_OUT_POOL_SIZE
from ldm.toy_benchmark import (
    METHOD_NAMES, TOY_ACCURACY, TOY_JUDGE, evaluate, load_toy_model, method, prompt_following,
    prompt_suite, require_toy_models, train,
)
from ldm.toy_judge import load_judge
from ldm.util import atomic_write

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("toy_benchmark")

QUICK_METHODS = ("ti", "momentum_0.1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=5, help="how many held-out subjects (from the pool's start)")
    p.add_argument("--subject-seed", type=int, default=None,
                   help=f"benchmark held-out subject N (0-{HELD_OUT_POOL_SIZE - 1}) alone instead")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per subject and method")
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), help="methods to run (default: all)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--max_steps", type=int, default=None, help="training steps (default: the configs')")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced run: 1 subject, 1 seed, {' and '.join(QUICK_METHODS)}")
    p.add_argument("--workdir", type=Path, default=ROOT / "logs" / "toy-benchmark", help="photos and run logs")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the results table as Markdown")
    p.add_argument("--figure", type=Path, default=None, help="PNG grid: rows = methods, columns = prompts")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p


def subject_seeds(args: argparse.Namespace) -> list[int]:
    if args.subject_seed is not None:
        if not 0 <= args.subject_seed < HELD_OUT_POOL_SIZE:
            raise ValueError(f"--subject-seed {args.subject_seed} does not exist: held-out subjects are numbered "
                             f"0 to {HELD_OUT_POOL_SIZE - 1}")
        return [args.subject_seed]
    if not 1 <= args.subjects <= HELD_OUT_POOL_SIZE:
        raise ValueError(f"--subjects must be 1 to {HELD_OUT_POOL_SIZE}, got {args.subjects}")
    return list(range(1 if args.quick else args.subjects))


def summarize(scores: list) -> dict[str, float]:
    """Mean and spread (std over subjects and seeds) of each figure."""
    summary = {}
    for name in ("fidelity", "editability", "features", "attribute"):
        values = [getattr(s, name) for s in scores]
        summary[name], summary[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
    return {**summary, "runs": len(scores)}


def run_benchmark(args: argparse.Namespace, subjects: list[int]) -> dict:
    require_toy_models()
    torch.set_num_threads(args.threads)
    names = list(QUICK_METHODS) if args.quick else args.methods
    methods = [method(n) for n in names]
    seeds = [0] if args.quick else list(range(args.seeds))
    judge_model = load_judge(TOY_JUDGE)
    base = load_toy_model()
    start = time.perf_counter()
    results = {"methods": {}, "init_word": {}, "runs": [], "figure_rows": {}}
    init_scores, oracle_scores, per_method = [], [], {m.name: [] for m in methods}
    for subject_seed in subjects:
        photos = args.workdir / "photos" / f"subject-{subject_seed}"
        subject = write_photo_folder(subject_seed, photos)
        logger.info("Subject %d: %s (photos in %s)", subject_seed, subject.describe(), photos)
        score, images = evaluate(base, judge_model, CLASS_WORD, subject, samples_per_prompt=args.samples, seed=0)
        init_scores.append(score)
        results["figure_rows"].setdefault("init word", images[::args.samples])
        score, _ = evaluate(base, judge_model, subject.describe(), subject, samples_per_prompt=args.samples, seed=0)
        oracle_scores.append(score)
        for seed in seeds:
            dreambooth_model = None
            for m in methods:
                run_start = time.perf_counter()
                base_ckpt = None
                if m.dreambooth_first:
                    dreambooth_model = dreambooth_model or train(method("dreambooth"), photos, seed, args.workdir,
                                                                 max_steps=args.max_steps)
                    base_ckpt = dreambooth_model
                result = train(m, photos, seed, args.workdir, max_steps=args.max_steps,
                               **({"base_ckpt": base_ckpt} if base_ckpt else {}))
                train_s = time.perf_counter() - run_start
                if not m.embedding:
                    dreambooth_model = result
                if m.embedding:
                    model = base if base_ckpt is None else load_toy_model(base_ckpt)
                else:
                    model = load_toy_model(result)
                score, images = evaluate(model, judge_model, m.phrase, subject, samples_per_prompt=args.samples,
                                         seed=1000 + seed, embedding=result if m.embedding else None)
                per_method[m.name].append(score)
                results["figure_rows"].setdefault(m.name, images[::args.samples])
                results["runs"].append({"method": m.name, "subject_seed": subject_seed, "seed": seed,
                                        "fidelity": score.fidelity, "editability": score.editability,
                                        "features": score.features,
                                        "attribute": score.attribute, "per_prompt": score.per_prompt,
                                        "train_seconds": round(train_s, 1)})
                logger.info("%s subject %d seed %d: fidelity %.2f editability %.2f (train %.0f s)", m.name,
                            subject_seed, seed, score.fidelity, score.editability, train_s)
    results["methods"] = {name: summarize(scores) for name, scores in per_method.items()}
    results["init_word"] = summarize(init_scores)
    results["full_description"] = summarize(oracle_scores)
    results["prompt_following"] = prompt_following(base, judge_model, samples_per_prompt=args.samples)
    results["judge_accuracy"] = json.loads(TOY_ACCURACY.read_text()) if TOY_ACCURACY.is_file() else {}
    results["minutes"] = round((time.perf_counter() - start) / 60, 1)
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    results["prompts"] = [p for p, _, _ in prompt_suite("{}")]
    return results


def markdown_table(results: dict) -> str:
    """Mean ± std over subjects and seeds of each figure, one row per method."""
    lines = ["| method | fidelity | editability | identity features | asked attribute | runs |",
             "| --- | --- | --- | --- | --- | --- |"]
    rows = [("init word only (`toy`)", results["init_word"]),
            ("full description (no training)", results["full_description"]), *results["methods"].items()]
    for name, r in rows:
        cells = " | ".join(f"{r[k]:.2f} ± {r[k + '_std']:.2f}" for k in ("fidelity", "editability", "features",
                                                                           "attribute"))
        lines.append(f"| {name} | {cells} | {r['runs']} |")
    return "\n".join(lines) + "\n"


def write_figure(rows: dict[str, torch.Tensor], path: Path) -> None:
    """A grid with one row per method and one column per prompt of the suite."""
    from PIL import Image, ImageDraw

    label_w, cell = 170, 64
    names = list(rows)
    columns = max(t.shape[0] for t in rows.values())
    canvas = Image.new("RGB", (label_w + columns * cell, len(names) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        draw.text((4, r * cell + cell // 2 - 6), name, fill="black")
        pixels = ((rows[name].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for c, image in enumerate(pixels):
            canvas.paste(Image.fromarray(image), (label_w + c * cell, r * cell))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def body(args: argparse.Namespace) -> int:
    unknown = [n for n in args.methods if n not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown method '{unknown[0]}': use {', '.join(METHOD_NAMES)}")
    results = run_benchmark(args, subject_seeds(args))
    figure_rows = results.pop("figure_rows")
    if args.figure:
        write_figure(figure_rows, args.figure)
    if args.json:
        text = json.dumps(results, indent=1) + "\n"
        atomic_write(args.json, lambda tmp: tmp.write_text(text))
    if args.markdown:
        table = markdown_table(results)
        atomic_write(args.markdown, lambda tmp: tmp.write_text(table))
    logger.info("Results (%.1f min):\n%s", results["minutes"], markdown_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), body, argv, logger=logger, errors=(ValueError, OSError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
