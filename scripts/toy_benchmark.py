"""Fidelity-editability frontiers of TI, momentum TI and DreamBooth on held-out toy subjects, judged.

    python scripts/toy_benchmark.py --json docs/toy_benchmark.json --markdown table.md \\
        --figure docs/toy_frontiers.png                                # the full frontier benchmark
    python scripts/toy_benchmark.py --subject-seed 17 19 21 --seeds 1  # other held-out subjects
    python scripts/toy_benchmark.py --quick                          # ti and momentum_0.1, 1 subject, 1 seed

For every subject (the first ``--subjects`` of the held-out pool, or those of ``--subject-seed``), training
seed and cell, one main.py run saves after each of ``--steps``; each save is scored at each inference
strength of ``--strengths`` (embeddings; e_s = e_p + s (e - e_p)) by sampling the prompt suite (the plain
prompt and 4 edits) and judging every sample. A method's frontier is the Pareto set of its mean
(fidelity, editability) points (ldm/toy/frontier.py); intervals are 95% bootstrap intervals over runs.
Each run's result is kept in WORKDIR/runs/, so a benchmark started again reuses finished runs. Needs
the pretrained toy models (``python scripts/toy_pretrain.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ldm.cli import run_script
from ldm.toy.scenes import write_photo_folder
from ldm.toy.world import CLASS_WORD, HELD_OUT_POOL_SIZE
from ldm.toy.frontier import BOOTSTRAP_RESAMPLES, paired_difference, summarize_frontier
from ldm.momentum import check_strength
from ldm.png_metadata import model_hash
from ldm.toy.probes import prompt_following
from ldm.toy.benchmark import (
    INFERENCE_CONFIG, SAMPLER, STEPS, STRENGTHS, TOY_ACCURACY, TOY_JUDGE, TOY_MODEL, Protocol, base_files, evaluate,
    load_toy_model, native_bf16, prompt_suite, require_toy_models, run_clock, score_run, step_saves, train,
)
from ldm.toy.cells import FRONTIER_METHODS, METHOD_NAMES, QUICK_METHODS, Method, method
from ldm.toy.records import load_record, record_path, save_record, stored_probe
from ldm.toy.judge import load_judge
from ldm.util import atomic_write

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("toy_benchmark")

FIDELITY_THRESHOLDS = (0.5, 0.7)
QUICK_SAMPLES = 2
CLASS_IMAGES = 48  # class images for prior preservation, drawn once per workdir
REFERENCES = ("init_word", "full_description")
FIGURES = ("fidelity", "editability", "features", "attribute")


@dataclass(frozen=True)
class Plan:
    """What a benchmark runs, checked before any work starts."""

    cells: list[Method]  # in run order: a DreamBooth cell before the cells trained on its model
    scored: list[str]  # the cells asked for (a DreamBooth cell may run only as another's base)
    subjects: list[int]
    seeds: list[int]
    protocol: Protocol
    comparisons: list[tuple[str, str]] = field(default_factory=list)  # --compare X:Y, beside each cell's own


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=5, help="how many held-out subjects (from the pool's start)")
    p.add_argument("--subject-seed", type=int, nargs="+", default=None,
                   help=f"benchmark these held-out subjects (0-{HELD_OUT_POOL_SIZE - 1}) instead, e.g. ones not used "
                        "while tuning a method")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per subject and cell")
    p.add_argument("--methods", nargs="+", default=list(FRONTIER_METHODS),
                   help=f"cells to run (default: {' '.join(FRONTIER_METHODS)}); also: "
                        f"{' '.join(n for n in METHOD_NAMES if n not in FRONTIER_METHODS)}")
    p.add_argument("--samples", type=int, default=None, help=f"samples per prompt (default 8; {QUICK_SAMPLES} with "
                                                             "--quick)")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS),
                   help="training lengths scored, all from one run that trains for the largest")
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS),
                   help="inference strengths s in [0, 4] scored for embeddings: e_s = e_p + s (e - e_p)")
    p.add_argument("--ddim-steps", type=int, default=SAMPLER["ddim_steps"],
                   help=f"DDIM steps of every scored sample (default {SAMPLER['ddim_steps']}; 10 halves the scoring "
                        "time, docs/toy_benchmark.md)")
    p.add_argument("--bf16", action="store_true",
                   help="sample and judge under CPU bfloat16 autocast (training stays fp32): about half the scoring "
                        "time on a CPU with native bfloat16 (avx512_bf16 or AMX; refused on others, where it is "
                        "~20x slower), the same judged figures where measured (docs/toy_benchmark.md); its results "
                        "are stored apart from fp32 ones")
    p.add_argument("--compare", nargs="+", default=[], metavar="X:Y",
                   help="also give X's frontier figures minus Y's, run for run (paired), for cells X and Y of the "
                        "run (e.g. ti_vectors_4:dreambooth_prior_lr4e-5); each cell is already paired with the one "
                        "it adds a step or option to")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced run: 1 subject, 1 seed, {' and '.join(QUICK_METHODS)}, {QUICK_SAMPLES} samples "
                        "per prompt, no prompt-following probe")
    p.add_argument("--workdir", type=Path, default=ROOT / "logs" / "toy-benchmark",
                   help="photos, class images, run logs and the per-run results a restart reuses")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the results tables as Markdown")
    p.add_argument("--figure", type=Path, default=None, help="fidelity-vs-editability plot (PNG)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a machine shared with other jobs, 2 threads were 20x slower "
                        "per training step; docs/toy_benchmark.md)")
    return p


def subject_seeds(args: argparse.Namespace) -> list[int]:
    if args.subject_seed is not None:
        for seed in args.subject_seed:
            if not 0 <= seed < HELD_OUT_POOL_SIZE:
                raise ValueError(f"--subject-seed {seed} does not exist: held-out subjects are numbered "
                                 f"0 to {HELD_OUT_POOL_SIZE - 1}")
        return list(dict.fromkeys(args.subject_seed))
    if not 1 <= args.subjects <= HELD_OUT_POOL_SIZE:
        raise ValueError(f"--subjects must be 1 to {HELD_OUT_POOL_SIZE}, got {args.subjects}")
    return list(range(1 if args.quick else args.subjects))


def plan(args: argparse.Namespace) -> Plan:
    """Check every input (one-line ValueErrors) and order the cells; nothing is run or written."""
    names = list(QUICK_METHODS) if args.quick else list(dict.fromkeys(args.methods))
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown method '{unknown[0]}': use {', '.join(METHOD_NAMES)}")
    for strength in args.strengths:
        try:
            check_strength(strength)
        except ValueError as err:
            raise ValueError(f"--strengths: {err}") from None
    if any(s < 1 for s in args.steps) or sorted(set(args.steps)) != args.steps:
        raise ValueError(f"--steps must be increasing positive step counts, got {' '.join(map(str, args.steps))}")
    samples = args.samples if args.samples is not None else (QUICK_SAMPLES if args.quick else 8)
    if samples < 1 or args.seeds < 1 or args.ddim_steps < 1:
        raise ValueError("--samples, --seeds and --ddim-steps must be at least 1")
    if args.bf16 and not native_bf16():
        raise ValueError("--bf16: this CPU has no native bfloat16 (avx512_bf16 or AMX), so autocast emulates it and "
                         "scoring is about 20x slower than fp32 (docs/toy_benchmark.md): leave out --bf16")
    subjects = subject_seeds(args)
    cells = []
    for name in names:
        m = method(name)
        if m.on is not None and m.on not in [c.name for c in cells]:
            cells.append(method(m.on))
        if m not in cells:
            cells.append(m)
    protocol = Protocol(tuple(args.steps), tuple(float(s) for s in args.strengths), samples, args.ddim_steps,
                        bf16=args.bf16)
    comparisons = [comparison(text, [c.name for c in cells]) for text in args.compare]
    return Plan(cells, names, subjects, [0] if args.quick else list(range(args.seeds)), protocol, comparisons)


def comparison(text: str, cells: Sequence[str]) -> tuple[str, str]:
    """``X:Y`` of ``--compare`` as (X, Y), both cells this benchmark runs; else a one-line ValueError."""
    pair = tuple(text.split(":"))
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"--compare {text}: give two different cells as X:Y, e.g. ti_vectors_4:ti")
    missing = [name for name in pair if name not in cells]
    if missing:
        raise ValueError(f"--compare {text}: '{missing[0]}' is not run by this benchmark; add it to --methods")
    return pair


# ------------------------------------------------------------------------------------- runs
def class_images(workdir: Path, threads: int, ddim_steps: int, count: int = CLASS_IMAGES) -> Path:
    """The prior-preservation images of 'a photo of a toy' drawn by the pretrained toy model (made once,
    by scripts/make_class_images.py with ``threads`` CPU threads)."""
    outdir = workdir / "class_images" / CLASS_WORD
    command = [sys.executable, str(ROOT / "scripts" / "make_class_images.py"), "--ckpt", str(TOY_MODEL),
               "--config", str(INFERENCE_CONFIG), "--class_word", CLASS_WORD, "--outdir", str(outdir),
               "--n_images", str(count), "--batch_size", "16", "--ddim_steps", str(ddim_steps),
               "--scale", str(SAMPLER["scale"]), "--device", "cpu", "--precision", "full"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env)  # it makes only the images the folder lacks
    return outdir


class Runner:
    """Runs (or reuses) each cell's runs and the references, with the loaded base model and judge."""

    def __init__(self, plan_: Plan, workdir: Path, judge, base, class_dir: Path | None = None):
        self.plan, self.workdir = plan_, workdir
        self.judge, self.base, self.class_dir = judge, base, class_dir
        self.records: dict[tuple[str, int, int], dict] = {}

    def reference(self, name: str, subject_seed: int, subject) -> dict:
        """The init word's or the full description's score on the pretrained model (one point, stored)."""
        phrase = CLASS_WORD if name == "init_word" else subject.describe()
        fingerprint = json.loads(json.dumps({"phrase": phrase, "settings": [[0, 1.0]],
                                             "samples": self.plan.protocol.samples,
                                             "sampler": self.plan.protocol.sampler,
                                             "base_model": self.plan.protocol.base_model}))
        path = record_path(self.workdir, name, subject_seed, 0, fingerprint)
        record = load_record(path, fingerprint)
        if record is None:
            watch = Stopwatch()
            watch.mark("trained")
            score, _ = evaluate(self.base, self.judge, phrase, subject, samples_per_prompt=self.plan.protocol.samples,
                                seed=0, ddim_steps=self.plan.protocol.ddim_steps, bf16=self.plan.protocol.bf16)
            watch.mark("scored")
            point = {"steps": 0, "strength": 1.0, **{k: getattr(score, k) for k in FIGURES},
                     "per_prompt": score.per_prompt}
            record = {"fingerprint": fingerprint, "points": [point], "result": str(TOY_MODEL),
                      "times": run_times(watch.clock)}
            save_record(path, record)
        return record

    def run(self, m: Method, subject_seed: int, seed: int, photos: Path, subject) -> dict:
        """One run of cell ``m``: its stored result when reusable, else train, score and store it."""
        base_record = self.records[(m.on, subject_seed, seed)] if m.on else None
        base = base_record["result"] if base_record else str(TOY_MODEL)
        fingerprint = {**self.plan.protocol.fingerprint(m), "base": base}
        path = record_path(self.workdir, m.name, subject_seed, seed, fingerprint)
        record = load_record(path, fingerprint)
        if record is not None:
            logger.info("%s subject %d seed %d: reusing %s", m.name, subject_seed, seed, path)
            return record
        watch = Stopwatch()
        watch.mark("start")
        start = base_files(m, base_record)
        result = train(m, photos, seed, self.workdir / "logs", base_ckpt=start["ckpt"], lora=start["lora"],
                       max_steps=max(self.plan.protocol.steps), save_steps=self.plan.protocol.steps,
                       class_images=self.class_dir)
        watch.mark("trained")
        points = score_run(self.base, self.judge, m, subject, step_saves(result, m, self.plan.protocol.steps),
                           self.plan.protocol, seed=1000 + seed, unet=start["unet"], lora=start["lora"])
        watch.mark("scored")
        record = {"fingerprint": fingerprint, "points": points, "result": str(result),
                  "times": run_times({**watch.clock, **run_clock(result)})}
        if m.saves_unet:
            record["unet"] = str(step_saves(result, m, self.plan.protocol.steps)[max(self.plan.protocol.steps)])
        save_record(path, record)
        final = points[-1] if not m.embedding else next(p for p in points[::-1] if p["strength"] == 1.0)
        logger.info("%s subject %d seed %d: fidelity %.2f editability %.2f at %d steps (times %s)", m.name,
                    subject_seed, seed, final["fidelity"], final["editability"], final["steps"],
                    {k: round(v, 1) for k, v in record["times"].items()})
        return record

    def run_all(self) -> dict[str, list[dict]]:
        """Every record, by cell name and reference, over subjects x seeds."""
        by_cell: dict[str, list[dict]] = {name: [] for name in [*REFERENCES, *(m.name for m in self.plan.cells)]}
        for subject_seed in self.plan.subjects:
            photos = self.workdir / "photos" / f"subject-{subject_seed}"
            subject = write_photo_folder(subject_seed, photos)
            logger.info("Subject %d: %s (photos in %s)", subject_seed, subject.describe(), photos)
            for name in REFERENCES:
                by_cell[name].append(self.reference(name, subject_seed, subject))
            for seed in self.plan.seeds:
                for m in self.plan.cells:
                    record = self.run(m, subject_seed, seed, photos, subject)
                    self.records[(m.name, subject_seed, seed)] = record
                    by_cell[m.name].append(record)
        return by_cell


class Stopwatch:
    """Wall-clock and process CPU time (all threads) at named events, as ``<event>`` and ``<event>_cpu``."""

    def __init__(self):
        self.clock: dict[str, float] = {}

    def mark(self, event: str) -> None:
        self.clock.update({event: time.time(), f"{event}_cpu": time.process_time()})


def run_times(clock: dict[str, float]) -> dict[str, float]:
    """Seconds of each part of a run, wall and CPU: main.py's set-up (configure, instantiate, trainer),
    Lightning's fit set-up, training, what follows fit, and scoring (sampling and judging every setting).

    ``clock`` holds the events start, fit_start, train_start, train_end (:class:`BenchmarkProbe`),
    trained and scored; CPU time on a machine shared with other jobs is the fairer measure of cost.
    """
    parts = {"setup": ("start", "fit_start"), "fit_setup": ("fit_start", "train_start"),
             "train": ("train_start", "train_end"), "teardown": ("train_end", "trained"),
             "score": ("trained", "scored")}
    times = {}
    for name, (begin, end) in parts.items():
        if begin in clock and end in clock:
            times[f"{name}_s"] = clock[end] - clock[begin]
            times[f"{name}_cpu_s"] = clock[f"{end}_cpu"] - clock[f"{begin}_cpu"]
    return times


# ------------------------------------------------------------------------------------- results
def final_point(record: dict) -> dict:
    """The point of the earlier single-point protocol: the last save at strength 1."""
    return [p for p in record["points"] if p["strength"] == 1.0][-1]


def summarize(records: list[dict]) -> dict[str, float]:
    """Mean and spread (std over subjects and seeds) of each figure at the final point."""
    summary = {}
    for name in FIGURES:
        values = [final_point(r)[name] for r in records]
        summary[name], summary[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
    return {**summary, "runs": len(records)}


def run_points(records: list[dict]) -> np.ndarray:
    """The (fidelity, editability) of every setting of every run: [runs, settings, 2]."""
    return np.array([[[p["fidelity"], p["editability"]] for p in r["points"]] for r in records])


def frontier(records: list[dict]) -> dict:
    """The cell's points with bootstrap intervals, which are on its frontier, and the frontier's figures."""
    runs = run_points(records)
    summary = summarize_frontier(runs, FIDELITY_THRESHOLDS)
    points = []
    for i, p in enumerate(records[0]["points"]):
        fidelity_ci, editability_ci = summary["point_intervals"][i]
        points.append({"steps": p["steps"], "strength": p["strength"], "fidelity": summary["points"][i][0],
                       "editability": summary["points"][i][1], "fidelity_ci": fidelity_ci,
                       "editability_ci": editability_ci, "on_frontier": i in summary["frontier"]})
    return {"points": points, "figures": summary["figures"], "intervals": summary["figure_intervals"],
            "runs": len(records)}


def paired_differences(scored: Sequence[str], by_cell: dict[str, list[dict]],
                       comparisons: Sequence[tuple[str, str]] = ()) -> dict[str, dict]:
    """``"<cell> - <the cell it is compared with>"``: the difference of their frontier figures with paired
    intervals, for each scored cell whose comparison cell ran too, then for each pair of ``comparisons``.
    Run i of every cell is the same subject and seed (:meth:`Runner.run_all`), so the runs pair up."""
    pairs = [(name, method(name).compared_with) for name in scored] + list(comparisons)
    result = {}
    for name, other in dict.fromkeys(pairs):
        if other in by_cell and by_cell[other]:
            result[f"{name} - {other}"] = {
                **paired_difference(run_points(by_cell[name]), run_points(by_cell[other]), FIDELITY_THRESHOLDS),
                "runs": len(by_cell[name])}
    return result


def mean_times(by_cell: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Mean seconds of each part of a run, per cell (the runs of this invocation and reused ones alike)."""
    result = {}
    for name, records in by_cell.items():
        keys = sorted({k for r in records for k in r["times"]})
        result[name] = {k: round(float(np.mean([r["times"][k] for r in records if k in r["times"]])), 1)
                        for k in keys}
    return result


def results_json(plan_: Plan, by_cell: dict[str, list[dict]], following: dict | None, seconds: float,
                 cpu_seconds: float) -> dict:
    """The issue-10 keys (``methods``, ``init_word``, ``full_description``, ``judge_accuracy``) plus ``frontiers``."""
    frontiers = {name: frontier(by_cell[name]) for name in [*REFERENCES, *plan_.scored]}
    return {
        "methods": {name: summarize(by_cell[name]) for name in plan_.scored},
        "init_word": summarize(by_cell["init_word"]),
        "full_description": summarize(by_cell["full_description"]),
        "frontiers": {name: frontiers[name]["points"] for name in plan_.scored},
        "frontier_figures": {name: {k: v for k, v in f.items() if k != "points"} for name, f in frontiers.items()},
        "paired_differences": paired_differences(plan_.scored, by_cell, plan_.comparisons),
        "prompt_following": following,
        "judge_accuracy": json.loads(TOY_ACCURACY.read_text()) if TOY_ACCURACY.is_file() else {},
        "cells": {m.name: {"flags": list(m.flags), "on": m.on, "prior": m.prior, "note": m.note} for m in plan_.cells},
        "protocol": {"steps": list(plan_.protocol.steps), "strengths": list(plan_.protocol.strengths),
                     "samples_per_prompt": plan_.protocol.samples, "subjects": plan_.subjects, "seeds": plan_.seeds,
                     "sampler": plan_.protocol.sampler, "base_model": plan_.protocol.base_model, "interval": f"95% percentile bootstrap over runs, {BOOTSTRAP_RESAMPLES} "
                                                     "resamples", "prompts": [p for p, _, _ in prompt_suite("{}")]},
        "runs": {name: [{"points": r["points"], "times": r["times"], "result": r["result"]} for r in records]
                 for name, records in by_cell.items()},
        "seconds_per_run": mean_times(by_cell),
        "minutes": round(seconds / 60, 1),
        "cpu_minutes": round(cpu_seconds / 60, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }


def interval(value: float | None, ci) -> str:
    """``0.42 [0.30, 0.51]``, ``-`` for a missing value; the interval is left out when there is none."""
    if value is None:
        return "-"
    return f"{value:.2f}" if ci is None else f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def signed(value: float | None, ci) -> str:
    """``+0.12 [+0.03, +0.20] *``: a difference with its interval, starred when the interval leaves out 0."""
    if value is None:
        return "-"
    if ci is None:
        return f"{value:+.2f}"
    apart = " *" if ci[0] > 0 or ci[1] < 0 else ""
    return f"{value:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]{apart}"


def markdown_tables(results: dict) -> str:
    """The frontier figures per cell, then the earlier protocol's table (the final point) per cell."""
    keys = [f"best_editability_at_{t:g}" for t in FIDELITY_THRESHOLDS] + ["area"]
    lines = ["| method | " + " | ".join(f"best editability at fidelity >= {t:g}" for t in FIDELITY_THRESHOLDS)
             + " | frontier area | runs |", "| --- " * (len(keys) + 2) + "|"]
    for name, f in results["frontier_figures"].items():
        cells = " | ".join(interval(f["figures"][k], f["intervals"][k]) for k in keys)
        lines.append(f"| {name} | {cells} | {f['runs']} |")
    if results.get("paired_differences"):
        lines += ["", "| paired difference (same subjects and seeds) | "
                  + " | ".join(f"at fidelity >= {t:g}" for t in FIDELITY_THRESHOLDS)
                  + " | frontier area | margin at every fidelity | runs |", "| --- " * (len(keys) + 3) + "|"]
        for name, d in results["paired_differences"].items():
            cells = " | ".join(signed(d["difference"][k], d["intervals"][k]) for k in [*keys, "margin"])
            lines.append(f"| {name} | {cells} | {d['runs']} |")
    lines += ["", "| method (last save, strength 1) | fidelity | editability | identity features | asked attribute "
                  "| runs |", "| --- | --- | --- | --- | --- | --- |"]
    rows = [("init word only (`toy`)", results["init_word"]),
            ("full description (no training)", results["full_description"]), *results["methods"].items()]
    for name, r in rows:
        cells = " | ".join(f"{r[k]:.2f} ± {r[k + '_std']:.2f}" for k in FIGURES)
        lines.append(f"| {name} | {cells} | {r['runs']} |")
    return "\n".join(lines) + "\n"


def write_plot(results: dict, path: Path) -> None:
    """Fidelity (x) vs editability (y): each cell's points, its frontier as a line with its points labelled
    ``steps/strength``, and the references as crosses."""
    from PIL import Image, ImageDraw

    width, height, margin = 1000, 720, 70
    frontiers = results["frontiers"]
    def axis_end(name: str) -> float:  # the largest value shown, rounded up to a tenth
        values = [p[name] for points in frontiers.values() for p in points] + [results[r][name] for r in REFERENCES]
        return float(np.ceil(max([0.1, *values]) * 10) / 10)

    right, top = axis_end("fidelity"), axis_end("editability")
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def xy(fidelity: float, editability: float) -> tuple[float, float]:
        return (margin + fidelity / right * (width - 2 * margin - 180),
                height - margin - editability / top * (height - 2 * margin))

    draw.rectangle([xy(0, top), xy(right, 0)], outline="black")
    for i in range(11):
        x, y = xy(i * right / 10, 0)
        draw.line([(x, y), (x, y + 5)], fill="black")
        draw.text((x - 8, y + 8), f"{i * right / 10:.2f}", fill="black")
    for i in range(11):
        x, y = xy(0, i * top / 10)
        draw.line([(x - 5, y), (x, y)], fill="black")
        draw.text((x - 40, y - 6), f"{i * top / 10:.2f}", fill="black")
    draw.text((xy(0.4 * right, 0)[0], height - 30), "fidelity (plain prompt shows the subject)", fill="black")
    draw.text((10, 10), "editability (edit shows the subject and the asked attribute); labels: steps/strength",
              fill="black")
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf", "#000080", "#808000", "#4b0082", "#a00060", "#ff4500", "#c08000"]
    for k, (name, points) in enumerate(frontiers.items()):
        colour = palette[k % len(palette)]
        for p in points:
            x, y = xy(p["fidelity"], p["editability"])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
        line = sorted((p for p in points if p["on_frontier"]), key=lambda p: p["fidelity"])
        draw.line([xy(p["fidelity"], p["editability"]) for p in line], fill=colour, width=2)
        for p in line:
            x, y = xy(p["fidelity"], p["editability"])
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            draw.text((x + 5, y - 12 + 11 * k), f"{p['steps']}/{p['strength']:g}", fill=colour)  # cells apart
        legend_x, legend_y = width - margin - 160, margin + 18 * k
        draw.rectangle([legend_x, legend_y + 3, legend_x + 10, legend_y + 13], fill=colour)
        draw.text((legend_x + 15, legend_y + 2), name, fill=colour)
    for k, name in enumerate(REFERENCES):
        x, y = xy(results[name]["fidelity"], results[name]["editability"])
        draw.line([(x - 5, y - 5), (x + 5, y + 5)], fill="black", width=2)
        draw.line([(x - 5, y + 5), (x + 5, y - 5)], fill="black", width=2)
        draw.text((x + 6, y + 2 + 12 * k), name.replace("_", " "), fill="black")
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def body(args: argparse.Namespace) -> int:
    checked = plan(args)  # every input error before any work
    require_toy_models()
    checked = replace(checked, protocol=replace(checked.protocol, base_model=model_hash(TOY_MODEL)))
    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    class_dir = class_images(args.workdir, args.threads, args.ddim_steps) if any(m.prior for m in checked.cells) else None
    runner = Runner(checked, args.workdir, load_judge(TOY_JUDGE), load_toy_model(), class_dir)
    by_cell = runner.run_all()
    following = None if args.quick else stored_probe(
        args.workdir, "prompt_following",
        {"base_model": checked.protocol.base_model, "judge": model_hash(TOY_JUDGE), "sampler": SAMPLER,
         "samples": checked.protocol.samples, "seed": 0},
        lambda: prompt_following(runner.base, runner.judge, samples_per_prompt=checked.protocol.samples))
    results = results_json(checked, by_cell, following, time.perf_counter() - start, time.process_time() - cpu_start)
    if args.figure:
        write_plot(results, args.figure)
    if args.json:
        text = json.dumps(results, indent=1) + "\n"
        atomic_write(args.json, lambda tmp: tmp.write_text(text))
    tables = markdown_tables(results)
    if args.markdown:
        atomic_write(args.markdown, lambda tmp: tmp.write_text(tables))
    logger.info("Results (%.1f min, %.1f CPU min; seconds per run by part: %s):\n%s", results["minutes"],
                results["cpu_minutes"], results["seconds_per_run"], tables)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), body, argv, logger=logger,
                      errors=(ValueError, OSError, RuntimeError, subprocess.CalledProcessError))


if __name__ == "__main__":
    sys.exit(main())
