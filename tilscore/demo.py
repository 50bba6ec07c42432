"""``tilscore demo``: score the bundled example slides end to end and compare with their truth.

Per slide: info, thumbnail, tissue mask and stain QC, then :func:`tilscore.score_slide` with the
slide's marker and annotations (all outputs, report.html included), and the detection and
per-compartment figures beside the slide's known truth, on screen and in demo_summary.json.
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


def _truth_by_compartment(truth, result) -> dict[str, dict[str, float]]:
    """True counts, % positive and density per compartment of a synthetic slide's truth cells.

    The synthetic truth labels cells "tumour" (nests) and "stroma" (bed minus nests); densities
    use the scored compartment's area (the same annotated polygons).
    """
    out = {}
    for tname, comp in (("tumour", "intratumoral"), ("stroma", "stromal")):
        sel = truth["compartment"] == tname
        n, k = int(sel.sum()), int((sel & truth["positive"]).sum())
        area = float(result.row(comp)["area_mm2"])
        out[comp] = {
            "n_cells": n,
            "n_positive": k,
            "pct_positive": round(100.0 * k / n, 2) if n else float("nan"),
            "density_per_mm2": round(k / area, 1) if area > 0 else float("nan"),
        }
    return out


def run_demo(output: Path, slides_dir: Path | None = None, console: Any = None) -> list[dict]:
    """Score each example slide end to end and compare with its truth; one summary per slide.

    For each slide: info, thumbnail, tissue mask and stain QC; then :func:`tilscore.score_slide`
    with the slide's marker and its annotations (``<name>.regions.geojson`` beside it, else
    automatic compartments), whose outputs (summary.csv, cells, GeoJSON, overlay, heatmap,
    run.json, report.html) go to one folder per slide; where a truth file
    (``<name>.cells.csv``) exists, detection F1 and per-compartment % positive and density are
    compared with it. ``demo_summary.json`` and ``summary.csv`` (all slides) sum up.

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

    from .evaluate import evaluate_cells
    from .export import atomic_write
    from .qc import slide_info, slide_stain_qc, write_stain_qc, write_thumbnail
    from .score import score_slide
    from .slide import open_slide

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summaries, tables = [], []
    for path in find_example_slides(slides_dir):
        name = path.name.split(".")[0]
        outdir = output / name
        if console is not None:
            console.print(f"[bold]{path.name}[/bold]")
        marker = _marker_of(path)
        regions = path.with_name(f"{name}.regions.geojson")
        with open_slide(path) as slide:
            info = slide_info(slide)
            outdir.mkdir(parents=True, exist_ok=True)
            write_thumbnail(slide, outdir / "thumbnail.png")
            text = json.dumps(info, indent=2)
            atomic_write(outdir / "info.json", lambda p, t=text: p.write_text(t))
            qc = slide_stain_qc(slide)
            files = write_stain_qc(qc, slide, outdir)
            result = None
            if marker:
                result = score_slide(
                    slide, marker, regions if regions.is_file() else None, qc=qc, slide_id=name
                )
                files.update(result.save(outdir))
        d = qc.to_dict()
        summary: dict[str, Any] = {
            "slide": path.name,
            "width_px": info["width_px"],
            "height_px": info["height_px"],
            "mpp": info["mpp"],
            "tissue_area_mm2": round(d["tissue_area_mm2"], 3),
            "stain_source": d["stains"]["source"],
            "background": [round(v, 1) for v in d["background"]],
            "outputs": sorted(str(p.relative_to(output)) for p in files.values()),
        }
        if result is not None:
            cells = result.cells
            tables.append(result.summary)
            summary.update(
                marker=marker,
                n_cells=len(cells),
                n_positive=int(cells["positive"].sum()),
                regions=result.provenance["regions"]["source"],
                compartments={
                    r["compartment"]: {
                        k: (round(float(r[k]), 3) if isinstance(r[k], float) else r[k])
                        for k in (
                            "area_mm2",
                            "n_cells",
                            "n_positive",
                            "density_per_mm2",
                            "pct_positive",
                            "area_fraction_pct",
                        )
                    }
                    for r in result.summary.to_dict("records")
                },
            )
            truth_csv = path.with_name(f"{name}.cells.csv")
            if truth_csv.is_file():
                truth = pd.read_csv(truth_csv)
                m = evaluate_cells(cells, truth, 4.0 / info["mpp"])
                summary["truth"] = {
                    "f1_cells": round(m["f1"], 3),
                    "f1_positive": round(m["pos_f1"], 3),
                    **_truth_by_compartment(truth, result),
                }
        summaries.append(summary)
        if console is not None:
            _print_slide(console, info, summary)
    text = json.dumps(summaries, indent=2)
    atomic_write(output / "demo_summary.json", lambda p: p.write_text(text))
    if tables:
        table = pd.concat(tables, ignore_index=True)
        atomic_write(output / "summary.csv", lambda p: table.to_csv(p, index=False))
    if console is not None:
        console.print(
            f"results in {output}/: summary.csv, demo_summary.json, and per slide a "
            "report.html with its overlay, heatmap, cells and regions"
        )
    return summaries


def _print_slide(console: Any, info: dict, summary: dict) -> None:
    console.print(
        f"  {info['width_px']} x {info['height_px']} px at {info['mpp']:.3f} µm/px, "
        f"tissue {summary['tissue_area_mm2']:.2f} mm², stains {summary['stain_source']}"
    )
    if "marker" not in summary:
        return
    marker, truth = summary["marker"], summary.get("truth", {})
    line = f"  {summary['n_cells']} cells, {summary['n_positive']} {marker}-positive"
    if truth:
        line += f"; detection F1 all {truth['f1_cells']:.3f}, positive {truth['f1_positive']:.3f}"
    console.print(line)
    for comp in ("intratumoral", "stromal"):
        c = summary["compartments"][comp]
        line = (
            f"  {comp:<12} {c['pct_positive']:5.1f}% positive, "
            f"{c['density_per_mm2']:6.1f} {marker}+/mm²"
        )
        if comp in truth:
            t = truth[comp]
            line += f"   (truth {t['pct_positive']:5.1f}%, {t['density_per_mm2']:6.1f}/mm²)"
        console.print(line)
