"""Judge generated images: face detection rate, identity distance to reference photos, CLIP similarities.

    python scripts/evaluate_identity.py --reference data/alice --generated out/gamma1/samples \\
        out/gamma0.1/samples --prompt "photo of a * woman" --class_word woman \\
        --out results.json --markdown results.md --plot results.png

Per generated folder: the fraction of images with a detected face; for those faces, the mean and
median distance of dlib's 128-d descriptor to the reference set (mean over the reference faces) and
the fraction under 0.6 (same person); CLIP image-image similarity to the references and text-image
similarity to the prompt with the placeholder replaced by --class_word. CLIP weights are read from
--clip_model (a .pt file) or the clip package's cache (~/.cache/clip); nothing is downloaded, and
without them the CLIP metrics are null.
"""
import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ldm import evaluation
from ldm.cli import run_script
from ldm.inference import resolve_device
from ldm.data.face import FaceEncoder
from ldm.util import atomic_write

logger = logging.getLogger("evaluate_identity")


def embed_folder(paths, encoder: FaceEncoder, scorer: "evaluation.ClipScorer | None"):
    """Face descriptors (None where no face) and CLIP image embeddings of the images at ``paths``."""
    descriptors, clip_embeddings = [], []
    for path, image in evaluation.iter_images(paths):
        descriptors.append(encoder.descriptor(image))
        if descriptors[-1] is None:
            logger.info("%s: no face detected", path)
        if scorer is not None:
            clip_embeddings.append(scorer.image_embedding(image))
    return descriptors, clip_embeddings


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The results: reference summary, settings and one row per generated folder."""
    reference_paths = evaluation.folder_images(args.reference, "reference")
    generated = {folder: evaluation.folder_images(folder, "generated") for folder in args.generated}
    device = resolve_device(args.device)
    encoder = FaceEncoder(detector=args.detector)
    scorer = evaluation.ClipScorer.load(args.clip_model, device)
    ref_descriptors, ref_clip = embed_folder(reference_paths, encoder, scorer)
    identity = evaluation.IdentityScorer(encoder, ref_descriptors, source=args.reference, threshold=args.threshold)
    text = evaluation.text_for_clip(args.prompt, args.placeholder, args.class_word) if args.prompt else None
    text_embedding = scorer.text_embedding(text) if scorer is not None and text else None
    rows = []
    for folder, paths in generated.items():
        descriptors, clip_embeddings = embed_folder(paths, encoder, scorer)
        row = {"folder": folder, **identity.metrics(descriptors),
               "clip_image_image": None, "clip_text_image": None}
        if scorer is not None:
            row.update(evaluation.clip_metrics(clip_embeddings, ref_clip, text_embedding))
        rows.append(row)
    reference = {"folder": args.reference, "images": len(reference_paths), "faces": len(identity.references)}
    return {"reference": reference,
            "detector": args.detector, "threshold": args.threshold, "prompt": args.prompt, "clip_text": text,
            "clip_weights": None if scorer is None else str(scorer.path),
            "folders": rows}


def write_outputs(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """JSON, markdown and chart, each written atomically; all are rendered before anything is written."""
    table = evaluation.markdown_table(results["folders"], args.threshold)
    chart = evaluation.bar_chart(results["folders"], f"identity evaluation against {args.reference}") \
        if args.plot else None
    if args.out:
        text = json.dumps(results, indent=2)
        atomic_write(args.out, lambda tmp: tmp.write_text(text))
    if args.markdown:
        atomic_write(args.markdown, lambda tmp: tmp.write_text(table))
    if chart is not None:
        atomic_write(args.plot, lambda tmp: chart.save(tmp, format="PNG"))
    logger.info("\n%s", table)


def validate(args: argparse.Namespace) -> None:
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: the chart is a PNG; give a file name ending in .png")
    if args.prompt is not None and args.placeholder not in args.prompt:
        logger.warning("--prompt %r has no placeholder %r; it is used as written", args.prompt, args.placeholder)
    if not 0.0 < args.threshold:
        raise ValueError(f"--threshold must be positive, got {args.threshold}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="folder of reference photos of the person")
    p.add_argument("--generated", required=True, nargs="+", help="one or more folders of generated images")
    p.add_argument("--prompt", default=None, help="the sampling prompt, for CLIP text-image similarity")
    p.add_argument("--placeholder", default="*", help="placeholder in --prompt to replace by --class_word")
    p.add_argument("--class_word", default="person", help="class word for the placeholder (e.g. woman)")
    p.add_argument("--clip_model", default=None,
                   help=f"CLIP weights: a .pt file or a clip model name found in ~/.cache/clip "
                        f"(default {evaluation.DEFAULT_CLIP_MODEL})")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", default=None, help="write a markdown table (one row per folder) here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here")
    p.add_argument("--detector", default="hog", choices=["hog", "cnn"], help="dlib face detector")
    p.add_argument("--threshold", type=float, default=evaluation.SAME_PERSON_THRESHOLD,
                   help="descriptor distance under which a face counts as the same person")
    p.add_argument("--device", default="auto", help="device for CLIP: auto, cpu, cuda, cuda:1, ...")
    return p


def run(args: argparse.Namespace) -> None:
    validate(args)
    with torch.inference_mode():
        results = evaluate(args)
    write_outputs(args, results)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the exit code (0 ok, 2 bad flags or inputs)."""
    # ImportError: dlib or CLIP missing; ValueError/OSError: missing folders, no faces, bad files
    return run_script(build_parser(), run, argv, logger=logger, errors=(ValueError, OSError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
