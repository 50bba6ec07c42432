"""``tilscore demo``: run the pipeline (as far as it exists) on the bundled example slides.

For now: slide info, a thumbnail, the tissue mask and stain QC per slide, written to one folder,
with a summary table on screen. Later stages (detection, scoring) extend this.
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
        summaries.append(summary)
        if console is not None:
            console.print(
                f"  {info['width_px']} x {info['height_px']} px at {info['mpp']:.3f} µm/px, "
                f"tissue {summary['tissue_area_mm2']:.2f} mm², stains {summary['stain_source']}"
            )
    (output / "demo_summary.json").write_text(json.dumps(summaries, indent=2))
    if console is not None:
        console.print(f"results in {output}/ (demo_summary.json, one folder per slide)")
    return summaries
