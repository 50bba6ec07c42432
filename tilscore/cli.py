"""The ``tilscore`` command line.

Every subcommand calls the public API; none re-implements a stage. Bad input (a
:class:`~tilscore.errors.TilscoreError`) prints one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import TilscoreError
from .progress import run_to_end

EXIT_BAD_INPUT = 2


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a marker-rule field, e.g. --set threshold_od=0.3 (repeatable)",
    )


def _mpp(text: str) -> float:
    from .plausible import check_mpp

    value = _positive_float(text)
    try:
        return check_mpp(value)
    except TilscoreError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME|PATH",
        help="CNN model: a shipped name (default, synthetic) or a model folder (tilscore "
        "finetune); overrides [detect] model of the config",
    )


def _config_with_model(path, model):
    """The config file's settings with ``[detect] model`` replaced (checked before any work)."""
    from .config import Config, load_config
    from .detect.cnn import check_model

    config = load_config(path)
    if model is None:
        return config
    check_model(model)
    data = config.to_dict()
    data.setdefault("detect", {})["model"] = str(model)
    return Config.from_dict(data, source=config.source)


def _add_mpp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mpp",
        type=_mpp,
        default=None,
        metavar="UM_PER_PX",
        help="level-0 pixel size in µm/px; overrides the file's (needed when the file has none)",
    )


def _add_force_stain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force-stain",
        action="store_true",
        help="score an image that does not look like DAB IHC (H&E, fluorescence, greyscale) "
        "anyway, with a warning",
    )


def _with_force_stain(config, force: bool):
    """The config with ``[stain] check = "warn"`` when ``--force-stain`` was given."""
    from .config import Config, load_config

    config = load_config(config)
    if not force:
        return config
    data = config.to_dict()
    data["stain"] = {**data["stain"], "check": "warn"}
    return Config.from_dict(data, source=config.source)


def build_parser() -> argparse.ArgumentParser:
    from .failsafe import OneLineParser

    parser = OneLineParser(
        prog="tilscore",
        description="Score tumour-infiltrating immune cells in IHC whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"tilscore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="print a slide's levels, pixel size and metadata")
    p.add_argument("slide", type=Path, help="slide or image file")
    _add_mpp(p)
    p.add_argument("--thumbnail", type=Path, metavar="PNG", help="also write a thumbnail here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "stain-qc",
        help="tissue mask, background, estimated stain vectors and H / DAB channel images",
    )
    p.add_argument("slide", type=Path, help="slide or image file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output folder")
    _add_mpp(p)
    p.set_defaults(func=_cmd_stain_qc)

    p = sub.add_parser(
        "detect",
        help="find cells, measure them and call them positive for a marker",
        description="Detect every cell of an image or slide and call it positive or negative "
        "for the marker; writes one row per cell (.csv, .parquet or QuPath .geojson).",
    )
    p.add_argument("image", type=Path, help="slide or image file")
    _add_mpp(p)
    p.add_argument("--marker", default="CD8", help="marker preset (default CD8)")
    p.add_argument("--detector", default="cnn", choices=["cnn", "classical"])
    p.add_argument(
        "--region", default=None, metavar="X,Y,W,H", help="only this level-0 box of a slide"
    )
    _add_model(p)
    _add_set(p)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="TOML",
        help="configuration file ([markers.CD8] threshold_od = 0.3 ...; tilscore config --show)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="cells file: .csv, .parquet or .geojson",
    )
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser(
        "score",
        help="score a slide: cells per compartment, densities, %% positive, report",
        description="Score one slide end to end: tissue and stain QC, cell detection, regions "
        "(annotations, or automatic tumour/stroma segmentation), and per-compartment metrics. "
        "Writes summary.csv, cells.parquet, cells.geojson, regions.geojson, "
        "compartments.geojson (the compartments scored, for QuPath), overlay.png, heatmap.png, "
        "run.json and report.html into the output folder.",
    )
    p.add_argument("slide", type=Path, help="slide or image file")
    p.add_argument("--marker", default="CD8", help="marker preset (default CD8)")
    p.add_argument(
        "--regions",
        type=Path,
        default=None,
        metavar="FILE",
        help="QuPath GeoJSON annotations or a mask image (default: automatic compartments)",
    )
    p.add_argument("--config", type=Path, default=None, metavar="TOML", help="configuration file")
    _add_set(p)
    _add_mpp(p)
    _add_force_stain(p)
    _add_model(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "register",
        help="align a serial section to a reference slide and move its annotations",
        description="Find the rigid (or affine) transform between two serial sections from "
        "their tissue masks, write a QC overlay and the transform (JSON), and move "
        "annotations drawn on the reference onto the moving slide.",
    )
    p.add_argument("moving", type=Path, help="the slide to align (e.g. the CD68 section)")
    p.add_argument("--reference", type=Path, required=True, help="the annotated slide")
    p.add_argument(
        "--regions", type=Path, default=None, metavar="GEOJSON", help="annotations of the reference"
    )
    p.add_argument("--motion", choices=["rigid", "affine"], default="rigid")
    p.add_argument("--no-flip", action="store_true", help="do not try the mirror image")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="DIR",
        help="writes registration.json, registration_qc.png and regions.geojson",
    )
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser(
        "evaluate",
        help="compare detected cells with truth: precision, recall, F1, %% positive",
        description="Match predicted to true cells one-to-one within a radius (Hungarian) and "
        "report precision, recall and F1 for all cells and for positive cells, and the error of "
        "the percentage of positive cells.",
    )
    p.add_argument("--pred", type=Path, required=True, help="predicted cells (.csv or .parquet)")
    p.add_argument("--truth", type=Path, required=True, help="true cells (.csv or .parquet)")
    p.add_argument("--radius-um", type=_positive_float, default=4.0, help="match radius (µm)")
    _add_mpp(p)
    p.add_argument(
        "--positives-only",
        action="store_true",
        help="the truth lists positive cells only (no all-cell metrics)",
    )
    p.add_argument("-o", "--output", type=Path, default=None, metavar="JSON", help="metrics file")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "demo", help="score the bundled example slides and compare each compartment with truth"
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("tilscore-demo"),
        metavar="DIR",
        help="output folder (default: ./tilscore-demo)",
    )
    p.add_argument(
        "--slides",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of example slides (default: the repository's example_slides/)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "batch",
        help="score many slides (folders, files, manifest CSVs) on Dask; resumable",
        description="Score every slide of folders (searched recursively), slide files and "
        "manifest CSVs (columns path, marker, regions, patient, timepoint, mpp, ...) on a Dask "
        "cluster. Results go to OUT/<slide_id>/, OUT/summary.csv, OUT/cells/ and OUT/errors.csv; "
        "a re-run skips the slides done with the same input and config. Exit status 0 when "
        "every slide was scored, 1 when any failed.",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="folder, slide or CSV")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output folder")
    p.add_argument("--config", type=Path, default=None, metavar="TOML", help="configuration file")
    p.add_argument(
        "--marker", default=None, help="marker of slides whose manifest and file name name none"
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="existing Dask scheduler: tcp://host:port or a scheduler file",
    )
    p.add_argument("--workers", type=_positive_int, default=None, help="local worker processes")
    p.add_argument(
        "--threads-per-worker", type=_positive_int, default=None, help="slides at once per worker"
    )
    p.add_argument("--force", action="store_true", help="score every slide again")
    p.add_argument(
        "--mpp",
        type=_mpp,
        default=None,
        metavar="UM_PER_PX",
        help="level-0 µm/px of files that record none (PNG/JPEG fields, a TIFF without "
        "resolution; a folder search then takes .png/.jpg too); a file's own is kept",
    )
    _add_force_stain(p)
    _add_model(p)
    p.set_defaults(func=_cmd_batch)

    from .detect.finetune_cli import add_finetune_parser

    add_finetune_parser(sub)

    p = sub.add_parser("config", help="print the configuration (TOML) with every default")
    p.add_argument("--show", action="store_true", help="print the effective configuration")
    p.add_argument(
        "--config", type=Path, default=None, metavar="TOML", help="show this file over the defaults"
    )
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "cohort",
        help="paired pre/post change and association with pCR of a batch summary",
        description="Per marker x compartment x metric: pre- vs post-treatment change per "
        "patient (medians, IQR, Wilcoxon signed-rank p) and the odds ratio of pCR per 10 "
        "percentage points (per 100 cells/mm² for densities) from a logistic regression. Writes "
        "DIR/paired.csv, DIR/association.csv, plots and a self-contained DIR/report.html.",
    )
    p.add_argument("summary", type=Path, metavar="SUMMARY", help="OUT/summary.csv of a batch")
    p.add_argument(
        "--manifest",
        type=Path,
        default=None,
        metavar="CSV",
        help="slide_id (or path), patient, timepoint, pcr per slide, if the summary lacks them",
    )
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        default=None,
        metavar="COLUMN",
        help="metric column (repeatable; default pct_positive, density_per_mm2, area_fraction_pct)",
    )
    p.add_argument("--pre", default="pre", help="timepoint value of the pre-treatment biopsy")
    p.add_argument("--post", default="post", help="timepoint value of the post-treatment biopsy")
    p.set_defaults(func=_cmd_cohort)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _cmd_info(args: argparse.Namespace) -> int:
    from .qc import slide_info, write_thumbnail
    from .slide import open_slide

    with open_slide(args.slide, mpp=args.mpp) as slide:
        info = slide_info(slide)
        if args.thumbnail is not None:
            write_thumbnail(slide, args.thumbnail)
            info["thumbnail"] = str(args.thumbnail)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _print_info(info: dict) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{info['path']}[/bold]")
    pairs = [
        ("vendor", info["vendor"]),
        ("size (level 0)", f"{info['width_px']} x {info['height_px']} px"),
        ("pixel size", f"{info['mpp']:.4f} µm/px (from {info['mpp_source']})"),
        ("physical size", f"{info['width_mm']:.2f} x {info['height_mm']:.2f} mm"),
        ("objective", f"{info['objective_power']:g}x" if info["objective_power"] else "unknown"),
        ("associated images", ", ".join(info["associated_images"]) or "none"),
    ]
    for key, value in pairs:
        console.print(f"  {key:<18} {value}")
    table = Table(title="levels", title_justify="left")
    for col in ("level", "width px", "height px", "downsample", "µm/px"):
        table.add_column(col, justify="right")
    for lv in info["levels"]:
        table.add_row(
            str(lv["level"]),
            str(lv["width_px"]),
            str(lv["height_px"]),
            f"{lv['downsample']:.3f}",
            f"{lv['mpp']:.4f}",
        )
    console.print(table)
    if "thumbnail" in info:
        console.print(f"  thumbnail written to {info['thumbnail']}")


def _cmd_stain_qc(args: argparse.Namespace) -> int:
    from .outdir import check_output_dir
    from .qc import slide_stain_qc, write_stain_qc
    from .slide import open_slide

    check_output_dir(args.output)  # before the work
    with open_slide(args.slide, mpp=args.mpp) as slide:
        qc = slide_stain_qc(slide)
        files = write_stain_qc(qc, slide, args.output)
    _print_stain_qc(qc, files)
    return 0


def _print_stain_qc(qc, files: dict[str, Path]) -> None:
    console = _console()
    d = qc.to_dict()
    console.print(f"[bold]{d['slide']}[/bold]")
    console.print(
        f"  tissue            {d['tissue_area_mm2']:.2f} mm² "
        f"({100 * d['tissue_fraction']:.1f}% of the slide)"
    )
    bg = ", ".join(f"{v:.1f}" for v in d["background"])
    console.print(f"  background I0     R, G, B = {bg}")
    for name, vec in zip(d["stains"]["names"], d["stains"]["vectors"]):
        console.print(f"  {name:<17} OD vector {', '.join(f'{v:.3f}' for v in vec)}")
    console.print(f"  stain source      {d['stains']['source']}")
    for w in d["warnings"]:
        console.print(f"  [yellow]warning[/yellow]: {w}")
    console.print(f"  wrote {', '.join(str(p) for p in files.values())}")


def _parse_overrides(items: list[str]) -> dict[str, object]:
    from .errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _parse_box(text: str | None) -> tuple[float, ...] | None:
    from .errors import ConfigError

    if text is None:
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ConfigError(f"--region expects X,Y,W,H in level-0 px (finite numbers), got {text!r}")
    return box


def _cmd_detect(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .detect import iter_detect_cells
    from .errors import ConfigError
    from .export import CELL_FORMATS, write_cells

    if args.output.suffix.lower() not in CELL_FORMATS:
        raise ConfigError(
            f"cannot tell the output format from {args.output.name!r}",
            hint=f"Use one of the suffixes {', '.join(CELL_FORMATS)}",
        )
    from .outdir import check_output_file

    check_output_file(args.output, "cells file")  # before the work

    config = _config_with_model(args.config, args.model)
    rule = config.marker_rule(args.marker, **_parse_overrides(args.overrides))
    gen = iter_detect_cells(
        args.image,
        args.mpp,
        rule,
        args.detector,
        region=_parse_box(args.region),
        model=config["detect"]["model"],
    )
    console = _console()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("detecting", total=None)
        cells, settings = run_to_end(
            gen, lambda step: bar.update(task, completed=step[0], total=step[1])
        )
    write_cells(cells, args.output)
    n_pos = int(cells["positive"].sum())
    pct = 100.0 * n_pos / len(cells) if len(cells) else 0.0
    console.print(
        f"{args.image.name}: {len(cells)} cells, {n_pos} {rule.name}-positive ({pct:.1f}%), "
        f"detector {settings.detector}; wrote {args.output}"
    )
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .outdir import score_output, staged_save
    from .score import iter_score_slide

    config = _with_force_stain(_config_with_model(args.config, args.model), args.force_stain)
    console = _console()
    # the output is checked and locked before the work; the old files stay until all new ones
    # are written
    with score_output(args.output) as out:
        gen = iter_score_slide(
            args.slide,
            args.marker,
            args.regions,
            config,
            mpp=args.mpp,
            **_parse_overrides(args.overrides),
        )
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("scoring", total=None)
            result = run_to_end(
                gen,
                lambda step: bar.update(
                    task, description=step[0], completed=step[1], total=step[2]
                ),
            )
        files = staged_save(out, lambda stage: result.save(stage, config))
    print_summary(result, console)
    console.print(f"wrote {len(files)} files to {args.output}; open {files.get('report', '')}")
    return 0


def print_summary(result, console) -> None:
    """The per-compartment table of a SlideResult on the console."""
    from rich.table import Table

    table = Table(title=f"{result.slide_id} — {result.marker}", title_justify="left")
    cols = [
        ("compartment", "compartment", ""),
        ("area_mm2", "mm²", ".3f"),
        ("n_cells", "cells", "d"),
        ("n_positive", "positive", "d"),
        ("density_per_mm2", "pos/mm²", ".1f"),
        ("pct_positive", "% pos", ".1f"),
        ("area_fraction_pct", "area %", ".2f"),
        ("h_score", "H", ".1f"),
    ]
    for _, title, fmt in cols:
        table.add_column(title, justify="right" if fmt else "left", no_wrap=True)
    for row in result.summary.to_dict("records"):
        cells = []
        for key, _, fmt in cols:
            v = row[key]
            if fmt and isinstance(v, float) and v != v:
                cells.append("–")
            else:
                cells.append(format(v, fmt) if fmt else str(v))
        table.add_row(*cells)
    console.print(table)
    sources = dict(zip(result.summary["compartment"], result.summary["source"]))
    console.print("regions: " + ", ".join(f"{k} {v}" for k, v in sources.items()))
    from .failsafe import shown_warnings

    for w in result.provenance.get("warnings", []):
        if " ".join(str(w).split()) not in shown_warnings:  # not printed on stderr already
            console.print(f"[yellow]warning[/yellow]: {w}")


def _cmd_register(args: argparse.Namespace) -> int:
    from .export import atomic_write
    from .outdir import check_output_dir
    from .register import register_slides

    out = check_output_dir(args.output)  # before the work
    reg = register_slides(
        args.moving, args.reference, motion=args.motion, allow_flip=not args.no_flip
    )
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(reg.to_dict(), indent=1)
    atomic_write(out / "registration.json", lambda p: p.write_text(text))
    reg.save_qc(out / "registration_qc.png")
    console = _console()
    console.print(
        f"{args.moving.name} -> {args.reference.name}: rotation {reg.rotation_deg:.1f}°, "
        f"{'mirrored, ' if reg.flipped else ''}tissue IoU {reg.iou_before:.2f} -> {reg.iou:.2f}"
    )
    if args.regions is not None:
        moved = reg.transform_regions(args.regions)
        moved.save(out / "regions.geojson")
        console.print(f"moved {len(moved)} regions to {out / 'regions.geojson'}")
    console.print(f"wrote {out}")
    return 0


def _read_table(path: Path):
    import pandas as pd

    from .errors import SlideReadError

    if not path.is_file():
        raise SlideReadError("no such file", path=path, hint="Check the path and spelling")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise SlideReadError(f"cannot read the table: {e}", path=path) from e


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_tables, format_table

    if args.output is not None:
        from .outdir import check_output_file

        check_output_file(args.output, "metrics file")
    pred, truth = _read_table(args.pred), _read_table(args.truth)
    metrics = evaluate_tables(
        pred,
        truth,
        radius_um=args.radius_um,
        mpp=args.mpp,
        truth_positive_only=args.positives_only,
        names=(str(args.pred), str(args.truth)),
    )
    _console().print(format_table(metrics))
    if args.output is not None:
        from .export import atomic_write

        text = json.dumps(metrics, indent=2)
        atomic_write(args.output, lambda p: p.write_text(text))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .outdir import check_output_dir

    check_output_dir(args.output)  # before the work
    run_demo(args.output, slides_dir=args.slides, console=_console())
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    console = _console()
    report = _BatchProgress(console)
    try:
        result = run_batch(
            args.inputs,
            args.output,
            config=_with_force_stain(_config_with_model(args.config, args.model), args.force_stain),
            marker=args.marker,
            scheduler=args.scheduler,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            force=args.force,
            mpp=args.mpp,
            on_event=report,
        )
    except KeyboardInterrupt:
        report.close()
        print(
            f"tilscore batch: interrupted; the finished slides are kept in {args.output}; "
            "run the same command again to score the rest",
            file=sys.stderr,
        )
        return 130
    report.close()
    console.print(
        f"{result.n_done} scored, {result.n_skipped} already done, {result.n_failed} failed "
        f"in {result.seconds:.0f} s"
        + (f", {len(result.kept)} from earlier runs kept" if result.kept else "")
        + f"; wrote {result.summary_path}"
        + (f" and {result.errors_path}" if result.failed else ""),
        soft_wrap=True,
    )
    return 0 if result.ok else 1


class _BatchProgress:
    """A rich progress bar (done, failed, ETA) on a terminal, one plain line per slide else."""

    def __init__(self, console) -> None:
        self.console = console
        self.bar = None
        self.task = None

    def __call__(self, ev) -> None:
        if ev.kind == "start":
            self.console.print(ev.message)
            if ev.dashboard:
                self.console.print(f"dashboard: {ev.dashboard}")
            if self.console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(
                    TextColumn("scoring"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[failed]} failed"),
                    TimeRemainingColumn(),
                    console=self.console,
                )
                self.bar.start()
                self.task = self.bar.add_task("scoring", total=ev.total, failed=0)
            return
        n = ev.done + ev.failed + ev.skipped
        if ev.kind == "failed":
            rec = ev.record
            line = f"[{n}/{ev.total}] {ev.slide_id}: failed: {rec.get('error_type')}: "
            line += str(rec.get("message", "")).splitlines()[0] if rec.get("message") else ""
        elif ev.kind == "done":
            line = f"[{n}/{ev.total}] {ev.slide_id}: done in {ev.record.get('seconds', 0):.1f} s"
        else:
            line = f"[{n}/{ev.total}] {ev.slide_id}: already done"
        if self.bar is not None:
            if ev.kind != "skipped":
                self.bar.console.print(line, markup=False)
            self.bar.update(self.task, completed=n, failed=ev.failed)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _cmd_config(args: argparse.Namespace) -> int:
    from .config import default_config_toml, load_config

    if not args.show:
        print("tilscore config: nothing to do; use --show", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.config is None:
        print(default_config_toml(), end="")
    else:
        print(load_config(args.config).to_toml(), end="")
    return 0


def _cmd_cohort(args: argparse.Namespace) -> int:
    import warnings

    import pandas as pd
    from rich.markup import escape

    from .cohort import run_cohort, summary_lines
    from .errors import TilscoreWarning
    from .outdir import check_output_dir

    check_output_dir(args.output)  # before the work
    console = _console()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TilscoreWarning)
        files = run_cohort(
            args.summary,
            args.manifest,
            out_dir=args.output,
            metrics=args.metrics,
            pre=args.pre,
            post=args.post,
        )
    for w in caught:
        if issubclass(w.category, TilscoreWarning):
            console.print(f"[yellow]warning[/yellow]: {escape(str(w.message))}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    paired, assoc = (
        pd.read_csv(files[k], converters={"note": str}) for k in ("paired", "association")
    )
    for line in summary_lines(paired, assoc):
        console.print(escape(line), soft_wrap=True)
    console.print(f"wrote {len(files)} files to {args.output}; open {files['report']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tilscore`` console script; returns the exit status."""
    from .failsafe import run_command

    parser = build_parser()
    args = parser.parse_args(argv)
    # expected failures: one line, exit 2; a bug: one line and a saved traceback (exit 3)
    return run_command(args.command, lambda: args.func(args), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
