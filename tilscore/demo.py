"""``tilscore demo``: run the pipeline (as far as it exists) on the bundled example slides.

For now: slide info, a thumbnail, the tissue mask and stain QC, then cell detection with the
slide's marker (CNN), compared with the slide's truth file, written to one folder per slide, with
a summary on screen. Later stages (regions, per-compartment scoring) extend this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import SlideReadError

#: The repository's example slides (present in a clone / editable install).
REPO_EXAMPLES = Path(__file__).resolve().parents[1] / "example_slides"
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi")


def find_example_slides(slides_dir: Path | None = None) -> list[Path]:
    """Return the example slide files in ``slides_dir`` (default: the repository's example_slides).

    Raises
    ------
    SlideReadError
        If the folder holds no slide.
    """
    folder = Path(slides_dir) if slides_dir is not None else REPO_EXAMPLES
    slides = (
        sorted(p for p in folder.glob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
        if folder.is_dir()
        else []
    )
    if not slides:
        raise SlideReadError(
            "no example slides found",
            path=folder,
            hint="Pass --slides DIR, or regenerate them with "
            "`python -m tilscore.synthetic examples example_slides`",
        )
    return slides


def _marker_of(path: Path) -> str | None:
    """The marker named in an example slide's file name (synthetic_cd8.tif -> "CD8")."""
    from .markers import MARKERS

    words = path.name.split(".")[0].upper().replace("-", "_").split("_")
    return next((MARKERS[w].name for w in words if w in MARKERS), None)


def run_demo(output: Path, slides_dir: Path | None = None, console: Any = None) -> list[dict]:
    """Run info, tissue mask and stain QC on each example slide; return one summary per slide.

    Parameters
    ----------
    output
        Folder for the results; one sub-folder per slide.
    slides_dir
        Folder of slides (default: the repository's ``example_slides/``).
    console
        A ``rich`` console for progress lines (optional).
    """
    import pandas as pd

    from .detect import detect_cells
    from .evaluate import evaluate_cells
    from .export import write_cells
    from .qc import slide_info, slide_stain_qc, write_stain_qc, write_thumbnail
    from .slide import open_slide

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summaries = []
    for path in find_example_slides(slides_dir):
        name = path.name.split(".")[0]
        outdir = output / name
        if console is not None:
            console.print(f"[bold]{path.name}[/bold]")
        with open_slide(path) as slide:
            info = slide_info(slide)
            outdir.mkdir(parents=True, exist_ok=True)
            write_thumbnail(slide, outdir / "thumbnail.png")
            (outdir / "info.json").write_text(json.dumps(info, indent=2))
            qc = slide_stain_qc(slide)
            files = write_stain_qc(qc, slide, outdir)
            marker = _marker_of(path)
            cells = detect_cells(slide, marker=marker, qc=qc) if marker else None
        d = qc.to_dict()
        summary = {
            "slide": path.name,
            "width_px": info["width_px"],
            "height_px": info["height_px"],
            "mpp": info["mpp"],
            "tissue_area_mm2": round(d["tissue_area_mm2"], 3),
            "stain_source": d["stains"]["source"],
            "background": [round(v, 1) for v in d["background"]],
            "outputs": sorted(str(p.relative_to(output)) for p in files.values()),
        }
        if cells is not None:
            files["cells"] = write_cells(cells, outdir / "cells.csv")
            summary["outputs"] = sorted(str(p.relative_to(output)) for p in files.values())
            summary.update(marker=marker, n_cells=len(cells), n_positive=int(cells.positive.sum()))
            summary["pct_positive"] = round(100.0 * summary["n_positive"] / max(len(cells), 1), 2)
            truth_csv = path.with_name(f"{name}.cells.csv")
            if truth_csv.is_file():
                m = evaluate_cells(cells, pd.read_csv(truth_csv), 4.0 / info["mpp"])
                summary["truth"] = {
                    "n_cells": m["n_truth"],
                    "n_positive": m["pos_n_truth"],
                    "pct_positive": round(m["pct_positive_truth"], 2),
                    "f1_cells": round(m["f1"], 3),
                    "f1_positive": round(m["pos_f1"], 3),
                }
        summaries.append(summary)
        if console is not None:
            console.print(
                f"  {info['width_px']} x {info['height_px']} px at {info['mpp']:.3f} µm/px, "
                f"tissue {summary['tissue_area_mm2']:.2f} mm², stains {summary['stain_source']}"
            )
            if cells is not None:
                line = (
                    f"  {summary['n_cells']} cells, {summary['n_positive']} {marker}-positive "
                    f"({summary['pct_positive']:.1f}%)"
                )
                if "truth" in summary:
                    t = summary["truth"]
                    line += (
                        f"; truth {t['n_cells']} cells, {t['n_positive']} positive "
                        f"({t['pct_positive']:.1f}%); F1 cells {t['f1_cells']:.3f}, "
                        f"positive {t['f1_positive']:.3f}"
                    )
                console.print(line)
    (output / "demo_summary.json").write_text(json.dumps(summaries, indent=2))
    if console is not None:
        console.print(f"results in {output}/ (demo_summary.json, one folder per slide)")
    return summaries
