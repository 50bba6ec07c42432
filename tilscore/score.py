"""Scoring: cells and compartments into the numbers a study reports.

:func:`score_slide` (a slide file or :class:`~tilscore.slide.Slide`) and :func:`score_image` (an
RGB array with its µm/px) run the whole pipeline: stain QC (tissue, glass brightness, stain
vectors), cell detection, regions (annotations, or automatic tumour/stroma segmentation from the
detector's nucleus classes), compartments, and per-compartment metrics. :func:`iter_score_slide`
is the same as a generator yielding progress ``(stage, done, total)``: the CLI draws a progress
bar from it and the napari widget runs it in a worker it can cancel.

Per compartment (:data:`tilscore.regions.COMPARTMENTS`):

=====================  ==========================================================================
area_mm2               compartment area after exclusions (mm²)
n_cells                all detected nucleated cells
n_positive             marker-positive cells
density_per_mm2        positive cells per mm²
cell_density_per_mm2   all cells per mm²
pct_positive           100 x positive / all cells (the IHC "% positive")
area_fraction_pct      100 x area of positive cells / compartment area (TILs-WG analogue)
n_bin0 .. n_bin3       cells per intensity bin (0 = negative, 1+, 2+, 3+)
h_score                1 x %1+ + 2 x %2+ + 3 x %3+ over all cells (0-300)
=====================  ==========================================================================
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import platform
import time
import warnings
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import RegionError, TilscoreWarning
from .evaluate import to_jsonable
from .progress import run_to_end

if TYPE_CHECKING:  # pragma: no cover
    from .regions import Compartments, RegionSet
    from .slide import Slide

__all__ = ["SUMMARY_COLUMNS", "SlideResult", "iter_score_slide", "score_image", "score_slide"]

SUMMARY_COLUMNS = (
    "slide_id",
    "marker",
    "compartment",
    "source",
    "area_mm2",
    "excluded_area_mm2",
    "n_cells",
    "n_positive",
    "density_per_mm2",
    "cell_density_per_mm2",
    "pct_positive",
    "area_fraction_pct",
    "n_bin0",
    "n_bin1",
    "n_bin2",
    "n_bin3",
    "h_score",
)
#: Colours (RGB) of compartments and cells in the overlay.
COLOURS = {
    "intratumoral": (200, 0, 0),
    "stromal": (0, 150, 0),
    "invasive_margin": (230, 170, 0),
    "excluded": (120, 120, 120),
    "positive": (255, 0, 110),
    "negative": (60, 90, 220),
}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (read in 4 MiB chunks).

    A folder (a DICOM slide) is hashed file by file in sorted order, each file's relative
    path and bytes, so that the same folder anywhere gives the same hash.
    """
    h = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        if root.is_dir():
            h.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def _input_size(path: str) -> int:
    """Bytes of a slide file, or of every file of a slide folder (DICOM)."""
    root = Path(path)
    if root.is_dir():
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return os.path.getsize(root)


def _in_thread(fn: Any, *args: Any) -> Future:
    """``fn(*args)`` started in a thread of its own; its result (or error) from ``.result()``."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilscore-hash")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the call


def summarise(
    cells: pd.DataFrame,
    compartments: Compartments,
    mpp_x: float,
    mpp_y: float | None = None,
    *,
    slide_id: str = "",
    marker: str = "",
) -> pd.DataFrame:
    """Per-compartment metrics (one row per compartment) from assigned, classified cells.

    ``cells`` needs ``compartment`` and ``in_margin`` (from
    :meth:`tilscore.regions.Compartments.assign`), ``positive`` and ``intensity_bin``; the area
    fraction uses ``cell_area_um2`` where present.
    """
    from .regions import COMPARTMENTS

    comp = cells["compartment"].to_numpy(object)
    members = {
        "intratumoral": comp == "intratumoral",
        "stromal": comp == "stromal",
        "invasive_margin": cells["in_margin"].to_numpy(bool),
        "tumour_bed": (comp == "intratumoral") | (comp == "stromal"),
        "tissue": np.isin(comp, ("intratumoral", "stromal", "tissue")),
    }
    pos = cells["positive"].to_numpy(bool)
    bins = cells["intensity_bin"].to_numpy(np.int64)
    cell_area = (
        np.nan_to_num(cells["cell_area_um2"].to_numpy(np.float64))
        if "cell_area_um2" in cells.columns
        else np.zeros(len(cells))
    )
    rows = []
    for name in COMPARTMENTS:
        sel = members[name]
        area = compartments.area_mm2(name, mpp_x, mpp_y)
        n = int(sel.sum())
        k = int((sel & pos).sum())
        counts = np.bincount(bins[sel], minlength=4)[:4]
        with np.errstate(invalid="ignore", divide="ignore"):
            rows.append(
                {
                    "slide_id": slide_id,
                    "marker": marker,
                    "compartment": name,
                    "source": compartments.sources[name],
                    "area_mm2": area,
                    "excluded_area_mm2": compartments.excluded_mm2(name, mpp_x, mpp_y),
                    "n_cells": n,
                    "n_positive": k,
                    "density_per_mm2": k / area if area > 0 else np.nan,
                    "cell_density_per_mm2": n / area if area > 0 else np.nan,
                    "pct_positive": 100.0 * k / n if n else np.nan,
                    "area_fraction_pct": (
                        100.0 * cell_area[sel & pos].sum() / (area * 1e6) if area > 0 else np.nan
                    ),
                    "n_bin0": int(counts[0]),
                    "n_bin1": int(counts[1]),
                    "n_bin2": int(counts[2]),
                    "n_bin3": int(counts[3]),
                    "h_score": (
                        100.0 * (counts[1] + 2 * counts[2] + 3 * counts[3]) / n if n else np.nan
                    ),
                }
            )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


@dataclass
class SlideResult:
    """Everything one scoring run produced.

    Attributes
    ----------
    slide_id
        File stem (or the name given).
    path
        The slide file (None for an array).
    marker
        Marker name.
    mpp
        Level-0 µm/px.
    dimensions
        Level-0 (width, height) px.
    summary
        One row per compartment (:data:`SUMMARY_COLUMNS`).
    cells
        The cells table (:data:`tilscore.cells.CELL_COLUMNS`) plus ``compartment`` and
        ``in_margin``.
    regions
        The annotations used (or the automatic regions).
    compartments
        The compartment geometries and their sources.
    provenance
        What was used: versions, model and hash, stains, thresholds, config, input hash, time.
    thumbnail
        Optional RGB overview for the overlay and the report, with its downsample.
    scored_area
        The scored area before exclusions (level-0 px geometry; None: unknown); a review
        rebuilds the compartments from it when regions are edited.
    """

    slide_id: str
    path: str | None
    marker: str
    mpp: float
    dimensions: tuple[int, int]
    summary: pd.DataFrame
    cells: pd.DataFrame
    regions: RegionSet
    compartments: Compartments
    provenance: dict[str, Any]
    thumbnail: np.ndarray | None = field(default=None, repr=False)
    thumbnail_downsample: float = 1.0
    scored_area: Any = field(default=None, repr=False)

    @property
    def reviewed(self) -> bool:
        """Whether this is a reviewed result (``provenance["review"]``, see tilscore.review)."""
        return bool(self.provenance.get("review"))

    def row(self, compartment: str) -> dict[str, Any]:
        """The summary row of one compartment as a dict."""
        sel = self.summary[self.summary["compartment"] == compartment]
        if sel.empty:
            raise KeyError(compartment)
        return sel.iloc[0].to_dict()

    def reclassify(self, keep_manual: bool = True, **overrides: Any) -> SlideResult:
        """A new result with the marker rule's values replaced; no detection is re-run.

        ``overrides`` are :class:`~tilscore.markers.MarkerRule` fields (``threshold_od=0.2``...).
        Cells called positive or negative by hand in a review (``manual_positive``) keep that
        call unless ``keep_manual`` is False.
        """
        from .markers import MarkerRule, classify_cells

        rule = MarkerRule.from_dict(self.provenance["detection"]["marker"]).with_overrides(
            **overrides
        )
        cells = classify_cells(self.cells, rule)
        if "manual_positive" in cells.columns:
            from .review import apply_manual_calls

            cells = apply_manual_calls(cells, rule, keep_manual)
        summary = summarise(
            cells, self.compartments, self.mpp, slide_id=self.slide_id, marker=self.marker
        )
        for extra in [c for c in self.summary.columns if c not in summary.columns]:
            summary[extra] = self.summary[extra].iloc[0] if len(self.summary) else None
        prov = json.loads(json.dumps(self.provenance))
        prov["detection"]["marker"] = rule.to_dict()
        if prov.get("review"):  # the reviewed score as it now stands
            from .review_log import QUOTED

            prov["review"]["summary_after"] = {
                str(r["compartment"]): to_jsonable({k: r[k] for k in QUOTED})
                for r in summary.to_dict("records")
            }
        prov.setdefault("reclassified", []).append(
            {"overrides": to_jsonable(overrides), "time": _now()}
        )
        return replace(self, cells=cells, summary=summary, provenance=prov)

    # -- outputs ----------------------------------------------------------------------------

    def _counted_positive(self) -> pd.DataFrame:
        """The positive cells that are counted: not in an exclusion (ink, frames, pigment,
        exclude regions) and not outside the scored tissue."""
        cells = self.cells
        keep = cells["positive"].to_numpy(bool)
        if "compartment" in cells.columns:
            keep = keep & ~cells["compartment"].isin(["excluded", "outside"]).to_numpy(bool)
        return cells[keep]

    def overlay_image(self, max_size: int = 1600) -> np.ndarray:
        """RGB overview with compartment outlines and positive cells (for overlay.png)."""
        from PIL import Image, ImageDraw

        base, ds = self._base(max_size)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img, "RGBA")
        for name in ("stromal", "intratumoral", "invasive_margin"):
            _draw_geom(draw, self.compartments.geometries[name], ds, COLOURS[name], width=2)
        _draw_geom(draw, self.compartments.excluded, ds, COLOURS["excluded"], width=2)
        pos = self._counted_positive()
        r = 3.0
        for x, y in zip(pos["x"].to_numpy() / ds, pos["y"].to_numpy() / ds):
            draw.ellipse(
                [x - r, y - r, x + r, y + r],
                fill=(*COLOURS["positive"], 255),
                outline=(255, 255, 255, 255),
            )
        _legend(
            draw,
            [
                ("intratumoral", COLOURS["intratumoral"]),
                ("stromal", COLOURS["stromal"]),
                ("invasive margin", COLOURS["invasive_margin"]),
                ("excluded (regions, ink)", COLOURS["excluded"]),
                (f"{self.marker}+ cell", COLOURS["positive"]),
            ],
        )
        return np.asarray(img)

    def heatmap_image(self, cell_um: float = 100.0, max_size: int = 1600) -> np.ndarray:
        """RGB density heatmap of positive cells (per mm², bins of ``cell_um`` µm) on the slide."""
        import cv2
        from PIL import Image, ImageDraw

        base, ds = self._base(max_size)
        w0, h0 = self.dimensions
        bin_px = cell_um / self.mpp
        nx, ny = max(1, int(np.ceil(w0 / bin_px))), max(1, int(np.ceil(h0 / bin_px)))
        pos = self._counted_positive()
        counts, _, _ = np.histogram2d(
            pos["y"].to_numpy(),
            pos["x"].to_numpy(),
            bins=(ny, nx),
            range=((0, ny * bin_px), (0, nx * bin_px)),
        )
        density = counts / (cell_um * cell_um / 1e6)
        vmax = float(np.percentile(density[density > 0], 99)) if (density > 0).any() else 1.0
        norm = np.clip(density / max(vmax, 1e-9), 0, 1)
        h, w = base.shape[:2]
        big = cv2.resize(
            norm.astype(np.float32),
            (round(nx * bin_px / ds), round(ny * bin_px / ds)),
            interpolation=cv2.INTER_NEAREST,
        )[:h, :w]
        big = np.pad(big, ((0, h - big.shape[0]), (0, w - big.shape[1])))
        colour = cv2.applyColorMap((big * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
        # coloured where cells were counted (zero density included); elsewhere no data
        scored = _raster(self.compartments.geometries["tissue"], ds, (h, w))
        alpha = np.where(scored, 0.75, 0.0)[..., None]
        out = (base * (1 - alpha) + colour * alpha).astype(np.uint8)
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img, "RGBA")
        _draw_geom(draw, self.compartments.geometries["tumour_bed"], ds, (255, 255, 255), width=1)
        bar = cv2.applyColorMap(
            np.linspace(0, 255, 200).astype(np.uint8)[None].repeat(12, 0), cv2.COLORMAP_INFERNO
        )[..., ::-1]
        img.paste(Image.fromarray(np.ascontiguousarray(bar)), (10, h - 42))
        # ASCII units: Pillow's built-in font has no "²" or "µ"
        draw.text(
            (10, h - 26),
            f"0 - {vmax:.0f} {self.marker}+ cells per mm2 ({cell_um:.0f} um bins)",
            fill=(0, 0, 0, 255),
            font=_font(),
        )
        return np.asarray(img)

    def _base(self, max_size: int) -> tuple[np.ndarray, float]:
        if self.thumbnail is None:
            w0, h0 = self.dimensions
            ds = max(w0, h0) / max_size
            return np.full((round(h0 / ds), round(w0 / ds), 3), 255, np.uint8), ds
        th = self.thumbnail
        ds = self.thumbnail_downsample
        scale = min(1.0, max_size / max(th.shape[:2]))
        if scale < 1.0:
            import cv2

            th = cv2.resize(
                th,
                (round(th.shape[1] * scale), round(th.shape[0] * scale)),
                interpolation=cv2.INTER_AREA,
            )
            ds = ds / scale
        return np.ascontiguousarray(th), ds

    def to_html(self, images: dict[str, np.ndarray | bytes] | None = None) -> str:
        """A self-contained HTML report (images, arrays or PNG bytes, embedded as PNG data)."""
        images = (
            images
            if images is not None
            else {
                "overlay": self.overlay_image(),
                "heatmap": self.heatmap_image(),
            }
        )
        return _report_html(self, images)

    def save(self, folder: str | os.PathLike, config: Any = None) -> dict[str, Path]:
        """Write the outputs into ``folder`` (each file atomically); returns name -> path.

        summary.csv, cells.parquet, cells.geojson (QuPath detections), regions.geojson (the
        regions used, QuPath annotations; compartments included), overlay.png, heatmap.png,
        run.json (provenance) and report.html, as ``[output]`` in the config says.
        """
        from .config import load_config
        from .export import atomic_write, encode_png, write_cells, write_png

        cfg = load_config(config if config is not None else self.provenance.get("config"))
        out_cfg = cfg["output"]
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        files["summary"] = atomic_write(
            folder / "summary.csv", lambda p: self.summary.to_csv(p, index=False)
        )
        if out_cfg["cells_parquet"]:
            files["cells"] = write_cells(self.cells, folder / "cells.parquet")
        if out_cfg["cells_geojson"]:
            files["cells_geojson"] = write_cells(self.cells, folder / "cells.geojson")
        if out_cfg["regions_geojson"]:
            files["regions"] = self.compartment_regions().save(folder / "regions.geojson")
        from .results import write_compartments  # a review recounts from these geometries

        files["compartments"] = write_compartments(self, folder / "compartments.geojson")
        images: dict[str, np.ndarray | bytes] = {}  # each image encoded once: file and report
        if out_cfg["overlay"] or out_cfg["report"]:
            images["overlay"] = encode_png(self.overlay_image())
        if out_cfg["heatmap"] or out_cfg["report"]:
            images["heatmap"] = encode_png(self.heatmap_image(out_cfg["heatmap_cell_um"]))
        if out_cfg["overlay"]:
            files["overlay"] = write_png(images["overlay"], folder / "overlay.png")
        if out_cfg["heatmap"]:
            files["heatmap"] = write_png(images["heatmap"], folder / "heatmap.png")
        prov = json.dumps(to_jsonable(self.provenance), indent=1)
        files["run"] = atomic_write(folder / "run.json", lambda p: p.write_text(prov))
        if out_cfg["report"]:
            text = self.to_html(images)
            files["report"] = atomic_write(
                folder / "report.html", lambda p: p.write_text(text, encoding="utf-8")
            )
        return files

    def compartment_regions(self) -> RegionSet:
        """The regions used plus the computed compartments, as one RegionSet (for GeoJSON).

        Annotated and automatic regions keep their class; the computed stroma, margin band and
        scored tissue are added as "stroma", "margin" and "roi" regions named for what they are.
        """
        from .regions import Region, RegionSet

        out = list(self.regions.regions)
        g = self.compartments.geometries
        have = {r.cls for r in out}
        for cls, name, comp in (
            ("tumour", "Tumor", "intratumoral"),
            ("stroma", "Stroma", "stromal"),
            ("margin", "Margin", "invasive_margin"),
        ):
            if cls not in have and not g[comp].is_empty:
                out.append(Region(cls, g[comp], name))
        return RegionSet(out, self.regions.source)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _draw_geom(draw: Any, geom: Any, ds: float, colour: tuple[int, int, int], width: int) -> None:
    if geom is None or geom.is_empty:
        return
    polys = geom.geoms if hasattr(geom, "geoms") else [geom]
    for p in polys:
        if p.geom_type != "Polygon":
            continue
        for ring in [p.exterior, *p.interiors]:
            xy = [(x / ds, y / ds) for x, y in ring.coords]
            if len(xy) > 1:
                draw.line(xy, fill=(*colour, 255), width=width)


def _raster(geom: Any, ds: float, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask of a (multi)polygon in level-0 px on an image downsampled by ``ds``."""
    import cv2

    out = np.zeros(shape, np.uint8)
    if geom is None or geom.is_empty:
        return out.astype(bool)
    polys = geom.geoms if hasattr(geom, "geoms") else [geom]
    for p in polys:
        if p.geom_type != "Polygon":
            continue
        shell = np.round(np.asarray(p.exterior.coords) / ds).astype(np.int32)
        cv2.fillPoly(out, [shell], 1)
        holes = [np.round(np.asarray(r.coords) / ds).astype(np.int32) for r in p.interiors]
        if holes:
            cv2.fillPoly(out, holes, 0)
    return out.astype(bool)


def _font(size: int = 16) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _legend(draw: Any, items: list[tuple[str, tuple[int, int, int]]]) -> None:
    y = 8
    draw.rectangle([4, 4, 235, 10 + 20 * len(items)], fill=(255, 255, 255, 210))
    for label, colour in items:
        draw.rectangle([8, y + 3, 20, y + 15], fill=(*colour, 255))
        draw.text((26, y), label, fill=(0, 0, 0, 255), font=_font())
        y += 20


def _png_b64(image: np.ndarray | bytes) -> str:
    from .export import encode_png

    return base64.b64encode(image if isinstance(image, bytes) else encode_png(image)).decode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if not np.isfinite(v) else f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return html.escape(str(v))


def _report_html(res: SlideResult, images: dict[str, np.ndarray | bytes]) -> str:
    prov = res.provenance
    det = prov.get("detection", {})
    rule = det.get("marker", {})
    cols = [
        ("compartment", "Compartment"),
        ("source", "Source"),
        ("area_mm2", "Area (mm²)"),
        ("excluded_area_mm2", "Excluded (mm²)"),
        ("n_cells", "Cells"),
        ("n_positive", f"{res.marker}+"),
        ("density_per_mm2", f"{res.marker}+ / mm²"),
        ("pct_positive", "% positive"),
        ("area_fraction_pct", "Area fraction (%)"),
        ("h_score", "H-score"),
    ]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r[c])}</td>" for c, _ in cols) + "</tr>"
        for r in res.summary.to_dict("records")
    )
    figs = "".join(
        f'<figure><img alt="{k}" src="data:image/png;base64,{_png_b64(v)}">'
        f"<figcaption>{html.escape(_CAPTIONS.get(k, k))}</figcaption></figure>"
        for k, v in images.items()
    )
    warn = prov.get("warnings") or []
    warn_html = (
        "<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warn) + "</ul>"
        if warn
        else ""
    )
    facts = [
        ("Slide", res.path or res.slide_id),
        ("Marker", f"{res.marker}: {rule.get('description', '')}"),
        (
            "Positive if",
            f"{rule.get('measure')} DAB OD ≥ {rule.get('threshold_od')} "
            f"(nucleus class {', '.join(rule.get('cell_classes', []))})",
        ),
        (
            "Detector",
            f"{det.get('detector')} {det.get('model') or ''} "
            f"{(det.get('model_sha256') or '')[:12]} at {det.get('mpp')} µm/px",
        ),
        ("Pixel size", f"{res.mpp:.4f} µm/px, {res.dimensions[0]} x {res.dimensions[1]} px"),
        ("Regions", prov.get("regions", {}).get("source", "")),
        ("tilscore", prov.get("tilscore_version", "")),
        ("Scored", prov.get("finished", "")),
    ]
    facts_html = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts
    )
    prov_text = html.escape(json.dumps(to_jsonable(prov), indent=1))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>tilscore: {html.escape(res.slide_id)} {html.escape(res.marker)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f2f2f2; }} .facts th, .facts td {{ text-align: left; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; max-width: 100%; }}
img {{ max-width: 100%; border: 1px solid #ccc; }} figcaption {{ font-size: 90%; color: #555; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 80%; }}
</style></head><body>
<h1>{html.escape(res.slide_id)} — {html.escape(res.marker)}</h1>
<table class="facts">{facts_html}</table>
<h2>Per compartment</h2>
<table><tr>{head}</tr>{body}</table>
<p>% positive = positive cells / all detected nucleated cells; area fraction = area of positive
cells / compartment area (the IHC analogue of the TILs Working Group's stromal TIL %); the invasive
margin overlaps the tumour bed's edge and the tissue around it. Exclusions are removed from every
compartment.</p>
{_review_html(res)}{warn_html}
<h2>Images</h2>{figs}
<details><summary>Provenance (run.json)</summary><pre>{prov_text}</pre></details>
</body></html>
"""


def _review_html(res: SlideResult) -> str:
    """The report's review section: what was changed, by whom, and the score before / after."""
    rev = res.provenance.get("review")
    if not rev:
        return ""
    c = rev.get("counts", {})
    head = (
        f"<p>{c.get('added', 0)} cells added, {c.get('removed', 0)} removed, "
        f"{c.get('flipped', 0)} flipped, {c.get('class_changed', 0)} re-classed, "
        f"{c.get('moved', 0)} moved, {c.get('region_edits', 0)} region edits "
        f"({c.get('edits', 0)} edits in {html.escape(str(rev.get('log', 'review.jsonl')))}, "
        f"by {html.escape(', '.join(rev.get('users', [])))}, "
        f"{html.escape(str(rev.get('first_edit')))} to {html.escape(str(rev.get('last_edit')))})."
        "</p>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(b.get('n_positive'))}</td>"
        f"<td>{_fmt(a.get('n_positive'))}</td><td>{_fmt(b.get('density_per_mm2'))}</td>"
        f"<td>{_fmt(a.get('density_per_mm2'))}</td><td>{_fmt(b.get('pct_positive'))}</td>"
        f"<td>{_fmt(a.get('pct_positive'))}</td></tr>"
        for k, b in rev.get("summary_before", {}).items()
        for a in [rev.get("summary_after", {}).get(k, {})]
    )
    return (
        f"<h2>Review</h2>{head}<table><tr><th>Compartment</th><th>{res.marker}+ before</th>"
        f"<th>after</th><th>per mm² before</th><th>after</th><th>% positive before</th>"
        f"<th>after</th></tr>{rows}</table>"
    )


_CAPTIONS = {
    "overlay": "Compartments (red: tumour nests, green: stroma, yellow: invasive margin) and "
    "positive cells.",
    "heatmap": "Density of positive cells per mm² over the scored tissue (uncoloured: not scored).",
}


# -- the pipeline -------------------------------------------------------------------------------


def _scope(regions: RegionSet | None, margin_um: float, mpp: float) -> Any:
    """The area to detect in: the roi, else the annotations grown by half the margin band."""
    import shapely

    if regions is None or len(regions) == 0:
        return None
    if regions.has("roi"):
        return regions.geometry("roi")
    parts = [regions.geometry(c) for c in ("tumour", "stroma", "tumour_bed", "margin")]
    parts = [p for p in parts if not p.is_empty]
    if not parts:
        return None
    return shapely.buffer(shapely.union_all(parts), margin_um / 2 / mpp, quad_segs=8)


def _keep_annotations(
    reg: RegionSet, tissue: Any, artefacts: Any, max_removed: float, name: str
) -> Any:
    """The annotations that the tissue mask would cut by more than ``max_removed`` (their share),
    with a warning naming the share; None when the mask only takes clear glass from them.

    The user's regions are the truth: only glass may be taken from them, and where the automatic
    mask would take more than a small share, the annotation is scored as drawn.
    """
    import shapely

    covered = tissue if artefacts is None else shapely.union(tissue, artefacts)
    shapely.prepare(covered)
    keep = []
    for r in reg:
        if r.cls in ("exclude", "roi") or r.geometry.is_empty or r.geometry.area <= 0:
            continue
        # what the mask takes as glass (ink and pigment are exclusions, counted apart)
        removed = shapely.difference(r.geometry, covered).area / r.geometry.area
        if removed > max_removed:
            keep.append(r.geometry)
            warnings.warn(
                f"{name}: the tissue mask would remove {removed:.0%} of the "
                f"{r.name or r.cls} annotation as glass; it is scored as drawn "
                "(draw it on the tissue, or add an exclude region where there is none)",
                TilscoreWarning,
                stacklevel=3,
            )
    return shapely.union_all(keep) if keep else None


def iter_score_slide(
    source: str | os.PathLike | Slide | np.ndarray,
    marker: str = "CD8",
    regions: Any = None,
    config: Any = None,
    *,
    mpp: float | None = None,
    slide_id: str | None = None,
    qc: Any = None,
    **overrides: Any,
) -> Generator[tuple[str, int, int], None, SlideResult]:
    """Score a slide step by step, yielding ``(stage, done, total)``; returns the SlideResult.

    Stages: "qc" (tissue and stains), "detect" (one step per tile), "regions", "score".
    See :func:`score_slide` for the parameters; ``qc`` is a :func:`tilscore.qc.slide_stain_qc`
    result already computed for this slide (not computed again).
    """
    from . import __version__
    from .config import load_config
    from .detect import iter_detect_cells
    from .plausible import check_mpp, check_scoring_work, regions_scale_mismatch
    from .qc import slide_stain_qc
    from .regions import RegionSet, auto_regions, build_compartments, load_regions
    from .slide import Slide, open_slide
    from .stain import RUIFROK_HDAB
    from .stain_check import apply_stain_check, check_stains

    started, t0 = _now(), time.perf_counter()
    cfg = load_config(config)
    rule = cfg.marker_rule(marker, **overrides)
    det_cfg, reg_cfg = cfg["detect"], cfg["regions"]
    caught: list[warnings.WarningMessage] = []
    if isinstance(source, Slide):
        slide, owned = source, False
    elif isinstance(source, np.ndarray):
        slide, owned = Slide.from_array(source, mpp), True
    else:
        slide, owned = open_slide(source, mpp=mpp), True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TilscoreWarning)
            path = None if slide.vendor == "array" else str(slide.path)
            check_mpp(slide.mpp, path, slide.mpp_source)  # before hours of work (issue 17)
            check_scoring_work(*slide.dimensions, slide.mpp, path)
            sid = slide_id or (Path(path).name.split(".")[0] if path else "image")
            # the file's hash (provenance) is read in a thread while the stain QC, which
            # uses one core, runs: about a second per GB, otherwise spent at the end
            digest = _in_thread(file_sha256, path) if path else None
            # regions first: a bad file fails before minutes of work
            reg = None
            if regions is not None:
                reg = load_regions(regions, class_map=reg_cfg["class_map"], slide=slide)
            yield "qc", 0, 1
            if qc is None:
                from .tissue import tissue_mask

                qc = slide_stain_qc(
                    slide, tissue=tissue_mask(slide, remove_pen=reg_cfg["exclude_artefacts"])
                )
            # not DAB IHC (H&E, fluorescence, greyscale): refused, or scored with a warning
            stain_check = check_stains(qc)
            stain_verdict = apply_stain_check(stain_check, cfg["stain"]["check"], path or sid)
            stains = RUIFROK_HDAB if cfg["stain"]["vectors"] == "ruifrok" else qc.stains
            background = (
                (255.0, 255.0, 255.0) if cfg["stain"]["background"] == "white" else qc.background
            )
            # the tissue with the ink and pigment on it: those are excluded below, so that
            # their area is reported (excluded_area_mm2) rather than silently missing
            tissue_geom = (
                qc.tissue.polygons_with_artefacts()
                if reg_cfg["exclude_artefacts"]
                else qc.tissue.polygons()
            )
            if tissue_geom.is_empty:
                warnings.warn(
                    f"{path or sid}: no tissue found; every count is zero",
                    TilscoreWarning,
                    stacklevel=2,
                )
            yield "qc", 1, 1
            if (
                reg is not None
                and not tissue_geom.is_empty
                and all(not r.geometry.intersects(tissue_geom) for r in reg)
            ):
                warnings.warn(
                    f"{reg.source}: the regions cover no tissue of {path or sid}",
                    TilscoreWarning,
                    stacklevel=2,
                )
            elif reg is not None and (mismatch := regions_scale_mismatch(reg, tissue_geom)):
                warnings.warn(f"{reg.source}: {mismatch}", TilscoreWarning, stacklevel=2)
            scope = _scope(reg, reg_cfg["margin_width_um"], slide.mpp)
            device = None if det_cfg["device"] == "auto" else det_cfg["device"]
            gen = iter_detect_cells(
                slide,
                marker=rule,
                detector=det_cfg["detector"],
                region=scope,
                stains=stains,
                background=background,
                qc=qc,
                tile_size_px=det_cfg["tile_size_px"],
                halo_px=det_cfg["halo_px"],
                model=det_cfg["model"],
                device=device,
                workers=det_cfg["tile_workers"] or None,
            )
            while True:
                try:
                    done, total = next(gen)
                except StopIteration as stop:
                    cells, settings = stop.value
                    break
                yield "detect", done, total
            yield "regions", 0, 1
            w0, h0 = slide.dimensions
            needs_auto = (
                reg is None
                or not (reg.has("tumour_bed") or reg.has("stroma"))
                or not reg.has("tumour")
            )
            auto = None
            if needs_auto:
                auto = auto_regions(
                    cells,
                    w0,
                    h0,
                    slide.mpp,
                    tissue=tissue_geom if not tissue_geom.is_empty else None,
                    grid_um=reg_cfg["auto_grid_um"],
                    sigma_um=reg_cfg["auto_sigma_um"],
                    min_tumour_fraction=reg_cfg["auto_min_tumour_fraction"],
                    min_density_per_mm2=reg_cfg["auto_min_density_per_mm2"],
                    min_nest_area_um2=reg_cfg["auto_min_nest_area_um2"],
                    bed_margin_um=reg_cfg["auto_bed_margin_um"],
                )
            tissue_scope = tissue_geom if not tissue_geom.is_empty else None
            if reg is not None and reg.has("roi"):
                tissue_scope = scope  # the roi as drawn
            elif scope is not None and tissue_scope is not None:
                import shapely

                tissue_scope = shapely.intersection(tissue_scope, scope)
                kept = _keep_annotations(
                    reg,
                    tissue_geom,
                    qc.tissue.artefact_polygons(),
                    reg_cfg["max_annotation_removed"],
                    path or sid,
                )
                if kept is not None:  # annotations the mask would cut: scored as drawn
                    tissue_scope = shapely.union(tissue_scope, kept)
            elif scope is not None:
                tissue_scope = scope
            artefacts = qc.tissue.artefact_polygons() if reg_cfg["exclude_artefacts"] else None
            comps = build_compartments(
                reg,
                tissue_scope,
                slide.mpp,
                reg_cfg["margin_width_um"],
                automatic=auto,
                artefacts=artefacts,
            )
            yield "regions", 1, 1
            yield "score", 0, 1
            label, in_margin = comps.assign(cells["x"], cells["y"])
            cells = cells.copy(deep=False)  # new columns only: the measurements are not copied
            cells["compartment"] = pd.Categorical(
                label, categories=["intratumoral", "stromal", "tissue", "excluded", "outside"]
            )
            cells["in_margin"] = in_margin
            summary = summarise(
                cells, comps, slide.mpp_x, slide.mpp_y, slide_id=sid, marker=rule.name
            )
            summary["stain_check"] = stain_verdict  # after SUMMARY_COLUMNS (issue 17)
            # the stain QC's overview (whole slide, read once) serves the overlay and heatmap
            thumb = qc.overview
            thumb_ds = slide.dimensions[0] / thumb.shape[1]
            regions_used = reg if reg is not None else (auto or RegionSet([], "automatic"))
            if reg is not None and auto is not None and len(auto):
                regions_used = RegionSet(
                    [*reg.regions, *[r for r in auto if not reg.has(r.cls)]],
                    f"{reg.source} + automatic",
                )
            yield "score", 1, 1
        prov = {
            "tilscore_version": __version__,
            "slide": {
                "path": path,
                "slide_id": sid,
                "vendor": slide.vendor,
                "dimensions": list(slide.dimensions),
                "mpp": slide.mpp,
                "mpp_source": slide.mpp_source,
                "file_size": _input_size(path) if path else None,
                "file_sha256": digest.result() if digest is not None else None,
            },
            "detection": settings.to_dict(),
            "stain_qc": {
                "estimated_stains": qc.stains.to_dict(),
                "estimated_background": [float(v) for v in qc.background],
                "tissue": qc.tissue.to_dict(),
                "stain_check": stain_check.to_dict(),
            },
            "regions": {
                "source": regions_used.source if (reg is not None or auto) else "none",
                "compartment_sources": comps.sources,
                "margin_width_um": reg_cfg["margin_width_um"],
            },
            "config": cfg.to_dict(),
            "config_sha256": cfg.hash(),
            "started": started,
            "finished": _now(),
            "seconds": round(time.perf_counter() - t0, 2),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "warnings": [str(w.message) for w in caught],
        }
        for w in caught:  # pass them on to the caller too
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return SlideResult(
            slide_id=sid,
            path=path,
            marker=rule.name,
            mpp=slide.mpp,
            dimensions=tuple(slide.dimensions),
            summary=summary,
            cells=cells,
            regions=regions_used,
            compartments=comps,
            provenance=prov,
            thumbnail=thumb,
            thumbnail_downsample=thumb_ds,
            scored_area=tissue_scope,
        )
    finally:
        if owned:
            slide.close()


def score_slide(
    source: str | os.PathLike | Slide,
    marker: str = "CD8",
    regions: Any = None,
    config: Any = None,
    *,
    mpp: float | None = None,
    slide_id: str | None = None,
    **overrides: Any,
) -> SlideResult:
    """Score one slide: cells, compartments and per-compartment metrics.

    Parameters
    ----------
    source
        A slide path or an open :class:`~tilscore.slide.Slide`.
    marker
        Marker preset name (or one defined in the config's ``[markers.NAME]``).
    regions
        Annotations: a QuPath GeoJSON path or object, a mask image path, a
        :class:`~tilscore.regions.RegionSet`; None = automatic tumour/stroma segmentation.
        Compartments that the annotations leave open are filled automatically; the result says
        which source each compartment came from.
    config
        A TOML path, dict or :class:`~tilscore.config.Config` (every parameter of every stage).
    mpp
        µm/px for a file that does not record it.
    slide_id
        Name in the results (default: the file name up to its first dot).
    **overrides
        Marker-rule values (``threshold_od=0.2``), over the config's.

    Returns
    -------
    SlideResult
    """
    return run_to_end(
        iter_score_slide(source, marker, regions, config, mpp=mpp, slide_id=slide_id, **overrides)
    )


def score_image(
    image: np.ndarray,
    mpp: float,
    marker: str = "CD8",
    regions: Any = None,
    config: Any = None,
    *,
    slide_id: str = "image",
    **overrides: Any,
) -> SlideResult:
    """Score an RGB image in memory (a field or a tile) whose pixel size is ``mpp`` µm/px.

    As :func:`score_slide`; regions are in the image's pixel coordinates.
    """
    if not isinstance(image, np.ndarray):
        raise RegionError(f"score_image needs a numpy array, got {type(image).__name__}")
    return run_to_end(
        iter_score_slide(image, marker, regions, config, mpp=mpp, slide_id=slide_id, **overrides)
    )
