"""The ``tilscore`` command line.

Every subcommand calls the public API; none re-implements a stage. Bad input (a
:class:`~tilscore.errors.TilscoreError`) prints one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import TilscoreError

EXIT_BAD_INPUT = 2


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_mpp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        metavar="UM_PER_PX",
        help="level-0 pixel size in µm/px; overrides the file's (needed when the file has none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        "demo", help="run on the bundled example slides (info, tissue and stain QC for now)"
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
    return parser


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
    from .qc import slide_stain_qc, write_stain_qc
    from .slide import open_slide

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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, slides_dir=args.slides, console=_console())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tilscore`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TilscoreError as exc:
        print(f"tilscore {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"tilscore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
