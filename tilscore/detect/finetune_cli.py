"""``tilscore finetune``: the command line of :func:`tilscore.detect.finetune`."""

from __future__ import annotations

import argparse
import csv
import signal
import sys
from pathlib import Path

from ..errors import ConfigError


def add_finetune_parser(sub) -> None:
    """Add the ``finetune`` and ``export-labels`` subcommands to the CLI's subparsers."""
    e = sub.add_parser(
        "export-labels",
        help="write the corrected cells of reviewed result folders as fine-tuning labels",
        description="Write the cells of reviewed result folders (review.jsonl beside the "
        "results) as fine-tuning labels: one CSV x,y,positive,cell_class per slide (level-0 px) "
        "and labels.json, for tilscore finetune --reviewed DIR.",
    )
    e.add_argument("results", nargs="+", type=Path, metavar="RESULT_DIR", help="result folders")
    e.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="labels folder")
    e.add_argument(
        "--all", action="store_true", help="also results without review edits (detector's cells)"
    )
    e.set_defaults(func=cmd_export_labels)

    p = sub.add_parser(
        "finetune",
        help="fine-tune the cell detector on your own labelled fields; writes a model folder",
        description="Fine-tune the CNN detector on images whose every cell is labelled (CSV "
        "x,y[,positive][,cell_class]; QuPath GeoJSON points, detections or cells; label masks). "
        "Give images and labels in the same order, or --pairs CSV with columns image, labels "
        "[, mpp]. Writes a model folder (weights, config, metrics, model card) for "
        "--model in detect, score and batch. Ctrl-C leaves no model folder.",
    )
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files")
    p.add_argument(
        "--labels", nargs="+", type=Path, default=[], metavar="FILE", help="one per image"
    )
    p.add_argument(
        "--pairs", type=Path, default=None, metavar="CSV", help="columns image, labels [, mpp]"
    )
    p.add_argument(
        "--reviewed",
        type=Path,
        default=None,
        metavar="LABELS_DIR",
        help="reviewed corrections exported from napari (Export labels…): fields around the edits",
    )
    p.add_argument("--mpp", type=float, default=None, help="µm/px of the images (all)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="model folder")
    p.add_argument("--base-model", default="default", metavar="NAME|PATH")
    p.add_argument("--marker", default=None, help="report positive-cell F1 with this preset")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600, help="most training steps")
    p.add_argument("--max-minutes", type=float, default=15.0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.set_defaults(func=cmd_finetune)


def _pairs(path: Path) -> tuple[list[Path], list[Path], list[float | None]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConfigError(f"cannot read the pairs file: {exc}", path=path) from None
    if not rows or not {"image", "labels"} <= set(rows[0]):
        raise ConfigError("the pairs file needs columns image, labels [, mpp]", path=path)
    base = path.parent
    images = [base / r["image"] for r in rows]
    labels = [base / r["labels"] for r in rows]
    mpps = [float(r["mpp"]) if r.get("mpp") else None for r in rows]
    return images, labels, mpps


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run ``tilscore finetune``."""
    from rich.progress import Progress

    from . import finetune

    images, labels = list(args.images), list(args.labels)
    mpps: list[float | None] = [args.mpp] * len(images)
    if args.pairs is not None:
        im, lab, mp = _pairs(args.pairs)
        images += im
        labels += lab
        mpps += [m if m is not None else args.mpp for m in mp]
    if args.reviewed is not None:
        from .labels import read_label_export

        im, lab, mp = read_label_export(args.reviewed)
        images += im
        labels += lab
        mpps += mp
    if not images:
        raise ConfigError(
            "no images given",
            hint="tilscore finetune IMG... --labels FILE..., or --reviewed LABELS_DIR",
        )
    if len(labels) != len(images):
        raise ConfigError(
            f"{len(images)} images but {len(labels)} label files",
            hint="give one --labels file per image, in the same order",
        )
    if any(m is None for m in mpps):
        raise ConfigError("the µm/px of the images is needed", hint="pass --mpp (or an mpp column)")
    # Ctrl-C: finetune removes its partial folder and re-raises; main() prints "interrupted"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("fine-tuning", total=args.steps)
        result = finetune(
            images,
            labels,
            out=args.output,
            base_model=args.base_model,
            mpp=mpps,
            val_fraction=args.val_fraction,
            seed=args.seed,
            steps=args.steps,
            max_minutes=args.max_minutes,
            marker=args.marker,
            device=args.device,
            overwrite=args.overwrite,
            progress=lambda step, total, info: bar.update(task, completed=step, total=total),
        )
    a = result.metrics["validation_all_cells"]
    print(
        f"validation F1 {a['before']['f1']:.3f} -> {a['after']['f1']:.3f}; wrote {result.folder} "
        f"(use --model {result.folder})"
    )
    return 0


def cmd_export_labels(args: argparse.Namespace) -> int:
    """Run ``tilscore export-labels``."""
    from ..outdir import check_output_dir
    from ..results import export_labels

    check_output_dir(args.output, "labels folder")
    manifest = export_labels(list(args.results), args.output, reviewed_only=not args.all)
    n = sum(e["n_cells"] for e in manifest["slides"])
    print(
        f"wrote the labels of {len(manifest['slides'])} slide(s), {n} cells, to {args.output} "
        f"(tilscore finetune --reviewed {args.output} -o MODEL_DIR)"
    )
    return 0
